"""How much of a leaderboard cell is the model's sensitivity to its start: the entry from w0 and from w0 moved
by a rounding.

    PYTHONPATH=src python benchmarks/nudged_start.py ENTRY [--suite default] [--models a,b] [--size S] [--key K]
        [--out DIR]

Runs the leaderboard entry (its optimizer, its yardstick and ``--models``, default every model of it) twice,
from the problem's w0 and from w0 moved by ``--size`` (default: the run dtype's rounding, eps ||w0||) along a
random direction (PRNG ``--key``; key 0 is :func:`eosflow.anchored.nudged`'s), and prints every model's
accuracy columns for both starts and their relative change. Where a model's cells move by more than a change
of the code moved them, that change is within the model's own sensitivity to the last bits of its start.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from eosflow.compare import ACCURACY, compare_run
from eosflow.experiment import prepare, run, run_dtype
from eosflow.leaderboard import selected, suite_tables
from eosflow.precision import precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entry")
    parser.add_argument("--suite", default="default")
    parser.add_argument("--models", default="", help="comma-separated models (default: every model of the entry)")
    parser.add_argument("--size", type=float, default=None, help="the move of w0 (default: eps ||w0||)")
    parser.add_argument("--key", type=int, default=0, help="PRNG key of the direction of the move")
    parser.add_argument("--out", type=Path, default=None, help="keep the two run directories here")
    args = parser.parse_args()
    models = args.models.split(",") if args.models else None
    table = suite_tables(models=models, suite=selected(args.suite, [args.entry], models))[args.entry]
    with precision(run_dtype(table)):
        _, problem, _, _ = prepare(table)
        w0 = jnp.asarray(problem.w0)
        direction = jax.random.normal(jax.random.PRNGKey(args.key), w0.shape, w0.dtype)
        size = float(jnp.finfo(w0.dtype).eps * jnp.linalg.norm(w0)) if args.size is None else args.size
        moved = dataclasses.replace(problem, w0=w0 + size * direction / jnp.linalg.norm(direction))
    out = args.out or Path(tempfile.mkdtemp(prefix="nudged_start-"))
    rows = {}
    for label, start in (("w0", None), ("moved", moved)):
        run(table, out / label, overwrite=True, problem=start)
        rows[label] = compare_run(out / label)
    print(f"{args.entry}: w0 moved by {size:.3g} ({table.get('dtype', 'float32')}); runs in {out}")
    print("| process | column | from w0 | from w0 moved | relative change |")
    print("|---|---|---|---|---|")
    for process in table["processes"][1:]:
        for column in ACCURACY:
            a, b = float(rows["w0"].loc[process, column]), float(rows["moved"].loc[process, column])
            change = abs(b - a) / abs(a) if a else float("nan")
            print(f"| {process} | {column} | {a:.6g} | {b:.6g} | {change:.1%} |")


if __name__ == "__main__":
    main()
