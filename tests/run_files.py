"""Run every test file in a pytest process of its own, ``--jobs`` at a time, then print one closing line.

In one long pytest session XLA's compiler crashed (SIGSEGV, then SIGABRT, inside
``backend_compile_and_load``) in tests/test_problems.py after ~200 earlier tests, with or without
torch imported, while the file passes alone: some state accumulates across compilations. The likely
cause, found later: every compiled scan stayed loaded for the life of the process (~390 memory maps
each) until the process reached ``vm.max_map_count`` and LLVM could not map the next program
(``benchmarks/compiled_memory.py``); the compiled scans are now bounded (:mod:`eosflow.compiled`).
One whole session has not been rerun since, and a process per file also lets files run two at a time,
so each file keeps its own process (a few seconds of start-up each).

Files run ``--jobs`` at a time (default: the machine's cores, at most 2), the slowest first, each
child on one thread (``--xla_cpu_multi_thread_eigen=false``, ``OMP_NUM_THREADS=1``) unless the
caller's environment says otherwise, so that the processes do not fight over the cores. A file's
output is printed whole when it ends, so outputs never interleave.

    python tests/run_files.py [--jobs N] [pytest options]

Where the time goes, per file (compilation, figures): ``benchmarks/suite_time.py``.
"""

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

# The files that take longest (40 s to 2 minutes of CPU each), started first so that no long file is
# left to run alone at the end. Any file not listed runs after them, largest first.
SLOWEST_FIRST = [
    "test_simulate.py",
    "test_problems.py",
    "test_torch.py",
    "test_central_flow.py",
    "test_reliability.py",
    "test_architectures.py",
    "test_microbatch.py",
    "test_spectrum.py",
    "test_adaptive_flows.py",
    "test_compare.py",
    "test_sweep.py",
    "test_tracker.py",
]


def parse_jobs(argv: list[str]) -> tuple[int, list[str]]:
    """Split ``--jobs N`` (or ``-j N``) off the pytest options."""
    jobs = min(2, os.cpu_count() or 1)
    rest = []
    args = iter(argv)
    for arg in args:
        if arg in ("--jobs", "-j"):
            value = next(args, "")
            if not value.isdigit() or int(value) < 1:
                sys.exit(f"run_files.py: --jobs needs a positive integer, got {value!r}")
            jobs = int(value)
        else:
            rest.append(arg)
    return jobs, rest


def ordered(paths: list[Path]) -> list[Path]:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    return sorted(paths, key=lambda p: (rank.get(p.name, len(rank)), -p.stat().st_size, p.name))


def child_environment(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    if jobs > 1:
        if "xla_cpu_multi_thread_eigen" not in env.get("XLA_FLAGS", ""):
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run(path: Path, options: list[str], env: dict[str, str]) -> tuple[Path, subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *options, str(path)],
        capture_output=True,
        text=True,
        env=env,
    )
    return path, result, time.perf_counter() - start


def main() -> int:
    jobs, options = parse_jobs(sys.argv[1:])
    paths = ordered(list(Path(__file__).parent.glob("test_*.py")))
    env = child_environment(jobs)
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    status = 0
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in as_completed([pool.submit(run, path, options, env) for path in paths]):
            path, result, seconds = future.result()
            out = result.stdout[-6000:] if result.returncode == 0 else result.stdout + result.stderr[-4000:]
            sys.stdout.write(f"--- {path.name} ({seconds:.0f} s)\n{out}")
            sys.stdout.flush()
            summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
            for count, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary):
                totals["error" if kind.startswith("error") else kind] += int(count)
            if result.returncode not in (0, 5):  # 5: no tests collected
                status = 1
                totals["failed"] += 0 if re.search(r"\d+ (failed|errors?)", summary) else 1  # a crash counts as one
    print(
        f"{totals['passed']} passed, {totals['failed'] + totals['error']} failed, {totals['skipped']} skipped "
        f"in {time.perf_counter() - start:.0f} s ({jobs} at a time)"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
