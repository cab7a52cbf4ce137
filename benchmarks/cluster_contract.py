"""What the cluster contract of :func:`eosflow.spectrum.lobpcg` costs, against the per-pair one.

    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/cluster_contract.py [--planted] [--replay]
        [--width 140] [--steps 300] [--replay-from 150] [--replay-to 250]
        [--variants tol=1e-3,guard=1 tol=1e-3,guard=1,cluster=1e-2 ...]

``--planted``: symmetric 400 x 400 matrices (float64) with a top cluster of 2 or 4 eigenvalues
10 (1 - s i) (s = 1e-2, 1e-3, 1e-4), then 8 and 7.5 and a bulk in [-1, 7]; LOBPCG (tol 1e-6, guard
2) from the top-k eigenvectors plus 0.1 Gaussian noise, 5 starts each, per pair against
``cluster = 10 s``: mean HVPs.

``--replay``: the central flow (k = 3, ``remeasure = false``) on the digits MLP of ``--width``
(lr = 0.4, 500 digits, float32) saves its centre at every step; the top 8 eigenvalues (ARPACK,
tol 0, float64) at three steps show the spectrum at the edge; then each variant of the solver
(``lobpcg`` keywords; k = 3, ``max_iters`` 30) replays steps [from, to), warm-started from the
previous step as in a run (20 steps of warm-up first): HVPs per step, the share of steps that
stop at ``max_iters``, and the largest reported per-pair residual. ``extrapolate=true`` starts
from the subspace extrapolated from the last two measurements instead (:func:`extrapolated`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tomllib

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)  # this script's choice: the planted matrices and the oracle are float64

from jaxtyping import Array

import eosflow
from eosflow.cli import demo_table
from eosflow.experiment import prepare, run
from eosflow.spectrum import lanczos, lobpcg, random_vectors


def planted(seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    d = 400
    print("| cluster spacing s | cluster size | k | HVPs, per pair | HVPs, cluster = 10 s |")
    print("|---|---|---|---|---|")
    for spacing in (1e-2, 1e-3, 1e-4):
        for size in (2, 4):
            top = np.concatenate([10.0 * (1.0 - spacing * np.arange(size)), [8.0, 7.5]])
            values = np.concatenate([top, rng.uniform(-1.0, 7.0, d - top.size)])
            q = np.linalg.qr(rng.standard_normal((d, d)))[0]
            a = jnp.asarray(q @ np.diag(values) @ q.T)
            vectors = q[:, np.argsort(-values)]
            for k in (1, 2, 3):
                starts = [vectors[:, :k] + 0.1 * rng.standard_normal((d, k)) for _ in range(5)]
                cells = []
                for cluster in (None, 10 * spacing):
                    solve = jax.jit(
                        lambda a, s, c=cluster: lobpcg(lambda v: a @ v, s, tol=1e-6, max_iters=300, guard=2, cluster=c)
                    )
                    cells.append(np.mean([int(solve(a, jnp.asarray(s)).hvps) for s in starts]))
                print(f"| {spacing:.0e} | {size} | {k} | {cells[0]:.0f} | {cells[1]:.0f} |", flush=True)


def centres(width: int, steps: int) -> tuple[np.ndarray, dict]:
    """The central flow's centre at every step (k = 3, remeasure = false), and the run's table."""
    table = demo_table()
    table.update(
        steps=steps,
        processes=["central_flow"],
        spectrum={"k": 3, "k_max": 3, "tol": 1e-3},
        record={"chunk": 100, "params_every": 1},
    )
    table["problem"]["width"] = width
    table["central_flow"] = {"remeasure": False}
    with tempfile.TemporaryDirectory() as out:
        run(table, out)
        _, params = eosflow.load_params(out, "central_flow")
    return np.asarray(params), table


def extrapolated(previous: Array, vectors: Array) -> Array:
    """2 U_t - U_{t-1} W, W the rotation that best aligns U_{t-1} with U_t (polar factor of
    U_{t-1}^T U_t): the subspace moved on by one more step of its last motion."""
    left, _, right = jnp.linalg.svd(previous.T @ vectors)
    return 2 * vectors - previous @ (left @ right)


def replay(args) -> None:
    started = time.perf_counter()
    params, table = centres(args.width, args.steps)
    objective = prepare(table)[1].objective
    objective64 = prepare({**table, "dtype": "float64"})[1].objective
    print(f"central flow, digits MLP width {args.width}: d = {params.shape[1]}, {args.steps} steps")
    for t in (args.replay_from, (args.replay_from + args.replay_to) // 2, args.replay_to - 1):
        top = lanczos(objective64, jnp.asarray(params[t], jnp.float64), k=8, tol=0.0).values
        print(f"step {t}: lr lambda_1..8 = {np.round(0.4 * np.asarray(top), 4).tolist()}")
    print("\n| solver (k = 3, max_iters 30) | HVPs / step | steps at max_iters | largest reported residual |")
    print("|---|---|---|---|")
    for variant in args.variants:
        keywords = tomllib.loads("\n".join(variant.split(",")))
        extrapolate = keywords.pop("extrapolate", False)

        def measure(w, v, keywords=keywords):
            matvec = jax.vmap(jax.linearize(objective.grad, w)[1], in_axes=1, out_axes=1)
            return lobpcg(matvec, v, max_iters=30, **keywords)

        measure = jax.jit(measure)
        vectors = random_vectors(jax.random.PRNGKey(0), params.shape[1], 3, params.dtype)
        for t in range(args.replay_from - 20, args.replay_from):  # warm-up
            previous, vectors = vectors, measure(jnp.asarray(params[t]), vectors).vectors
        hvps, unconverged, worst = [], [], 0.0
        for t in range(args.replay_from, args.replay_to):
            start = extrapolated(previous, vectors) if extrapolate else vectors
            pairs = measure(jnp.asarray(params[t]), start)
            previous, vectors = vectors, pairs.vectors
            hvps.append(int(pairs.hvps))
            contract = pairs.residuals if "cluster" not in keywords else pairs.subspace_residuals
            unconverged.append(bool(np.any(np.asarray(contract) > keywords["tol"])))
            worst = max(worst, float(np.max(pairs.residuals)))
        print(f"| {variant} | {np.mean(hvps):.1f} | {np.mean(unconverged):.0%} | {worst:.1e} |", flush=True)
    print(f"({time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planted", action="store_true", help="planted clusters")
    parser.add_argument("--replay", action="store_true", help="replay along the central flow on the digits MLP")
    parser.add_argument("--width", type=int, default=140, help="--replay: hidden width (140: d = 30250)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--replay-from", type=int, default=150)
    parser.add_argument("--replay-to", type=int, default=250)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[
            "tol=1e-3,guard=1",
            "tol=1e-3,guard=3",
            "tol=1e-3,guard=6",
            "tol=1e-3,guard=1,cluster=1e-2",
            "tol=1e-3,guard=3,cluster=1e-2",
            "tol=1e-3,guard=3,cluster=3e-3",
            "tol=1e-3,guard=6,cluster=1e-3",
            "tol=3e-3,guard=1",
            "tol=1e-2,guard=1",
            "tol=1e-3,guard=1,extrapolate=true",
            "tol=1e-2,guard=1,extrapolate=true",
        ],
        help="--replay: lobpcg keywords per solver (TOML values joined by ',')",
    )
    args = parser.parse_args()
    if args.planted:
        planted()
    if args.replay:
        replay(args)


if __name__ == "__main__":
    main()
