"""Cost of a central-flow step before the edge of stability, in gradient evaluations.

    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/central_step_cost.py [--steps 40] [--repeats 5] [--width 32]

On the leaderboard's digits MLP (d = 3,466, float32, lr = 0.4; no direction is critical during
the first steps), every process runs ``--steps`` steps from w0 once to compile, then
``--repeats`` more times (interleaved); the best time per step is divided by the best time of one jitted
value_and_grad at w0 ("gradient-equivalents per step"). Times are this process's CPU time
(``time.process_time``, all threads), which a loaded machine disturbs far less than wall-clock. Both flows measure one
eigenpair at every step (the central flow always does), so their ratio is the cost of the
central flow's own machinery; GD with the same measurement (one gradient + the eigensolver) is
timed too, so that what each flow spends beyond the eigensolver is printed apart. Counts from
the rows (machine-independent) are printed beside.
Under contention, compare ratios taken in one invocation, not absolute times.
"""

from __future__ import annotations

import argparse
import time

import equinox as eqx
import jax
import numpy as np

from eosflow.experiment import prepare

PROBLEM = {"name": "mlp", "dataset": "digits", "n_train": 300, "n_test": 0, "width": 32, "depth": 2}


def best_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        jax.block_until_ready(run())
        times.append(time.process_time() - start)
    return 1e3 * min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument(
        "--compile",
        type=int,
        nargs="*",
        default=[],
        metavar="K",
        help="only print the CPU time of the central flow's first advance (compile + 2 steps, "
        "float64, lr = 1, n_train 60, width 12) with K tracked pairs",
    )
    parser.add_argument("--width", type=int, default=32, help="hidden width (32: d = 3,466; 128: d = 26,122)")
    args = parser.parse_args(argv)
    if args.compile:
        for k in args.compile:
            small = {**PROBLEM, "n_train": 60, "width": 12}
            table = {
                "lr": 1.0,
                "dtype": "float64",
                "problem": small,
                "processes": ["central_flow"],
                "spectrum": {"k": k, "k_max": k},
            }
            _, problem, _, processes = prepare(table)
            flow = processes["central_flow"]
            first = best_ms(lambda f=flow, w=problem.w0: f.advance(f.init(w), 2)[1], 1) / 1e3
            print(f"k = {k}: first advance of the central flow (compile + 2 steps) {first:.1f} s CPU")
        return
    names = ["gd", "gradient_flow", "central_flow"]
    table = {
        "lr": 0.4,
        "dtype": args.dtype,
        "problem": {**PROBLEM, "width": args.width},
        "processes": names,
        "spectrum": {"k": 1, "k_max": 1, "every": 1},
    }
    _, problem, _, processes = prepare(table)
    gradient = eqx.filter_jit(lambda objective, w: objective.value_and_grad(w))
    jax.block_until_ready(gradient(problem.objective, problem.w0))
    grad_ms = best_ms(lambda: gradient(problem.objective, problem.w0), 20 * args.repeats)
    print(f"d = {problem.w0.size}, one value_and_grad: {grad_ms:.3f} ms (best of {20 * args.repeats})")
    runs, counts = {}, {}
    for name in names:
        process = processes[name]
        state = process.init(problem.w0)
        _, rows = process.advance(state, args.steps)  # compile
        counts[name] = {key: np.asarray(value) for key, value in rows.items()}
        runs[name] = lambda p=process, s=state: p.advance(s, args.steps)[1]
    times = {name: [] for name in names}
    for _ in range(args.repeats):  # interleaved, so that a burst of contention hits every process alike
        for name in names:
            times[name].append(best_ms(runs[name], 1) / args.steps)
    per_step = {name: min(values) for name, values in times.items()}
    for name in names:
        rows, ms = counts[name], per_step[name]
        summary = ", ".join(f"{key} {rows[key].mean():.2f}" for key in ("substeps", "grads", "hvps") if key in rows)
        critical = int(rows["critical"].max()) if "critical" in rows else 0
        print(
            f"{name:14s} {ms:8.3f} ms/step = {ms / grad_ms:6.2f} gradient-equivalents/step | rows per step: "
            f"{summary}, critical <= {critical}"
        )
    # GD with the same measurement is one gradient + the eigensolver: what a flow spends beyond it
    own = {name: (per_step[name] - per_step["gd"]) / grad_ms + 1 for name in names[1:]}
    print(
        "beyond the eigensolver (t - t_gd + one gradient): "
        + ", ".join(f"{name} {value:.2f}" for name, value in own.items())
        + " gradient-equivalents/step"
    )
    print(
        f"central / gradient flow step: {per_step['central_flow'] / per_step['gradient_flow']:.2f} (whole step), "
        f"{own['central_flow'] / own['gradient_flow']:.2f} (beyond the eigensolver)"
    )


if __name__ == "__main__":
    main()
