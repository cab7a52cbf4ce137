"""Where the top Hessian eigenvectors live along GD into the edge of stability, layer by layer (parameter_shares).

    PYTHONPATH=src .venv/bin/python benchmarks/parameter_shares.py [--steps 600] [--every 100] [--lr 0.4] [--k 3]

GD on the demo's problem (tanh MLP 64-32-32-10 on 500 digits, MSE, float32) keeps its iterates; at every
``--every``-th step the top k eigenpairs (ARPACK in float64, tol 1e-10) are split over the network's weights and
biases by ``eosflow.tracker.parameter_shares``: each row is one eigenvector's share (sum of squares) on each
parameter array, summing to 1. lr S / 2 = 1 is the edge.
"""

from __future__ import annotations

import argparse
import tempfile

import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg

import eosflow
from eosflow.cli import demo_table
from eosflow.experiment import prepare, run
from eosflow.hessian_operator import HessianOperator
from eosflow.precision import precision
from eosflow.tracker import parameter_shares


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--k", type=int, default=3)
    args = parser.parse_args()
    table = demo_table()
    table.update(steps=args.steps, lr=args.lr, spectrum={"every": 0}, record={"chunk": 100, "params_every": 1})
    with tempfile.TemporaryDirectory() as tmp:
        run(table, tmp)
        _, params = eosflow.load_params(tmp, "gd")
    with precision("float64"):
        problem = prepare({**table, "dtype": "float64"})[1]
        names = None
        print(f"digits MLP (tanh, width 32), d = {params.shape[1]}, GD at lr = {args.lr}; top {args.k} of H (ARPACK)")
        for step in sorted({*range(0, args.steps, args.every), args.steps - 1}):
            w = jnp.asarray(params[step], jnp.float64)
            operator = HessianOperator(problem.objective, w)
            values, vectors = scipy.sparse.linalg.eigsh(operator, k=args.k, which="LA", tol=1e-10)
            order = np.argsort(values)[::-1]
            shares = parameter_shares(vectors[:, order], problem.objective.unravel(w))
            if names is None:
                names = list(shares)
                print("| step | pair | lr lambda / 2 | " + " | ".join(names) + " |")
                print("|---" * (3 + len(names)) + "|")
            for i in range(args.k):
                row = " | ".join(f"{shares[name][i]:.3f}" for name in names)
                print(f"| {step} | {i + 1} | {args.lr * values[order][i] / 2:.4f} | {row} |")


if __name__ == "__main__":
    main()
