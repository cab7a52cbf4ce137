"""Rerun some rows of the adaptive leaderboard (``eosflow leaderboard --suite adaptive``) and print them.

    PYTHONPATH=src python benchmarks/adaptive_rows.py OUT --entries mlp_digits-rmsprop,matrix_factorization-rmsprop
        [--models rmsprop_central_flow]

Runs the named entries of ``leaderboard.ADAPTIVE_SUITE`` exactly as the suite does (same tables, into
``OUT/runs/<entry>``), with the optimizer, its stable flow (the yardstick of the relative distance) and
``--models`` (default: every model of the optimizer), and prints their rows in the leaderboard's Markdown
format: for replacing a few rows of docs/leaderboard.md without the whole 13-minute suite.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eosflow.leaderboard import ADAPTIVE_SUITE, markdown, run_suite, suite_tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--entries", required=True, help="comma-separated entry names of the adaptive suite")
    parser.add_argument("--models", default=None, help="comma-separated models (default: every model)")
    args = parser.parse_args()
    names = args.entries.split(",")
    known = {entry.name: entry for entry in ADAPTIVE_SUITE}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"--entries: {', '.join(unknown)} not in the adaptive suite ({', '.join(known)})")
    models = args.models.split(",") if args.models else None
    tables = suite_tables(models=models, suite=tuple(known[name] for name in names))
    rows = run_suite(tables, args.out, progress=False)
    print("\n".join(markdown(rows)))


if __name__ == "__main__":
    main()
