"""How far an optimizer moves from itself after a tiny nudge: the floor of a pointwise prediction.

    PYTHONPATH=src python benchmarks/self_distance.py ENTRY [--seed 0] [--at 0,353] [--sizes 1e-6,1e-4,eps]
        [--directions 1]

ENTRY is a leaderboard entry of any suite (``matrix_factorization-rmsprop``, ``matrix_factorization``, ...).
Runs its optimizer from w0 and every model of the entry (the suite's processes, each from w0), then the
optimizer again from its own iterate at step k moved by delta, |delta| = size (``eps``: its rounding, eps
||w_k||) along a fixed random direction (``eosflow.anchored.nudged`` with keys 1 .. ``--directions``), for
every k of ``--at``, every size and every direction. Prints, per run, two time averages over the whole run
(0 before k for a nudged run), as on the leaderboard:

- ``<d>``: <||w_opt(t) - w(t)||>, the leaderboard's distance, and its ratio to the yardstick's (gradient
  flow for GD, the optimizer's stable flow otherwise): ``rel. distance``;
- ``<c>``: <||e_t + e_(t+1)|| / 2>, e = w_opt - w, the distance between the midpoints of consecutive
  steps, where a period-2 oscillation of constant amplitude cancels whichever its phase (the experiment's
  ``centre_distance``, the same values one step later), and its ratio to the
  yardstick's: ``rel. centre distance``;
- ``loss error (avg)``: the window-averaged loss error against the optimizer's loss
  (``compare.averaged_loss_error``, over the leaderboard's 101-step window and over 401 steps), scored from step
  ``--from-step`` on (0 by default), and for a run nudged at step k from step k on if that is later (the steps
  before it are the optimizer's own). A nudged copy whose loss error is large is a run of the same optimizer
  that the smoothed loss cannot tell apart from a prediction error: a model is not expected to score below it.

Each process advances in one piece (a run grows its tracked eigenspace between chunks, so the models that use
their eigenpairs differ from the leaderboard's rows in the 3rd digit). A nudged optimizer whose <d> is large
while its <c> stays small has kept its centre and flipped the phase of its oscillation: the optimizer does not
determine its own phase to that size, so no model can predict it pointwise, and <d> then measures the
oscillation's amplitude rather than a model's error.
"""

from __future__ import annotations

import argparse
import copy
import itertools

import numpy as np

from eosflow.anchored import nudged
from eosflow.compare import averaged_loss_error, baseline_of
from eosflow.experiment import prepare
from eosflow.leaderboard import suite_entries, suite_tables
from eosflow.precision import precision


def distances(reference: np.ndarray, positions: np.ndarray, first: int = 0) -> tuple[float, float]:
    """(<||e_t||>, <||e_t + e_(t+1)|| / 2>) over the run, e = reference - positions from step ``first`` on
    (0 before it; ``positions`` holds the steps from ``first``)."""
    e = np.zeros_like(reference)
    e[first:] = reference[first:] - positions
    return float(np.linalg.norm(e, axis=1).mean()), float((np.linalg.norm(e[:-1] + e[1:], axis=1) / 2).mean())


def loss_errors(reference: np.ndarray, predicted: np.ndarray, first: int) -> tuple[float, float]:
    """Window-averaged loss error of ``predicted`` against ``reference`` over steps [first, end), windows 101, 401."""
    return tuple(averaged_loss_error(predicted[first:], reference[first:], window) for window in (101, 401))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entry")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--at", default="0", help="comma-separated steps k at which the optimizer is nudged")
    parser.add_argument(
        "--sizes", default="1e-6,1e-4", help="comma-separated nudge sizes |delta|; eps: the rounding eps ||w_k||"
    )
    parser.add_argument("--directions", type=int, default=1, help="nudge along this many random directions each")
    parser.add_argument("--from-step", type=int, default=0, help="score the models' loss from this step on")
    args = parser.parse_args()
    entries = {entry.name: entry for entry in suite_entries("all")}
    if args.entry not in entries:
        raise SystemExit(f"ENTRY: {args.entry!r} is in no suite; choose from {', '.join(entries)}")
    table = copy.deepcopy(suite_tables(suite=(entries[args.entry],))[args.entry])
    table["seed"] = args.seed
    steps = int(table["steps"])
    at = [int(k) for k in args.at.split(",")]
    sizes = [None if s == "eps" else float(s) for s in args.sizes.split(",")]
    if min(at) < 0 or max(at) >= steps - 1:
        raise SystemExit(f"--at: each step must lie in [0, {steps - 2}] ({args.entry} runs {steps} steps)")
    with precision(table["dtype"]):
        _, problem, _, processes = prepare(table)
        names = list(processes)
        optimizer = processes[names[0]]
        start = optimizer.init(problem.w0)
        reference_rows = optimizer.advance(start, steps)[1]
        reference = np.asarray(reference_rows["position"], np.float64).reshape(steps, -1)
        reference_loss = np.asarray(reference_rows["loss"], np.float64)
        yardstick = baseline_of(names[0])
        rows = {}
        for name in names[1:]:
            process = processes[name]
            series = process.advance(process.init(problem.w0), steps)[1]
            positions = np.asarray(series["position"], np.float64)
            predicted = np.asarray(series.get("predicted_loss", series["loss"]), np.float64)
            rows[name] = distances(reference, positions.reshape(steps, -1)) + loss_errors(
                reference_loss, predicted, args.from_step
            )
        for k in at:
            state = optimizer.advance(start, k)[0] if k else start
            for size, key in itertools.product(sizes, range(1, args.directions + 1)):
                rows_k = optimizer.advance(nudged(state, size, key), steps - k)[1]
                positions = np.asarray(rows_k["position"], np.float64).reshape(steps - k, -1)
                nudged_loss = np.concatenate([reference_loss[:k], np.asarray(rows_k["loss"], np.float64)])
                label = "eps ||w||" if size is None else f"{size:g}"
                direction = f", direction {key}" if args.directions > 1 else ""
                rows[f"{names[0]} moved {label} at step {k}{direction}"] = distances(
                    reference, positions, k
                ) + loss_errors(reference_loss, nudged_loss, max(k, args.from_step))
    base = rows.get(yardstick, (np.nan,) * 4)
    print(f"{args.entry}, seed {args.seed}: {steps} steps; ratios to {yardstick}")
    print("| run | <d> | rel. distance | <c> | rel. centre distance | loss error (avg), 101 | over 401 |")
    print("|---|---|---|---|---|---|---|")
    for name, (d, c, loss101, loss401) in rows.items():
        print(f"| {name} | {d:.4g} | {d / base[0]:.3f} | {c:.4g} | {c / base[1]:.3f} | {loss101:.3f} | {loss401:.3f} |")


if __name__ == "__main__":
    main()
