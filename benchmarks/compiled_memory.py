"""Resident memory of one Python process running many configurations (a Dask worker, a notebook sweep).

    PYTHONPATH=src python benchmarks/compiled_memory.py [--configs 48] [--kept 2 32 1000]
        [--problem mlp|factorization] [--processes gd] [--grow K_MAX]
    PYTHONPATH=src python benchmarks/compiled_memory.py --operators 6

Each configuration is a new lr (so a new compilation of every process); each runs 20 steps of the
listed processes, then the process's resident memory is printed after ``gc.collect()`` and glibc's
``malloc_trim(0)`` (Linux only: freed memory is returned to the OS so that RSS shows it). Each
``--kept`` value (``eosflow.process._scan.kept``, the compiled scans kept for reuse, 32 by default) runs in a fresh
interpreter; 1000 stands for the former unbounded module-level jit. The count of memory maps is
printed too: each compiled GD scan maps ~390 regions, and past vm.max_map_count (65530 by default) LLVM
cannot allocate the next one's code ("LLVM compilation error: Cannot allocate memory") and the
interpreter dies: with ``--kept 1000 --configs 200`` the child exits with status -11 (SIGSEGV) before
the end (a loop of the same configurations had aborted with SIGABRT at about the 163rd).

``--grow K_MAX``: each configuration tracks k = 1 .. K_MAX eigenpairs, one more every 5 steps
(``spectrum.grow_every = 5``, a threshold low enough that every block grows), and runs 20 then 13
steps: K_MAX + 1 scan programs per configuration (k = 1 .. K_MAX with 5 steps, K_MAX with 13). The
live executables (summed over ``_scan``'s jits) are printed with the maps after each configuration.

``--operators N``: N ``eosflow.HessianOperator``s of one model (the digits MLP) at N points, as when the
sharpness is measured at each checkpoint of a run; prints the time of each one's first and second
product (the first includes any compilation).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import subprocess
import sys

PROBLEMS = {
    "mlp": {"name": "mlp", "dataset": "digits", "n_train": 300, "n_test": 0, "width": 32, "depth": 2},
    "factorization": {"name": "matrix_factorization", "dim": 2, "depth": 3, "rank": 1, "target_scale": 5.5},
}


def resident_mb() -> float:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_maps() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


def live_executables(compiled: dict) -> int:
    """Executables held by a BoundedJit's jits (JAX's private per-jit cache size)."""
    return sum(jitted._cache_size() for jitted in compiled.values())


def child(kept: int, configs: int, problem: str, processes: list[str], grow: int) -> None:
    import eosflow.process
    from eosflow.experiment import prepare

    eosflow.process._scan.kept = kept
    spectrum = {"k": 1, "k_max": grow, "grow_every": 5, "threshold": 1e-6} if grow else {"k": 1}
    lengths = (20, 13) if grow else (20,)
    sizes, maps, executables = [], [], []
    baseline = memory_maps()  # after importing eosflow
    for i in range(configs):
        table = {"lr": 0.07 + 1e-3 * i, "processes": processes, "problem": PROBLEMS[problem], "spectrum": spectrum}
        _, built, _, runs = prepare(table)
        for process in runs.values():
            state = process.init(built.w0)
            for n in lengths:
                state, _ = process.advance(state, n)
        del runs, built, state
        sizes.append(resident_mb())
        maps.append(memory_maps())
        executables.append(live_executables(eosflow.process._scan.compiled))
    growth = sizes[-1] - sizes[min(1, configs - 1)]
    print(
        f"kept {kept:5d}: RSS after each configuration (MB) "
        + " ".join(f"{s:.0f}" for s in sizes)
        + f"; growth after the second: {growth:.0f} MB ({growth / max(configs - 2, 1):.1f} MB per configuration),"
        f" over the last 8: {sizes[-1] - sizes[max(configs - 9, 0)]:.0f} MB; memory maps at the end: {maps[-1]}"
    )
    print(f"            memory maps before the first configuration {baseline}, after each: {' '.join(map(str, maps))}")
    print(f"            live executables after each configuration: {' '.join(map(str, executables))}")


def operators(count: int) -> None:
    import time

    import numpy as np

    import eosflow
    from eosflow.problems import build_problem

    problem, _ = build_problem(PROBLEMS["mlp"], 0, "float32")
    rng = np.random.default_rng(0)
    v = rng.standard_normal(problem.w0.size).astype(np.float32)
    for i in range(count):
        w = problem.w0 + 0.01 * rng.standard_normal(problem.w0.size).astype(np.float32)
        H = eosflow.HessianOperator(problem.objective, w)
        start = time.perf_counter()
        H @ v
        first = time.perf_counter() - start
        start = time.perf_counter()
        H @ v
        second = time.perf_counter() - start
        print(f"operator {i}: first product {1e3 * first:.1f} ms, second {1e3 * second:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=int, default=48)
    parser.add_argument("--kept", type=int, nargs="+", default=[2, 32, 1000])
    parser.add_argument("--problem", choices=sorted(PROBLEMS), default="mlp")
    parser.add_argument("--processes", default="gd")
    parser.add_argument("--grow", type=int, default=0, help="track k = 1 .. K_MAX eigenpairs, one more every 5 steps")
    parser.add_argument("--operators", type=int, default=0, help="time N HessianOperators of one model instead")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.operators:
        operators(args.operators)
        return
    processes = args.processes.split(",")
    if args.child is not None:
        child(args.child, args.configs, args.problem, processes, args.grow)
        return
    steps = f"20 then 13 steps, k = 1 .. {args.grow}" if args.grow else "20 steps"
    print(f"{args.configs} configurations of {processes} on {args.problem}, {steps} each")
    for kept in args.kept:
        command = [sys.executable, __file__, "--child", str(kept), "--configs", str(args.configs)]
        command += ["--problem", args.problem, "--processes", args.processes, "--grow", str(args.grow)]
        code = subprocess.run(command).returncode
        if code != 0:
            print(f"kept {kept:5d}: the interpreter exited with status {code}")


if __name__ == "__main__":
    main()
