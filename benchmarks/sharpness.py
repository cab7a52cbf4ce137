"""Cost and accuracy of sharpness measurement along the demo's GD trajectory.

    .venv/bin/python benchmarks/sharpness.py [--steps 1200] [--every 100]

Runs the demo (GD on the digits MLP, lr = 0.4) once, saving the iterates, then replays the
trajectory with each eigensolver and prints, per phase (progressive sharpening: lr*S < 1.9;
edge of stability: afterwards), the mean HVPs per step and the relative error of the top
eigenvalue against the dense float64 Hessian's eigh at every ``--every``-th step:

- tracker: warm-started LOBPCG (the vectors of the previous step), at several tolerances, with
  k = 1 and with the demo's growing k (up to 3);
- cold Lanczos: ARPACK eigsh from a random start (k = 1, tol 0 = machine precision);
- power iteration: PyHessian's rule, stop when the estimate changes by < 1e-3 relative.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)  # this script's choice: its oracles and prepare() compute in float64

import eosflow
from eosflow.cli import demo_table
from eosflow.experiment import prepare, run
from eosflow.spectrum import dense_top_eigenpairs, grow_tracked, hessian_eigenpairs, lanczos, power_iteration, random_vectors


def replay_tracker(objective, params, k, k_max, tol, lr, threshold=1.5):
    measure = jax.jit(lambda w, v: hessian_eigenpairs(objective, w, v, tol=tol, max_iters=30))
    vectors = random_vectors(jax.random.PRNGKey(0), params.shape[1], k, params.dtype)
    hvps, top = [], []
    for t, w in enumerate(params):
        pairs = measure(jnp.asarray(w), vectors)
        vectors = grow_tracked(pairs.vectors, np.asarray(pairs.values), threshold / lr, k_max,
                               jax.random.PRNGKey(t))
        hvps.append(int(pairs.hvps))
        top.append(float(pairs.values[0]))
    return np.array(hvps), np.array(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=100, help="dense-eigh oracle every n steps")
    args = parser.parse_args()

    table = demo_table()
    table.update(steps=args.steps)
    table["spectrum"] = {"every": 0}
    table["record"] = {"chunk": 100, "params_every": 1}
    lr = table["lr"]
    with tempfile.TemporaryDirectory() as tmp:
        run(table, tmp)
        _, params = eosflow.load_params(tmp, "gd")
    _, problem, _, _ = prepare(table)
    objective = problem.objective
    oracle_objective = prepare({**table, "dtype": "float64"})[1].objective  # same data, float64
    checkpoints = np.arange(10, args.steps, args.every)
    print(f"demo trajectory: {args.steps} steps, d = {params.shape[1]}, oracle at {len(checkpoints)} steps")
    started = time.perf_counter()
    exact = np.array([dense_top_eigenpairs(oracle_objective, jnp.asarray(params[t], jnp.float64), k=1).values[0]
                      for t in checkpoints])
    print(f"dense float64 eigh: {(time.perf_counter() - started) / len(checkpoints):.1f} s per step")
    at_edge = lr * exact >= 1.9
    phases = {"sharpening": ~at_edge, "edge of stability": at_edge}

    rows = []
    for label, k, k_max, tol in [
        ("tracker k=1 tol=1e-3", 1, 1, 1e-3),
        ("tracker k=1 tol=3e-3", 1, 1, 3e-3),
        ("tracker k=1 tol=1e-2", 1, 1, 1e-2),
        ("tracker k<=3 tol=3e-3 (demo)", 1, 3, 3e-3),
    ]:
        hvps, top = replay_tracker(objective, params, k, k_max, tol, lr)
        error = np.abs(top[checkpoints] - exact) / exact
        edge_start = checkpoints[at_edge][0] if at_edge.any() else len(hvps)
        hvp_phase = {"sharpening": hvps[10:edge_start], "edge of stability": hvps[edge_start:]}
        for name, mask in phases.items():
            rows.append((label, name, hvp_phase[name].mean() if hvp_phase[name].size else np.nan,
                         np.mean(error[mask]) if mask.any() else np.nan, np.max(error[mask]) if mask.any() else np.nan))

    for label, solver in [
        ("cold Lanczos (ARPACK)", lambda w: lanczos(objective, jnp.asarray(w), k=1, tol=0.0)),
        ("power iteration tol=1e-3", lambda w: power_iteration(objective, jnp.asarray(w), tol=1e-3)),
    ]:
        results = [solver(params[t]) for t in checkpoints]
        hvps = np.array([r.hvps for r in results])
        error = np.abs(np.array([r.values[0] for r in results]) - exact) / exact
        for name, mask in phases.items():
            rows.append((label, name, hvps[mask].mean() if mask.any() else np.nan,
                         np.mean(error[mask]) if mask.any() else np.nan, np.max(error[mask]) if mask.any() else np.nan))

    print("\n| solver | phase | HVPs per step | mean rel. error of S | max rel. error of S |")
    print("|---|---|---|---|---|")
    for label, phase, hvps, mean_error, max_error in rows:
        print(f"| {label} | {phase} | {hvps:.1f} | {mean_error:.1e} | {max_error:.1e} |")


if __name__ == "__main__":
    main()
