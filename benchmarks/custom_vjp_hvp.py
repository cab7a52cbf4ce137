"""The cost of reverse mode for a model with a ``jax.custom_vjp`` (docs/problems.md, "A model with a
custom_vjp"): ms per gradient, per HVP and per block of 3 HVPs, and the relative difference of H v,
for a digits MLP (64-W-W-10, swish, 1000 examples, float32) written with a custom_vjp swish (its HVPs
reverse-over-reverse, eosflow.derivative_chain) and with a plain one (forward-over-reverse).

    PYTHONPATH=src .venv/bin/python benchmarks/custom_vjp_hvp.py [--widths 64 256]
"""

import argparse
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

from eosflow.derivative_chain import ReverseModeLoss
from eosflow.objective import Objective

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from user_models import swish  # noqa: E402  (a custom_vjp swish, as a user writes one)


def network(activation):
    def apply(params, x):
        for w, b in params[:-1]:
            x = activation(x @ w + b)
        w, b = params[-1]
        return x @ w + b

    return apply


def best_ms(fn, *args, repeats=20):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    digits = load_digits()
    x = jnp.asarray(digits.data[:1000] / 16, jnp.float32)
    y = jax.nn.one_hot(digits.target[:1000], 10)
    print("| d | model | gradient ms | HVP ms | 3 HVPs (vmap) ms | max rel. diff. of H v |")
    print("|---|---|---|---|---|---|")
    for width in args.widths:
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        sizes = [64, width, width, 10]
        params = [
            (jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b)) for k, a, b in zip(keys, sizes[:-1], sizes[1:])
        ]
        rows = {}
        for name, activation in (
            ("plain (forward-over-reverse)", lambda z: z * jax.nn.sigmoid(z)),
            ("custom_vjp (reverse-over-reverse)", swish),
        ):
            objective, w = Objective.from_model(network(activation), params, x, y, "cross_entropy")
            assert isinstance(objective.loss_on, ReverseModeLoss) == (activation is swish)
            v = jax.random.normal(jax.random.PRNGKey(1), w.shape)
            block = jax.random.normal(jax.random.PRNGKey(2), (w.size, 3))
            grad = eqx.filter_jit(lambda o, w: o.grad(w))
            hvp = eqx.filter_jit(lambda o, w, v: o.hvp(w, v))
            hvp_batch = eqx.filter_jit(lambda o, w, b: o.hvp_batch(w, b))
            rows[name] = (
                best_ms(grad, objective, w),
                best_ms(hvp, objective, w, v),
                best_ms(hvp_batch, objective, w, block),
                np.asarray(hvp(objective, w, v)),
            )
        reference = rows["plain (forward-over-reverse)"][3]
        for name, (g_ms, h_ms, b_ms, product) in rows.items():
            diff = np.max(np.abs(product - reference)) / np.max(np.abs(reference))
            print(f"| {w.size} | {name} | {g_ms:.2f} | {h_ms:.2f} | {b_ms:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
