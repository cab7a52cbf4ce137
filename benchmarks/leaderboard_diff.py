"""Relative changes of the accuracy columns between two leaderboard tables (Markdown pages).

    git show f53415a:docs/leaderboard.md > /tmp/old.md
    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/leaderboard_diff.py /tmp/old.md OUT/leaderboard.md [--tol 0.01]

Reads the first table of each page (rows keyed by problem and process), and prints, for every row
and accuracy column the two share, old, new and |new - old| / |old| when it exceeds ``--tol``;
then how many cells were compared and how many changed by more.
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
    for key in (k for k in new if k in old):
        for column in ACCURACY:
            a, b = number(old[key].get(column)), number(new[key].get(column))
            if not (math.isfinite(a) and math.isfinite(b)):
                continue
            compared += 1
            change = abs(b - a) / abs(a) if a else abs(b - a)
            if change > args.tol:
                changed += 1
                print(f"| {key[0]} | {key[1]} | {column} | {a:.6g} | {b:.6g} | {change:.1%} |")
    print(f"\n{compared} cells compared, {changed} changed by more than {args.tol:.0%}")


if __name__ == "__main__":
    main()
