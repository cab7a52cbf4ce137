"""Where the test suite's time goes: per test file, its wall time, XLA compilation and figure rendering.

A pytest plugin, loaded into every file's process of ``tests/run_files.py``, appends one JSON line per
file to ``$SUITE_TIME`` (default ``suite_time.jsonl``); run as a script, this module prints the table:

    PYTHONPATH=src:benchmarks SUITE_TIME=/tmp/suite.jsonl .venv/bin/python tests/run_files.py -p suite_time
    .venv/bin/python benchmarks/suite_time.py /tmp/suite.jsonl

Compilation is the time inside ``jax._src.compiler.compile_or_get_cached`` (XLA's backend compile of
each program, after tracing and lowering, which are not counted), and its count; figures are the time
inside matplotlib's ``Figure.savefig`` and ``Figure.tight_layout``. The wrappers are installed in the
test process only, by ``pytest_configure``; nothing is changed when this module is imported.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

_TOTALS: dict[str, float] = {"compile_s": 0.0, "compiles": 0, "figure_s": 0.0, "figures": 0}
_START = [0.0]


def _timed(function: Callable, seconds: str, count: str | None) -> Callable:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _TOTALS[seconds] += time.perf_counter() - start
            if count:
                _TOTALS[count] += 1

    return wrapper


def pytest_configure(config: Any) -> None:
    from jax._src import compiler  # private: the one function every compilation goes through
    from matplotlib.figure import Figure

    if not hasattr(compiler, "compile_or_get_cached"):
        raise RuntimeError("suite_time: jax._src.compiler.compile_or_get_cached is gone in this jax version")
    compiler.compile_or_get_cached = _timed(compiler.compile_or_get_cached, "compile_s", "compiles")
    Figure.savefig = _timed(Figure.savefig, "figure_s", "figures")  # type: ignore[method-assign]
    Figure.tight_layout = _timed(Figure.tight_layout, "figure_s", None)  # type: ignore[method-assign]
    _START[0] = time.perf_counter()


def pytest_sessionfinish(session: Any) -> None:
    row = {"files": [str(arg) for arg in session.config.args], "wall_s": time.perf_counter() - _START[0], **_TOTALS}
    with open(os.environ.get("SUITE_TIME", "suite_time.jsonl"), "a") as out:
        out.write(json.dumps(row) + "\n")


def table(path: str) -> str:
    """The rows of ``path``, slowest file first, and their totals."""
    with open(path) as lines:
        rows = sorted((json.loads(line) for line in lines if line.strip()), key=lambda row: -row["wall_s"])
    text = [f"{'file':32s} {'wall s':>7s} {'compile s':>10s} {'compiles':>9s} {'figures s':>10s} {'figures':>8s}"]
    for row in rows:
        name = " ".join(os.path.basename(file) for file in row["files"]) or "?"
        text.append(
            f"{name:32s} {row['wall_s']:7.0f} {row['compile_s']:10.0f} {row['compiles']:9d} "
            f"{row['figure_s']:10.1f} {row['figures']:8d}"
        )
    total = {key: sum(row[key] for row in rows) for key in ("wall_s", "compile_s", "compiles", "figure_s", "figures")}
    text.append(
        f"{'total (' + str(len(rows)) + ' files)':32s} {total['wall_s']:7.0f} {total['compile_s']:10.0f} "
        f"{total['compiles']:9d} {total['figure_s']:10.1f} {total['figures']:8d}"
    )
    share = total["compile_s"] / total["wall_s"] if total["wall_s"] else 0.0
    text.append(f"XLA compilation: {share:.0%} of the files' wall time")
    return "\n".join(text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/suite_time.py SUITE_TIME.jsonl")
    print(table(sys.argv[1]))
