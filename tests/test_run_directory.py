"""The run directory accounts for every chunk and rebuilds its metadata from the data.

A chunk lost or damaged after its checkpoint is named by step range (load, report) and
recomputed by `eosflow resume DIR` from the latest checkpoint before it, or from w0; a lost or
corrupt summary.json is rebuilt from spec.resolved.toml and the trajectories; `load` of a run in
progress returns every flushed step with status "running".
"""

import json
import os
import re
import warnings

import numpy as np
import pytest

import eosflow
from eosflow.cli import main
from eosflow.config import SpecError, SpecWarning
from eosflow.experiment import run
from eosflow.report import edge_of_stability_window, make_report
from eosflow.store import RunDirectoryWarning, RunStore, StoreError
from test_reliability import SPEC as GD_SPEC
from test_reliability import assert_same_run

# a second process, whose distances to gd carry an offset across chunks, checkpoints and repairs
SPEC = {**GD_SPEC, "processes": ["gd", "gradient_flow"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    run(SPEC, out)
    return eosflow.load(out)


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "run"
    run(SPEC, out)
    return out


def _chunk(out, first):
    return next(path for a, _, path in RunStore(out).chunk_files("gd") if a == first)


def _bytes(out):
    return {p: p.read_bytes() for p in (out / "trajectories").rglob("*.npz")}


def test_a_deleted_chunk_is_named_by_step_range_and_recomputed_by_resume(finished, uninterrupted, capsys):
    out = finished
    _chunk(out, 16).unlink()
    with pytest.warns(RunDirectoryWarning, match=r"steps 16\.\.23 of 'gd' \(missing\).*`eosflow resume .*` recomputes"):
        ds = eosflow.load(out)
    # the step grid is uninterrupted; the lost steps are NaN, every other step is the run's
    assert ds.sizes["step"] == 80 and list(ds.step.values) == list(range(80))
    loss = ds.loss.values[0]
    assert np.isnan(loss[16:24]).all() and ds.attrs["missing_steps"] == "steps 16..23 of 'gd' (missing)"
    keep = np.r_[0:16, 24:80]
    np.testing.assert_array_equal(loss[keep], uninterrupted.loss.values[0, keep])
    # the report counts steps, not positions: its edge-of-stability steps are the intact run's
    with pytest.warns(RunDirectoryWarning):
        report = make_report(out).read_text()
    window = edge_of_stability_window(uninterrupted.lr_sharpness.values[0])
    if window["first_step_at_edge"] is not None and not 16 <= window["first_step_at_edge"] < 24:
        assert f"first step with lr*S >= 1.9: {window['first_step_at_edge']}" in report
    assert "| steps on disk | 72 (steps 0..79) |" in report
    assert "| missing steps | steps 16..23 of 'gd' (missing) |" in report
    capsys.readouterr()
    assert main(["report", str(out)]) == 0  # load, report and summary each find the gap: one line says it
    assert capsys.readouterr().err.count("steps 16..23 of 'gd' (missing)") == 1
    untouched = {p: b for p, b in _bytes(out).items()}
    assert main(["resume", str(out), "--quiet"]) == 0
    assert re.search(r"steps 16\.\.23 of 'gd' \(missing\); recomputing them from step 0", capsys.readouterr().err)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunDirectoryWarning)
        assert_same_run(eosflow.load(out), uninterrupted)
    after = _bytes(out)
    assert all(after[p] == b for p, b in untouched.items())  # only the lost file was written


def test_a_corrupt_chunk_is_recomputed_from_the_checkpoint_before_it(finished, uninterrupted):
    """A flipped byte in the last checkpointed chunk (72..79): the manifest's checksum finds it; the
    previous checkpoint (step 72) precedes it, so the repair starts there."""
    out = finished
    path = _chunk(out, 72)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(RunDirectoryWarning, match=r"steps 72\.\.79 of 'gd' \(corrupt"):
        assert np.isnan(eosflow.load(out).loss.values[0, 72:]).all()
    with pytest.warns(RunDirectoryWarning, match=r"recomputing them from step 72 \(the checkpoint"):
        run(SPEC, out, resume=True)
    assert_same_run(eosflow.load(out), uninterrupted)


def test_a_chunk_recomputed_by_a_newer_eosflow_is_recorded_as_written(finished, uninterrupted, monkeypatch):
    """A repair by a version whose rows carry one more field (bytes differ from the manifest's): the
    newest checkpoint must list the rewritten chunk, or it reads as corrupt (and NaN) for ever."""
    out = finished
    _chunk(out, 16).unlink()
    write = RunStore.write_chunk

    def newer(self, process, first_step, arrays):
        write(self, process, first_step, {**arrays, "new_field": np.zeros(len(arrays["loss"]))})

    monkeypatch.setattr(RunStore, "write_chunk", newer)
    with pytest.warns(RunDirectoryWarning, match=r"steps 16\.\.23 of 'gd' \(missing\); recomputing"):
        run(SPEC, out, resume=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunDirectoryWarning)
        ds = eosflow.load(out)
    np.testing.assert_array_equal(ds.loss.values, uninterrupted.loss.values)
    assert np.isfinite(ds.new_field.sel(process="gd").values[16:24]).all()
    run(SPEC, out, resume=True)  # a second resume finds nothing to repair
    assert RunStore(out).read_checkpoint().step == 80


def test_a_lost_or_corrupt_summary_is_rebuilt_from_the_data(tmp_path, uninterrupted, capsys):
    out = tmp_path / "run"
    run(SPEC, out, stop_after=24)
    (out / "summary.json").unlink()
    with pytest.warns(RunDirectoryWarning, match="summary.json is missing; rebuilt from spec.resolved.toml"):
        ds = eosflow.load(out)
    assert ds.attrs["status"] == "interrupted" and ds.attrs["steps_done"] == 24 and ds.attrs["lr"] == 0.4
    assert main(["report", str(out)]) == 0
    assert "summary.json is missing; rebuilt" in capsys.readouterr().err
    assert "| note | summary.json is missing; rebuilt" in (out / "report" / "report.md").read_text()
    (out / "summary.json").write_text('{"status": "comp')  # cut short
    assert main(["run", "--resume", str(out), "--quiet"]) == 0  # the directory alone, as `eosflow resume DIR`
    assert "summary.json is unreadable (JSONDecodeError" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 80
    assert_same_run(eosflow.load(out), uninterrupted)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a limit past float32's range overflowed in a cast, warning
@pytest.mark.parametrize("lr, divergence", [(3.0, {}), (3.0, {"loss_blowup": 2.0}), (300.0, {"loss_blowup": 1e300})])
def test_a_diverged_run_that_lost_its_summary_is_rebuilt_as_diverged(tmp_path, lr, divergence):
    """A probe: a diverged run whose summary.json was lost read back as `interrupted` with no reason (and a sweep
    would have run it again). The step it diverged at is the last on disk: its loss says so, with the reason the
    run wrote, whether the loss blew up past the limit (the default or a low one) or overflowed."""
    table = {**SPEC, "lr": lr, "processes": ["gd"], "divergence": divergence}
    written = run(table, tmp_path / "run")
    assert written.status == "diverged"
    reason = json.loads((tmp_path / "run" / "summary.json").read_text())["reason"]
    (tmp_path / "run" / "summary.json").unlink()
    with pytest.warns(RunDirectoryWarning, match="summary.json is missing"):
        ds = eosflow.load(tmp_path / "run")
    assert ds.attrs["status"] == "diverged" and ds.attrs["reason"].split(" (read from")[0] in reason, reason
    interrupted = tmp_path / "cut"
    run({**SPEC, "processes": ["gd"]}, interrupted, stop_after=24)
    (interrupted / "summary.json").unlink()
    with pytest.warns(RunDirectoryWarning):
        assert eosflow.load(interrupted).attrs["status"] == "interrupted"


def test_a_finished_run_is_extended_by_resuming_with_more_steps(tmp_path, uninterrupted, capsys):
    """`eosflow resume DIR --steps N` (or resume=True with another `steps`) continues a finished run;
    the longer run is the one a single run of N steps writes, bitwise."""
    out = tmp_path / "run"
    assert run({**SPEC, "steps": 40}, out).status == "completed"
    assert main(["resume", str(out), "--steps", "64", "--quiet"]) == 0
    assert "completed: 64 steps" in capsys.readouterr().out
    ds = eosflow.load(out)
    assert ds.attrs["steps"] == 64 and ds.attrs["steps_done"] == 64
    np.testing.assert_array_equal(ds.loss.values, uninterrupted.loss.values[:, :64])
    assert "steps = 64" in (out / "spec.toml").read_text() and "steps = 64" in (out / "spec.resolved.toml").read_text()
    assert run(SPEC, out, resume=True).status == "completed"  # the API: the spec with steps = 80
    assert_same_run(eosflow.load(out), uninterrupted)
    # never shorter than what is on disk, and nothing else may change: the directory is untouched
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match=r"with steps = 72: it already holds 80 steps \(of 80\)"):
        run({**SPEC, "steps": 72}, out, resume=True)
    with pytest.raises(StoreError, match=r"resolved spec differs from this one \(`lr` = 0.4 there, 0.3 here\)"):
        run({**SPEC, "steps": 120, "lr": 0.3}, out, resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_interrupted_run_can_be_resumed_to_fewer_steps_than_planned(tmp_path, uninterrupted):
    out = tmp_path / "run"
    run(SPEC, out, stop_after=24)
    assert main(["run", "--resume", str(out), "--set", "steps=48", "--quiet"]) == 0
    ds = eosflow.load(out)
    assert ds.attrs["status"] == "completed" and ds.sizes["step"] == 48
    np.testing.assert_array_equal(ds.distance.values, uninterrupted.distance.values[:, :48])


def test_extending_a_run_that_ended_inside_a_chunk_says_where_it_may_differ(tmp_path, uninterrupted):
    out = tmp_path / "run"
    run({**SPEC, "steps": 36}, out)
    with pytest.warns(RunDirectoryWarning, match=r"from 36 to 80 steps: step 36 .* record.chunk = 8"):
        run(SPEC, out, resume=True)
    ds = eosflow.load(out)  # the iterates are GD's; the tracker grew at step 36 instead of 40
    np.testing.assert_array_equal(ds.loss.values, uninterrupted.loss.values)


def test_load_of_a_run_in_progress_returns_every_flushed_step(tmp_path, uninterrupted):
    out = tmp_path / "run"
    seen = []

    def look(step, chunk):
        ds = eosflow.load(out)
        seen.append((step, ds.sizes["step"], ds.attrs["status"]))
        np.testing.assert_array_equal(ds.loss.values, uninterrupted.loss.values[:, :step])

    run(SPEC, out, progress=look)
    assert seen == [(step, step, "running") for step in range(8, 81, 8)]
    assert eosflow.load(out).attrs["status"] == "completed"


def test_spectrum_sizes_beyond_the_parameter_count(tmp_path):
    """A 2-parameter quadratic has 2 eigenpairs: k_max = 5 tracks 2 (with a warning, no NaN
    columns); k = 3 is refused by name."""
    table = {
        "steps": 4,
        "lr": 0.1,
        "dtype": "float64",
        "problem": {"name": "quadratic", "eigenvalues": [3.0, 1.0]},
        "spectrum": {"k": 1, "k_max": 5, "threshold": 0.01},
        "record": {"chunk": 2},
    }
    with pytest.warns(SpecWarning, match=r"`spectrum.k_max` = 5 exceeds the number of parameters \(2\)"):
        run(table, tmp_path / "a")
    eigenvalues = eosflow.load(tmp_path / "a").eigenvalues.values[0]
    assert eigenvalues.shape == (4, 2) and np.isfinite(eigenvalues[-1]).all()
    np.testing.assert_allclose(np.sort(eigenvalues[-1]), [1.0, 3.0], rtol=1e-6)
    with pytest.raises(SpecError, match=r"`spectrum.k` = 3 exceeds the number of parameters \(2\)"):
        run({**table, "spectrum": {"k": 3, "k_max": 5}}, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_the_edge_of_stability_window_is_in_steps_not_positions():
    """Steps 5..9 lost: lr*S reaches 2 at step 10, which is position 5 of what is on disk."""
    values = np.array([1.0] * 5 + [2.0] * 5)
    steps = np.r_[0:5, 10:15]
    window = edge_of_stability_window(values, steps=steps)
    assert window["first_step_at_edge"] == 10 and window["longest_window_start"] == 10
    assert window["longest_window_steps"] == 5
    assert edge_of_stability_window(values)["first_step_at_edge"] == 5  # positions are steps when nothing is lost


@pytest.mark.parametrize("fall, rise", [(1, 30), (4, 12)])
def test_the_report_reads_adam_and_rmsprop_after_their_start_transient_and_gd_as_before(fall, rise):
    """One edge ratio by construction for each reference: 1.2 until step ``fall`` (P from the first gradients),
    0.05 there, climbing to the edge at step ``rise``. Adam's and RMSProp's lines report the transient apart and
    the edge at ``rise``; momentum's (P = I) and GD's (lr*S) keep step 0."""
    import xarray as xr

    from eosflow.report import _edge_lines

    steps = np.arange(60)
    ratio = np.where(steps < fall, 1.2, np.minimum(0.05 + 0.95 * (steps - fall) / (rise - fall), 1.0))
    names = ["adam", "rmsprop", "momentum", "gd"]
    nan = np.full(steps.size, np.nan)
    ds = xr.Dataset(
        {
            "edge_ratio": (("process", "step"), np.array([ratio, ratio, ratio, nan])),
            "lr_sharpness": (("process", "step"), np.array([nan, nan, nan, 2 * ratio])),
        },
        coords={"process": names, "step": steps},
    )
    for name in ("adam", "rmsprop"):
        lines = "\n".join(_edge_lines(ds, name, steps))
        assert f"S/threshold up to 1.2000 before step {fall}, where it fell below 0.5" in lines
        first = int(steps[(steps >= fall) & (ratio >= 0.95)][0])
        assert (
            f"first step with S/threshold >= 0.95: {first}\n" in lines
            and "largest S/threshold measured: 1.0000" in lines
        )
    assert "- first step with S/threshold >= 0.95: 0\n" in "\n".join(_edge_lines(ds, "momentum", steps))
    assert "- first step with lr*S >= 1.9: 0\n" in "\n".join(_edge_lines(ds, "gd", steps))
    assert not any("transient" in line for p in ("momentum", "gd") for line in _edge_lines(ds, p, steps))


def test_an_adam_runs_report_gives_its_preconditioned_sharpness_and_edge_ratio(tmp_path):
    """Adam records no plain sharpness: the report's process table gave `nan` twice per row (a probe); it now gives
    the last preconditioned sharpness and S / threshold each process recorded, read back from the run."""
    import jax.numpy as jnp

    problem = eosflow.Problem.from_function(lambda w: 0.5 * jnp.sum(jnp.arange(1.0, 5.0) * w**2), np.ones(4))
    out = tmp_path / "adam"
    ds = eosflow.simulate(problem, lr=0.05, steps=12, processes=["adam", "adam_stable_flow"], out=out)
    text = make_report(out).read_text()
    assert "| process | final loss | final preconditioned sharpness | final S/threshold | final distance |" in text
    for p in ("adam", "adam_stable_flow"):
        s, r = (float(ds[v].sel(process=p).values[-1]) for v in ("preconditioned_sharpness", "edge_ratio"))
        assert np.isfinite(s) and np.isfinite(r)
        assert re.search(rf"\| {p} \| \S+ \| {s:.6g} \| {r:.6g} \| ", text)


def test_a_lost_resolved_spec_is_resolved_again_and_the_run_goes_on_bitwise(tmp_path, uninterrupted, capsys):
    """spec.resolved.toml lost: resume re-resolves spec.toml in its place (a traceback before) and writes it back,
    bitwise equal to the uninterrupted run; with summary.json lost too, load and report rebuild from spec.toml."""
    out = tmp_path / "run"
    run(SPEC, out, stop_after=24)
    kept = (out / "spec.resolved.toml").read_text()
    (out / "spec.resolved.toml").unlink()
    (out / "summary.json").unlink()
    with pytest.warns(RunDirectoryWarning, match=r"rebuilt from spec.toml \(spec.resolved.toml is missing\)"):
        ds = eosflow.load(out)
    assert ds.attrs["lr"] == 0.4 and ds.attrs["steps_done"] == 24
    assert main(["report", str(out)]) == 0
    assert main(["resume", str(out), "--quiet"]) == 0
    assert "spec.resolved.toml is missing; the run's spec.toml was resolved again" in capsys.readouterr().err
    assert (out / "spec.resolved.toml").read_text() == kept
    assert_same_run(eosflow.load(out), uninterrupted)


def test_a_directory_that_is_not_a_process_is_not_read_as_one(finished):
    """A folder an editor leaves in trajectories/ (Jupyter's .ipynb_checkpoints), or an empty one, is not a
    process of the run: load lists the spec's processes only (it added a NaN process before)."""
    (finished / "trajectories" / ".ipynb_checkpoints").mkdir()
    (finished / "trajectories" / "notes").mkdir()
    assert list(eosflow.load(finished).process.values) == ["gd", "gradient_flow"]
    assert RunStore(finished).processes() == ["gd", "gradient_flow"]
    with pytest.raises(StoreError, match=r"has no process 'rod_flow'; its processes: gd, gradient_flow"):
        eosflow.load_params(finished, "rod_flow")


def test_a_run_is_not_written_over_files_that_are_not_a_run_nor_inside_one(tmp_path, finished, capsys):
    """--overwrite removed report/ and summary.json from a directory that held no run (a user's own folder, or
    the current directory from an empty --out); a run inside another run's directory mixed the two."""
    mine = tmp_path / "mine"
    (mine / "report").mkdir(parents=True)
    (mine / "report" / "thesis.md").write_text("notes")
    (mine / "summary.json").write_text("1")
    spec = tmp_path / "spec.toml"
    spec.write_text('steps = 2\n[problem]\nname = "quadratic"\n')
    for extra in ([], ["--overwrite"]):
        assert main(["run", str(spec), "--out", str(mine), "--quiet", *extra]) == 2
        assert "holds no run (no spec.toml) but has report/, summary.json" in capsys.readouterr().err
    assert sorted(p.name for p in mine.rglob("*")) == ["report", "summary.json", "thesis.md"]
    assert (mine / "report" / "thesis.md").read_text() == "notes"
    inside = finished / "trajectories" / "x"
    assert main(["run", str(spec), "--out", str(inside), "--quiet"]) == 2
    assert "is inside the run directory" in capsys.readouterr().err and not inside.exists()
    with pytest.raises(SystemExit):
        main(["run", str(spec), "--out", ""])
    assert "an empty path (an unset shell variable?)" in capsys.readouterr().err


def test_run_files_take_the_umask_like_any_new_file(tmp_path):
    """Files written atomically (spec, summary, chunks, checkpoints) were 0600 whatever the umask (mkstemp)."""
    previous = os.umask(0o022)
    try:
        run({**GD_SPEC, "steps": 8}, tmp_path / "run")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert {"spec.toml", "summary.json", "checkpoint.npz", "0000000000-0000000007.npz"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes


def test_a_run_stopped_before_its_first_chunk_says_so_and_report_names_it(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the first chunk compiles: the summary said "steps 0..-1 are on disk" and `eosflow report`
    raised IndexError (from a probe). Now both say that no step is on disk yet, and how to go on."""
    import eosflow.experiment as experiment

    def interrupted(self, states, inactive, step, n):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment._Advance, "__call__", interrupted)
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        run(SPEC, out)
    summary = RunStore(out).read_summary()
    assert summary["steps_done"] == 0 and "no step is on disk yet" in summary["reason"], summary["reason"]
    with pytest.raises(StoreError, match="holds no step yet.*eosflow resume"):
        make_report(out)
    assert main(["report", str(out)]) == 2
    assert "holds no step yet" in capsys.readouterr().err
    monkeypatch.undo()
    run(SPEC, out, resume=True)
    assert RunStore(out).read_summary()["steps_done"] == SPEC["steps"]


def test_a_report_that_cannot_be_written_is_named(finished, monkeypatch, capsys):
    """A read-only run directory gave a PermissionError traceback from the first figure (from a probe, as uid
    65534; root writes anyway, so the kernel's answer is stood in for here), as did report/ being a file."""
    import eosflow.store as store

    monkeypatch.setattr(store.os, "access", lambda path, mode: False)
    assert main(["report", str(finished)]) == 2
    assert "cannot write to output directory" in capsys.readouterr().err and "Permission denied" in str(
        pytest.raises(StoreError, make_report, finished).value
    )
    monkeypatch.undo()
    import shutil

    shutil.rmtree(finished / "report", ignore_errors=True)
    (finished / "report").write_text("not a folder")
    with pytest.raises(StoreError, match="cannot write to output directory .*report"):
        make_report(finished)


def test_a_resume_in_another_environment_says_so_and_keeps_both(tmp_path):
    """A run made by another eosflow or jax resumed without a word and its summary forgot the old versions (from a
    probe), so 'bitwise the same as one run' could not be checked. Each session's environment is kept."""
    out = tmp_path / "r"
    run({**SPEC, "steps": 32}, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sessions"] == [
        {"from_step": 0, **{k: summary[k] for k in ("eosflow", "jax", "device", "xla_flags")}}
    ]
    del summary["sessions"]  # as an eosflow before sessions wrote it
    summary.update(eosflow="0.0.9", jax="0.4.30")
    (out / "summary.json").write_text(json.dumps(summary))
    with pytest.warns(RunDirectoryWarning, match=r"steps 0\.\.31 were computed in another environment \(eosflow "):
        run({**SPEC, "steps": 48}, out, resume=True)
    sessions = json.loads((out / "summary.json").read_text())["sessions"]
    assert [(s["from_step"], s["eosflow"], s["jax"]) for s in sessions][0] == (0, "0.0.9", "0.4.30")
    assert sessions[1]["from_step"] == 32 and sessions[1]["eosflow"] != "0.0.9"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunDirectoryWarning)  # the same environment again: no new session
        run({**SPEC, "steps": 64}, out, resume=True)
    assert len(json.loads((out / "summary.json").read_text())["sessions"]) == 2


def test_consecutive_lost_chunks_are_named_as_one_range(finished, uninterrupted):
    """A probe deleted a whole process folder: the warning listed every chunk apart (30 ranges). Consecutive
    ranges of a process and cause are one: the lost folder of gradient_flow is 'steps 0..79', beside gd's chunk."""
    import shutil

    shutil.rmtree(finished / "trajectories" / "gradient_flow")
    _chunk(finished, 16).unlink()
    _chunk(finished, 24).unlink()
    with pytest.warns(RunDirectoryWarning):
        ds = eosflow.load(finished)
    assert ds.attrs["missing_steps"] == "steps 16..31 of 'gd' (missing); steps 0..79 of 'gradient_flow' (missing)"
    with pytest.warns(
        RunDirectoryWarning, match=r"steps 16\.\.31 of 'gd' \(missing\); steps 0\.\.79 of 'gradient_flow'"
    ):
        run(SPEC, finished, resume=True)
    np.testing.assert_array_equal(eosflow.load(finished).loss.values, uninterrupted.loss.values)


QUADRATIC = {
    "name": "q",
    "steps": 12,
    "lr": 0.5,
    "dtype": "float64",
    "problem": {"name": "quadratic", "eigenvalues": [2.0, 1.0, 0.5]},
    "spectrum": {"k": 1, "k_max": 1},
}


@pytest.mark.parametrize(
    "table, lines",
    [
        # GD diverged at lr = 2.5 (lr S > 2): the reference's status read "ok" (from a probe)
        (
            {"lr": 2.5, "processes": ["gd", "gradient_flow"]},
            ["| diverged (the reason above) |", "| stopped with gd |", "- first step with lr*S >= 1.9: 0"],
        ),
        # no eigensolver: "lr*S never reached 1.9 (largest measured: nan): no edge of stability"
        ({"spectrum": {"every": 0}}, ["- gd's sharpness was not measured in this run (`spectrum.every` = 0)"]),
        # Adam's `sharpness` is not its own (NaN): its edge is S_P / threshold, which the section had no line for
        (
            {"processes": ["adam"], "lr": 0.05},
            ["S/threshold never reached 0.95 (largest measured: 0.", "![Edge ratio: preconditioned sharpness over"],
        ),
    ],
)
def test_the_report_says_how_the_reference_ended_and_where_its_edge_is(tmp_path, table, lines):
    from eosflow.experiment import run
    from eosflow.report import make_report

    run({**QUADRATIC, **table}, tmp_path / "run")
    report = make_report(tmp_path / "run").read_text()
    for line in lines:
        assert line in report, report


def test_sgds_final_loss_on_the_page_is_a_full_batch_one(tmp_path):
    """With loss_every = 10, SGD's `loss` holds the minibatch loss between full-batch measurements; the page's
    final loss was the last step's minibatch value, set beside Langevin's full-batch one (from a probe)."""
    import eosflow
    from eosflow.experiment import run
    from eosflow.report import make_report

    table = {
        "name": "sgd",
        "steps": 25,
        "lr": 0.05,
        "dtype": "float64",
        "processes": ["sgd"],
        "problem": {"name": "linear_regression", "dim": 4, "n_train": 20},
        "spectrum": {"every": 0},
        "sgd": {"batch_size": 4, "loss_every": 10},
    }
    run(table, tmp_path / "run")
    loss = eosflow.load(tmp_path / "run")["loss"].sel(process="sgd").values
    report = make_report(tmp_path / "run").read_text()
    assert f"| sgd | {loss[20]:.6g} |" in report and loss[24] != loss[20], report
