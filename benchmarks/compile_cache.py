"""What JAX's persistent compilation cache saves a command-line run, and that it changes no number.

    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/compile_cache.py [--spec SPEC] [--reps 2]

Runs ``eosflow run SPEC`` (default: the demo's spec) in fresh processes: without a cache, then with
``eosflow --compile-cache DIR`` into an empty DIR (cold) and again (warm), then with JAX's own default
(``JAX_COMPILATION_CACHE_DIR`` alone: only programs that compiled for over 1 s are kept) cold and warm.
Prints the wall time of each (the median over ``--reps``, each rep from an empty cache), the entries each
cache holds, and whether every run's arrays equal the uncached run's bit for bit (``eosflow.load``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import eosflow

DEMO = Path(eosflow.__file__).parent / "specs" / "demo.toml"


def timed_run(spec: Path, out: Path, cache: list[str], env: dict[str, str]) -> float:
    command = [sys.executable, "-m", "eosflow", *cache, "run", str(spec), "--out", str(out), "--quiet"]
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, **env}, capture_output=True)
    return time.perf_counter() - start


def same_arrays(a: Path, b: Path) -> bool:
    left, right = eosflow.load(a), eosflow.load(b)
    return all(np.array_equal(left[name].values, right[name].values, equal_nan=True) for name in left.data_vars)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=DEMO)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args(argv)
    settings = {
        "no cache": lambda d: ([], {}),
        "--compile-cache (every program)": lambda d: (["--compile-cache", str(d)], {}),
        "JAX_COMPILATION_CACHE_DIR (JAX's 1 s threshold)": lambda d: ([], {"JAX_COMPILATION_CACHE_DIR": str(d)}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        reference = None
        print(f"spec: {args.spec}")
        print("| setting | cold s | warm s | cache entries | arrays bitwise equal to the uncached run |")
        print("|---|---|---|---|---|")
        for label, setting in settings.items():
            cold, warm, entries, equal = [], [], 0, True
            for rep in range(args.reps):
                cache = root / f"cache-{len(label)}-{rep}"
                flags, env = setting(cache)
                first, second = root / f"{len(label)}-{rep}-a", root / f"{len(label)}-{rep}-b"
                cold.append(timed_run(args.spec, first, flags, env))
                warm.append(timed_run(args.spec, second, flags, env))
                reference = reference or first
                equal &= same_arrays(reference, first) and same_arrays(reference, second)
                entries = len(list(cache.glob("*"))) if cache.exists() else 0
            warm_cell = f"{statistics.median(warm):.1f}" if flags or env else "-"
            cold_cell = f"{statistics.median(cold + ([] if flags or env else warm)):.1f}"
            print(f"| {label} | {cold_cell} | {warm_cell} | {entries} | {'yes' if equal else 'NO'} |")


if __name__ == "__main__":
    main()
