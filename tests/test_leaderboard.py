"""The leaderboard: its suite covers every GD model, and its table equals the runs it made."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import tomllib

import numpy as np
import pytest

import eosflow
import eosflow.anchored as anchored_module
from eosflow import leaderboard as lb
from eosflow.compare import SMOOTHING, compare_run, gaussian_smooth
from eosflow.experiment import prepare
from eosflow.optim.adaptive import OPTIMIZERS
from eosflow.process import PROCESSES


def test_suite_runs_every_gd_model_and_every_spec_is_valid():
    models = lb.gd_models()
    expected = {n for n, e in PROCESSES.items() if not e.discrete and e.optimizer is None} - {
        "langevin",
        "gradient_flow",
    }
    assert set(models) == expected and "gd" not in models
    tables = lb.suite_tables()
    assert {
        "quartic",
        "sharp_valley",
        "matrix_factorization",
        "mlp_digits",
        "cnn_digits",
        "two_layer_meanfield",
    } <= set(tables)
    quick = lb.suite_tables(quick=True)
    assert set(quick) < set(tables) and all(t["steps"] <= 700 for t in quick.values())
    for name, table in tables.items():  # the particle model models the mean-field network only
        expected = [m for m in models if m != "particle_model" or name == "two_layer_meanfield"]
        assert table["processes"][:2] == ["gd", "gradient_flow"] and table["processes"][2:] == expected
    assert "particle_model" in tables["two_layer_meanfield"]["processes"]
    for table in quick.values():  # building the problems and processes validates every value
        prepare(table)
    # on the mean-field network the models that read the eigenvectors track 6, grown every 10 steps
    meanfield = prepare(tables["two_layer_meanfield"])[0]
    for name in meanfield.processes:
        own = meanfield.spectrum_of(name)
        reads = name in ("central_flow", "projected_flow", "free_energy")
        assert (own.k_max, own.grow_every) == ((6, 10) if reads else (3, 0)), name


def test_adaptive_suite_runs_every_model_of_rmsprop_and_adam():
    tables = lb.suite_tables(suite=lb.ADAPTIVE_SUITE)
    assert {"mlp_digits-rmsprop", "mlp_digits-adam"} <= set(tables)
    assert len({t["problem"]["name"] for t in tables.values() if t["processes"][0] == "adam"}) >= 2
    for table in tables.values():
        optimizer = table["processes"][0]
        models = {n for n, e in PROCESSES.items() if e.optimizer == optimizer}
        assert table["processes"][1] == f"{optimizer}_stable_flow" and set(table["processes"][1:]) == models
    assert "rmsprop_central_flow" in tables["mlp_digits-rmsprop"]["processes"]
    assert "adam_rod_flow" in tables["mlp_digits-adam"]["processes"]
    for table in tables.values():
        prepare(table)
    # the RMSProp central flow's own tracker; left out with the model, so that the spec still resolves
    central = prepare(tables["mlp_digits-rmsprop"])[0].spectrum_of
    assert central("rmsprop_central_flow").k_max == 6 and central("rmsprop").k_max == 3
    rod_only = lb.suite_tables(models=["rmsprop_rod_flow"], suite=lb.ADAPTIVE_SUITE)["mlp_digits-rmsprop"]
    assert "rmsprop_central_flow" not in rod_only
    prepare(rod_only)


def test_problems_and_models_select_rows_and_name_what_is_unknown():
    """``--problems`` / ``--models``: the chosen rows beside the reference and its baseline; an entry
    whose optimizer none of the models models is left out; an unknown name is a SpecError naming it."""
    from eosflow.config import SpecError

    entries = lb.selected("all", ["cnn_digits", "mlp_digits-adam"], ["free_energy"])
    assert {e.name for e in entries} == {"mlp_digits-adam", "cnn_digits"}
    tables = lb.suite_tables(models=["free_energy"], suite=entries)
    assert list(tables) == ["cnn_digits"] and tables["cnn_digits"]["processes"] == [
        "gd",
        "gradient_flow",
        "free_energy",
    ]
    assert list(lb.suite_tables(models=["particle_model"])) == ["two_layer_meanfield"]  # it models that one only
    with pytest.raises(SpecError, match="'mlp_digit'"):
        lb.selected("default", ["mlp_digit"])
    with pytest.raises(SpecError, match="'adam_rod_flow'"):
        lb.selected("default", None, ["adam_rod_flow"])


TINY = (
    lb.Entry(
        "quartic",
        {
            "name": "quartic",
            "steps": 90,
            "lr": 0.08,
            "dtype": "float64",
            "problem": {"name": "quartic", "dim": 1},
            "spectrum": {"k": 1, "k_max": 1},
            "record": {"chunk": 45},
        },
    ),
)


def test_table_rows_equal_the_run_directories(tmp_path):
    tables = lb.suite_tables(models=["rod_flow"], suite=TINY)
    rows = lb.run_suite(tables, tmp_path, progress=False)
    assert list(rows["process"]) == ["gd", "gradient_flow", "rod_flow"]
    ds = eosflow.load(tmp_path / "runs" / "quartic")
    gd_loss = ds["loss"].sel(process="gd").values
    for process in ("gradient_flow", "rod_flow"):
        row = rows[rows["process"] == process].iloc[0]
        distance = ds["distance"].sel(process=process).values
        baseline = ds["distance"].sel(process="gradient_flow").values
        assert row["relative_distance"] == pytest.approx(distance.mean() / baseline.mean(), rel=1e-12)
        centre = ds["centre_distance"].sel(process=process).values
        centre_baseline = ds["centre_distance"].sel(process="gradient_flow").values
        assert row["relative_centre_distance"] == pytest.approx(
            np.nanmean(centre) / np.nanmean(centre_baseline), rel=1e-12
        )
        smooth = gaussian_smooth(gd_loss, SMOOTHING)  # checked against scipy in test_compare
        predicted = ds["predicted_loss"].sel(process=process).values
        assert row["loss_error"] == pytest.approx(np.abs(predicted - smooth).sum() / smooth.sum(), rel=1e-12)
    assert (rows["status"] == "ok").all()
    text = "\n".join(lb.markdown(rows))
    assert "| quartic | rod_flow |" in text
    # GD's own row: its floor from w0, GD restarted from w0 moved by its rounding, over the run's yardstick
    floor = anchored_module.floor_from_w0(tables["quartic"])
    gd = rows[rows["process"] == "gd"].iloc[0]
    copy_distance = floor["distance"].sel(process="gd_nudged").values
    baseline = ds["distance"].sel(process="gradient_flow").values
    assert gd["relative_distance"] == pytest.approx(copy_distance.mean() / baseline.mean(), rel=1e-12)
    assert 0 < gd["relative_distance"] < 1e-12  # a contracting orbit: the rounding is never amplified
    np.testing.assert_allclose(floor["loss"].sel(process="gd").values, gd_loss, rtol=1e-13)
    # scored as GD itself would be as a model, by its own smoothed loss and envelope: so GD's oscillation,
    # which no model of the smoothed loss is charged for, is not a floor (it would be 2% of the loss here)
    for column in ("loss_error", "envelope_error", "loss_error_averaged", "envelope_error_averaged"):
        assert 0 <= gd[column] < 1e-9, column
    for column in lb.FLOOR_COLUMNS:
        assert np.isfinite(gd[column]), column
    onset = lb.from_onset(tables["quartic"]).set_index("process")  # merged into each process's row
    for column, _ in lb.FROM_ONSET:
        np.testing.assert_array_equal(rows.set_index("process")[column].values, onset[column].values)
    assert "rel. distance from onset" in text


def test_a_model_that_raises_gets_an_error_row_and_the_others_survive(tmp_path, monkeypatch):
    entry = PROCESSES["rod_flow"]

    def broken(problem, spec, options):
        raise RuntimeError("boom")

    monkeypatch.setitem(PROCESSES, "broken_flow", dataclasses.replace(entry, name="broken_flow", build=broken))
    tables = lb.suite_tables(models=["broken_flow", "rod_flow"], suite=TINY)
    tables["quartic"]["rod_flow"] = {"substeps": 3}  # a model's own table: the broken model runs without it
    rows = lb.run_suite(tables, tmp_path, progress=False)
    status = dict(zip(rows["process"], rows["status"]))
    assert status["broken_flow"].startswith("error: RuntimeError: boom")
    assert status["rod_flow"] == "ok" and status["gd"] == "ok"
    assert (tmp_path / "runs" / "quartic-rod_flow" / "summary.json").exists()
    resolved = tomllib.loads((tmp_path / "runs" / "quartic-rod_flow" / "spec.resolved.toml").read_text())
    assert resolved["rod_flow"]["substeps"] == 3


def test_cli_quick_leaderboard_page_equals_its_csv(tmp_path):
    """`eosflow leaderboard --quick` on its quartic entry (its sharp_valley entry, 700 steps of every
    model, took three quarters of this test's time: which entries --quick runs, and how long, is
    test_suite_runs_every_gd_model_and_every_spec_is_valid's). The critical-set line under the table,
    which only sharp_valley's run printed, is checked on the same rows with one row flagged; that
    compare computes the flag is test_central_flow's."""
    import pandas as pd

    from eosflow.cli import main
    from eosflow.compare import format_number

    out = tmp_path / "board"
    assert main(["leaderboard", "--quick", "--problems", "quartic", "--quiet", "--out", str(out)]) == 0
    rows = pd.read_csv(out / "leaderboard.csv", keep_default_na=False, na_values=[""])
    quick = lb.suite_tables(quick=True)["quartic"]
    assert set(rows["problem"]) == {"quartic"} and list(rows["process"]) == quick["processes"]
    text = (out / "leaderboard.md").read_text()
    assert "`eosflow leaderboard --quick --problems quartic --out" in text
    page = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert len(page) == len(rows)
    for line, (_, row) in zip(page, rows.iterrows()):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:2] == [row["problem"], row["process"]] and cells[-1] == row["status"]
        if row["status"] == "ok":
            assert cells[2] == format_number(float(row["relative_distance"]))
            assert cells[3] == format_number(float(row["relative_centre_distance"]))
            assert cells[4] == format_number(float(row["loss_error"]))
    for rows_of_page in (rows, rows.assign(critical_incomplete=rows["process"].map({"central_flow": 0.25}))):
        text = lb.write_page(rows_of_page, tmp_path, quick=True, minutes=1.0).read_text()
        flagged = rows_of_page[rows_of_page["critical_incomplete"].fillna(0) > 0]
        assert ("Critical sets not shown complete" in text) == (not flagged.empty)
        for row in flagged.itertuples():
            assert f"{row.problem} {row.process} {row.critical_incomplete:.0%}" in text
    assert not flagged.empty  # the second page flagged central_flow
    assert str(eosflow.load(out / "runs" / "quartic")["process"].values[0]) == "gd"  # the run loads, gd first

    # rerunning one model's row merges it into the table; the entry's run, with every other model, stays whole
    # (the rerun overwrote it and the table kept 3 of its 7 rows, from a probe)
    written = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert main(["leaderboard", "--problems", "quartic", "--models", "rod_flow", "--out", str(out)]) == 2  # not --quick
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == written  # refused before it ran
    before = pd.read_csv(out / "leaderboard.csv")
    rerun = ["leaderboard", "--quick", "--problems", "quartic", "--models", "rod_flow", "--quiet", "--out", str(out)]
    assert main(rerun) == 0
    after = pd.read_csv(out / "leaderboard.csv")
    assert list(after["process"]) == quick["processes"]
    kept = after["process"] != "rod_flow"
    pd.testing.assert_frame_equal(after[kept].reset_index(drop=True), before[kept].reset_index(drop=True))
    alone = compare_run(out / "runs" / "quartic-rod_flow").loc["rod_flow"]
    assert after.set_index("process").loc["rod_flow", "relative_distance"] == pytest.approx(alone["relative_distance"])
    assert list(eosflow.load(out / "runs" / "quartic")["process"].values) == quick["processes"]
    assert "merged into the table this directory held" in (out / "leaderboard.md").read_text()


def test_measure_only_processes_never_read_their_eigenpairs_and_own_cost_leaves_them_out(tmp_path):
    """The processes of MEASURE_ONLY move the same with the eigensolver off (spectrum.every = 0), to the last bits:
    their own cost is the total less the eigensolver's, which compare reports as 2 * measurement_hvps."""
    table = {
        "name": "mlp",
        "steps": 12,
        "lr": 0.5,
        "dtype": "float64",
        "processes": list(lb.MEASURE_ONLY),
        "problem": {"name": "mlp", "width": 8, "n_train": 40, "n_test": 0},
        "spectrum": {"k": 2, "k_max": 2, "tol": 1e-6},
        "record": {"chunk": 6},
    }
    runs = {}
    for every in (1, 0):
        rows = lb.run_suite(
            {"mlp": {**table, "spectrum": {**table["spectrum"], "every": every}}},
            tmp_path / str(every),
            progress=False,
            onset=False,
        )
        runs[every] = (eosflow.load(tmp_path / str(every) / "runs" / "mlp"), rows.set_index("process"))
    (measured, measured_rows), (off, off_rows) = runs[1], runs[0]
    for process in lb.MEASURE_ONLY:  # bit for bit under XLA's default optimization, to an ulp at level 0 (conftest)
        np.testing.assert_allclose(
            measured["loss"].sel(process=process).values, off["loss"].sel(process=process).values, rtol=1e-14
        )
        solver = 2 * measured["measurement_hvps"].sel(process=process).values.mean()
        assert solver >= 4 and measured_rows.loc[process, "measurement_equivalents"] == pytest.approx(solver)
        assert off_rows.loc[process, "measurement_equivalents"] == 0
        assert measured_rows.loc[process, "own_equivalents"] == pytest.approx(off_rows.loc[process, "own_equivalents"])
    for optimizer in ("gd", *OPTIMIZERS):  # one gradient per step, the eigensolver apart
        assert measured_rows.loc[optimizer, "own_equivalents"] == pytest.approx(1.0)


def test_architectures_suite_covers_the_listed_pairs_and_every_spec_is_valid():
    from eosflow.config import SpecError

    tables = lb.suite_tables(suite=lb.suite_entries("architectures"))
    assert list(tables) == ["resnet_digits", "transformer_sorting", "lstm_copying", "mlp_moons"]
    problems = {
        name: (t["problem"]["name"], t["problem"].get("dataset", t["problem"].get("task")))
        for name, t in tables.items()
    }
    assert problems == {
        "resnet_digits": ("resnet", "digits"),
        "transformer_sorting": ("transformer", "sorting"),
        "lstm_copying": ("lstm", "copying"),
        "mlp_moons": ("mlp", "moons"),
    }
    models = [m for m in lb.gd_models() if m != "particle_model"]
    for table in tables.values():
        assert table["processes"] == ["gd", "gradient_flow", *models]
        prepare(table)  # builds every problem and process: validates every value
    with pytest.raises(SpecError, match="architectures"):
        lb.suite_entries("zoo")


def test_the_machine_line_names_xlas_flags(monkeypatch):
    """A float32 page reproduces only under the same XLA threading (docs/leaderboard.md), so the page says it."""
    from eosflow.leaderboard import machine

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    assert "XLA_FLAGS='--xla_cpu_multi_thread_eigen=false'" in machine()
    monkeypatch.delenv("XLA_FLAGS")
    assert "XLA_FLAGS" not in machine()


@pytest.mark.parametrize("signum, group", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_an_interrupted_leaderboard_in_workers_stops_them_flushed_without_a_traceback(tmp_path, signum, group):
    """--jobs 2 stopped by Ctrl-C (SIGINT to the process group) or by SIGTERM to the command alone: the forked
    workers printed the parent's SIGTERM handler's traceback, and with SIGTERM the command waited for every
    entry to finish (from a probe). Now the workers' runs stop at a chunk boundary, flushed and resumable, and the
    command exits with the signal's status, leaving no process behind."""
    out = tmp_path / "board"
    command = [sys.executable, "-m", "eosflow.cli", "leaderboard", "--quick", "--problems", "sharp_valley"]
    child = subprocess.Popen(
        [*command, "--jobs", "2", "--quiet", "--out", str(out)],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")},
    )
    chunks = out / "runs" / "sharp_valley" / "trajectories" / "gd"
    deadline = time.monotonic() + 300
    while not (chunks.is_dir() and any(chunks.iterdir())) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert child.poll() is None, child.communicate()[1]  # still running after its first chunk
    if group:
        os.killpg(child.pid, signum)
    else:
        child.send_signal(signum)
    err = child.communicate(timeout=120)[1]
    assert child.returncode == 128 + signum and "Traceback" not in err, err
    assert "no entry finished" in err and "eosflow leaderboard --quick --problems sharp_valley --out" in err, err
    with pytest.raises(ProcessLookupError):
        os.killpg(child.pid, 0)  # no worker left
    summary = json.loads((out / "runs" / "sharp_valley" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["steps_done"] < 700, summary
    assert eosflow.load(out / "runs" / "sharp_valley").sizes["step"] == summary["steps_done"]


def _two_entries() -> tuple:
    """TINY's quartic twice, at two step sizes: entries a and b."""
    (entry,) = TINY
    return tuple(
        dataclasses.replace(entry, name=name, table={**entry.table, "name": name, "lr": lr}, quick_steps=60)
        for name, lr in (("a", 0.08), ("b", 0.085))
    )


def _stopping_at(name: str, real_run):
    """``run`` that is stopped (SIGINT, at its start) in the run of entry ``name``."""
    from eosflow.signals import Interrupted

    def run(table, out, **options):
        if out.name.split("-")[0] == name:  # (a run of some of the entry's models is named <entry>-<models>)
            raise Interrupted(signal.SIGINT)
        return real_run(table, out, **options)

    return run


def test_an_interrupted_leaderboard_writes_the_rows_it_finished_and_names_the_rest(tmp_path, monkeypatch, capsys):
    """Stopped in its last entry, a leaderboard wrote no table (its message said the same command runs every entry
    again). Now the finished entries' rows are written, the page says it was interrupted, and the command the
    message names runs the rest into the same table: equal, row for row, to an uninterrupted leaderboard's."""
    import pandas as pd

    from eosflow.cli import main

    def untimed(rows):  # the same runs, to the last bit, but for their wall times
        return rows.drop(columns=[c for c in rows.columns if c.startswith("ms_per_step")])

    monkeypatch.setitem(lb.SUITES, "default", _two_entries())
    command = ["leaderboard", "--quick", "--models", "rod_flow", "--quiet"]
    assert main([*command, "--out", str(tmp_path / "whole")]) == 0
    whole = pd.read_csv(tmp_path / "whole" / "leaderboard.csv")
    out = tmp_path / "board"
    monkeypatch.setattr(lb, "run", _stopping_at("b", lb.run))
    capsys.readouterr()
    assert main([*command, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted before it finished b;" in err and str(out / "leaderboard.md") in err, err
    rows = pd.read_csv(out / "leaderboard.csv")
    assert list(rows["problem"].unique()) == ["a"]
    pd.testing.assert_frame_equal(untimed(rows), untimed(whole[whole["problem"] == "a"].reset_index(drop=True)))
    rest = err.rsplit(": eosflow ", 1)[1].split()
    assert rest == ["leaderboard", "--quick", "--problems", "b", "--models", "rod_flow", "--out", str(out)], err
    assert f"`eosflow {' '.join(rest)}` runs them" in (out / "leaderboard.md").read_text()
    monkeypatch.undo()
    monkeypatch.setitem(lb.SUITES, "default", _two_entries())
    assert main([*rest, "--quiet"]) == 0
    pd.testing.assert_frame_equal(untimed(pd.read_csv(out / "leaderboard.csv")), untimed(whole))
    assert "Interrupted" not in (out / "leaderboard.md").read_text()
    # stopped again in a whole rerun: the finished rows replace theirs, the others stay (the page says they are old)
    monkeypatch.setattr(lb, "run", _stopping_at("b", lb.run))
    assert main([*command, "--out", str(out)]) == 130
    pd.testing.assert_frame_equal(untimed(pd.read_csv(out / "leaderboard.csv")), untimed(whole))
    assert "their rows, if any, are from earlier runs" in (out / "leaderboard.md").read_text()


WORKERS_SCRIPT = """
import dataclasses, signal, sys
import eosflow.leaderboard as lb
from eosflow.cli import main
from tests.test_leaderboard import TINY, _stopping_at

(entry,) = TINY
lb.SUITES["default"] = tuple(
    dataclasses.replace(entry, name=name, table={**entry.table, "name": name, "lr": lr}, quick_steps=60)
    for name, lr in (("a", 0.08), ("b", 0.082), ("c", 0.085))
)
if sys.argv[1] == "stop-c":
    lb.run = _stopping_at("c", lb.run)
sys.exit(main(sys.argv[2:]))
"""


def test_a_leaderboard_in_workers_keeps_the_rows_of_the_entries_they_finished(tmp_path):
    """--jobs 2 over entries a, b, c, stopped in c's run (which starts when a or b has finished): the rows of the
    finished entries are written, those of the entry stopped with it are not, and the rest, run by the command
    the message names (in workers again), completes the table in the suite's order."""
    import pandas as pd

    out = tmp_path / "board"
    root = os.path.join(os.path.dirname(__file__), "..")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(root, "src"), root])}

    def leaderboard(mode, *args):
        command = [
            sys.executable,
            "-c",
            WORKERS_SCRIPT,
            mode,
            "leaderboard",
            "--quick",
            "--models",
            "rod_flow",
            "--quiet",
        ]
        return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=600)

    stopped = leaderboard("stop-c", "--jobs", "2", "--out", str(out))
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr
    rows = pd.read_csv(out / "leaderboard.csv")
    finished = list(rows["problem"].unique())
    assert finished in (["a"], ["b"], ["a", "b"]), finished
    for problem in finished:
        own = compare_run(out / "runs" / f"{problem}-rod_flow").loc["rod_flow", "relative_distance"]
        assert rows.set_index(["problem", "process"]).loc[(problem, "rod_flow"), "relative_distance"] == own
    rest = stopped.stderr.rsplit(": eosflow ", 1)[1].split()
    assert rest[:4] == ["leaderboard", "--quick", "--problems", ",".join(p for p in "abc" if p not in finished)], rest
    completed = leaderboard("run", *rest[1:], "--jobs", "2")
    assert completed.returncode == 0, completed.stderr
    rows = pd.read_csv(out / "leaderboard.csv")
    assert list(rows["problem"]) == [p for p in "abc" for _ in range(3)]
    assert (rows["status"] == "ok").all() and rows[rows["process"] != "gd"]["relative_distance"].notna().all()
