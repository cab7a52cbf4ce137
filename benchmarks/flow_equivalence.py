"""Every flow's trajectory on this checkout against a dump from another (e.g. the base commit).

    # dump the base's trajectories (any checkout whose eosflow has experiment.prepare):
    git worktree add /tmp/base 36860a2
    PYTHONPATH=/tmp/base/src .venv/bin/python benchmarks/flow_equivalence.py --dump /tmp/base.npz
    # compare this checkout's with them:
    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/flow_equivalence.py --against /tmp/base.npz

Each case runs one process on one problem in float64 (or ``--dtype``) from the problem's w0 and records every
row of every step. The comparison prints, per case, "bitwise" when every recorded array is equal
bit for bit, else the largest difference relative to the column's largest magnitude, and the
columns that appeared or disappeared, over the steps up to the first non-finite loss of the
dump (where an experiment drops the process); ``top_vector`` is compared up to the sign of each
row (an eigenvector's sign is arbitrary). The cost columns (``grads``, ``hvps``, ``third_derivatives``:
evaluation counts, not trajectories) are compared apart: their mean per step, before -> after.
Exit status 1 if any relative difference of a trajectory column exceeds --tol.
"""

from __future__ import annotations

import argparse
import sys

import jax

jax.config.update("jax_enable_x64", True)  # a script, not library code: float64 for the 1e-12 contract

import numpy as np

from eosflow.experiment import prepare
from eosflow.precision import precision

QUARTIC = {"name": "quartic", "sharpness": 30.0, "quartic": 1.0, "dim": 1}
VALLEY = {"name": "sharp_valley"}
FACTORIZATION = {"name": "matrix_factorization", "dim": 2, "depth": 3, "rank": 1, "target_scale": 5.5}
MLP = {"name": "mlp", "dataset": "digits", "n_train": 60, "n_test": 0, "width": 12, "depth": 2}
MEANFIELD = {"name": "two_layer_meanfield", "width": 16, "n_train": 64, "dataset": "gaussian", "input_dim": 4}
COST = ("grads", "hvps", "third_derivatives")
SMOOTH = ("gradient_flow", "projected_flow", "central_flow", "rod_flow", "edge_flow", "free_energy")

ADAM = {"adam": {"beta1": 0.9, "beta2": 0.99, "eps": 1e-4}}
RMSPROP = {"rmsprop": {"beta2": 0.99, "eps": 1e-3, "bias_correction": True}}
SCALAR = {"rmsprop": {"beta2": 0.99, "eps": 1e-3, "second_moment": "scalar"}}
HEAVY_BALL = {"momentum": {"beta": 0.9, "form": "ema"}}
NESTEROV = {"nesterov": {"beta": 0.8}}
SGD = {"sgd": {"batch_size": 20, "momentum": 0.5}}
EVERY3 = {"spectrum": {"k": 1, "k_max": 3, "every": 3}}
DISCRETE = [  # (process, lr, its table)
    ("gd", 0.4, {}),
    ("sgd", 0.1, SGD),
    ("momentum", 0.05, HEAVY_BALL),
    ("nesterov", 0.1, NESTEROV),
    ("rmsprop", 0.004, RMSPROP),
    ("adam", 0.01, ADAM),
    ("nls", 0.4, {}),
]

# (label, problem, lr, steps, process, options, k_max[, more tables: the optimizer's a model reads, a spectrum])
CASES = [
    *[(f"quartic/{p}", QUARTIC, 0.08, 150, p, {}, 2) for p in SMOOTH],
    *[(f"valley/{p}", VALLEY, 0.1, 700, p, {}, 2) for p in SMOOTH],
    *[(f"factorization/{p}", FACTORIZATION, 0.077, 300, p, {}, 3) for p in SMOOTH],
    *[(f"mlp/{p}", MLP, 0.4, 120, p, {}, 3) for p in SMOOTH],
    ("quartic/gradient_flow_rk4", QUARTIC, 0.08, 150, "gradient_flow", {"method": "rk4"}, 2),
    ("mlp/gradient_flow_rk4", MLP, 0.4, 60, "gradient_flow", {"method": "rk4"}, 3),
    ("mlp/rod_flow_plain", MLP, 0.4, 120, "rod_flow", {"correction": False}, 3),
    ("factorization/free_energy_taylor", FACTORIZATION, 0.077, 300, "free_energy", {"stiffness": "taylor"}, 3),
    ("mlp/free_energy_unfloored", MLP, 0.4, 120, "free_energy", {"floor": False, "rank": 1}, 3),
    ("mlp/central_flow_k3", MLP, 1.0, 150, "central_flow", {}, -3),  # 1, 2 and 3 critical directions
    ("meanfield/particle_model", MEANFIELD, 64.0, 200, "particle_model", {}, 3),
    ("meanfield/rod_flow", MEANFIELD, 64.0, 200, "rod_flow", {"correction": False}, 3),
    ("mlp/langevin_baoab", MLP, 0.1, 60, "langevin", {"batch_size": 10, "substeps": 2}, 2),
    ("mlp/langevin_em", MLP, 0.1, 60, "langevin", {"batch_size": 10, "substeps": 3, "integrator": "euler_maruyama"}, 2),
    # the adaptive optimizers' models (docs/adaptive.md), each at its edge within the run
    *[
        (f"factorization/adam_{m}", FACTORIZATION, 0.03, 300, f"adam_{m}", {}, 3, ADAM)
        for m in ("stable_flow", "rod_flow")
    ],
    *[(f"mlp/adam_{m}", MLP, 0.01, 150, f"adam_{m}", {}, 3, ADAM) for m in ("stable_flow", "rod_flow")],
    *[
        (f"mlp/rmsprop_{m}", MLP, 0.004, 150, f"rmsprop_{m}", {}, 3, RMSPROP)
        for m in ("stable_flow", "rod_flow", "central_flow")
    ],
    ("factorization/rmsprop_central_flow", FACTORIZATION, 0.01, 500, "rmsprop_central_flow", {}, 3, RMSPROP),
    (
        "mlp/rmsprop_central_flow_ref",
        MLP,
        0.004,
        150,
        "rmsprop_central_flow",
        {"moments": "reference", "free_method": "euler"},
        3,
        SCALAR,
    ),
    ("mlp/rmsprop_scalar_central_flow", MLP, 0.004, 150, "rmsprop_central_flow", {}, 3, SCALAR),
    ("mlp/momentum_rod_flow", MLP, 0.05, 150, "momentum_rod_flow", {}, 3, HEAVY_BALL),
    ("mlp/nesterov_stable_flow", MLP, 0.1, 150, "nesterov_stable_flow", {}, 3, NESTEROV),
    # the discrete optimizers, measuring at every step and at every 3rd (the solver skipped in between)
    *[
        (f"mlp/{p}{tag}", MLP, lr, 300, p, {}, 3, {**table, **extra})
        for p, lr, table in DISCRETE
        for tag, extra in (("", {}), ("_every3", EVERY3))
    ],
    ("mlp/sgd_loss_every2", MLP, 0.1, 300, "sgd", {}, 3, {"sgd": {**SGD["sgd"], "loss_every": 2}, **EVERY3}),
]


def leaderboard_cases(suite: str, processes: str = "reference") -> list[tuple]:
    """Processes of every entry of a leaderboard suite, as the entry runs them (its problem, lr, steps, dtype,
    ``[spectrum]``, the optimizer's hyperparameters and the process's own table), labelled
    ``leaderboard/<entry>/<process>``. ``processes`` (comma-separated): ``reference`` (the entry's optimizer),
    ``baseline`` (its yardstick, e.g. gradient_flow), ``models`` (every model of it the entry runs), or names
    (those the entry runs)."""
    from eosflow.leaderboard import applicable, baseline_of, models_of, suite_entries

    cases = []
    for entry in suite_entries(suite):
        table, optimizer = entry.table, entry.optimizer
        models = applicable(models_of(optimizer), table["problem"]["name"])
        names = {"reference": [optimizer], "baseline": [baseline_of(optimizer)], "models": models}
        runs = [optimizer, baseline_of(optimizer), *models]
        for process in [name for part in processes.split(",") for name in names.get(part, [part])]:
            if process not in runs:
                continue
            tables = {"dtype": table["dtype"], "spectrum": table["spectrum"]}
            tables.update({key: table[key] for key in (optimizer, process) if key in table})
            name = f"leaderboard/{entry.name}/{process}"
            cases.append((name, table["problem"], table["lr"], table["steps"], process, {}, 1, tables))
    return cases


def run_case(
    problem: dict,
    lr: float,
    steps: int,
    process: str,
    options: dict,
    k_max: int,
    optimizer: dict | None = None,
    moved=None,
    dtype: str = "float64",
) -> dict[str, np.ndarray]:
    """Rows of ``steps`` steps; k_max < 0 tracks |k_max| eigenpairs from the start (k = k_max);
    ``optimizer``: more tables, e.g. the optimizer's a model reads (``{"adam": {...}}``) or a ``spectrum``
    replacing the one k_max sets; ``moved(w0)``,
    if given, is the start instead of w0."""
    spectrum = {"k": -k_max, "k_max": -k_max} if k_max < 0 else {"k": 1, "k_max": k_max}
    table = {
        "lr": lr,
        "dtype": dtype,
        "seed": 0,
        "steps": steps,
        "processes": [process],
        "problem": problem,
        "spectrum": spectrum,
        process: options,
        **(optimizer or {}),
    }
    with precision(table["dtype"]):  # as `eosflow run` computes (in float32: x64 off, matmuls at "highest")
        _, built, _, processes = prepare(table)
        flow = processes[process]
        state = flow.init(built.w0 if moved is None else moved(built.w0))
        _, rows = flow.advance(state, steps)
        return {key: np.asarray(value) for key, value in rows.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", help="write every case's rows to this .npz")
    parser.add_argument("--against", help="compare every case with the rows in this .npz")
    parser.add_argument(
        "--only", default="", help="run only the cases whose label contains one of these (comma-separated)"
    )
    parser.add_argument("--tol", type=float, default=1e-12, help="largest relative difference accepted")
    parser.add_argument("--dtype", default="float64", help="the spec's dtype (float32: is a change bitwise there too?)")
    parser.add_argument("--columns", action="store_true", help="print every column's relative difference")
    parser.add_argument(
        "--leaderboard",
        metavar="SUITE",
        help="instead of the cases above, the reference optimizer of each entry of this leaderboard suite "
        "(default, adaptive, ...) as the entry runs it, in its own dtype: would a change move the leaderboard?",
    )
    parser.add_argument(
        "--processes",
        default="reference",
        help="with --leaderboard: reference, baseline, models or process names (comma-separated)",
    )
    args = parser.parse_args(argv)
    if not (args.dump or args.against):
        parser.error("give --dump or --against")
    stored = dict(np.load(args.against)) if args.against else {}
    dumped, worst = {}, 0.0
    cases = leaderboard_cases(args.leaderboard, args.processes) if args.leaderboard else CASES
    for label, problem, lr, steps, process, options, k_max, *optimizer in cases:
        if not any(part in label for part in args.only.split(",")):
            continue
        rows = run_case(problem, lr, steps, process, options, k_max, *(optimizer or [None]), dtype=args.dtype)
        dumped.update({f"{label}/{key}": value for key, value in rows.items()})
        if not args.against:
            print(f"{label}: {len(rows)} columns x {steps} steps", flush=True)
            continue
        base = {
            key[len(label) + 1 :]: value
            for key, value in stored.items()
            if key.startswith(label + "/") and "/" not in key[len(label) + 1 :]
        }
        common = sorted((set(base) & set(rows)) - set(COST))
        # the experiment drops a process at its first non-finite loss: compare the steps before it
        finite = np.isfinite(base["loss"])
        live = len(finite) if finite.all() else int(np.argmin(finite))
        base = {key: value[:live] for key, value in base.items()}
        rows = {key: value[:live] for key, value in rows.items()}
        relative, where, gaps = 0.0, "", {}
        bitwise = all(np.array_equal(base[k], rows[k], equal_nan=True) for k in common)
        for key in common:
            a, b = np.asarray(base[key], np.float64), np.asarray(rows[key], np.float64)
            if a.shape != b.shape:
                relative, where = np.inf, f"{key} shape {a.shape} -> {b.shape}"
                break
            scale = np.nanmax(np.abs(a)) if np.isfinite(a).any() else 1.0
            if key == "top_vector":  # an eigenvector's sign is arbitrary: align b's rows with a's
                b = b * np.where(np.sum(a * b, axis=-1, keepdims=True) < 0, -1.0, 1.0)
            both = np.isfinite(a) & np.isfinite(b)
            gap = np.max(np.abs(a - b)[both], initial=0.0) / (scale if scale > 0 else 1.0)
            if not np.array_equal(np.isnan(a), np.isnan(b)):
                gap = np.inf
            gaps[key] = gap
            if gap > relative:
                relative, where = gap, key
        worst = max(worst, relative)
        changes = ""
        if set(base) - set(rows):
            changes += f"  dropped {sorted(set(base) - set(rows))}"
        if set(rows) - set(base):
            changes += f"  new {sorted(set(rows) - set(base))}"
        verdict = "bitwise" if bitwise else f"max relative difference {relative:.2e} ({where})"
        for key in COST:
            if key in base and key in rows and not np.array_equal(base[key], rows[key]):
                changes += f"  {key}/step {np.mean(base[key]):.4g} -> {np.mean(rows[key]):.4g}"
        print(f"{label:36s} {verdict}{changes}", flush=True)
        if args.columns and not bitwise:
            print("    " + ", ".join(f"{key} {gap:.1e}" for key, gap in sorted(gaps.items()) if gap > 0), flush=True)
    if args.dump:
        np.savez(args.dump, **dumped)
    if args.against:
        print(f"worst relative difference: {worst:.2e} (tolerance {args.tol:.0e})")
        return int(worst > args.tol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
