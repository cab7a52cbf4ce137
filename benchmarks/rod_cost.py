"""Where rod flow's own cost goes: counted gradient-equivalents and wall clock, part by part.

    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/rod_cost.py [--problems mlp_digits cnn_digits] [--reps 30]

On the leaderboard's nets (its spec tables, float32), at the initial parameters with a rod of
length 1e-2 along a random direction, each part of a rod-flow step is jitted and timed alone
(median of ``--reps`` calls after a warm-up): one gradient (the unit), the rod's two ends without
and with the centre's correction (one ``jax.linearize`` of the two end gradients and its tangent
at E; or, ``curvature = "lookahead"``, two more gradients at the moved ends), one HVP by
``jvp(grad)``, the centre's loss (``observe``), and the whole process step with
the eigensolver off (``spectrum.every = 0``, which rod flow never reads) and on; and the corrected
ends n times in an XLA loop and unrolled, alone and inside a 5-step ``lax.scan`` (as the runner
scans a chunk), to show what the loop itself costs (XLA:CPU runs convolutions much slower inside
a loop). Each line gives the gradient-equivalents the process
counts (an HVP counts 2) and the measured time in gradients.
Wall-clock ratios depend on the machine and its load; the counts do not.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from eosflow.experiment import prepare
from eosflow.flows.rod import correction_coefficient, rod_ends
from eosflow.leaderboard import suite_tables


def timed(fn, *args, reps: int) -> float:
    """Median wall-clock seconds of a jitted call (after one warm-up call)."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def unrolled(body, x, n: int):
    """body applied n times in a Python loop (traced n times: no XLA loop around it)."""
    for _ in range(n):
        x = body(x)
    return x


def breakdown(name: str, table: dict, reps: int) -> None:
    table = {**table, "processes": ["rod_flow"]}
    off = {**table, "spectrum": {**table.get("spectrum", {}), "every": 0}}  # rod flow never reads eigenpairs
    _, problem, _, processes = prepare(off)
    rod = processes["rod_flow"]
    measuring = prepare({**table, "spectrum": {**table.get("spectrum", {}), "every": 1}})[3]["rod_flow"]
    objective, w, lr = problem.objective, problem.w0, rod.lr
    n, correction = rod.options.substeps, rod.options.correction
    c = correction_coefficient(n, correction)
    direction = jax.random.normal(jax.random.PRNGKey(0), w.shape, w.dtype)
    direction = direction / jnp.linalg.norm(direction)
    length = jnp.asarray(1e-2, w.dtype)
    gradient = timed(jax.jit(lambda w: objective.value_and_grad(w)), w, reps=reps)
    parts = [
        ("one gradient (the unit)", 1, jax.jit(lambda w: objective.value_and_grad(w)), (w,)),
        ("one HVP, jvp(grad) (its gradient included)", 2, jax.jit(lambda w, v: objective.hvp(w, v)), (w, direction)),
        (
            "rod ends, no correction: 2 gradients",
            2,
            jax.jit(lambda w, u, m: rod_ends(objective, w, u, m, lr, 0.0)),
            (w, direction, length),
        ),
        (
            "rod ends with the correction: 2 gradients + 2 HVPs",
            6,
            jax.jit(lambda w, u, m: rod_ends(objective, w, u, m, lr, c)),
            (w, direction, length),
        ),
        (
            "rod ends with the lookahead correction: 4 gradients",
            4,
            jax.jit(lambda w, u, m: rod_ends(objective, w, u, m, lr, c, "lookahead")),
            (w, direction, length),
        ),
        ("loss at the centre (observe; not counted)", 0, jax.jit(lambda w: objective.value(w)), (w,)),
    ]

    def corrected(x):
        return x + 1e-6 * rod_ends(objective, x, direction, length, lr, c).centre_velocity

    def looped(x):
        return jax.lax.fori_loop(0, n, lambda i, x: corrected(x), x)

    def flat(x):
        return unrolled(corrected, x, n)

    def scanned(substeps):  # 5 steps of n substeps in a lax.scan, as the runner scans a chunk; per step
        return jax.jit(lambda x: jax.lax.scan(lambda z, _: (substeps(z), None), x, None, length=5)[0])

    parts += [
        (f"rod ends with the correction, {n} times in a lax.fori_loop", 6 * n, jax.jit(looped), (w,)),
        (f"rod ends with the correction, {n} times unrolled", 6 * n, jax.jit(flat), (w,)),
        ("the same loop inside a 5-step lax.scan, per step", 6 * n, scanned(looped), (w,), 5),
        ("the same unrolled inside a 5-step lax.scan, per step", 6 * n, scanned(flat), (w,), 5),
    ]
    state = rod.init(w)
    state = state._replace(z=(w, length * direction))
    step = jax.jit(lambda s: rod.step(s))
    row = step(state)[1]
    counted = float(row["grads"]) + 2 * float(row["hvps"])  # as compare.COST_WEIGHTS: an HVP counts 2
    measured_step = jax.jit(lambda s: measuring.step(s))
    mrow = measured_step(state)[1]
    ahead = prepare({**off, "rod_flow": {**table.get("rod_flow", {}), "curvature": "lookahead"}})[3]["rod_flow"]
    ahead_step = jax.jit(lambda s: ahead.step(s))
    ahead_row = ahead_step(state)[1]
    parts += [
        (f"whole step, eigensolver off ({n} substeps)", counted, step, (state,)),
        (
            "whole step, eigensolver off, lookahead correction",
            float(ahead_row["grads"]) + 2 * float(ahead_row["hvps"]),
            ahead_step,
            (state,),
        ),
        (
            f"whole step, eigensolver on ({int(mrow['measurement_hvps'])} HVPs here)",
            counted + 2 * float(mrow["measurement_hvps"]),
            measured_step,
            (state,),
        ),
    ]
    print(f"\n## {name}: d = {w.size}, lr = {lr}, substeps = {n}, correction = {correction}")
    print(f"one gradient: {1e3 * gradient:.3f} ms\n")
    print("| part | counted grad-equiv. | measured time / one gradient | ms |")
    print("|---|---|---|---|")
    for label, count, fn, args, *per in parts:
        seconds = timed(fn, *args, reps=reps) / (per[0] if per else 1)
        print(f"| {label} | {count:g} | {seconds / gradient:.2f} | {1e3 * seconds:.3f} |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["mlp_digits", "cnn_digits"])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    tables = suite_tables(models=["rod_flow"])
    for name in args.problems:
        breakdown(name, tables[name], args.reps)


if __name__ == "__main__":
    main()
