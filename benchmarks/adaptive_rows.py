"""Rerun some rows of the adaptive leaderboard (``eosflow leaderboard --suite adaptive``) and print them.

    PYTHONPATH=src python benchmarks/adaptive_rows.py OUT --entries mlp_digits-rmsprop,matrix_factorization-rmsprop
        [--models rmsprop_central_flow]
    PYTHONPATH=src python benchmarks/adaptive_rows.py OUT --entries mlp_digits-adam-eps --seeds 0,1,2,3,4
        [--params-every 1]

Runs the named entries of ``leaderboard.ADAPTIVE_SUITE`` exactly as the suite does (same tables, into
``OUT/runs/<entry>``), with the optimizer, its stable flow (the yardstick of the relative distance) and
``--models`` (default: every model of the optimizer), and prints their rows in the leaderboard's Markdown
format: for replacing a few rows of docs/leaderboard.md without the whole 13-minute suite.

``--seeds``: the seed study. Each entry runs once per seed (the suite's table with ``seed = k``, its length
unchanged, into ``OUT/runs/<entry>-seed<k>``), and one line per (seed, model) prints the model's mean
distance to the optimizer <d>, the stable flow's <d_stable>, their ratio (the leaderboard's rel. distance) and
the same ratio between the midpoints of consecutive steps (its rel. centre distance),
the model's loss error and its floor (the optimizer's own loss against its smoothed loss), the optimizer's
edge onset and S_end, the stable flow's median edge ratio over the last 50 steps (how far the yardstick has
sharpened past the edge), then, per model, how many seeds meet rel. distance <= 0.5. ``--no-run`` prints the
table of runs already in OUT. ``--params-every 1`` also saves every iterate, for
``benchmarks/adaptive_rod_distance.py``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import NamedTuple

import numpy as np

import eosflow
from eosflow.compare import baseline_of, compare_run, gaussian_smooth, relative_l1_error
from eosflow.leaderboard import ADAPTIVE_SUITE, markdown, run_suite, suite_tables


def seed_tables(tables: dict[str, dict], seeds: list[int], params_every: int) -> dict[str, dict]:
    """Each table once per seed, named ``<entry>-seed<k>``; everything else as the suite has it."""
    out = {}
    for name, table in tables.items():
        for seed in seeds:
            seeded = copy.deepcopy(table)
            seeded["seed"] = seed
            seeded["name"] = f"{name}-seed{seed}"
            seeded["record"]["params_every"] = params_every
            out[seeded["name"]] = seeded
    return out


class SeedRow(NamedTuple):
    model: str
    distance: float  # <d>, the model's time-averaged distance to the optimizer
    stable: float  # <d_stable>, the stable flow's
    ratio: float  # rel. distance
    centre_ratio: float  # rel. centre distance (between midpoints of consecutive steps)
    loss_error: float
    floor: float  # the optimizer's own loss against its smoothed loss
    onset: int  # the optimizer's first step with edge ratio >= 0.95 (the run's length if none)
    stable_edge: float  # the stable flow's median edge ratio over the last LAST steps


LAST = 50


def seed_rows(run_dir: Path) -> list[SeedRow]:
    """One row per model of the run but the optimizer and its stable flow."""
    rows = compare_run(run_dir)
    ds = eosflow.load(run_dir)
    optimizer = str(ds.process.values[0])
    loss = ds["loss"].sel(process=optimizer).values.astype(np.float64)
    floor = relative_l1_error(loss, gaussian_smooth(loss))
    stable = baseline_of(optimizer)
    above = np.flatnonzero(ds["edge_ratio"].sel(process=optimizer).values >= 0.95)
    onset = int(above[0]) if above.size else len(loss)
    stable_edge = float(np.nanmedian(ds["edge_ratio"].sel(process=stable).values[-LAST:]))
    base = rows.loc[stable].mean_distance
    return [
        SeedRow(
            str(name),
            row.mean_distance,
            base,
            row.relative_distance,
            row.relative_centre_distance,
            row.loss_error,
            floor,
            onset,
            stable_edge,
        )
        for name, row in rows.iloc[1:].iterrows()
        if name != stable
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--entries", required=True, help="comma-separated entry names of the adaptive suite")
    parser.add_argument("--models", default=None, help="comma-separated models (default: every model)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds: run each entry once per seed")
    parser.add_argument("--params-every", type=int, default=0, help="with --seeds: record.params_every")
    parser.add_argument("--no-run", action="store_true", help="with --seeds: only print the table of OUT's runs")
    args = parser.parse_args()
    names = args.entries.split(",")
    known = {entry.name: entry for entry in ADAPTIVE_SUITE}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"--entries: {', '.join(unknown)} not in the adaptive suite ({', '.join(known)})")
    models = args.models.split(",") if args.models else None
    tables = suite_tables(models=models, suite=tuple(known[name] for name in names))
    if args.seeds is None:
        rows = run_suite(tables, args.out, progress=False)
        print("\n".join(markdown(rows)))
        return
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds: {args.seeds!r} is not a comma-separated list of integers") from None
    seeded = seed_tables(tables, seeds, args.params_every)
    if not args.no_run:
        run_suite(seeded, args.out, progress=False)
    print(
        "| entry | seed (onset) | model | <d> | <d_stable> | rel. distance | rel. centre distance "
        "| loss error (floor) | S_end |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    met: dict[str, list[tuple[float, float]]] = {}
    for name, table in seeded.items():
        entry = name.rsplit("-seed", 1)[0]
        for row in seed_rows(args.out / "runs" / name):
            print(
                f"| {entry} | {table['seed']} ({row.onset}) | {row.model} | {row.distance:.4g} | {row.stable:.4g} "
                f"| {row.ratio:.3f} | {row.centre_ratio:.3f} | {row.loss_error:.3f} ({row.floor:.3f}) "
                f"| {row.stable_edge:.2f} |"
            )
            met.setdefault(f"{entry} {row.model}", []).append((row.ratio, row.centre_ratio))
    for key, pairs in met.items():
        for column, ratios in zip(("rel. distance", "rel. centre distance"), zip(*pairs, strict=True), strict=True):
            print(
                f"{key}: {column} <= 0.5 on {sum(r <= 0.5 for r in ratios)} of {len(ratios)} seeds "
                f"(median {np.median(ratios):.3f}, max {max(ratios):.3f})"
            )


if __name__ == "__main__":
    main()
