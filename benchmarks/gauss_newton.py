"""The top of the Hessian against the top of its Gauss-Newton part, along GD into the edge of stability.

    PYTHONPATH=src .venv/bin/python benchmarks/gauss_newton.py [--loss mse|cross_entropy] [--lr 0.4] [--steps 400]
        [--width 32] [--activation tanh]

GD on the demo's problem (tanh MLP 64-32-32-10 on 500 digits, float32; ``--loss`` and ``--lr`` change it) runs
``--steps`` steps keeping its iterates; every ``--every`` steps it prints the top 3 eigenvalues of H and of
G = J^T H_out J (ARPACK in float64, tol 1e-10), lr lambda_1 / 2 of each, and |cos| between their top
eigenvectors; then the cost of one product of each in the run's dtype (median ms per column over blocks of 8,
after compilation; gradients cost ``grad ms``).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg

import eosflow
from eosflow.cli import demo_table
from eosflow.experiment import prepare, run
from eosflow.gauss_newton import GaussNewtonOperator
from eosflow.hessian_operator import HessianOperator
from eosflow.precision import precision


def top(operator, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = scipy.sparse.linalg.eigsh(operator, k=k, which="LA", tol=1e-10)
    order = np.argsort(values)[::-1]
    return values[order], vectors[:, order]


def per_column_ms(operator, d: int, repeats: int = 7) -> float:
    block = np.random.default_rng(0).standard_normal((d, 8)).astype(operator.dtype)
    operator @ block  # compile
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        operator @ block
        times.append(time.perf_counter() - started)
    return 1e3 * float(np.median(times)) / 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loss", choices=["mse", "cross_entropy"], default="mse")
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--activation", default="tanh")
    args = parser.parse_args()
    table = demo_table()
    table.update(steps=args.steps, lr=args.lr, spectrum={"every": 0}, record={"chunk": 100, "params_every": 1})
    table["problem"].update(loss=args.loss, width=args.width, activation=args.activation)
    with tempfile.TemporaryDirectory() as tmp:
        run(table, tmp)
        _, params = eosflow.load_params(tmp, "gd")
    problem = prepare(table)[1]
    with precision("float64"):
        problem64 = prepare({**table, "dtype": "float64"})[1]
    d = params.shape[1]
    print(
        f"digits MLP ({args.activation}, width {args.width}), {args.loss}: d = {d}, GD at lr = {args.lr} "
        f"(2/lr = {2 / args.lr:g}); float64 ARPACK, tol 1e-10"
    )
    print("| step | lr S/2 (H) | lr S/2 (G) | top 3 of H | top 3 of G | abs cos(u_H, u_G) |")
    print("|---|---|---|---|---|---|")
    for step in sorted({*range(0, args.steps, args.every), args.steps - 1}):
        with precision("float64"):
            w64 = jnp.asarray(params[step], jnp.float64)
            h_values, h_vectors = top(HessianOperator(problem64.objective, w64))
            g_values, g_vectors = top(GaussNewtonOperator(problem64.objective, w64))
        cosine = abs(float(h_vectors[:, 0] @ g_vectors[:, 0]))
        print(
            f"| {step} | {args.lr * h_values[0] / 2:.4f} | {args.lr * g_values[0] / 2:.4f} | "
            f"{', '.join(f'{v:.4f}' for v in h_values)} | {', '.join(f'{v:.4f}' for v in g_values)} | {cosine:.4f} |"
        )
    w = jnp.asarray(params[-1])
    hvp_ms = per_column_ms(HessianOperator(problem.objective, w), d)
    gn_ms = per_column_ms(GaussNewtonOperator(problem.objective, w), d)
    grad = eqx.filter_jit(lambda objective, w: objective.value_and_grad(w)[1])
    grad(problem.objective, w).block_until_ready()
    started = time.perf_counter()
    for _ in range(20):
        grad(problem.objective, w).block_until_ready()
    grad_ms = 1e3 * (time.perf_counter() - started) / 20
    print(
        f"\ncost per column (float32, blocks of 8): HVP {hvp_ms:.3f} ms, G product {gn_ms:.3f} ms; "
        f"grad {grad_ms:.3f} ms"
    )


if __name__ == "__main__":
    main()
