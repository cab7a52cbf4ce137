"""Sweeps on a two-worker dask LocalCluster (processes, one thread each) with a diagonal quadratic.

Oracles: GD on L = 1/2 sum_i h_i w_i^2 has the closed form w_t = (1 - lr h)^t w0, so the loss
at every step, the top eigenvalue h_max and lr * h_max are known exactly; the distance between
processes is recomputed from the saved parameters; the grid is the itertools product.
"""

import itertools
import json
import os
import signal
import threading
import time
import tomllib

import numpy as np
import pandas as pd
import pytest

import eosflow
from eosflow.config import SpecError
from eosflow.store import RunStore
from eosflow.sweep import load_sweep, local_cluster, parse_grid, run_sweep

HESSIAN = np.array([20.0, 0.5])
LR = 0.099  # lr * h_max = 1.98: GD oscillates along the sharp axis, decaying slowly
BASE = {
    "steps": 100,
    "lr": LR,
    "dtype": "float64",
    "processes": ["gd", "gradient_flow"],
    "problem": {"name": "quadratic", "rotate": False, "eigenvalues": HESSIAN.tolist()},
    "spectrum": {"k_max": 1},
    "record": {"chunk": 50, "params_every": 1},
}
GRID = ["seed=0,1", "problem.init_scale=1.0,2.0"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = local_cluster(2, cache_dir=tmp_path_factory.mktemp("jax-cache"))
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def swept(cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    assert run_sweep(BASE, GRID, out, scheduler=cluster.scheduler_address, progress=False) == out
    return out


def gd_loss(w0: np.ndarray, steps: int) -> np.ndarray:
    """Closed-form loss of GD at the start of steps 0..steps-1."""
    w = (1 - LR * HESSIAN)[None, :] ** np.arange(steps)[:, None] * w0
    return 0.5 * (w**2 * HESSIAN).sum(axis=1)


def snapshot(folder) -> dict:
    """(mtime, size) of every durable file under ``folder``. Atomic-write temporaries
    (``.<name>.<random>.tmp``) are left out: a running worker renames them away at any moment."""
    return {
        p: (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if not (p.name.startswith(".") and p.name.endswith(".tmp"))
    }


def test_parse_grid():
    assert parse_grid("lr=0.1,0.2") == ("lr", [0.1, 0.2])
    assert parse_grid("problem.name=quadratic,quartic") == ("problem.name", ["quadratic", "quartic"])
    assert parse_grid("problem.eigenvalues=[2.0, 1.0],[3.0]") == ("problem.eigenvalues", [[2.0, 1.0], [3.0]])
    assert parse_grid("seed = 1, 2") == ("seed", [1, 2])
    assert parse_grid("problem.rotate=true,1") == ("problem.rotate", [True, 1])  # a bool is not the number 1
    bad_grids = [("lr", "lr"), ("lr=", "lr"), ("seed=1,1", "seed"), ("=1,2", "key"), ("lr=0.1,,0.2", "lr")]
    for bad, field in [*bad_grids, ("lr=1,1.0", "lr")]:  # 1 and 1.0: one spec, run twice (from a probe)
        with pytest.raises(SpecError, match=field):
            parse_grid(bad)


def test_bad_grid_value_fails_before_anything_runs(tmp_path):
    # an unreachable scheduler: validation must fail before any connection is attempted
    for grid, field in [
        ("lr=0.1,-1", "`lr`"),
        ("problem.init_scale=1.0,0.0", "`problem.init_scale`"),
        ("problem.widht=3", "problem.widht"),
        ("record.chunk=0", "`record.chunk`"),
        ("lr.x=1,2", "--grid lr.x: `lr` is not a table"),  # named --set before
    ]:
        with pytest.raises(SpecError, match=field):
            run_sweep(BASE, ["seed=0,1", grid], tmp_path, scheduler="tcp://127.0.0.1:9", progress=False)
    assert not any(tmp_path.iterdir())
    with pytest.raises(SpecError, match="twice"):
        run_sweep(BASE, ["seed=0", "seed=1"], tmp_path, scheduler="tcp://127.0.0.1:9", progress=False)


def test_workers_are_single_threaded(cluster):
    from dask.distributed import Client

    with Client(cluster) as client:
        flags = client.run(lambda: os.environ["XLA_FLAGS"])
    assert len(flags) == 2
    assert all("multi_thread_eigen=false" in f and "intra_op" not in f for f in flags.values())


@pytest.mark.parametrize(
    "inherited",
    ["", "--xla_cpu_multi_thread_eigen=false", "--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=4"],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_worker_xla_flags_are_ones_xla_accepts(monkeypatch, inherited, threads):
    """Every token a worker gets in XLA_FLAGS is a --flag (XLA reads a bare token as a flag file and the
    worker dies: "Could not open file intra_op_parallelism_threads=2"); at one thread Eigen is serial,
    unless the user's own flag says otherwise. That flag is kept at any thread count: with 2 threads a
    worker dropped the user's =false, and its float32 point differed from `eosflow run` in the same shell
    (43 of 63 arrays, from a probe)."""
    from eosflow.sweep import worker_environment

    monkeypatch.setenv("XLA_FLAGS", inherited)
    tokens = worker_environment(threads)["XLA_FLAGS"].split()
    assert all(token.startswith("--") for token in tokens) and "intra_op" not in " ".join(tokens)
    chosen = [token for token in inherited.split() if token.startswith("--xla_cpu_multi_thread_eigen")]
    eigen = [token for token in tokens if token.startswith("--xla_cpu_multi_thread_eigen")]
    assert eigen == (chosen or (["--xla_cpu_multi_thread_eigen=false"] if threads == 1 else []))
    assert worker_environment(threads)["OMP_NUM_THREADS"] == str(threads)


def test_grid_is_complete(swept):
    names = {f"seed={s},problem.init_scale={x}" for s, x in itertools.product([0, 1], ["1.0", "2.0"])}
    assert {p.name for p in (swept / "points").iterdir()} == names
    assert all(RunStore(swept / "points" / n).read_summary()["status"] == "completed" for n in names)
    ds = load_sweep(swept)
    assert dict(ds.sizes) == {"seed": 2, "problem.init_scale": 2, "process": 2}
    assert list(ds["seed"].values) == [0, 1] and list(ds["problem.init_scale"].values) == [1.0, 2.0]
    assert (ds.status == "completed").all()
    assert (swept / "sweep.png").stat().st_size > 0


def test_table_equals_run_directories(swept):
    table = pd.read_parquet(swept / "sweep.parquet")
    ds = load_sweep(swept)
    assert len(table) == 4 * 2
    for row in table.to_dict("records"):
        run_dir = swept / "points" / row["point"]
        scale = row["problem.init_scale"]
        spec = RunStore(run_dir).root.joinpath("spec.toml").read_text()
        assert f"seed = {row['seed']}" in spec and f"init_scale = {scale}" in spec
        one = eosflow.load(run_dir).sel(process=row["process"])
        for variable in ("loss", "sharpness", "lr_sharpness", "distance"):
            values = one[variable].values
            assert row[f"final_{variable}"] == values[np.isfinite(values)][-1]
        assert row["mean_distance"] == np.nanmean(one.distance.values)
        cell = ds.sel({"seed": row["seed"], "problem.init_scale": scale, "process": row["process"]})
        assert cell.final_loss.item() == row["final_loss"] and cell.point.item() == row["point"]
        # independent oracles: closed-form GD, the exact spectrum, distances from saved parameters
        _, gd_params = eosflow.load_params(run_dir, "gd")
        _, params = eosflow.load_params(run_dir, row["process"])
        np.testing.assert_allclose(np.linalg.norm(gd_params[0]), scale, rtol=1e-12)
        distance = np.linalg.norm(params - gd_params, axis=1)
        np.testing.assert_allclose(row["mean_distance"], distance.mean(), rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(row["final_sharpness"], HESSIAN.max(), rtol=1e-3)
        np.testing.assert_allclose(row["final_lr_sharpness"], LR * HESSIAN.max(), rtol=1e-3)
        if row["process"] == "gd":
            np.testing.assert_allclose(row["final_loss"], gd_loss(gd_params[0], 100)[-1], rtol=1e-10)
        else:
            assert row["mean_distance"] > 0.1 * scale  # gradient flow leaves GD's oscillation


def test_rerun_does_no_work(swept, cluster):
    before = snapshot(swept / "points")
    run_sweep(BASE, GRID, swept, scheduler=cluster.scheduler_address, progress=False)
    assert snapshot(swept / "points") == before
    last_run = json.loads((swept / "sweep.json").read_text())["last_run"]
    assert last_run == {"points": 4, "skipped": 4, "ran": 0, "failed": {}}


def test_killed_worker_loses_nothing(cluster, tmp_path):
    from dask.distributed import Client

    steps = 2000
    out = tmp_path / "sweep"
    table = {**BASE, "steps": steps, "record": {"chunk": 50, "params_every": 1}}
    grid = ["seed=2,3", "problem.init_scale=1.0,2.0"]
    errors = []
    thread = threading.Thread(
        target=lambda: _catch(errors, run_sweep, table, grid, out, scheduler=cluster.scheduler_address, progress=False)
    )
    with Client(cluster) as client:
        thread.start()
        victim, worker = _running_point(client, out)
        checkpoint_step = RunStore(out / "points" / victim).read_checkpoint()[0]
        # finished points, and the victim's chunks before its checkpoint, must survive untouched
        kept = {p: snapshot(p) for p in (out / "points").iterdir() if _status(p) == "completed"}
        trajectories = out / "points" / victim / "trajectories"
        kept[trajectories] = {
            f: stamp
            for f, stamp in snapshot(trajectories).items()
            if f.suffix == ".npz" and int(f.stem.split("-")[1]) < checkpoint_step
        }
        pid = client.run(os.getpid, workers=[worker])[worker]
        os.kill(pid, signal.SIGKILL)
        thread.join(timeout=120)
    assert not thread.is_alive() and not errors, errors
    assert checkpoint_step > 0 and kept[trajectories]
    for folder, files in kept.items():
        now = snapshot(folder)
        assert all(now.get(f) == stamp for f, stamp in files.items()), folder
    names = {f"seed={s},problem.init_scale={x}" for s, x in itertools.product([2, 3], ["1.0", "2.0"])}
    assert {p.name for p in (out / "points").iterdir()} == names
    for name in names:
        run_dir = out / "points" / name
        assert RunStore(run_dir).read_summary()["status"] == "completed"
        assert not list(run_dir.rglob("*.tmp"))
        for process in ("gd", "gradient_flow"):  # chunks tile 0..steps-1 exactly once
            chunks = RunStore(run_dir).chunk_files(process)
            assert [c[0] for c in chunks] == list(range(0, steps, 50)) and chunks[-1][1] == steps - 1
        ds = eosflow.load(run_dir)
        assert list(ds.step.values) == list(range(steps))
        _, gd_params = eosflow.load_params(run_dir, "gd")
        np.testing.assert_allclose(
            ds.loss.sel(process="gd").values, gd_loss(gd_params[0], steps), rtol=1e-9, atol=1e-300
        )
    table_rows = pd.read_parquet(out / "sweep.parquet")
    assert set(table_rows.status) == {"completed"} and len(table_rows) == 8


def _catch(errors, function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except Exception as error:  # reported by the test thread
        errors.append(error)


def _status(run_dir) -> str:
    return RunStore(run_dir).read_summary().get("status", "")


def _running_point(client, out, timeout=120.0):
    """(point, worker address) of a point that has a checkpoint but is not finished."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        for worker, keys in client.processing().items():
            for key in keys:
                name = str(key).split("-", 3)[3]
                run_dir = out / "points" / name
                if (run_dir / "checkpoint.npz").exists() and _status(run_dir) in ("", "running"):
                    step = RunStore(run_dir).read_checkpoint()[0]
                    if 0 < step < 1000:
                        return name, worker
        time.sleep(0.02)
    raise AssertionError("no point was seen running")


def test_a_point_written_before_an_option_existed_is_still_done(tmp_path):
    """A finished point whose spec.resolved.toml lacks `spectrum.grow_every` (an older eosflow), or has lost it,
    is `completed`, not `mismatch`; another lr is a mismatch."""
    from eosflow.experiment import run
    from eosflow.sweep import _resolved_text, point_state

    table = {
        "name": "old",
        "steps": 10,
        "lr": 0.08,
        "dtype": "float64",
        "problem": {"name": "quartic", "dim": 1},
        "record": {"chunk": 5},
    }
    run(table, tmp_path / "run")
    path = tmp_path / "run" / "spec.resolved.toml"
    path.write_text(
        "".join(line for line in path.read_text().splitlines(keepends=True) if not line.startswith("grow_every"))
    )
    assert point_state(tmp_path / "run", _resolved_text(table)) == "completed"
    assert point_state(tmp_path / "run", _resolved_text({**table, "lr": 0.07})) == "mismatch"
    # spec.resolved.toml lost: spec.toml stands in (it read as `new`, and the sweep ran over the point from step 0,
    # another spec's run included: a probe lost an lr = 0.2 run that way)
    path.unlink()
    assert point_state(tmp_path / "run", _resolved_text(table)) == "completed"
    assert point_state(tmp_path / "run", _resolved_text({**table, "lr": 0.07})) == "mismatch"


def test_a_sweep_rerun_with_more_steps_extends_its_points(cluster, tmp_path):
    """Raising `steps` and re-running a sweep continues every point from where it ended (its first
    chunks are not rewritten) to the closed-form loss of the longer run; fewer steps is a mismatch."""
    from eosflow.sweep import _resolved_text, point_state

    grid = ["problem.init_scale=1.0,2.0"]
    run_sweep({**BASE, "steps": 50}, grid, tmp_path, scheduler=cluster.scheduler_address, progress=False)
    first_chunks = {p: p.stat().st_mtime_ns for p in tmp_path.glob("points/*/trajectories/gd/0000000000-*.npz")}
    assert len(first_chunks) == 2
    point = next((tmp_path / "points").iterdir())
    stored = tomllib.loads((point / "spec.toml").read_text())
    assert point_state(point, _resolved_text({**stored, "steps": 100})) == "shorter"
    run_sweep(BASE, grid, tmp_path, scheduler=cluster.scheduler_address, progress=False)
    assert {p: p.stat().st_mtime_ns for p in first_chunks} == first_chunks
    for point in (tmp_path / "points").iterdir():
        ds = eosflow.load(point)
        assert ds.attrs["status"] == "completed" and ds.sizes["step"] == 100
        steps, gd_params = eosflow.load_params(point, "gd")
        assert list(steps) == list(range(100))  # the parameters too, saved on both sides of the extension
        np.testing.assert_allclose(ds.loss.sel(process="gd").values, gd_loss(gd_params[0], 100), rtol=1e-9)
    with pytest.raises(eosflow.store.StoreError, match="hold runs of a different spec"):
        run_sweep({**BASE, "steps": 60}, grid, tmp_path, scheduler=cluster.scheduler_address, progress=False)


def test_another_grid_into_a_sweep_adds_its_points_and_other_keys_are_refused(cluster, tmp_path):
    """A second sweep into `out` replaced sweep.json, so the table lost the first sweep's points (from a probe).
    Values of the same keys are added; other keys or another base spec are refused before anything is written."""
    address = cluster.scheduler_address
    run_sweep(BASE, ["problem.init_scale=1.0"], tmp_path, scheduler=address, progress=False)
    first = snapshot(tmp_path / "points")
    run_sweep(BASE, ["problem.init_scale=2.0,1.0"], tmp_path, scheduler=address, progress=False)
    assert {p: v for p, v in snapshot(tmp_path / "points").items() if p in first} == first  # not run again
    ds = load_sweep(tmp_path)
    assert list(ds["problem.init_scale"].values) == [1.0, 2.0] and set(ds["status"].values.ravel()) == {"completed"}
    for scale in (1.0, 2.0):
        point = tmp_path / "points" / str(ds["point"].sel({"problem.init_scale": scale}).item())
        steps, gd_params = eosflow.load_params(point, "gd")
        np.testing.assert_allclose(
            ds["final_loss"].sel({"problem.init_scale": scale, "process": "gd"}).item(),
            gd_loss(gd_params[0], 100)[-1],
            rtol=1e-9,
        )
    assert "`problem.init_scale` = 1.0, 2.0" in (tmp_path / "sweep.md").read_text()
    written = snapshot(tmp_path)
    with pytest.raises(eosflow.store.StoreError, match="holds a sweep over problem.init_scale"):
        run_sweep(BASE, ["seed=3"], tmp_path, scheduler=address, progress=False)
    with pytest.raises(eosflow.store.StoreError, match="another base spec"):
        run_sweep({**BASE, "lr": 0.05}, ["problem.init_scale=3.0"], tmp_path, scheduler=address, progress=False)
    assert snapshot(tmp_path) == written


def test_an_output_that_cannot_be_a_sweep_or_a_scheduler_out_of_reach_is_named(tmp_path):
    """Tracebacks before (from a probe): FileExistsError for --out a file, OSError after 30 s for a scheduler."""
    import dask

    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(eosflow.store.StoreError, match="exists and is not a directory"):
        run_sweep(BASE, ["seed=0"], afile, scheduler="tcp://127.0.0.1:9", progress=False)
    assert afile.read_text() == "mine"
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(eosflow.store.StoreError, match="cannot reach the dask scheduler at tcp://127.0.0.1:9"):
            run_sweep(BASE, ["seed=0"], tmp_path / "s", scheduler="tcp://127.0.0.1:9", progress=False)
    with pytest.raises(SpecError, match="--workers = 0"):
        run_sweep(BASE, ["seed=0"], tmp_path / "w", workers=0, progress=False)
    assert not (tmp_path / "w").exists()


def test_sweep_writes_a_markdown_summary(swept):
    from eosflow.compare import format_number

    page = (swept / "sweep.md").read_text()
    table = pd.read_parquet(swept / "sweep.parquet")
    assert "4 points: 4 completed" in page and "![" in page and "sweep.png" in page
    rows = [line for line in page.splitlines() if line.startswith("| seed=")]
    assert len(rows) == len(table) == 8
    for row in table.to_dict("records"):
        process = row["process"] + (" (reference)" if row["reference"] else "")
        cells = [row["point"], "completed", "100", process] + [
            format_number(row[c]) for c in ("final_loss", "final_lr_sharpness", "mean_distance", "final_distance")
        ]
        assert "| " + " | ".join(cells) + " |" in rows


def test_a_dropped_process_is_marked_on_the_sweep_page(tmp_path):
    """A model that diverged at step 1 of a completed point showed as completed, with its blown-up last values
    and no word of the drop (found by checking sweep.md against summary.json)."""
    from eosflow.sweep.summary import markdown_summary

    numbers = {"final_loss": 0.5, "final_lr_sharpness": 1.9, "mean_distance": 0.1, "final_distance": 0.2}
    reason = "loss -1.374e+15 at step 1 exceeded the blow-up limit 1500"
    frame = pd.DataFrame(
        [
            {
                "point": "lr=0.08",
                "status": "completed",
                "steps_done": 40,
                "reason": "",
                "process": process,
                "reference": process == "gd",
                "dropped": why,
                **numbers,
            }
            for process, why in (("gd", ""), ("central_flow", reason))
        ]
    )
    page = markdown_summary(frame, {"spec": {"name": "q"}, "grid": [("lr", [0.08])]}, tmp_path / "sweep.md").read_text()
    assert "| lr=0.08 | completed | 40 | gd (reference) |" in page
    assert "| lr=0.08 | completed | 40 | central_flow (dropped: its last values) |" in page
    assert f"## Processes dropped before the end\n\n- lr=0.08, central_flow: {reason}" in page


def test_sweep_figure_has_a_panel_per_measured_quantity(swept):
    from eosflow.sweep.figure import draw_summary

    frame = pd.read_parquet(swept / "sweep.parquet")
    keys = ["seed", "problem.init_scale"]  # x: seed; one line per (process, init_scale)
    both = draw_summary(frame, keys)
    assert len(both.axes) == 2 and all(ax.lines for ax in both.axes)
    assert {line.get_label() for line in both.axes[1].lines} == {
        f"gradient_flow problem.init_scale={scale}" for scale in (1.0, 2.0)
    }  # distance: models only
    gd = frame[frame.process == "gd"]
    gd_only = draw_summary(gd, keys)
    assert len(gd_only.axes) == 1  # no empty distance panel
    curves = [line for line in gd_only.axes[0].lines if line.get_label().startswith("gd")]
    assert len(curves) == 2
    for line in curves:
        scale = float(line.get_label().split("=")[1])
        expected = gd[gd["problem.init_scale"] == scale].sort_values("seed")
        np.testing.assert_array_equal(line.get_xdata(), expected.seed.values)
        np.testing.assert_array_equal(line.get_ydata(), expected.tail_lr_sharpness.values)


def test_each_process_has_one_colour_in_every_panel_of_the_sweep_figure():
    """Colours followed the drawing order: the distance panel leaves the reference out, so its first model took
    the reference's colour there. Now a process is one colour everywhere, a value of another grid key one dash."""
    from matplotlib.colors import to_hex

    from eosflow.sweep.figure import draw_summary

    rows = [
        {
            "lr": lr,
            "seed": seed,
            "process": process,
            "reference": process == "gd",
            "tail_lr_sharpness": 2.0 + lr + seed,
            "mean_distance": np.nan if process == "gd" else lr + seed,
        }
        for lr in (0.1, 0.2)
        for seed in (0, 1)
        for process in ("gd", "central_flow", "stable_flow")
    ]
    figure = draw_summary(pd.DataFrame(rows), ["lr", "seed"])
    styles = [
        {
            line.get_label(): (to_hex(line.get_color()), line.get_linestyle())
            for line in ax.lines
            if "=" in line.get_label()
        }
        for ax in figure.axes
    ]
    assert styles[1] == {name: style for name, style in styles[0].items() if not name.startswith("gd")}
    assert len({colour for colour, _ in styles[0].values()}) == 3
    assert styles[0]["central_flow seed=0"][0] == styles[0]["central_flow seed=1"][0]
    assert styles[0]["central_flow seed=0"][1] != styles[0]["central_flow seed=1"][1]


@pytest.mark.parametrize("steps", [100, 101, 7, 2])
def test_the_tail_mean_of_a_period_2_orbit_does_not_depend_on_its_last_phase(steps):
    """The sweep figure drew the last lr*S, one side of a period-2 orbit: two seeds on one orbit read 3.21 and 1.01
    (from a probe). tail_mean averages an even number of the last values: the orbit's mean whichever side ends,
    with the NaNs of unmeasured steps skipped."""
    from eosflow.sweep.aggregate import tail_mean

    orbit = np.where(np.arange(steps) % 2 == 0, 1.01, 3.21)
    for values in (orbit, orbit[::-1].copy(), np.concatenate([orbit, [np.nan, np.nan]])):
        assert tail_mean(values) == pytest.approx(2.11, rel=1e-12), values
    drifting = np.linspace(0.0, 1.0, 101)  # not an orbit: the mean of its last 10 values, not its last value
    assert tail_mean(drifting) == pytest.approx(drifting[-10:].mean())


def test_points_report_progress_and_the_local_cluster_stops_quietly(tmp_path):
    """Each point publishes its steps after every chunk (seen by the client while it runs), and the
    sweep's own local cluster shuts down without dask killing a worker or losing a result."""
    import logging

    from eosflow.sweep.cluster import run_points
    from eosflow.sweep.grid import parse_grid
    from eosflow.sweep.points import grid_points
    from eosflow.sweep.progress import SweepProgress

    class Recorder(SweepProgress):
        def step(self, point, step):
            seen.append((point, step))
            super().step(point, step)

    class Messages(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    seen, messages = [], []
    table = {
        "steps": 60,
        "lr": 0.08,
        "dtype": "float64",
        "problem": {"name": "quartic", "dim": 2},
        "record": {"chunk": 20},
    }
    points = grid_points(table, [parse_grid("lr=0.05,0.08")])
    display = Recorder({p.name: p.steps for p in points}, len(points), 0, enabled=False)
    handler = Messages(logging.WARNING)
    logging.getLogger("distributed").addHandler(handler)
    try:
        results = run_points(points, tmp_path, None, 1, display)
    finally:
        logging.getLogger("distributed").removeHandler(handler)
    assert {name: r["status"] for name, r in results.items()} == {"lr=0.05": "completed", "lr=0.08": "completed"}
    for point in ("lr=0.05", "lr=0.08"):
        assert sorted(step for name, step in seen if name == point) == [20, 40, 60]
    assert display.counts == {"completed": 2}
    assert not [m for m in messages if "still alive" in m or "lose" in m], messages


def test_a_local_cluster_leaves_the_callers_environment_as_it_was(tmp_path):
    """run_sweep from the user's own Python left dask's worker variables in os.environ (OMP_NUM_THREADS=1,
    PYTHONHASHSEED, __DASK_PARENT_PID, ...; from a probe): the nanny writes them into its own process."""
    from eosflow.sweep.cluster import available_cores, connect

    before = dict(os.environ)
    with connect(None, 1, tmp_path / "jax-cache") as client:
        assert list(client.run(lambda: os.environ["OMP_NUM_THREADS"]).values()) == [str(available_cores())]
        assert dict(os.environ) == before  # the worker has its variables, the caller keeps its own
    assert dict(os.environ) == before
