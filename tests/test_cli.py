"""The first minutes with the command: fast help, plain text, the README's commands as written."""

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from eosflow.cli import main
from eosflow.experiment import prepare
from eosflow.store import StoreError

ROOT = Path(__file__).resolve().parents[1]


def test_help_and_version_import_neither_jax_nor_matplotlib_nor_dask():
    code = (
        "import sys; from eosflow.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('jax', 'matplotlib', 'dask', 'xarray', 'pandas') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
    help_text = result.stdout
    assert "``" not in help_text and "resume" in help_text and "eosflow COMMAND --help" in help_text
    for module in ("eosflow.cli", "eosflow"):  # `python -m eosflow`: before, "No module named eosflow.__main__"
        version = subprocess.run(
            [sys.executable, "-m", module, "--version"], capture_output=True, text=True, check=True
        )
        assert re.fullmatch(r"eosflow \d+\.\d+\.\d+\S*\n", version.stdout)
    failed = subprocess.run([sys.executable, "-m", "eosflow", "report", "/nonexistent/run"], capture_output=True)
    assert failed.returncode == 2 and b"eosflow: error" in failed.stderr  # the status and message of the script


def test_every_positional_argument_has_help(capsys):
    for command in ("run", "resume", "report", "compare", "sweep"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        usage = capsys.readouterr().out
        positional = usage.split("positional arguments:")[1].split("options:")[0].strip().splitlines()
        assert positional and all(len(line.split(None, 1)) == 2 for line in positional), (command, positional)


def test_every_option_has_help(capsys):
    """`--quiet` of compare, sweep and leaderboard and `demo --out` had none."""
    for command in ("run", "resume", "demo", "report", "compare", "sweep", "leaderboard"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        lines = capsys.readouterr().out.split("options:")[1].splitlines()
        bare = [  # an option line without help, and no help wrapped onto the next line
            line.strip()
            for line, after in zip(lines, [*lines[1:], ""])
            if line.startswith("  -") and "  " not in line.strip() and not re.match(r" {6,}\S", after)
        ]
        assert not bare, (command, bare)


def test_run_resume_without_out_is_refused(tmp_path, monkeypatch, capsys):
    """`eosflow run SPEC --resume` without --out used to start a fresh run in a new directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.toml").write_text('steps = 2\n[problem]\nname = "quadratic"\n')
    assert main(["run", "spec.toml", "--resume", "--quiet"]) == 2
    assert "--resume needs the run directory" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_path_without_a_run_says_why(tmp_path, capsys):
    """resume, report and eosflow.load name a missing path, a file, or a directory without spec.toml."""
    import eosflow

    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    for name, why in [("missing", "it does not exist"), ("file", "it is a file"), ("empty", "it has no spec.toml")]:
        path = tmp_path / name
        compare = [["compare", str(path), "--from", "10"]] if path.is_dir() else []  # (a file is read as a spec)
        for command in (["resume", str(path)], ["report", str(path)], *compare):
            assert main(command) == 2
            assert f"{str(path)!r} is not a run directory ({why})" in capsys.readouterr().err
        with pytest.raises(StoreError, match=rf"is not a run directory \({why}\)"):
            eosflow.load(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"]  # nothing created


def test_a_spec_that_is_not_utf8_or_a_seed_out_of_range_is_named(tmp_path, monkeypatch, capsys):
    """Tracebacks before: UnicodeDecodeError for a Latin-1 comment, OverflowError from JAX for seed >= 2**63; a
    byte-order mark read as invalid TOML. A spec's name that leaves runs/ ("../x") is kept inside it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin.toml").write_bytes(b"steps = 2\n# \xb5 comment\n")
    assert main(["run", "latin.toml", "--quiet"]) == 2
    assert "spec file 'latin.toml' is not UTF-8 text, as TOML must be (byte 0xb5 at position 12)" in (
        capsys.readouterr().err
    )
    spec = 'steps = 2\nname = "../../escape"\n[problem]\nname = "quadratic"\n'
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf" + spec.encode())
    assert main(["run", "bom.toml", "--quiet", "--set", "seed=9223372036854775808"]) == 2
    assert "`seed` = 9223372036854775808 is out of range: it must be at most 9223372036854775807" in (
        capsys.readouterr().err
    )
    assert main(["run", "bom.toml", "--quiet"]) == 0
    (made,) = (tmp_path / "runs").iterdir()
    assert made.name.startswith("_.._escape-") and sorted(p.name for p in tmp_path.iterdir()) == [
        "bom.toml",
        "latin.toml",
        "runs",
    ]


def test_output_cut_short_by_the_reader_ends_quietly():
    """`eosflow processes | head -1`: a BrokenPipeError traceback before; now exit status 141 and no stderr."""
    command = [sys.executable, "-c", "import sys; from eosflow.cli import main; sys.exit(main(['processes']))"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has left before the first write: every write fails (EPIPE)
    try:
        finished = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    assert finished.returncode == 141 and finished.stderr == b""


def test_processes_says_where_options_go_and_aligns_them(capsys):
    assert main(["processes"]) == 0
    listing = capsys.readouterr().out
    assert "set an option in the table of the process's name" in listing and "[central_flow]\n    substeps" in listing
    block = listing.split("[central_flow]  ")[1].split("\n[")[0].splitlines()[1:]
    columns = {len(re.match(r"    \S+ = .*?  +(?=\S)", line).group(0)) for line in block}
    assert len(block) > 3 and len(columns) == 1  # every help text starts in one column


def test_docs_name_what_an_empty_spec_runs():
    """docs/spec.md shows the resolved spec an empty spec runs; it is the code's, key for key."""
    text = (ROOT / "docs" / "spec.md").read_text()
    block = text.split("## An empty spec")[1].split("```toml\n")[1].split("```")[0]
    resolved = prepare({})[2]
    resolved.pop("gd", None)  # gd's one option (warm_start) is not shown there
    assert tomllib.loads(block) == resolved


def _readme_commands() -> list[list[str]]:
    lines = (ROOT / "README.md").read_text().splitlines()
    commands = []
    for line in lines:
        line = line.strip()
        if line.startswith(".venv/bin/eosflow "):
            commands.append(shlex.split(line.split("#")[0])[1:])
    return commands


def test_the_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """Every `.venv/bin/eosflow ...` line of the README, in a fresh directory, with `--set steps=N`
    (and --quiet) added to the commands that train; `leaderboard --quick` (minutes; its own test
    is tests/test_leaderboard.py) and `sweep` (tests/test_sweep.py) are checked to parse only; the
    `--compile-cache` line runs in a subprocess (it sets JAX's configuration), into a cache in tmp_path."""
    commands = _readme_commands()
    assert [c[0] for c in commands] == [
        "run",
        "resume",
        "resume",
        "report",
        "problems",
        "processes",
        "compare",
        "leaderboard",
        "leaderboard",
        "leaderboard",
        "leaderboard",
        "sweep",
        "--compile-cache",
    ]
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    for command in commands:
        if command[0] == "--compile-cache":  # a setting of the whole process: run apart, into a cache here
            command = [command[0], str(tmp_path / "cache"), *command[2:], "--set", "steps=12", "--quiet"]
            ran = subprocess.run([sys.executable, "-m", "eosflow", *command], capture_output=True, text=True)
            assert ran.returncode == 0 and any((tmp_path / "cache").iterdir()), ran.stderr
            continue
        if command[0] in ("leaderboard", "sweep"):
            with pytest.raises(SystemExit) as parsed:
                main([*command, "--help"])
            assert parsed.value.code == 0
            continue
        if "--steps" in command:  # extending the run: to 16 steps, not the README's
            command = [*command[: command.index("--steps")], "--steps", "16"]
        extra = ["--set", "steps=12", "--set", "record.chunk=4"] if command[0] in ("run", "compare") else []
        extra += ["--quiet"] if command[0] in ("run", "resume", "compare") else []
        assert main([*command, *extra]) == 0, (command, capsys.readouterr().err)
    assert (tmp_path / "runs" / "lr03" / "report" / "report.md").exists()
    assert json.loads((tmp_path / "runs" / "lr03" / "summary.json").read_text())["steps_done"] == 16
    assert (tmp_path / "runs" / "cmp" / "report" / "compare.md").exists()


def test_a_dropped_model_is_named_by_the_command_and_in_the_report(tmp_path, capsys):
    """The free-energy model with the Taylor stiffness blows up on the quartic's orbit (loss -4.6e5 at step 15):
    the command printed only "completed" and report.md listed that last value as the final loss (from a probe)."""
    spec = Path(__file__).parent.parent / "examples" / "compare_quartic.toml"
    out = tmp_path / "r"
    changes = [
        "--set",
        'processes=["gd", "free_energy"]',
        "--set",
        'free_energy.stiffness="taylor"',
        "--set",
        "steps=40",
    ]
    assert main(["run", str(spec), *changes, "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    reason = json.loads((out / "summary.json").read_text())["dropped_processes"]["free_energy"]
    assert f"dropped free_energy: {reason}" in printed
    rows = {
        line.split("|")[1].strip(): line
        for line in (out / "report" / "report.md").read_text().splitlines()
        if line.startswith("| gd |") or line.startswith("| free_energy |")
    }
    assert rows["free_energy"].rstrip().endswith(f"| dropped: {reason} |") and rows["gd"].rstrip().endswith("| ok |")


def test_the_demo_replaces_an_earlier_demo_and_refuses_any_other_run(tmp_path, capsys):
    """`eosflow demo --out DIR` replaced whatever run DIR held (from a probe); `eosflow run` refuses that."""
    import tomli_w

    from eosflow.cli import demo_table
    from eosflow.spec import load_spec_table

    spec = Path(__file__).parent.parent / "examples" / "compare_quartic.toml"
    out = tmp_path / "mine"
    assert main(["run", str(spec), "--set", "steps=10", "--quiet", "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["demo", "--out", str(out), "--quiet"]) == 2
    assert "holds the run 'compare_quartic', not the demo" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (tmp_path / "demo.toml").write_text(tomli_w.dumps(demo_table()))  # what a demo's directory holds
    assert load_spec_table(tmp_path / "demo.toml") == demo_table()  # so an earlier demo is replaced


def test_a_bad_problem_value_prints_its_error_and_no_progress_bar(tmp_path, capsys):
    """`eosflow run` with `[problem] widht = 3` printed a progress bar at 0 on stdout before the error (from an
    audit of docs/reliability.md's "one paragraph")."""
    spec = tmp_path / "c.toml"
    spec.write_text('steps = 50\n[problem]\nname = "mlp"\nwidht = 3\n')
    assert main(["run", str(spec), "--out", str(tmp_path / "o")]) == 2
    out, err = capsys.readouterr()
    assert out == "", repr(out)  # no bar at 0, and no blank line either
    assert "unknown key `problem.widht`" in err and not (tmp_path / "o").exists()


def test_measurements_that_did_not_converge_are_named_counted_and_marked(tmp_path, capsys):
    """A measurement that stopped at `max_iters` with a residual above tol was recorded like any other: nothing in
    the report, the command or the leaderboard said so. Now each counts them per process, and every eigenvalue left
    unflagged is dense eigh's to tol while the flagged ones are Ritz values, at most the eigenvalues they stand for
    (a small MLP in float64, k = 2, tol 1e-4, capped at 4 iterations: about half the steps stop at the cap)."""
    import jax.numpy as jnp
    import numpy as np
    import tomli_w

    import eosflow
    from eosflow.compare import compare_dataset
    from eosflow.leaderboard import unconverged_measurements
    from eosflow.spectrum import dense_top_eigenpairs

    table = {
        "lr": 0.5,
        "steps": 20,
        "dtype": "float64",
        "processes": ["gd", "gradient_flow"],
        "problem": {"name": "mlp", "width": 8, "n_train": 40, "n_test": 0},
        "spectrum": {"k": 2, "k_max": 2, "tol": 1e-4, "max_iters": 4},
        "record": {"params_every": 1},
    }
    spec = tmp_path / "spec.toml"
    spec.write_text(tomli_w.dumps(table))
    for out, max_iters in [(tmp_path / "capped", 4), (tmp_path / "free", 200)]:
        assert main(["run", str(spec), "--set", f"spectrum.max_iters={max_iters}", "--quiet", "--out", str(out)]) == 0
        err, page = capsys.readouterr().err, (out / "report" / "report.md").read_text()
        ds = eosflow.load(out)
        objective = prepare(tomllib.loads(spec.read_text()))[1].objective
        _, params = eosflow.load_params(out, "gd")
        values = ds["eigenvalues"].sel(process="gd").values
        oracle = np.array([dense_top_eigenpairs(objective, jnp.asarray(w), k=2).values for w in params])
        for process in ("gd", "gradient_flow"):
            flagged = ds["residual"].sel(process=process).values > 1e-4
            line = f"{process}: {flagged.sum()} of 20 measurements stopped at `max_iters` = {max_iters} with a relative"
            assert (line in err and line in page) == bool(flagged.any()), (process, max_iters)
        flagged = ds["residual"].sel(process="gd").values > 1e-4
        error = np.abs(values - oracle) / oracle
        assert np.all(error[~flagged] <= 1e-4) and np.all(values[flagged] <= oracle[flagged] * (1 + 1e-12))
        rows = compare_dataset(ds).reset_index().assign(problem="mlp")  # the leaderboard's rows of this run
        assert rows.set_index("process").loc["gd", "not_converged"] == flagged.sum() / 20
        assert bool(unconverged_measurements(rows)) == bool(flagged.any())
        if max_iters == 4:
            assert 3 <= flagged.sum() <= 17 and np.any(error[flagged] > 1e-4)
            assert "## Measurements not converged" in page
            assert f"mlp gd {flagged.sum() / 20:.1%}" in unconverged_measurements(rows)[-1]
        else:
            assert not flagged.any() and "not converged" not in page and "max_iters" not in err
