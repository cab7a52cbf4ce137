"""The architectures suite: parameter counts, per-step costs, and GD at the edge of stability.

    python benchmarks/architectures.py [--only resnet_digits,lstm_copying] [--steps 400] [--lr NAME=LR ...]
                                       [--problem KEY=VALUE ...] [--no-run]

For every entry of the suite (``eosflow.leaderboard.ARCHITECTURES``, the problems of
``eosflow leaderboard --suite architectures``) it prints
  params      the parameter count at the entry's size, and at the problem's default size
  grad, hvp   milliseconds per gradient and per HVP, median of 20 timed calls after compiling
              (wall-clock, depends on the machine's load)
(after a table of every architecture's parameter count at its default size) and runs GD alone with its top
eigenvalue tracked every step (float64 spectrum of the float32 run as the suite records it) for ``--steps`` steps
at the entry's learning rate:
  first EoS   the first step with lr S >= 1.8
  EoS steps   steps with lr S in [1.8, 2.2] (the edge of stability: [0.9, 1.1] x 2)
  lr S        mean and max of lr S after the first EoS step; the final training loss
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import equinox as eqx
import numpy as np

import eosflow
from eosflow.experiment import run
from eosflow.leaderboard import ARCHITECTURES
from eosflow.problems import build_problem


def milliseconds(fn, *args, repeats: int = 20) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def costs(problem_table: dict, dtype: str) -> tuple[int, int, float, float]:
    problem, _ = build_problem(problem_table, 0, dtype)
    default, _ = build_problem({"name": problem_table["name"]}, 0, dtype)
    objective, w = problem.objective, problem.w0
    grad = eqx.filter_jit(lambda o, w: o.grad(w))
    hvp = eqx.filter_jit(lambda o, w, v: o.hvp(w, v))
    return int(w.size), int(default.w0.size), milliseconds(grad, objective, w), milliseconds(hvp, objective, w, w)


def eos_run(table: dict, steps: int) -> dict:
    table = copy.deepcopy(table)
    table.update(steps=steps, processes=["gd"])
    table["spectrum"] = {**table.get("spectrum", {}), "every": 1}
    with tempfile.TemporaryDirectory() as tmp:
        run(table, Path(tmp) / "run", overwrite=True)
        ds = eosflow.load(Path(tmp) / "run")
        lr_s = ds["lr_sharpness"].sel(process="gd").values
        loss = ds["loss"].sel(process="gd").values
    edge = (lr_s >= 1.8) & (lr_s <= 2.2)
    first = int(np.argmax(lr_s >= 1.8)) if (lr_s >= 1.8).any() else -1
    after = lr_s[first:] if first >= 0 else lr_s[:0]
    return {
        "first": first,
        "edge_steps": int(edge.sum()),
        "mean": float(np.nanmean(after)) if after.size else np.nan,
        "max": float(np.nanmax(lr_s)),
        "final_loss": float(loss[-1]),
        "initial": float(lr_s[0]),
    }


DEFAULT_SIZES = {  # the parameter counts of docs/problems.md: each architecture at its default size
    "resnet (norm = layer)": {"name": "resnet"},
    "resnet (norm = none)": {"name": "resnet", "norm": "none"},
    "resnet (norm = group)": {"name": "resnet", "norm": "group"},
    "vit (digits)": {"name": "vit"},
    "transformer (sorting)": {"name": "transformer"},
    "transformer (copying)": {"name": "transformer", "task": "copying"},
    "lstm (copying)": {"name": "lstm"},
    "mlp (moons, width 32, depth 2)": {"name": "mlp", "dataset": "moons", "classes": 2, "width": 32},
}


def parameter_counts() -> None:
    print("| problem | parameters at default size |\n|---|---|")
    for label, table in DEFAULT_SIZES.items():
        problem, _ = build_problem(table, 0, "float32")
        print(f"| {label} | {problem.w0.size} |", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated entry names")
    parser.add_argument("--steps", type=int, help="GD steps (default: the entry's)")
    parser.add_argument("--lr", nargs="*", default=[], help="NAME=LR overrides")
    parser.add_argument(
        "--problem", nargs="*", default=[], help="KEY=VALUE overrides of every run entry's problem (e.g. norm=none)"
    )
    parser.add_argument("--no-run", action="store_true", help="counts and costs only")
    args = parser.parse_args()
    parameter_counts()
    overrides = dict(item.split("=") for item in args.lr)
    only = set(args.only.split(",")) if args.only else None
    print(
        "| entry | params (default size) | grad ms | hvp ms | lr | lr S at 0 | first EoS | EoS steps / steps "
        "| mean lr S after | max lr S | final loss |"
    )
    print("|---" * 11 + "|")
    for entry in ARCHITECTURES:
        if only and entry.name not in only:
            continue
        table = copy.deepcopy(entry.table)
        if entry.name in overrides:
            table["lr"] = float(overrides[entry.name])
        for item in args.problem:
            key, value = item.split("=", 1)
            table["problem"][key] = json.loads(value) if value[:1].isdigit() else value
        size, default, grad_ms, hvp_ms = costs(table["problem"], table["dtype"])
        cells = [entry.name, f"{size} ({default})", f"{grad_ms:.2f}", f"{hvp_ms:.2f}", f"{table['lr']:g}"]
        if not args.no_run:
            steps = args.steps or table["steps"]
            r = eos_run(table, steps)
            cells += [
                f"{r['initial']:.3f}",
                str(r["first"]),
                f"{r['edge_steps']} / {steps}",
                f"{r['mean']:.3f}",
                f"{r['max']:.3f}",
                f"{r['final_loss']:.4g}",
            ]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
