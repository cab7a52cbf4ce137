"""The live monitor on the demo MLP: its overhead, and its accuracy against dense float64 eigh.

    .venv/bin/python benchmarks/monitor.py [--steps 600] [--every 10] [--adam-lr 0.01] [--adam-steps 2000]

1. Overhead: the same jitted optax.sgd loop (full batch, the demo's lr = 0.4) with and without
   ``eosflow.monitor.monitored(..., every=10, k=1, tol=1e-3)``; wall-clock ratio (best of 3)
   and the HVPs the monitor spent.
2. SGD accuracy: lr * S from the monitor against lr * (top eigenvalue of the dense float64
   Hessian at the same parameters) at ``--checks`` monitored steps.
3. Adam: optax.adam at ``--adam-lr``; the preconditioned sharpness S of P^{-1/2} H P^{-1/2}
   against the dense float64 computation at ``--checks`` steps, and the band of lr * S / 38
   (1 at Adam's edge of stability, b1 = 0.9) over the second half of the run.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

jax.config.update("jax_enable_x64", True)  # this script's choice: the oracle Hessian is float64

from eosflow import optimizer_edges
from eosflow.cli import demo_table
from eosflow.experiment import prepare
from eosflow.monitor import monitored
from eosflow.precision import precision
from eosflow.spectrum import dense_hessian


def demo_problem(dtype: str):
    table = {**demo_table(), "dtype": dtype}
    with precision(dtype):
        return prepare(table)[1]


def train(optimizer, problem, steps: int, every: int, monitor: bool, record: list | None = None):
    """A plain optax loop (one jitted step per iteration); returns params at every step and the wall time."""
    objective = problem.objective
    params = objective.unravel(problem.w0)
    batch = objective.data

    def loss(params, batch):
        return objective.loss_on(_flat(params), batch)

    opt = monitored(optimizer, loss, every=every, k=1, tol=1e-3, log=None) if monitor else optimizer.transform

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params, batch)
        updates, state = opt.update(grads, state, params, batch=batch) if monitor else opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    jax.block_until_ready(step(params, state))  # compile
    history = []
    started = time.perf_counter()
    for t in range(steps):
        if record is not None:
            history.append(_flat(params))
        params, state = step(params, state)
        if record is not None and monitor and t % every == 0:
            record.append(
                (
                    t,
                    float(state.reading.sharpness),
                    optimizer.preconditioner(state.inner) if optimizer.preconditioner else None,
                    int(state.tracker.hvps),
                )
            )
    jax.block_until_ready(params)
    return history, time.perf_counter() - started, state


def _flat(params):
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(params)])


def solver_cost(problem, repeats: int = 20) -> tuple[float, float]:
    """Milliseconds of a lobpcg solve (k = 1, tol 1e-3, 10 steps of warm start apart) and of one HVP."""
    from eosflow.spectrum import lobpcg, random_vectors

    objective, w = problem.objective, problem.w0
    vector = random_vectors(jax.random.PRNGKey(0), w.size, 1, w.dtype)

    def matvec_at(w):
        return jax.vmap(jax.linearize(objective.grad, w)[1], in_axes=1, out_axes=1)

    solve = jax.jit(lambda w, v: lobpcg(matvec_at(w), v, tol=1e-3, max_iters=30).values)
    hvp = jax.jit(lambda w, v: matvec_at(w)(v))
    vector = jax.jit(lambda w, v: lobpcg(matvec_at(w), v, tol=1e-3, max_iters=30).vectors)(w, vector)
    shifted = w + 1e-3 * jax.random.normal(jax.random.PRNGKey(1), w.shape, w.dtype)  # a nearby point
    timings = []
    for f in (solve, hvp):
        jax.block_until_ready(f(shifted, vector))
        started = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(f(shifted, vector))
        timings.append(1e3 * (time.perf_counter() - started) / repeats)
    return timings[0], timings[1]


def oracle(problem64, w, preconditioner=None) -> float:
    with precision("float64"):
        hessian = dense_hessian(problem64.objective, jnp.asarray(np.asarray(w, np.float64)))
    if preconditioner is not None:
        scale = 1.0 / np.sqrt(np.asarray(_flat(preconditioner), np.float64))
        hessian = scale[:, None] * hessian * scale[None, :]
    return float(np.linalg.eigvalsh(hessian)[-1])


def accuracy(name, problem32, problem64, optimizer, steps, every, checks):
    record: list = []
    history, _, _ = train(optimizer, problem32, steps, every, True, record)
    if checks == 0:
        return record
    picks = np.linspace(0, len(record) - 1, checks).astype(int)
    errors = []
    for i in picks:
        t, measured, preconditioner, _ = record[i]
        exact = oracle(problem64, history[t], preconditioner)
        errors.append(abs(measured - exact) / abs(exact))
        print(
            f"  {name} step {t:5d}: lr*S tracker {optimizer.lr * measured:.6f}  dense float64 "
            f"{optimizer.lr * exact:.6f}  relative error {errors[-1]:.2e}"
        )
    print(
        f"  {name}: max relative error {max(errors):.2e} over {len(picks)} checked steps; "
        f"{record[-1][3] / len(record):.1f} HVPs per measurement"
    )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--also-every", default="50", help="more measurement intervals for the overhead table")
    parser.add_argument("--checks", type=int, default=4)
    parser.add_argument("--adam-lr", type=float, default=0.01)
    parser.add_argument("--adam-steps", type=int, default=2000)
    parser.add_argument("--adam-checks", type=int, default=None, help="dense checks of the Adam run (default --checks)")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: overhead,sgd,adam")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    problem32, problem64 = demo_problem("float32"), demo_problem("float64")
    lr = demo_table()["lr"]

    if "overhead" not in skip:
        sgd = optimizer_edges.sgd(lr)
        with precision("float32"):
            plain = min(train(sgd, problem32, args.steps, args.every, False)[1] for _ in range(3))
            for every in [args.every] + [int(e) for e in args.also_every.split(",") if e]:
                runs = [train(sgd, problem32, args.steps, every, True) for _ in range(3)]
                tracked = min(seconds for _, seconds, _ in runs)
                hvps = int(runs[0][2].tracker.hvps)
                print(
                    f"overhead: {args.steps} sgd steps on the demo MLP (d = {problem32.w0.size}), float32: plain "
                    f"{plain:.3f} s, monitored every {every} {tracked:.3f} s, ratio {tracked / plain:.3f} "
                    f"({hvps} HVPs, {hvps / (args.steps / every):.1f} per measurement)"
                )
            solve_ms, hvp_ms = solver_cost(problem32)
        print(
            f"  where it goes: one warm-started k=1 LOBPCG solve {solve_ms:.2f} ms, one HVP {hvp_ms:.3f} ms, "
            f"one plain step {1e3 * plain / args.steps:.3f} ms"
        )
    if "sgd" not in skip:
        with precision("float32"):
            accuracy("sgd", problem32, problem64, optimizer_edges.sgd(lr), args.steps, args.every, args.checks)
    if "adam" not in skip:
        adam = optimizer_edges.adam(args.adam_lr)
        with precision("float32"):
            checks = args.checks if args.adam_checks is None else args.adam_checks
            record = accuracy("adam", problem32, problem64, adam, args.adam_steps, args.every, checks)
        ratio = np.array([s * args.adam_lr / 38.0 for _, s, _, _ in record])
        late = ratio[len(ratio) // 2 :]
        print(
            f"  adam lr = {args.adam_lr}: lr*S_pre/38 over steps {record[len(ratio) // 2][0]}.."
            f"{record[-1][0]}: min {late.min():.3f}, 10% {np.percentile(late, 10):.3f}, median "
            f"{np.median(late):.3f}, 90% {np.percentile(late, 90):.3f}, max {late.max():.3f}; first step "
            f"with ratio >= 0.95: {next((t for (t, *_), r in zip(record, ratio) if r >= 0.95), None)}"
        )


if __name__ == "__main__":
    main()
