"""The runner's own cost: `eosflow.run` of plain GD against a hand-written jitted `lax.scan` of the same steps.

Both in one process, on the same in-memory problem (so the runner's scans compile once), alternated rep by rep.
The runner's time is its summary's `seconds` (the chunk loop: scans, distances, chunk files, checkpoints,
summaries; its scans compiled in a warm-up), the hand loop's its wall time with the losses brought to the host
per chunk. Prints ms per step and the median of the per-rep ratios runner / hand, per chunk length.

    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false OMP_NUM_THREADS=1 PYTHONPATH=src \\
        .venv/bin/python benchmarks/runner_overhead.py --width 64 --chunks 100,1000 --reps 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from eosflow.experiment import prepare, run
from eosflow.precision import precision
from eosflow.store import RunStore


def table(width: int, steps: int, chunk: int, processes: list[str]) -> dict:
    return {
        "name": "overhead",
        "steps": steps,
        "lr": 0.4,
        "dtype": "float32",
        "processes": processes,
        "problem": {"name": "mlp", "width": width, "n_train": 500, "n_test": 0},
        "spectrum": {"every": 0},
        "record": {"chunk": chunk},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--chunks", default="100,1000")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--processes", default="gd", help="comma-separated; the hand loop is GD alone")
    args = parser.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    processes = args.processes.split(",")
    with precision("float32"):
        _, problem, _, _ = prepare(table(args.width, args.steps, chunks[0], processes))
        objective, w0 = problem.objective, problem.w0

        def step(w, _):
            loss, grad = objective.value_and_grad(w)
            return w - 0.4 * grad, loss

        scans = {c: jax.jit(lambda w, c=c: jax.lax.scan(step, w, None, length=c)) for c in chunks}

    def hand(chunk: int) -> float:
        with precision("float32"):
            started, w, losses = time.perf_counter(), w0, []
            for _ in range(args.steps // chunk):
                w, loss = scans[chunk](w)
                losses.append(np.asarray(loss))
            return time.perf_counter() - started

    def runner(chunk: int, out: Path) -> float:
        run(table(args.width, args.steps, chunk, processes), out, overwrite=True, problem=problem)
        return RunStore(out).read_summary()["seconds"]  # its scans compiled in the warm-up (the same problem)

    with tempfile.TemporaryDirectory() as scratch:
        for chunk in chunks:  # warm-up: every program compiled
            hand(chunk), runner(chunk, Path(scratch) / f"c{chunk}")
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.reps):
            for chunk in chunks:
                times.setdefault(("hand", chunk), []).append(hand(chunk))
                times.setdefault(("runner", chunk), []).append(runner(chunk, Path(scratch) / f"c{chunk}"))
    print(
        f"mlp width {args.width} (d = {int(w0.size)}), {args.steps} steps of {'+'.join(processes)}, float32, "
        f"{args.reps} reps (medians)"
    )
    print("| chunk | hand jit(scan) ms/step | runner ms/step | runner / hand |")
    print("|---|---|---|---|")
    for chunk in chunks:
        hand_times, runner_times = np.array(times[("hand", chunk)]), np.array(times[("runner", chunk)])
        per_step = 1e3 / args.steps
        print(
            f"| {chunk} | {per_step * np.median(hand_times):.3f} | {per_step * np.median(runner_times):.3f} | "
            f"{np.median(runner_times / hand_times):.2f} |"
        )


if __name__ == "__main__":
    main()
