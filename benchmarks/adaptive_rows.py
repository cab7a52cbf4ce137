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
distance to the optimizer <d>, the stable flow's <d_stable>, their ratio (the leaderboard's rel. distance),
the model's loss error and its floor (the optimizer's own loss against its smoothed loss), then, per model,
how many seeds meet rel. distance <= 0.5. ``--params-every 1`` also saves every iterate, for
``benchmarks/adaptive_rod_distance.py``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

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


def seed_rows(run_dir: Path) -> list[tuple[str, float, float, float, float, float]]:
    """Per model of the run: (name, <d>, <d_stable>, rel. distance, loss error, the loss error's floor)."""
    rows = compare_run(run_dir)
    ds = eosflow.load(run_dir)
    optimizer = str(ds.process.values[0])
    loss = ds["loss"].sel(process=optimizer).values.astype(np.float64)
    floor = relative_l1_error(loss, gaussian_smooth(loss))
    stable = baseline_of(optimizer)
    base = rows.loc[stable].mean_distance
    return [
        (str(name), row.mean_distance, base, row.relative_distance, row.loss_error, floor)
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
    run_suite(seeded, args.out, progress=False)
    print("| entry | seed | model | <d> | <d_stable> | rel. distance | loss error (floor) |")
    print("|---|---|---|---|---|---|---|")
    met: dict[str, list[float]] = {}
    for name, table in seeded.items():
        entry = name.rsplit("-seed", 1)[0]
        for model, d, base, ratio, error, floor in seed_rows(args.out / "runs" / name):
            print(
                f"| {entry} | {table['seed']} | {model} | {d:.4g} | {base:.4g} | {ratio:.3f} "
                f"| {error:.3f} ({floor:.3f}) |"
            )
            met.setdefault(f"{entry} {model}", []).append(ratio)
    for key, ratios in met.items():
        print(
            f"{key}: rel. distance <= 0.5 on {sum(r <= 0.5 for r in ratios)} of {len(ratios)} seeds "
            f"(median {np.median(ratios):.3f}, max {max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
