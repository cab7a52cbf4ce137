"""Adam's loss at its edge on the matrix factorization, against its rod flow started at Adam's onset.

    PYTHONPATH=src python benchmarks/adam_edge_loss.py [--seed 0] [--set adam_rod_flow.rod_rate=first_order ...]

Runs ``matrix_factorization-adam`` of ``leaderboard.ADAPTIVE_SUITE`` (Adam, its stable flow, its rod flow)
with :func:`eosflow.anchored.anchored` at Adam's onset and prints, for the rod flow (docs/adaptive.md
sections 5b and 6):
- its rel. distance from the onset;
- the window-averaged loss error over 101 (the leaderboard's), 201 and 401 steps;
- its mean predicted loss over the steps after the onset, as a fraction of Adam's mean loss;
- the step of the first loss spike (the first step whose loss exceeds 100x its value at the onset);
- the lowest edge ratio in the 60 steps after that spike;
- both of the last two for Adam too.
``--set`` applies dotted assignments to the spec (e.g. ``adam_rod_flow.substeps=16``).
"""

from __future__ import annotations

import argparse
import copy

import numpy as np

from eosflow.anchored import anchored
from eosflow.compare import averaged_loss_error, compare_dataset
from eosflow.leaderboard import ADAPTIVE_SUITE
from eosflow.spec import set_dotted

ENTRY = "matrix_factorization-adam"
AFTER_SPIKE = 60


def spike(loss: np.ndarray, edge_ratio: np.ndarray) -> tuple[int | None, float]:
    """(index of the first step with loss > 100 x loss[0], lowest edge ratio in the AFTER_SPIKE steps after it)."""
    above = np.flatnonzero(loss > 100.0 * loss[0])
    if not above.size:
        return None, float("nan")
    first = int(above[0])
    return first, float(np.nanmin(edge_ratio[first : first + AFTER_SPIKE]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="dotted assignments applied to the spec")
    args = parser.parse_args()
    entry = next(entry for entry in ADAPTIVE_SUITE if entry.name == ENTRY)
    table = copy.deepcopy(entry.table)
    table.update(seed=args.seed, processes=["adam", "adam_stable_flow", "adam_rod_flow"])
    for assignment in args.set:
        set_dotted(table, assignment)
    ds = anchored(table, "onset")
    k = int(ds.attrs["anchored_at"])
    row = compare_dataset(ds).loc["adam_rod_flow"]
    loss = ds["loss"].sel(process="adam").values
    predicted = ds["predicted_loss"].sel(process="adam_rod_flow").values
    windows = ", ".join(f"{w}: {averaged_loss_error(predicted, loss, w):.3f}" for w in (101, 201, 401))
    print(f"{ENTRY}, seed {args.seed}, onset {k}, {' '.join(args.set) or 'defaults'}")
    print(f"rod flow: rel. distance from onset {row['relative_distance']:.3f}; loss error (avg) over {windows}")
    print(f"mean predicted loss / Adam's mean loss: {predicted.mean() / loss.mean():.3f}")
    for name, series in (("adam", loss), ("adam_rod_flow", predicted)):
        first, lowest = spike(series, ds["edge_ratio"].sel(process=name).values)
        where = "none" if first is None else f"step {k + first}"
        print(f"{name}: first spike {where}, lowest edge ratio in the {AFTER_SPIKE} steps after it {lowest:.2f}")


if __name__ == "__main__":
    main()
