"""Milliseconds per step of GD, GD with k = 1 and k = 3 tracked eigenpairs, and the central flow,
on the digits MLP at d ~ 3k, 30k, 300k and 3M, on jax's default device (meant for a CUDA GPU).

    benchmarks/gpu.sh [--cpu-smoke] [--steps 100]          # the wrapper: refuses to run without a GPU
    python benchmarks/gpu.py [--device gpu|cpu] [--widths 32 140 510 1700] [--steps 100]

The network is the demo's tanh MLP 64-w-w-10 on 500 digits (lr = 0.4, float32); widths 32, 140,
510 and 1700 give d = 3466, 30250, 298870 and 3019210. Every process runs ``--steps`` steps once
to compile, then again from the same initialization (``--repeats`` times, the median printed), timed
(``block_until_ready``), in the spec's precision as ``eosflow run`` computes (float32 matrix products at
"highest", not a GPU's TF32); the table also gives the HVPs per step of the timed run. ``--device cpu
--widths 32 140 --steps 20`` (what ``gpu.sh --cpu-smoke`` runs) checks the script on a machine without a
GPU; ``--cases eigenpairs`` keeps the cases whose label holds that text (comma-separated), and ``--cpu-time``
times by the process's CPU time, which other jobs on a shared CPU disturb far less than the wall clock.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from eosflow.cli import demo_table
from eosflow.experiment import prepare
from eosflow.precision import precision

CASES = {  # label: (process, spectrum table)
    "GD": ("gd", {"every": 0}),
    "GD + k=1 eigenpairs": ("gd", {"k": 1, "k_max": 1}),
    "GD + k=3 eigenpairs": ("gd", {"k": 3, "k_max": 3}),
    "central flow (k=3)": ("central_flow", {"k": 3, "k_max": 3}),
}


def time_case(
    width: int, process_name: str, spectrum: dict, steps: int, repeats: int = 1, clock=time.perf_counter
) -> tuple[int, float, float]:
    """(d, ms per step, HVPs per step) of ``steps`` steps of one process, compiled beforehand (the median
    over ``repeats`` timed runs, by ``clock``)."""
    table = demo_table()
    table.update(steps=steps, processes=[process_name], spectrum=spectrum)
    table["problem"]["width"] = width
    with precision(table["dtype"]):  # as `eosflow run` computes: float32 products in float32, not a GPU's TF32
        _, problem, _, processes = prepare(table)
        process = processes[process_name]
        state = process.init(problem.w0)
        jax.block_until_ready(process.advance(state, steps))  # compile
        times = []
        for _ in range(repeats):
            start = clock()
            _, rows = process.advance(state, steps)
            jax.block_until_ready(rows)
            times.append(clock() - start)
    return problem.w0.size, 1e3 * float(np.median(times)) / steps, float(np.mean(np.asarray(rows["hvps"])))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=["gpu", "cpu"], default="gpu", help="run on it (refused unless jax has a GPU)"
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 140, 510, 1700])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case (their median is printed)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the process's CPU time (all threads) instead of the wall clock: on a shared, loaded CPU",
    )
    parser.add_argument(
        "--cases", default="", help="only the cases whose label contains one of these (comma-separated)"
    )
    args = parser.parse_args()
    cases = {label: case for label, case in CASES.items() if any(part in label for part in args.cases.split(","))}
    backend = jax.default_backend()
    if args.device == "gpu" and backend != "gpu":
        print(
            f"no GPU: jax {jax.__version__} runs on {backend} ({jax.devices()[0]}); install a CUDA jax "
            f"(pip install 'jax[cuda12]') on a machine with a GPU, or check the script with --cpu-smoke"
        )
        return 2
    device = jax.devices(args.device)[0]
    jax.config.update("jax_default_device", device)  # --device cpu on a GPU machine: its CPU, not the GPU
    timed = "CPU time" if args.cpu_time else "wall time"
    print(
        f"jax {jax.__version__} on {device} ({device.platform}); {args.steps} steps per case timed ({timed}, median "
        f"of {args.repeats}), after compiling"
    )
    print("| d | " + " | ".join(f"{label} ms/step (HVPs/step)" for label in cases) + " |")
    print("|---" * (len(cases) + 1) + "|")
    for width in args.widths:
        cells = []
        for process_name, spectrum in cases.values():
            clock = time.process_time if args.cpu_time else time.perf_counter
            d, ms, hvps = time_case(width, process_name, spectrum, args.steps, args.repeats, clock)
            cells.append(f"{ms:.2f} ({hvps:.1f})")
        print(f"| {d} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
