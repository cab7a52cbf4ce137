"""LOBPCG's wall time per iteration on the digits MLP, split into its HVPs and everything else.

    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false OMP_NUM_THREADS=1 PYTHONPATH=src \\
        .venv/bin/python benchmarks/lobpcg_overhead.py --widths 32,140 --iters 20 --reps 7 [--base REV]

For each width of the tanh MLP 64-w-w-10 on 500 digits (float32; 32: d = 3466, 140: d = 30250) and
each block k (guard 1), one jitted function linearizes the gradient at w0 and runs `spectrum.lobpcg`
from random orthonormal vectors at tol 0, so that every pair stays unconverged and the loop runs
exactly ``--iters`` iterations with k HVPs each (the HVP count printed checks it: k (1 + iters)).
The time per iteration is (t(iters) - t(0)) / iters, the jitted call with the loop cut at 0
iterations (linearization, QR, the first k HVPs and Rayleigh-Ritz) subtracted. The same is timed
with the HVP replaced by a diagonal operator of the same d (one multiply per column, a few
microseconds): its time per iteration is the bookkeeping (Gram matrices, orthogonalization, the
small eighs, the loops, the convergence tests), and the difference from the real one the HVPs.

``--base REV`` also loads `lobpcg` from that git revision's src/eosflow/spectrum.py and times it in
the same process, rep by rep alternated with this checkout's, so that load changes hit both alike.
Medians over ``--reps`` reps are printed, in ms per iteration, with the load average.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from eosflow import spectrum
from eosflow.experiment import prepare
from eosflow.precision import precision

ROOT = Path(__file__).resolve().parents[1]


def base_lobpcg(revision: str):
    """`lobpcg` of src/eosflow/spectrum.py at a git revision (its imports are this checkout's)."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:src/eosflow/spectrum.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name = f"eosflow._spectrum_{revision}"
    module_spec = importlib.util.spec_from_loader(name, loader=None)
    assert module_spec is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    exec(compile(source, f"{revision}:src/eosflow/spectrum.py", "exec"), module.__dict__)
    return module.lobpcg


def problem_objective(width: int):
    table = {
        "name": "lobpcg_overhead",
        "steps": 1,
        "lr": 0.4,
        "dtype": "float32",
        "processes": ["gd"],
        "problem": {"name": "mlp", "dataset": "digits", "n_train": 500, "n_test": 0, "width": width},
        "spectrum": {"every": 0},
    }
    _, problem, _, _ = prepare(table)
    return problem.objective, problem.w0


def solver(lobpcg, objective, operator: str, iters: int):
    """jit((w, x0, diagonal) -> the eigenpairs' HVP count and values) at tol 0, ``iters`` iterations."""

    def solve(w, x0, diagonal):
        if operator == "hvp":
            _, linear = jax.linearize(objective.grad, w)
            matvec = jax.vmap(linear, in_axes=1, out_axes=1)
        else:
            matvec = lambda v: diagonal[:, None] * v  # noqa: E731
        pairs = lobpcg(matvec, x0, tol=0.0, max_iters=iters, guard=1)
        return pairs.hvps, pairs.values, pairs.vectors

    return jax.jit(solve)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="32,140", help="MLP hidden widths (32: d = 3466, 140: d = 30250)")
    parser.add_argument("--ks", default="1,3", help="block sizes (guard 1)")
    parser.add_argument("--iters", type=int, default=20, help="LOBPCG iterations per timed call")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--base", help="a git revision whose lobpcg is timed alongside, alternated")
    args = parser.parse_args()
    versions = {"this": spectrum.lobpcg}
    if args.base:
        versions = {f"base {args.base}": base_lobpcg(args.base), **versions}
    print(f"jax {jax.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    with precision("float32"):
        for width in [int(w) for w in args.widths.split(",")]:
            objective, w0 = problem_objective(width)
            d = int(w0.size)
            diagonal = jnp.asarray(np.random.default_rng(1).standard_normal(d), w0.dtype)
            for k in [int(k) for k in args.ks.split(",")]:
                x0 = spectrum.random_vectors(jax.random.PRNGKey(0), d, k, w0.dtype)
                calls = {
                    (version, operator, iters): solver(lobpcg, objective, operator, iters)
                    for version, lobpcg in versions.items()
                    for operator in ("hvp", "diagonal")
                    for iters in (0, args.iters)
                }
                hvps = {}
                for key, call in calls.items():  # compile, and check the iteration count
                    hvps[key] = int(jax.block_until_ready(call(w0, x0, diagonal))[0])
                    assert hvps[key] == k * (1 + key[2]), (key, hvps[key])
                times: dict[tuple, list[float]] = {key: [] for key in calls}
                for _ in range(args.reps):
                    for key, call in calls.items():  # every variant once per rep
                        started = time.perf_counter()
                        jax.block_until_ready(call(w0, x0, diagonal))
                        times[key].append(time.perf_counter() - started)
                for version in versions:
                    per_iter = {
                        operator: 1e3
                        * np.median(np.subtract(times[(version, operator, args.iters)], times[(version, operator, 0)]))
                        / args.iters
                        for operator in ("hvp", "diagonal")
                    }
                    setup = 1e3 * np.median(times[(version, "hvp", 0)])
                    rows.append(
                        (
                            version,
                            d,
                            k,
                            per_iter["hvp"],
                            per_iter["diagonal"],
                            per_iter["hvp"] - per_iter["diagonal"],
                            setup,
                            hvps[(version, "hvp", args.iters)],
                        )
                    )
                    print("  " + format_row(rows[-1]), flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f}; ms per iteration (medians of {args.reps} reps), tol 0, guard 1")
    print(
        f"{'version':>14s} {'d':>6s} {'k':>2s} {'total':>7s} {'bookkeeping':>11s} {'HVPs':>6s} {'setup':>7s} HVP count"
    )
    for row in rows:
        print(format_row(row))


def format_row(row) -> str:
    version, d, k, total, book, hvp, setup, hvps = row
    return f"{version:>14s} {d:6d} {k:2d} {total:7.3f} {book:11.3f} {hvp:6.3f} {setup:7.2f} {hvps:4d}"


if __name__ == "__main__":
    main()
