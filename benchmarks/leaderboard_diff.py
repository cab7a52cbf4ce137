"""Relative changes of the accuracy columns between two leaderboard tables (Markdown pages).

    git show f53415a:docs/leaderboard.md > /tmp/old.md
    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/leaderboard_diff.py /tmp/old.md OUT/leaderboard.md [--tol 0.01]

Reads the first table of each page (rows keyed by problem and process), and prints, for every row
and accuracy column the two share, old, new and |new - old| / |old| when it exceeds ``--tol``; a row in one
table only, a number in one and "-" in the other, and a changed status count as changed too; then how many
cells were compared and how many changed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from eosflow import compare, leaderboard

ACCURACY = tuple(title for column, title in leaderboard.COLUMNS if column in compare.ACCURACY)  # the page's titles


def table(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    """{(problem, process): {column title: cell}} of the first Markdown table of the page."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| problem | process |")]
    if not lines:
        raise SystemExit(f"{path}: no leaderboard table (a line starting '| problem | process |')")
    body = path.read_text().splitlines()
    start = body.index(lines[0])
    titles = [cell.strip() for cell in body[start].strip("|").split("|")]
    rows = {}
    for line in body[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(titles, (cell.strip() for cell in line.strip("|").split("|")), strict=False))
        rows[(cells["problem"], cells["process"])] = cells
    return rows


def number(cell: str | None) -> float:
    try:
        return float(cell) if cell is not None else math.nan
    except ValueError:
        return math.nan


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--tol", type=float, default=0.01)
    args = parser.parse_args(argv)
    old, new = table(args.old), table(args.new)
    compared = changed = 0
    print("| problem | process | column | old | new | relative change |")
    print("|---|---|---|---|---|---|")
    for key in [*old, *(k for k in new if k not in old)]:
        if key not in old or key not in new:  # a row gained or lost counts as changed
            changed += 1
            print(
                f"| {key[0]} | {key[1]} | (row) | {'-' if key not in old else 'present'} | "
                f"{'-' if key not in new else 'present'} | row {'added' if key not in old else 'missing'} |"
            )
            continue
        for column in (*ACCURACY, "status"):
            cells = old[key].get(column), new[key].get(column)
            a, b = number(cells[0]), number(cells[1])
            if column == "status" or math.isfinite(a) != math.isfinite(b):  # a number become "-", a new status
                if cells[0] != cells[1]:
                    changed += 1
                    print(f"| {key[0]} | {key[1]} | {column} | {cells[0]} | {cells[1]} | changed |")
                continue
            if not math.isfinite(a):  # "-" in both
                continue
            compared += 1
            change = abs(b - a) / abs(a) if a else abs(b - a)
            if change > args.tol:
                changed += 1
                print(f"| {key[0]} | {key[1]} | {column} | {a:.6g} | {b:.6g} | {change:.1%} |")
    print(
        f"\n{compared} cells compared, {changed} changed by more than {args.tol:.0%} (or gained, lost, or no longer a "
        "number, rows and statuses included)"
    )


if __name__ == "__main__":
    main()
