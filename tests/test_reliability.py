"""Faults and bad input: kills, interrupts, full disks, corrupt files, unusable paths."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w

import eosflow
from eosflow import store as store_module
from eosflow.cli import main
from eosflow.config import SpecError
from eosflow.experiment import run
from eosflow.store import RunDirectoryWarning, RunStore, StoreError

SPEC = {
    "name": "faults",
    "steps": 80,
    "lr": 0.4,
    "dtype": "float32",
    "problem": {"name": "mlp", "width": 16, "n_train": 100, "n_test": 0},
    "spectrum": {"k": 1, "k_max": 2, "threshold": 1.0, "max_iters": 8},
    "record": {"chunk": 8},
}
TRAJECTORY_VARIABLES = ("loss", "sharpness", "eigenvalues", "grad_norm", "hvps", "distance", "centre_distance")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    run(SPEC, out)
    return eosflow.load(out)


def assert_same_run(a, b):
    for name in TRAJECTORY_VARIABLES:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def _files(root: Path) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _start_cli(spec_path: Path, out: Path, *extra) -> subprocess.Popen:
    command = [sys.executable, "-m", "eosflow.cli", "run", str(spec_path), "--out", str(out), "--quiet", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _started_run(tmp_path: Path, chunks: int) -> tuple[subprocess.Popen, Path, Path]:
    """`eosflow run` of SPEC in a subprocess, once it has flushed ``chunks`` chunks: (process, spec path, out)."""
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(tomli_w.dumps(SPEC))
    out = tmp_path / "run"
    process = _start_cli(spec_path, out)
    _wait_for_chunks(out, chunks, process)
    return process, spec_path, out


def _wait_for_chunks(out: Path, count: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(RunStore(out).chunk_files("gd")) >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()}")
        time.sleep(0.05)
    raise AssertionError("the run made no progress")


def test_sigkill_mid_run_then_resume_is_bitwise_identical(tmp_path, uninterrupted):
    process, spec_path, out = _started_run(tmp_path, 3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    flushed = eosflow.load(out)  # everything flushed before the kill is readable
    n = flushed.sizes["step"]
    assert 24 <= n < 80 and flushed.attrs["status"] == "interrupted"  # the writer is gone
    assert main(["report", str(out)]) == 0  # the summary says "running"; the report still works
    np.testing.assert_array_equal(flushed.loss.values, uninterrupted.loss.values[:, :n])
    # the summary follows the checkpoints: the killed session's time and chunk timings are kept (they were lost,
    # and "run time (all sessions)" counted the sessions that ended only: 31.0 s of 141.3, from a probe)
    killed = RunStore(out).read_summary()
    checkpointed = RunStore(out).read_checkpoint().step
    assert killed["steps_done"] in (checkpointed, checkpointed - 8) and killed["seconds"] > 0, killed
    assert sum(steps for steps, _, _ in killed["timing"]["gd"]["chunks"]) == killed["steps_done"]
    assert main(["run", str(spec_path), "--out", str(out), "--resume", "--quiet"]) == 0
    assert_same_run(eosflow.load(out), uninterrupted)
    assert RunStore(out).read_summary()["seconds"] > killed["seconds"]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_stop_cleanly_with_every_step_on_disk(tmp_path, uninterrupted, signum, code):
    """Ctrl-C, and SIGTERM as `timeout`, Slurm and `docker stop` send it: the chunk in progress is
    flushed, the summary says `interrupted` with the resume command, the exit status is 128 + the
    signal (no crash: this used to end in a segfault, 139), and `eosflow resume DIR` completes the
    run bitwise equal to an uninterrupted one."""
    process, _, out = _started_run(tmp_path, 2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    name = signal.Signals(signum).name
    assert "Traceback" not in stderr and f"interrupted by {name}" in stderr
    assert f"resume with: eosflow resume {out}" in stderr
    summary = RunStore(out).read_summary()
    assert summary["status"] == "interrupted" and f"eosflow resume {out}" in summary["reason"]
    ds = eosflow.load(out)
    assert ds.sizes["step"] == summary["steps_done"] >= 16 and ds.attrs["status"] == "interrupted"
    np.testing.assert_array_equal(ds.loss.values, uninterrupted.loss.values[:, : ds.sizes["step"]])
    assert main(["resume", str(out), "--quiet"]) == 0
    assert_same_run(eosflow.load(out), uninterrupted)


def test_a_second_writer_is_refused_naming_the_first(tmp_path, uninterrupted, capsys):
    """A run in progress (paused with SIGSTOP so it certainly holds the directory) refuses an
    --overwrite with another lr and a --resume, both naming its PID and changing nothing; it then
    completes bitwise equal to a run that was never disturbed."""
    first, spec_path, out = _started_run(tmp_path, 1)
    first.send_signal(signal.SIGSTOP)
    try:
        assert RunStore(out).writer() == first.pid
        before = _files(out)
        assert main(["run", str(spec_path), "--set", "lr=0.3", "--out", str(out), "--overwrite", "--quiet"]) == 2
        assert main(["resume", str(out), "--quiet"]) == 2
        errors = capsys.readouterr().err.splitlines()
        assert len(errors) == 2 and all(
            f"being written by another eosflow process (PID {first.pid})" in e for e in errors
        )
        assert _files(out) == before
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr
    assert_same_run(eosflow.load(out), uninterrupted)
    assert RunStore(out).writer() is None  # released at exit


def test_the_lock_dies_with_its_holder(tmp_path):
    """The lock is the kernel's: a writer killed with SIGKILL leaves no stale lock."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from eosflow.store import RunStore; "
            f"RunStore({str(out)!r}).lock(); print('locked', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(StoreError, match=f"PID {holder.pid}"):
        RunStore(out).lock()
    holder.kill()
    holder.wait()
    store = RunStore(out)
    store.lock()
    assert store.writer() == os.getpid()
    store.unlock()


@pytest.mark.parametrize("failing", ["chunk", "checkpoint", "first checkpoint"])
def test_full_disk_fails_cleanly_keeps_data_and_resumes(tmp_path, monkeypatch, uninterrupted, failing):
    """The disk fills as a chunk or a checkpoint is written: the message and the summary say what is on disk, the
    steps up to the last checkpoint. When a checkpoint failed, the chunk before it was left on disk past the
    summary's steps, the summary said "running" with no reason, and at the first checkpoint the message said no
    step was on disk (from a probe under `ulimit -f 50`)."""
    out = tmp_path / "full"
    real_write = store_module.atomic_write
    checkpoints = {"n": 0}
    fails_at = 1 if failing == "first checkpoint" else 3  # checkpoints written before the write that fails

    def failing_write(path, write, *durable):
        if path.name == "checkpoint.npz":
            checkpoints["n"] += 1
        if checkpoints["n"] >= fails_at and path.name != "summary.json":
            if (path.name == "checkpoint.npz") == (failing != "chunk"):
                raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, write, *durable)

    monkeypatch.setattr(store_module, "atomic_write", failing_write)
    with pytest.raises(StoreError, match="No space left on device") as error:
        run(SPEC, out)
    done = 8 * (fails_at - (failing != "chunk"))  # SPEC's chunks of 8 steps, each checkpointed
    on_disk = f"steps 0..{done - 1} are on disk" if done else "no step is on disk yet"
    assert f"{on_disk}; resume with: eosflow resume {out}" in str(error.value)
    # (it named the --resume flag of no command, and "every step before 0" when none was)
    summary = RunStore(out).read_summary()
    assert (summary["status"], summary["steps_done"]) == ("interrupted", done), summary
    assert "No space left on device" in summary["reason"] and on_disk in summary["reason"]
    assert not list(out.rglob("*.tmp"))  # no half-written file left behind
    kept = eosflow.load(out)
    assert kept.sizes.get("step", 0) == done
    if done:
        np.testing.assert_array_equal(kept.loss.values, uninterrupted.loss.values[:, :done])
    monkeypatch.setattr(store_module, "atomic_write", real_write)
    run(SPEC, out, resume=True)
    assert_same_run(eosflow.load(out), uninterrupted)


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, uninterrupted):
    """The newest checkpoint cut short: resume says so, starts from the one before it (the chunk
    after that is recomputed) and ends bitwise equal; with both damaged it refuses, changing nothing."""
    out = tmp_path / "run"
    run(SPEC, out, stop_after=24)
    newest = out / "checkpoint.npz"
    newest.write_bytes(newest.read_bytes()[:300])
    with pytest.warns(RunDirectoryWarning, match=r"checkpoint\.npz' is corrupt .* previous checkpoint \(step 16\)"):
        run(SPEC, out, resume=True)
    assert_same_run(eosflow.load(out), uninterrupted)
    for name in ("checkpoint.npz", "checkpoint.previous.npz"):
        (out / name).write_bytes(b"this is not a checkpoint")
    before = _files(out)
    with pytest.raises(StoreError, match="no whole checkpoint is left"):
        run(SPEC, out, resume=True)
    assert _files(out) == before


def test_resume_with_a_different_spec_is_refused(tmp_path):
    out = tmp_path / "run"
    run({**SPEC, "steps": 16}, out)  # two of SPEC's chunks of 8: the scans the other tests compile
    before = _files(out)
    with pytest.raises(StoreError, match=r"resolved spec differs from this one \(`lr` = 0.4 there, 0.3 here\)"):
        run({**SPEC, "steps": 16, "lr": 0.3}, out, resume=True)
    assert _files(out) == before


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot write to output directory"):
        run({**SPEC, "steps": 5}, blocker / "run")


def test_user_errors_print_one_paragraph_without_traceback(tmp_path, capsys):
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(tomli_w.dumps({**SPEC, "lr": -1.0}))
    assert main(["run", str(spec_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eosflow: error: `lr` = -1.0 is out of range") and "Traceback" not in err
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    spec_path.write_text("steps = = 3")
    assert main(["run", str(spec_path)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.array([[1.0, np.nan], [0.0, 1.0]] * 10), "y": np.array([0, 1] * 10)}, "NaN or infinite"),
        ({"x": np.array([[1.0, np.inf], [0.0, 1.0]] * 10), "y": np.array([0, 1] * 10)}, "NaN or infinite"),
        ({"x": np.zeros((0, 3)), "y": np.zeros(0, int)}, "is empty"),
        ({"x": np.ones((20, 3)), "y": np.array([0, 1] * 9)}, "mismatched shapes"),
        ({"x": np.ones((20, 3))}, "has no array 'y'"),
    ],
)
def test_bad_data_files_are_named(tmp_path, arrays, message):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    table = {
        **SPEC,
        "steps": 3,
        "problem": {"name": "mlp", "dataset": "npz", "data_path": str(path), "classes": 2, "n_train": 10, "n_test": 0},
    }
    with pytest.raises(SpecError, match=message):
        run(table, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_own_npz_dataset_trains(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5))
    y = (x[:, 0] > 0).astype(int)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    table = {
        **SPEC,
        "steps": 5,
        "spectrum": {"every": 0},  # the data is under test, not the eigensolver (its compilation: ~5 s)
        "problem": {
            "name": "mlp",
            "dataset": "npz",
            "data_path": str(tmp_path / "data.npz"),
            "classes": 2,
            "n_train": 20,
            "n_test": 10,
        },
    }
    assert run(table, tmp_path / "out").status == "completed"


def test_unreadable_data_file(tmp_path):
    (tmp_path / "data.npz").write_bytes(b"garbage")
    table = {
        **SPEC,
        "steps": 3,
        "problem": {"name": "mlp", "dataset": "npz", "data_path": str(tmp_path / "data.npz"), "classes": 2},
    }
    with pytest.raises(SpecError, match="is not a readable .npz file"):
        run(table, tmp_path / "out")
    with pytest.raises(SpecError, match="does not exist"):
        run({**table, "problem": {**table["problem"], "data_path": str(tmp_path / "nope.npz")}}, tmp_path / "out")


def test_a_checkpoint_from_another_state_layout_is_refused_by_name(tmp_path):
    """A checkpoint whose GD state lacks an array (as one written before GD kept its previous
    gradient) is refused, naming the process, both layouts and the writer's version."""
    out = tmp_path / "run"
    run({**SPEC, "steps": 16}, out)
    store = RunStore(out)
    step, states, meta = store.read_checkpoint()
    store.manifest = meta.pop("manifest")
    store.write_checkpoint(step, {**states, "gd": states["gd"][:-1]}, {**meta, "eosflow": "0.0.9"})
    before = _files(out)
    with pytest.raises(StoreError, match=r"process 'gd' does not fit .* written by 0\.0\.9, this is eosflow"):
        run({**SPEC, "steps": 16}, out, resume=True)
    assert _files(out) == before


def test_a_run_from_before_an_option_existed_resumes(tmp_path, uninterrupted):
    """A resolved spec written before `spectrum.grow_every` existed lacks it; filled with its
    default it equals this spec, so the run resumes, bitwise identical to an uninterrupted one."""
    out = tmp_path / "run"
    run(SPEC, out, stop_after=16)
    path = out / "spec.resolved.toml"
    path.write_text(
        "".join(line for line in path.read_text().splitlines(keepends=True) if not line.startswith("grow_every"))
    )
    run(SPEC, out, resume=True)
    assert_same_run(eosflow.load(out), uninterrupted)


def test_an_interrupt_between_a_chunk_and_its_checkpoint_leaves_data_and_summary_agreeing(
    tmp_path, monkeypatch, uninterrupted
):
    """Ctrl-C after chunk 2 is flushed but before its checkpoint: the summary and the data on disk
    both say 8 steps (the checkpoint's), and the resumed run is bitwise identical."""
    out = tmp_path / "run"
    real_write = RunStore.write_checkpoint
    calls = []

    def interrupted_second_write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(RunStore, "write_checkpoint", interrupted_second_write)
    with pytest.raises(KeyboardInterrupt):
        run(SPEC, out)
    monkeypatch.setattr(RunStore, "write_checkpoint", real_write)
    summary = RunStore(out).read_summary()
    assert summary["status"] == "interrupted" and summary["steps_done"] == 8
    assert eosflow.load(out).sizes["step"] == 8
    run(SPEC, out, resume=True)
    assert_same_run(eosflow.load(out), uninterrupted)


def test_a_report_the_disk_has_no_room_for_is_a_clear_error_and_the_run_stays(tmp_path, monkeypatch, capsys):
    """A probe ran `eosflow run` under `ulimit -f 16`: the run completed on disk, then a PIL traceback ended it
    (OSError: File too large, exit 1). Now: one paragraph naming the report and how to write it again, exit 2;
    the run's files untouched; `eosflow report` writes it once there is room."""
    from matplotlib.figure import Figure

    table = {**SPEC, "steps": 16}
    run(table, tmp_path / "run")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and "report" not in p.parts}

    def full(self, *args, **kwargs):
        raise OSError(errno.EFBIG, "File too large")

    with monkeypatch.context() as patched:
        patched.setattr(Figure, "savefig", full)
        assert main(["report", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the report of" in err and "File too large" in err and "Traceback" not in err
    assert f"write the report again with: eosflow report {tmp_path / 'run'}" in err
    assert {p: p.read_bytes() for p in before} == before
    assert main(["report", str(tmp_path / "run")]) == 0 and (tmp_path / "run" / "report" / "report.md").is_file()


def test_a_stop_while_the_report_is_written_says_the_run_is_whole(tmp_path, monkeypatch, capsys):
    """SIGTERM after the last chunk, while `eosflow run` wrote the report: the command printed only "eosflow:
    interrupted" (exit 143), though the run was complete on disk (from a probe). Now it says so, and how to
    write the report."""
    from matplotlib.figure import Figure

    from eosflow.cli import _run_table
    from eosflow.signals import Interrupted

    def stopped(self, *args, **kwargs):
        raise Interrupted(signal.SIGTERM)

    out = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(Figure, "savefig", stopped)
        assert _run_table({**SPEC, "steps": 16}, out, resume=False, overwrite=False, quiet=True) == 143
    err = capsys.readouterr().err
    assert f"completed: 16 steps in {out}; its report was interrupted; write it with: eosflow report {out}" in err
    assert RunStore(out).read_summary()["status"] == "completed"


def test_the_sgd_report_of_a_run_that_lost_its_resolved_spec(tmp_path, capsys):
    """reliability.md: load and report rebuild what a lost spec.resolved.toml held from spec.toml; the SGD
    section read the file itself and raised FileNotFoundError."""
    table = {
        "name": "sgd",
        "steps": 30,
        "lr": 0.05,
        "dtype": "float64",
        "processes": ["sgd"],
        "problem": {"name": "linear_regression", "dim": 4, "n_train": 20},
        "spectrum": {"every": 0},
        "sgd": {"batch_size": 4},
        "record": {"params_every": 1},
    }
    run(table, tmp_path / "run")
    (tmp_path / "run" / "spec.resolved.toml").unlink()
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "SGD" in (tmp_path / "run" / "report" / "report.md").read_text()


def test_a_resume_removes_what_a_killed_writer_left_half_written(tmp_path, uninterrupted):
    """A SIGKILL during an atomic write leaves `.checkpoint.npz.<pid>.<hex>.tmp` (a probe found one per kill, each
    the size of a checkpoint); only the sweep removed them. The resumed run's writer does, and ends bitwise equal."""
    out = tmp_path / "run"
    run(SPEC, out, stop_after=40)
    stale = [out / ".checkpoint.npz.99999.0123456789ab.tmp", out / "trajectories" / "gd" / ".chunk.npz.99999.ab.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    run(SPEC, out, resume=True)
    assert not list(out.rglob("*.tmp"))
    for name in TRAJECTORY_VARIABLES:
        np.testing.assert_array_equal(eosflow.load(out)[name].values, uninterrupted[name].values)
