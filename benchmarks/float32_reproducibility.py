"""Is a float32 leaderboard entry's run bitwise the same as another's (another commit, other XLA threading)?

    PYTHONPATH=src python benchmarks/float32_reproducibility.py OUT [--entry resnet_digits]
        [--models central_flow,edge_flow,free_energy] [--against OTHER/series.npz]

Runs the architectures entry (``leaderboard.ARCHITECTURES``) with GD and ``--models`` into ``OUT``
(``experiment.run``), saves every process's loss and eigenvalue series in ``OUT/series.npz`` and prints the
compare metrics of each model (loss and envelope errors, pointwise and window-averaged). With
``--against``, it says for each series whether it is bitwise equal to the other run's, or where it first
differs and by how much. Run it from a worktree of another commit (with that commit's ``src`` on
PYTHONPATH), or under other ``XLA_FLAGS``, to tell a code change from XLA's reduction order
(docs/leaderboard.md, the ResNet cells).
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import numpy as np

from eosflow.compare import compare_run
from eosflow.experiment import run
from eosflow.leaderboard import ARCHITECTURES
from eosflow.load import load

METRICS = ["loss_error", "envelope_error", "loss_error_averaged", "envelope_error_averaged"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--entry", default="resnet_digits")
    parser.add_argument("--models", default="central_flow,edge_flow,free_energy")
    parser.add_argument("--against", type=Path, help="series.npz of another run to compare with, bitwise")
    args = parser.parse_args()
    entry = next((entry for entry in ARCHITECTURES if entry.name == args.entry), None)
    if entry is None:
        raise SystemExit(f"--entry: {args.entry!r} is not in the architectures suite")
    table = copy.deepcopy(entry.table)
    table["processes"] = ["gd", *args.models.split(",")]
    run(table, args.out, overwrite=True)
    ds = load(args.out)
    series = {f"{p}_{v}": ds[v].sel(process=p).values for p in table["processes"] for v in ("loss", "eigenvalues")}
    np.savez(args.out / "series.npz", **series)
    print(f"{args.entry}: XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(compare_run(args.out)[METRICS].to_string())
    if args.against is None:
        return
    with np.load(args.against) as other:
        for name, values in series.items():
            theirs = other[name]
            if np.array_equal(values, theirs, equal_nan=True):
                print(f"{name}: bitwise equal")
                continue
            differs = np.any((values != theirs).reshape(len(values), -1), axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                relative = np.nanmax(np.abs(values - theirs) / np.abs(theirs))
            print(f"{name}: differs from step {int(np.argmax(differs))}, by up to {relative:.2e} relative")


if __name__ == "__main__":
    main()
