"""`eosflow compare SPEC --from onset|K`: the anchored comparison saved in the run directory equals
`anchored(table, at)` bit for bit, the report's section shows `compare_dataset`'s numbers of it, `eosflow
report` re-renders it from the file alone, and what cannot be anchored is refused before anything is written."""

import json
import re
import shutil

import numpy as np
import pytest
import tomli_w
import xarray as xr

import eosflow.anchored
from eosflow.anchored import anchored
from eosflow.cli import main
from eosflow.compare import compare, compare_dataset, write_report
from eosflow.experiment import run
from eosflow.load import load, summary_of
from eosflow.store import RunStore
from test_compare import SPEC, _close, _page_table

# GD slides along a valley whose sharpness 5 e^x grows as it goes (x += lr eps = 0.006 a step): lr S reaches
# 1.9 at 5 e^x = 6.33, x = 0.236, near step 40 of 120 (at lr 0.2, 2 / lr = 10 is ~170 steps away)
TABLE = {**SPEC, "steps": 120, "lr": 0.3, "problem": {"name": "sharp_valley"}, "record": {"chunk": 40}}


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(tomli_w.dumps(TABLE))
    return path


def test_compare_from_onset_saves_reports_and_rerenders_the_comparison(spec, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["compare", str(spec), "--out", str(out), "--quiet", "--from", "onset"]) == 0
    # the onset read off the run from w0 on disk: GD's first step with lr S / 2 >= 0.95
    lr_sharpness = load(out)["lr_sharpness"].sel(process="gd").values
    k = int(np.flatnonzero(lr_sharpness / 2 >= 0.95)[0])
    assert 20 < k < 60
    assert RunStore(out).anchored_files() == [(k, out / f"from_step_{k}.nc")]
    expected = anchored(TABLE, "onset")
    with xr.open_dataset(out / f"from_step_{k}.nc", engine="scipy") as file:
        saved = file.load()
    # every value bit for bit, every attribute but the models' wall times (``timing``: ms_per_step)
    wall = {name: [chunk[0] for chunk in value["chunks"]] for name, value in summary_of(saved)["timing"].items()}
    assert wall == {name: [TABLE["steps"] - k] for name in ("gradient_flow", "rod_flow", "gd_nudged")}
    xr.testing.assert_identical(saved.assign_attrs(timing=""), expected.assign_attrs(timing=""))
    for name, variable in expected.data_vars.items():
        assert saved[name].dtype == variable.dtype and saved[name].values.tobytes() == variable.values.tobytes(), name

    page = out / "report" / "compare.md"
    assert str(page) in capsys.readouterr().out
    text = page.read_text()
    section = text.split(f"## From step {k} (the optimizer's edge onset)\n")[1]
    rows, table = _page_table(section), compare_dataset(saved)
    assert list(rows) == [*TABLE["processes"], "gd_nudged"] and (table["steps"] == TABLE["steps"] - k).all()
    assert "`gd_nudged` is gd itself restarted at k" in section
    for process, row in rows.items():
        for column, cell in row.items():
            if column == "status":
                assert cell == table.loc[process, "status"] == "ok"
            else:
                _close(cell, float(table.loc[process, column]))
    assert float(rows["rod_flow"]["relative_distance"]) < 0.8  # the rod flow, restarted on GD's rod, beats GF
    assert (out / "report" / f"compare_from_step_{k}.png").stat().st_size > 0

    # `eosflow report` writes the same page again from the files alone: nothing is rerun
    def rerun(*args, **kwargs):
        raise AssertionError("eosflow report reran the anchored comparison")

    monkeypatch.setattr(eosflow.anchored, "_anchored", rerun)
    shutil.rmtree(out / "report")
    assert main(["report", str(out)]) == 0
    assert page.read_text() == text and (out / "report" / f"compare_from_step_{k}.png").exists()
    assert f"- from step {k}: the models restarted on gd's state" in (out / "report" / "report.md").read_text()
    monkeypatch.undo()

    # an optimizer that never reaches its onset: status 3 and why; the run and its report are kept, and the
    # replaced run's comparison from step k is gone with it
    capsys.readouterr()
    command = ["compare", str(spec), "--out", str(out), "--quiet", "--overwrite", "--set", "lr=0.2", "--from", "onset"]
    assert main(command) == 3
    captured = capsys.readouterr()
    assert "no comparison from onset: gd never reached its edge of stability" in captured.err
    assert f"kept in {out}" in captured.err and str(page) in captured.out
    assert load(out).attrs["lr"] == 0.2 and load(out).attrs["status"] == "completed"
    assert "## From step" not in page.read_text() and RunStore(out).anchored_files() == []
    # the reason is kept in the run directory and on its page, also after `eosflow report`
    missing = out / RunStore.ANCHOR_MISSING
    assert missing.read_text().startswith("from onset: gd never reached its edge of stability")
    assert main(["report", str(out)]) == 0
    assert "Asked for, and not made: from onset: gd never reached its edge" in page.read_text()
    # a comparison that is made afterwards replaces it
    assert main(["compare", str(out), "--from", "40", "--quiet"]) == 0
    assert not missing.exists() and "No comparison from a later step" not in page.read_text()
    assert [k for k, _ in RunStore(out).anchored_files()] == [40]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--from", "1"], r"--from = 1: .* k must lie in \[2, 117\] for a run of 120 steps"),
        (["--from", "118"], r"--from = 118: .* k must lie in \[2, 117\]"),
        (["--from", "start"], r"--from = 'start': give a step \(an integer\) or 'onset'"),
        (["--from", "onset", "--set", "spectrum.every=0"], r"--from = 'onset' needs gd's edge ratio"),
        (["--from", "40", "--set", 'processes=["sgd", "langevin"]'], r"the first process, 'sgd', is not GD"),
        (["--from", "40", "--set", 'processes=["gd", "langevin"]'], r"process 'langevin' is not a model of 'gd'"),
        (
            ["--from", "40", "--set", 'processes=["gd", "momentum_stable_flow"]'],
            r"process 'momentum_stable_flow' is not a model of 'gd'",
        ),
        (["--from", "40", "--set", 'processes=["gd"]'], r"no model of 'gd' to start on its state"),
    ],
)
def test_what_cannot_be_anchored_is_refused_before_the_run(spec, tmp_path, capsys, options, message):
    out = tmp_path / "run"
    assert main(["compare", str(spec), "--out", str(out), "--quiet", *options]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_compare_run_dir_from_a_step_outside_the_window_of_a_diverged_run_says_where_it_diverged(tmp_path, capsys):
    """A run directory whose gd diverged at step 3 (its summary, as a run writes it; nothing is run here): --from 1
    said "k must lie in [2, 117] for a run of 120 steps", the spec's steps, as if any of them could anchor."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "spec.toml").write_text(tomli_w.dumps(TABLE))
    summary = {"status": "diverged", "reason": "gd: loss 1e+09 at step 3 exceeded the blow-up limit", "steps_done": 4}
    (out / "summary.json").write_text(json.dumps(summary))
    assert main(["compare", str(out), "--from", "1"]) == 2
    err = capsys.readouterr().err
    assert "--from = 1: gd diverged at step 3 of this run (steps 0..3 recorded, of 120)" in err
    assert "cannot be compared with it from any step" in err and "117" not in err


def test_compare_from_a_step_in_python_names_the_onset_beside_it(tmp_path, capsys):
    """``compare(table, out, at=K)``: the same file and section from a given step, whose title says where
    the optimizer's onset is (read off the run from w0); a run extended since is said to be longer than
    the file, and `eosflow compare RUN_DIR --from onset` adds a second comparison to the run as it is."""
    out = tmp_path / "run"
    page = compare(TABLE, out, progress=False, at=60)
    lr_sharpness = load(out)["lr_sharpness"].sel(process="gd").values
    onset = int(np.flatnonzero(lr_sharpness / 2 >= 0.95)[0])
    assert RunStore(out).anchored_files() == [(60, out / "from_step_60.nc")] and onset != 60
    section = page.read_text().split(f"## From step 60 (the optimizer's edge onset is step {onset})\n")[1]
    assert list(_page_table(section)) == [*TABLE["processes"], "gd_nudged"]
    # the run extended past the file's end: the section says the file was computed for the shorter run
    run({**TABLE, "steps": 160}, out, resume=True)  # one more chunk of 40: its compiled scan, reused
    assert "(Computed for a run of 120 steps; this run has 160" in write_report(out).read_text()
    # a run directory takes --from alone: the comparison from the onset is added to the run as it is
    assert main(["compare", str(out), "--set", "lr=0.2", "--from", "onset"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["compare", str(out), "--from", "onset"]) == 0
    assert RunStore(out).anchored_files() == [(onset, out / f"from_step_{onset}.nc"), (60, out / "from_step_60.nc")]
    text = page.read_text()
    assert f"## From step {onset} (the optimizer's edge onset)\n" in text and text.count("(Computed for a run") == 1
