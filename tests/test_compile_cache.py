"""``eosflow --compile-cache DIR``: every program compiled once into DIR, loaded by later commands, no number changed.

The command line runs in subprocesses here: the cache is a setting of JAX for the whole process, which the
test process must not take on (and an import of eosflow never sets it: test_precision's import checks)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import eosflow

SPEC = """
steps = 12
lr = 0.5
processes = ["gd", "rod_flow"]
[problem]
name = "mlp"
width = 6
n_train = 40
n_test = 0
[spectrum]
k = 1
"""


def eosflow_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("JAX_")}
    return subprocess.run(
        [sys.executable, "-m", "eosflow", *args], capture_output=True, text=True, env={**environment, **(env or {})}
    )


def entries(cache: Path) -> set[str]:
    return {path.name for path in cache.iterdir() if not path.name.startswith(".")}


def test_every_program_is_cached_loaded_by_the_next_command_and_changes_no_number(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    cache = tmp_path / "cache" / "made"  # made with its parents
    plain = eosflow_cli("run", str(spec), "--out", str(tmp_path / "plain"), "--quiet")
    assert plain.returncode == 0, plain.stderr
    cold = eosflow_cli("--compile-cache", str(cache), "run", str(spec), "--out", str(tmp_path / "cold"), "--quiet")
    assert cold.returncode == 0, cold.stderr
    kept = entries(cache)
    # every program, not only those that compiled for over 1 s (JAX's default threshold keeps 0-3 of this run's)
    assert len(kept) >= 10, sorted(kept)
    warm = eosflow_cli("--compile-cache", str(cache), "run", str(spec), "--out", str(tmp_path / "warm"), "--quiet")
    assert warm.returncode == 0, warm.stderr
    assert entries(cache) == kept  # the second command compiled nothing that was not in the cache
    reference = eosflow.load(tmp_path / "plain")
    for run in ("cold", "warm"):
        loaded = eosflow.load(tmp_path / run)
        for name in reference.data_vars:
            np.testing.assert_array_equal(loaded[name].values, reference[name].values, err_msg=f"{run}: {name}")


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_cache_directory_that_cannot_be_written_is_named(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    directory = blocker if where == "a file" else blocker / "cache"
    failed = eosflow_cli("--compile-cache", str(directory), "problems")
    assert failed.returncode == 2
    assert f"--compile-cache {directory}: cannot write a compiled program there" in failed.stderr
    assert "Traceback" not in failed.stderr and blocker.read_text() == "not a directory"


def test_sweep_workers_cache_every_program_where_the_command_line_said(monkeypatch, tmp_path):
    """The workers' cache: JAX_COMPILATION_CACHE_DIR if set (inherited), else eosflow --compile-cache's, else the
    sweep's own; in each, every program (JAX's threshold at 0 unless the user set one)."""
    from eosflow.sweep import worker_environment

    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        monkeypatch.delenv(name, raising=False)
    env = worker_environment(1, tmp_path / "sweep-cache")
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "sweep-cache")
    assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"
    before = jax.config.values["jax_compilation_cache_dir"]
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "chosen"))  # as --compile-cache sets it
        assert worker_environment(1, tmp_path / "sweep-cache")["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "chosen")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "yours"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")
    env = worker_environment(1, tmp_path / "sweep-cache")
    assert "JAX_COMPILATION_CACHE_DIR" not in env and "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in env


LEADERBOARD_SCRIPT = """
import dataclasses, multiprocessing, sys
import eosflow.leaderboard as lb
from eosflow.cli import main
from tests.test_leaderboard import TINY

multiprocessing.set_start_method(sys.argv[1])  # the workers' start method, as macOS's default or Python 3.14's
(entry,) = TINY
lb.SUITES["default"] = tuple(
    dataclasses.replace(entry, name=name, table={**entry.table, "name": name, "lr": lr}, quick_steps=30)
    for name, lr in (("a", 0.08), ("b", 0.082))
)
sys.exit(main(sys.argv[2:]))
"""


def test_leaderboard_workers_use_the_commands_compile_cache(tmp_path):
    """`eosflow --compile-cache DIR leaderboard --jobs 2` with spawned workers (macOS's default start method; Python
    3.14's forkserver on Linux likewise copies no JAX configuration): the workers keep their programs in DIR. Before,
    only a forked worker had the parent's setting: spawned, they wrote no entry (the parent compiles none of its own,
    so DIR stayed empty)."""
    root = Path(__file__).resolve().parents[1]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("JAX_")}
    environment["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root)])
    cache, out = tmp_path / "cache", tmp_path / "board"
    command = ["--compile-cache", str(cache), "leaderboard", "--quick", "--models", "rod_flow", "--quiet"]
    done = subprocess.run(
        [sys.executable, "-c", LEADERBOARD_SCRIPT, "spawn", *command, "--jobs", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert len(entries(cache)) >= 10, sorted(entries(cache))
