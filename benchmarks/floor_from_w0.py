"""The floor of the leaderboard's from-w0 columns, from the run directories of a leaderboard already made.

    PYTHONPATH=src python benchmarks/floor_from_w0.py OUT [--suite default|adaptive] [--entries a,b]

For each entry of the suite whose run directory ``OUT/runs/<entry>`` exists (``eosflow leaderboard [--suite
S] --out OUT``), reruns the optimizer from w0 and from w0 moved by its rounding (eps ||w0||, :func:`eosflow.
anchored.floor_from_w0`) and prints the copy's from-w0 columns (:func:`eosflow.leaderboard.floor_columns`:
what the optimizer's own row of a new leaderboard holds), beside the best model's of the leaderboard's
``leaderboard.csv`` in each column. A full ``eosflow leaderboard`` run prints the same numbers on its
optimizer rows; this script gives them without rerunning the models.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from eosflow.leaderboard import COLUMNS, FLOOR_COLUMNS, floor_columns, selected, suite_tables
from eosflow.spec import load_spec_table

TITLES = dict(COLUMNS)  # the leaderboard page's column titles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the --out directory of an `eosflow leaderboard` run")
    parser.add_argument("--suite", default="default")
    parser.add_argument("--entries", default="", help="comma-separated entries (default: every one with a run)")
    args = parser.parse_args()
    names = args.entries.split(",") if args.entries else None
    tables = suite_tables(suite=selected(args.suite, names))
    board = pd.read_csv(args.out / "leaderboard.csv") if (args.out / "leaderboard.csv").exists() else None
    print("| entry | optimizer | " + " | ".join(TITLES[c] for c in FLOOR_COLUMNS) + " | seconds |")
    print("|---" * (len(FLOOR_COLUMNS) + 3) + "|")
    for name, table in tables.items():
        run_dir = args.out / "runs" / name
        if not (run_dir / "spec.toml").exists():
            continue
        tick = time.perf_counter()
        floor = floor_columns(load_spec_table(run_dir / "spec.toml"), run_dir)  # the spec the run was made with
        seconds = time.perf_counter() - tick
        cells = []
        for column in FLOOR_COLUMNS:
            cell = f"{floor.get(column, float('nan')):.3g}"
            if board is not None:
                models = board[(board["problem"] == name) & (board["process"] != table["processes"][0])]
                models = models[models["status"] == "ok"]
                if column in models and models[column].notna().any():
                    best = models.loc[models[column].idxmin()]
                    cell += f" ({best['process']} {best[column]:.3g})"
            cells.append(cell)
        print(f"| {name} | {table['processes'][0]} | " + " | ".join(cells) + f" | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
