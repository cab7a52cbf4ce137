"""eosflow.edge_log: your loop's readings on disk. Oracles: the monitor's own state (the reading it keeps), the
optimizer's threshold 38/lr, the records as written, and the file's bytes after faults (kill -9 mid-write, a
file-size limit standing for a full disk, a second writer)."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eosflow
from eosflow.edge_log import EdgeLog, EdgeLogError, plot, read, summary
from eosflow.precision import precision

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def child(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, **kwargs)


OPTIMIZERS = {
    "adam": lambda: eosflow.optimizer_edges.adam(0.02),
    "adamw_schedule": lambda: eosflow.optimizer_edges.adamw(optax.linear_schedule(0.01, 0.05, 20), weight_decay=0.1),
    "rmsprop_momentum": lambda: eosflow.optimizer_edges.rmsprop(0.01, momentum=0.5),
    "sgd_nesterov": lambda: eosflow.optimizer_edges.sgd(0.05, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize(
    "every, name", [(3, "adam"), (7, "adamw_schedule"), (4, "rmsprop_momentum"), (5, "sgd_nesterov")]
)
def test_monitored_readings_round_trip_with_the_loops_own_scalars(tmp_path, every, name):
    """monitored(..., log=EdgeLog) records, at each measured step, the reading the monitor keeps in its state
    (sharpness, lr S, S / threshold) and the threshold of that step, the optimizer's own threshold_at(step)
    (38/lr for Adam; moving with a schedule); the loop's losses at every step merge with them."""
    rng = np.random.default_rng(every)
    with precision("float64"):
        x, y = jnp.asarray(rng.normal(size=(30, 4))), jnp.asarray(rng.normal(size=(30, 2)))
        params = {"a": jnp.asarray(rng.normal(size=(4, 6)) / 2), "b": jnp.asarray(rng.normal(size=(6, 2)) / 2)}

        def loss_fn(p, batch):
            return 0.5 * jnp.mean(jnp.sum((jnp.tanh(batch[0] @ p["a"]) @ p["b"] - batch[1]) ** 2, -1))

        edge = OPTIMIZERS[name]()
        path = tmp_path / "run" / f"{name}.jsonl"
        kept, losses = {}, {}
        with EdgeLog(path) as log:
            opt = eosflow.monitor.monitored(edge, loss_fn, every=every, tol=1e-6, max_iters=100, log=log)
            state = opt.init(params)
            update = jax.jit(lambda g, s, p: opt.update(g, s, p, batch=(x, y)))
            for t in range(25):
                loss, g = jax.value_and_grad(loss_fn)(params, (x, y))
                updates, state = update(g, state, params)
                params = optax.apply_updates(params, updates)
                jax.effects_barrier()
                if t % every == 0:
                    kept[t] = state.reading
                losses[t] = float(loss)
                log.write(t, loss=loss)
        ds = read(path)
    np.testing.assert_array_equal(ds.step, np.arange(25))
    np.testing.assert_array_equal(ds.loss, [losses[t] for t in range(25)])
    measured = sorted(kept)
    assert measured == [t for t in range(25) if np.isfinite(ds.sharpness.sel(step=t))]
    for t in measured:
        assert int(kept[t].step) == t
        for name in ("sharpness", "lr_sharpness", "edge_ratio"):
            assert float(ds[name].sel(step=t)) == pytest.approx(float(getattr(kept[t], name)), rel=1e-12)
        # optax's count is int32, and a schedule evaluated at it gives the lr the update used (float32 for optax's
        # linear_schedule): the threshold of that lr, c(lr) / lr in float64, not of the float64 lr(t)
        used = np.float64(edge.lr_at(jnp.int32(t)))
        assert float(ds.threshold.sel(step=t)) == pytest.approx(float(edge.edge(used)), rel=1e-12)
    if name == "adam":
        assert float(ds.threshold.dropna("step")[0]) == pytest.approx(38 / 0.02, rel=1e-12)
    # P estimated from the gradients (Adam, AdamW, RMSProp) or the identity (SGD with momentum): the summary's
    # start transient is read for the former only
    assert set(ds.adaptive.dropna("step").values) == {float(edge.preconditioner is not None)}
    assert set(ds.converged.dropna("step").values) == {1.0}  # tol 1e-6 within 100 iterations


def test_a_monitored_reading_that_did_not_converge_says_so(tmp_path, capsys):
    """monitored(..., max_iters=1) on a quadratic with eigenvalues 1..5 (k = 2, tol 1e-6): the first readings
    stop at the cap, lower bounds of 5, and say "(not converged)" in the printed line, `converged` = 0 in the
    state's Reading and the log, and plot-log counts them; the later ones, warm-started closer, converge to 5."""
    from eosflow.cli import main

    with precision("float64"):
        scales = jnp.arange(1.0, 6.0)

        def loss_fn(w):
            return 0.5 * jnp.sum(scales * w**2)

        params = jnp.ones(5)
        path, stopped = tmp_path / "log.jsonl", []
        with EdgeLog(path) as log:

            def both(reading):
                eosflow.monitor.print_reading(reading)
                log(reading)

            opt = eosflow.monitor.monitored(
                eosflow.optimizer_edges.sgd(0.1), loss_fn, every=1, k=2, tol=1e-6, max_iters=1, log=both
            )
            state = opt.init(params)
            for t in range(8):
                updates, state = opt.update(jax.grad(loss_fn)(params), state, params)
                params = optax.apply_updates(params, updates)
                jax.effects_barrier()
                if not bool(state.reading.converged):
                    stopped.append(t)
                    assert float(state.reading.sharpness) <= 5.0 * (1 + 1e-12)
                else:
                    assert float(state.reading.sharpness) == pytest.approx(5.0, rel=1e-9)
    assert 0 < len(stopped) < 8 and stopped[0] == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert [int(line.split()[1]) for line in lines if line.endswith("(not converged)")] == stopped
    np.testing.assert_array_equal(read(path)["converged"].values, [int(t not in stopped) for t in range(8)])
    assert main(["plot-log", str(path)]) == 0
    assert f"{len(stopped)} of 8 readings not converged (first at step 0;" in capsys.readouterr().out


def test_records_of_a_step_merge_and_a_resumed_loop_replaces_what_it_logs_again(tmp_path):
    path = tmp_path / "log.jsonl"
    with EdgeLog(path) as log:
        for t in range(6):
            log.write(t, loss=10.0 - t, lr=0.1)
        log.write(4, sharpness=19.0)
    with EdgeLog(path, resume=True) as log:  # resumed from a checkpoint at step 3: steps 3.. are logged again
        for t in range(3, 8):
            log.write(t, loss=100.0 + t)
    ds = read(path)
    np.testing.assert_array_equal(ds.step, np.arange(8))
    np.testing.assert_array_equal(ds.loss, [10, 9, 8, 103, 104, 105, 106, 107])
    np.testing.assert_array_equal(ds.lr, [0.1] * 6 + [np.nan] * 2)
    assert float(ds.sharpness.sel(step=4)) == 19.0 and int(np.isfinite(ds.sharpness).sum()) == 1


def test_a_torch_trackers_eigenpairs_are_recorded_with_their_threshold(tmp_path):
    torch = pytest.importorskip("torch")
    import eosflow.torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    batch = (torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    eig = eosflow.torch.SharpnessTracker(model, torch.nn.functional.mse_loss, k=3, tol=1e-8).update(batch, optimizer)
    loss = torch.nn.functional.mse_loss(model(batch[0]), batch[1])  # the loop's loss, before its backward
    assert loss.requires_grad
    with EdgeLog(tmp_path / "torch.jsonl") as log:
        log.write(0, eig, loss=loss)
    record = json.loads((tmp_path / "torch.jsonl").read_text())
    assert record == {
        "step": 0,
        "sharpness": eig.values[0],
        "eigenvalue_2": eig.values[1],
        "eigenvalue_3": eig.values[2],
        "threshold": eig.threshold,
        "edge_ratio": eig.values[0] / eig.threshold,
        "adaptive": 0,  # SGD's P = I: no start transient
        "hvps": eig.hvps,
        "residual": float(np.max(eig.residuals)),
        "converged": 1,
        "loss": loss.item(),
    }
    assert eig.threshold == pytest.approx(2 * 1.5 / 0.3)


def test_a_torch_reading_that_did_not_converge_is_logged_said_and_marked(tmp_path, capsys):
    """A torch tracker's reading stopped at `max_iters` above tol was logged like a converged one. Its record now
    holds the largest residual and `converged` = 0 (the tracker's `converged` is False), plot-log counts such
    readings and the figure's title says so and marks them. A 5-dimensional quadratic with eigenvalues 1..5, k = 2,
    tol 1e-10, one LOBPCG iteration per reading along an SGD run: the warm start improves from reading to reading,
    so the first readings stop at the cap and the later ones converge; the converged ones are the eigenvalues to
    1e-9, the others lower bounds of them."""
    torch = pytest.importorskip("torch")
    import eosflow.torch
    from eosflow.cli import main
    from eosflow.edge_log import figure

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1, bias=False).double()
    # mse of X w against 0 with X = diag(sqrt(2.5 i)): H = 2 X^T X / 5 = diag(1, ..., 5)
    batch = (torch.diag(torch.sqrt(2.5 * torch.arange(1.0, 6.0, dtype=torch.float64))), torch.zeros(5, 1).double())
    loss_fn = torch.nn.functional.mse_loss
    tracker = eosflow.torch.SharpnessTracker(model, loss_fn, k=2, tol=1e-10, max_iters=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path, stopped = tmp_path / "log.jsonl", []
    with EdgeLog(path) as log:
        for t in range(8):
            eig = tracker.update(batch, optimizer)
            assert eig.converged == bool(np.all(eig.residuals <= 1e-10))
            if not eig.converged:
                stopped.append(t)
                assert np.all(eig.values <= np.array([5.0, 4.0]) * (1 + 1e-12))  # Ritz values: lower bounds
            else:
                np.testing.assert_allclose(eig.values, [5.0, 4.0], rtol=1e-9)
            log.write(t, eig)
            optimizer.zero_grad()
            loss_fn(model(batch[0]), batch[1]).backward()
            optimizer.step()
    assert 0 < len(stopped) < 8 and stopped[0] == 0
    ds = read(path)
    np.testing.assert_array_equal(ds["converged"].values, [int(t not in stopped) for t in range(8)])
    assert main(["plot-log", str(path)]) == 0
    said = f"{len(stopped)} of 8 readings not converged (first at step 0; residual above tol"
    assert said in capsys.readouterr().out
    ax = figure(ds).axes[0]
    assert said in ax.get_title()
    (marks,) = [line for line in ax.lines if line.get_label() == "not converged"]
    np.testing.assert_array_equal(marks.get_xdata(), stopped)


def test_bad_records_are_named_and_nothing_is_written(tmp_path):
    path = tmp_path / "log.jsonl"
    with EdgeLog(path) as log:
        log.write(0, loss=1.0)
        with pytest.raises(ValueError, match=r"'loss' is ndarray of shape \(3,\)"):
            log.write(1, loss=np.ones(3))
        with pytest.raises(ValueError, match="'note' is str"):
            log.write(1, note="hello")
        with pytest.raises(ValueError, match="non-negative integer, got -2"):
            log.write(-2, loss=1.0)
        with pytest.raises(ValueError, match="non-negative integer, got 1.5"):
            log.write(1.5, loss=1.0)
        with pytest.raises(ValueError, match="nothing to record"):
            log.write(1)
        with pytest.raises(TypeError, match="got dict"):
            log.write(1, {"sharpness": 3.0})
    assert path.read_text() == '{"step": 0, "loss": 1.0}\n'
    with pytest.raises(EdgeLogError, match="is closed"):
        log.write(2, loss=1.0)


def test_a_second_writer_is_refused_in_this_process_and_another(tmp_path):
    path = tmp_path / "log.jsonl"
    with EdgeLog(path) as log:
        log.write(0, loss=1.0)
        with pytest.raises(EdgeLogError, match="being written by another process"):
            EdgeLog(path)
        other = child(
            """
            import sys
            from eosflow.edge_log import EdgeLog, EdgeLogError
            try:
                EdgeLog(sys.argv[1]).write(9, loss=9.0)
            except EdgeLogError as error:
                print(error)
            """,
            str(path),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert "being written by another process" in other.communicate(timeout=120)[0]
        log.write(1, loss=2.0)
    np.testing.assert_array_equal(read(path).loss, [1.0, 2.0])
    with EdgeLog(path, resume=True) as log:  # released by close
        log.write(2, loss=3.0)


@pytest.mark.parametrize("lost", ["file", "directory"])
def test_a_log_deleted_while_written_is_written_back_with_every_record(tmp_path, lost):
    """``rm`` of the log (or of its directory, as a cleanup of runs/ would) while the loop writes: the next write
    puts every record so far back at the path with the new one, warning once, and the new file is locked as the
    old one was; if another file has taken the path, the records go on beside it and that file is left alone."""
    import shutil

    path = tmp_path / "runs" / "log.jsonl"
    with EdgeLog(path) as log:
        for step in range(3):
            log.write(step, loss=1.0 / (step + 1))
        shutil.rmtree(path.parent) if lost == "directory" else path.unlink()
        with pytest.warns(UserWarning, match="deleted while this run wrote it: its 3 records went back"):
            log.write(3, loss=0.25)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            log.write(4, loss=0.2)
        with pytest.raises(EdgeLogError, match="being written by another process"):
            EdgeLog(path)
        np.testing.assert_array_equal(read(path).step, np.arange(5))
        np.testing.assert_allclose(read(path).loss, [1.0, 0.5, 1 / 3, 0.25, 0.2])
        path.unlink()
        path.write_text('{"step": 0, "other": 1.0}\n')  # another file takes the path
        beside = path.with_name(f"log.recovered-{os.getpid()}.jsonl")
        with pytest.warns(UserWarning, match=f"its 5 records went back to a new file beside it, to '{beside}'"):
            log.write(5, loss=0.1)
        assert log.path == beside
    assert path.read_text() == '{"step": 0, "other": 1.0}\n'
    np.testing.assert_allclose(read(beside).loss, [1.0, 0.5, 1 / 3, 0.25, 0.2, 0.1])
    log = EdgeLog(path.with_name("closed.jsonl"))
    log.write(0, loss=1.0)
    log.path.unlink()
    with pytest.warns(UserWarning, match="its 1 record went back to a new file at the path"):
        log.close()  # deleted after the last write: put back on closing
    np.testing.assert_array_equal(read(log.path).loss, [1.0])


def test_kill_9_mid_write_loses_only_the_torn_record_and_the_log_goes_on(tmp_path):
    """A process appending as fast as it can, killed with SIGKILL: every line but possibly a torn last one is a
    record, the steps are 0..n-1 without a gap; a new EdgeLog cuts the torn tail (saying so) and appends."""
    path = tmp_path / "log.jsonl"
    writer = child(
        """
        import sys
        from eosflow.edge_log import EdgeLog
        log = EdgeLog(sys.argv[1])
        print("ready", flush=True)
        t = 0
        while True:
            log.write(t, loss=1.0 / (t + 1), sharpness=float(t) * 1e-3, payload=float(t) ** 0.5)
            t += 1
        """,
        str(path),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    writer.stdout.close()
    data = path.read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = read(path)
    torn = not data.endswith(b"\n")
    assert len(caught) == int(torn)
    n = ds.sizes["step"]
    assert n > 10
    np.testing.assert_array_equal(ds.step, np.arange(n))
    np.testing.assert_allclose(ds.loss, 1.0 / (np.arange(n) + 1), rtol=1e-15)
    if not torn:  # make the tear the kill may not have made, to see it cut
        path.write_bytes(data + b'{"step": 99999, "loss"')
    with pytest.warns(UserWarning, match="cut off 2[0-9] bytes|cut off [0-9]+ bytes"):
        log = EdgeLog(path, resume=True)
    with log:
        log.write(n, loss=-1.0)
    again = read(path)
    np.testing.assert_array_equal(again.step, np.arange(n + 1))
    assert float(again.loss[-1]) == -1.0


def test_a_full_disk_keeps_every_whole_record_and_names_the_file(tmp_path):
    """RLIMIT_FSIZE stands for a full disk (writes past it fail with EFBIG, SIGXFSZ ignored): the write that
    does not fit is undone to the last whole record and raised naming the file; what came before is intact."""
    path = tmp_path / "log.jsonl"
    limited = child(
        """
        import resource, signal, sys
        from eosflow.edge_log import EdgeLog, EdgeLogError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        log = EdgeLog(sys.argv[1])
        try:
            for t in range(10_000):
                log.write(t, loss=1.0 / (t + 1))
        except EdgeLogError as error:
            print(t, error)
        """,
        str(path),
        stdout=subprocess.PIPE,
        text=True,
    )
    out = limited.communicate(timeout=120)[0]
    failed_at = int(out.split()[0])
    assert f"could not append to the edge log {str(path)!r}" in out and f"(step {failed_at}) are kept" in out
    data = path.read_bytes()
    assert data.endswith(b"\n") and len(data) <= 1000
    ds = read(path)
    np.testing.assert_array_equal(ds.step, np.arange(failed_at))
    assert failed_at > 20


def test_a_corrupt_line_inside_the_log_is_named(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\nnot json\n{"step": 1, "loss": 0.5}\n')
    with pytest.raises(EdgeLogError, match=r"line 2 is not an edge-log record: b'not json'"):
        read(path)
    path.write_text('{"step": 0, "loss": 1.0}\n{"loss": 0.5}\n')
    with pytest.raises(EdgeLogError, match="line 2"):
        read(path)


@pytest.mark.parametrize("start, length", [(40, 30), (10, 80)])
def test_summary_and_figures(tmp_path, start, length):
    """The window at the edge from a synthetic edge ratio (sharpening, a stretch within 10% of 1, then a drop);
    figures for sharpness with its threshold, for the ratio alone and for the loss alone."""
    steps = np.arange(0, 200, 2)
    ratio = np.where(steps < start, steps / start * 0.9, 1.0 + 0.05 * np.sin(steps))
    ratio = np.where(steps >= start + length, 0.5, ratio)
    path = tmp_path / "log.jsonl"
    with EdgeLog(path) as log:
        for t, r in zip(steps, ratio):
            log.write(int(t), sharpness=r * 38 / 0.01, threshold=38 / 0.01, loss=np.exp(-t / 50))
    ds = read(path)
    found = summary(ds)
    inside = steps[(steps >= start) & (steps < start + length)]
    assert found["first_step_at_edge"] == inside[0] and found["longest_window_start"] == inside[0]
    assert found["longest_window_steps"] == inside[-1] - inside[0] + 1
    assert found["max_edge_ratio"] == pytest.approx(ratio.max())
    assert plot(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    only_ratio = (ds.sharpness / ds.threshold).to_dataset(name="edge_ratio")
    assert plot(only_ratio, tmp_path / "ratio.png").stat().st_size > 0
    assert plot(ds[["loss"]], tmp_path / "loss.png").stat().st_size > 0
    with pytest.raises(EdgeLogError, match="nothing to plot"):
        plot(ds[["threshold"]], tmp_path / "none.png")


def test_the_command_line_draws_and_summarizes(tmp_path, capsys):
    from eosflow.cli import main

    path = tmp_path / "log.jsonl"
    with EdgeLog(path) as log:
        for t in range(50):
            log.write(t, edge_ratio=min(1.0, t / 20), loss=1.0 / (t + 1))
    assert main(["plot-log", str(path)]) == 0
    out = capsys.readouterr().out
    assert "50 steps logged (0..49)" in out and "first_step_at_edge: 19" in out
    assert (tmp_path / "log.png").exists()
    assert "no threshold" not in out
    with EdgeLog(tmp_path / "bare.jsonl") as log:  # the JAX tracker's eigenpairs: a sharpness, no threshold
        for t in range(5):
            log.write(t, sharpness=10.0 + t, loss=1.0 / (t + 1))
    assert main(["plot-log", str(tmp_path / "bare.jsonl")]) == 0
    assert "no threshold or edge_ratio logged" in capsys.readouterr().out  # before: silence about the edge
    assert main(["plot-log", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read the edge log" in capsys.readouterr().err
    for out, message in [
        (tmp_path / "no" / "dir" / "x.png", "the directory .* does not exist"),
        (tmp_path / "x.txt", r"its suffix names no image format matplotlib writes \(use .png"),
    ]:  # tracebacks from matplotlib before
        assert main(["plot-log", str(path), "--out", str(out)]) == 2
        assert re.search(f"cannot write the figure to .*{message}", capsys.readouterr().err)
    for line, shown in [('{"step": 0, "loss": "x"}', "'x'"), ('{"step": 0, "loss": [1, 2]}', r"\[1, 2\]")]:
        (tmp_path / "bad.jsonl").write_text(line + "\n")
        assert main(["plot-log", str(tmp_path / "bad.jsonl")]) == 2
        assert re.search(f"line 1: 'loss' is {shown}, not a number", capsys.readouterr().err)
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["plot-log", str(tmp_path / "empty.jsonl")]) == 2
    captured = capsys.readouterr()
    assert "empty.jsonl: no records" in captured.out and "nothing to plot" in captured.err


def test_several_logs_overlaid_on_the_scale_every_edge_shares(tmp_path, capsys):
    """Three runs of a loop (two step sizes, one logging S with its threshold and one its edge ratio, one with no
    loss): the overlay draws each run's loss and S / threshold in its own colour, labelled by file name, every
    point that is finite; the command line summarizes each and writes the figure, and asks for --out."""
    from eosflow.cli import main
    from eosflow.edge_log import overlay_figure

    paths = [tmp_path / name for name in ("lr_0.01.jsonl", "lr_0.02.jsonl", "ratio_only.jsonl")]
    with EdgeLog(paths[0]) as a, EdgeLog(paths[1]) as b, EdgeLog(paths[2]) as c:
        for t in range(0, 60, 3):
            a.write(t, sharpness=38 / 0.01 * min(1.0, t / 30), threshold=38 / 0.01, loss=1.0 / (t + 1))
            b.write(t, sharpness=38 / 0.02 * min(1.0, t / 15), threshold=38 / 0.02, loss=2.0 / (t + 1))
            c.write(t, edge_ratio=float("nan") if t == 9 else t / 60)
    runs = {path.stem: read(path) for path in paths}
    fig = overlay_figure(runs)
    loss_axis, ratio_axis = fig.axes
    assert [line.get_label() for line in loss_axis.get_lines()] == ["lr_0.01", "lr_0.02"]
    curves = {line.get_label(): line for line in ratio_axis.get_lines() if not line.get_label().startswith("edge")}
    assert list(curves) == ["lr_0.01", "lr_0.02", "ratio_only"]
    np.testing.assert_allclose(curves["lr_0.02"].get_ydata(), np.minimum(1.0, np.arange(0, 60, 3) / 15))
    assert 9 not in curves["ratio_only"].get_xdata() and len(curves["ratio_only"].get_xdata()) == 19
    assert len({line.get_color() for line in curves.values()}) == 3
    assert main(["plot-log", *map(str, paths), "--out", str(tmp_path / "lrs.png")]) == 0
    out = capsys.readouterr().out
    assert out.count("steps logged") == 3 and "first_step_at_edge: 15" in out
    assert (tmp_path / "lrs.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        main(["plot-log", *map(str, paths)])
    assert "give --out for the figure of several logs" in capsys.readouterr().err
    with pytest.raises(EdgeLogError, match="nothing to overlay"):
        overlay_figure({"empty": runs["lr_0.01"][["threshold"]]})


def test_logs_that_share_a_file_name_are_each_drawn_and_labelled_by_their_folder(tmp_path):
    """runs/<lr>/log.jsonl: two logs of one name were keyed by it, and the overlay drew the last one only (from a
    probe). Each is drawn, labelled by its path from the common folder; a log given twice is refused."""
    from eosflow.edge_log import log_labels, overlay

    paths = [tmp_path / "runs" / lr / "log.jsonl" for lr in ("0.1", "0.2")]
    for scale, path in enumerate(paths, start=1):
        path.parent.mkdir(parents=True)
        with EdgeLog(path) as log:
            for t in range(5):
                log.write(t, loss=scale / (t + 1), edge_ratio=0.2 * t * scale)
    assert log_labels(paths) == ["0.1/log", "0.2/log"]
    assert log_labels([tmp_path / "a.jsonl", tmp_path / "b" / "c.jsonl"]) == ["a", "c"]
    import matplotlib.figure

    drawn = []
    original = matplotlib.figure.Figure.savefig
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig) or original(fig, *a, **k)
        )
        overlay(paths, tmp_path / "both.png")
    loss_axis = drawn[0].axes[0]
    assert [line.get_label() for line in loss_axis.get_lines()] == ["0.1/log", "0.2/log"]
    np.testing.assert_allclose(loss_axis.get_lines()[1].get_ydata(), 2 / np.arange(1, 6))
    with pytest.raises(EdgeLogError, match="given twice"):
        log_labels([paths[0], tmp_path / "runs" / "0.2" / ".." / "0.1" / "log.jsonl"])


def test_writing_and_reading_a_log_imports_neither_jax_nor_torch(tmp_path):
    """A torch loop that logs pays no JAX import (summary and plot import what they draw with, when called)."""
    out = child(
        """
        import sys
        from eosflow.edge_log import EdgeLog, read
        with EdgeLog(sys.argv[1]) as log:
            log.write(0, loss=1.0)
        read(sys.argv[1])
        print(sorted(name for name in ("jax", "torch", "matplotlib") if name in sys.modules))
        """,
        str(tmp_path / "log.jsonl"),
        stdout=subprocess.PIPE,
        text=True,
    ).communicate(timeout=120)[0]
    assert out.strip() == "[]"


def test_a_log_left_open_at_exit_closes_quietly_with_its_records(tmp_path):
    """A loop's log never closed, a module global at the interpreter's exit, with eosflow.torch imported (whose
    teardown order collected it after edge_log's globals were cleared: "Exception ignored in EdgeLog.__del__")."""
    path = tmp_path / "log.jsonl"
    _, err = child(
        """
        import sys
        import eosflow.torch
        from eosflow.edge_log import EdgeLog
        log = EdgeLog(sys.argv[1])
        log.write(0, loss=1.0)
        log.write(1, loss=0.5)
        """,
        str(path),
        stderr=subprocess.PIPE,
        text=True,
    ).communicate(timeout=120)
    assert err == ""
    assert list(read(path).loss.values) == [1.0, 0.5]
    EdgeLog(path, resume=True).close()  # its lock was released


def test_non_finite_values_are_strict_json_nulls_read_as_nan(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    with EdgeLog(path, echo=True) as log:
        log.write(0, loss=1.0, sharpness=np.nan)
        log.write(1, loss=np.inf)
    assert "step      1  loss = nan" in capsys.readouterr().out

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    records = [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]
    assert records == [{"step": 0, "loss": 1.0, "sharpness": None}, {"step": 1, "loss": None}]
    ds = read(path)
    assert float(ds.loss[0]) == 1.0 and np.isnan(ds.loss[1]) and np.isnan(ds.sharpness).all()


def test_a_diverged_logs_non_finite_tail_is_said_in_the_summary_and_the_title(tmp_path, capsys):
    """The loss null from step 3 to the end (a step logging only other names does not end it) is said by plot-log
    and in the figure's title; a loss non-finite once and finite again is no tail."""
    from eosflow.cli import main
    from eosflow.edge_log import figure

    path = tmp_path / "diverged.jsonl"
    with EdgeLog(path) as log:
        for t, loss in enumerate([1.0, np.nan, 0.5, np.inf, np.nan]):
            log.write(t, loss=loss, sharpness=1.0 + t, threshold=4.0)
        log.write(5, sharpness=np.nan)
    assert main(["plot-log", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  loss non-finite from step 3 (diverged)\n  sharpness non-finite from step 5 (diverged)" in out
    title = figure(read(path)).axes[0].get_title()
    assert title.endswith("diverged.jsonl\nloss non-finite from step 3\nsharpness non-finite from step 5")
    with EdgeLog(tmp_path / "recovered.jsonl") as log:
        for t, loss in enumerate([1.0, np.nan, 0.5]):
            log.write(t, loss=loss)
    assert "non_finite_from" not in read(tmp_path / "recovered.jsonl").loss.attrs


@pytest.mark.parametrize(
    "loss, scale",
    [([1.0, 0.5, 0.1], "log"), ([1.0, 0.0, 0.1], "log"), ([0.5, -0.2, -1.0], "linear"), ([0.0, 0.0, np.nan], "linear")],
)
def test_one_y_scale_policy_for_every_loss_panel(tmp_path, loss, scale):
    """A loss below 0 keeps the axis linear (a log axis would drop it), in the single log, the overlay, and the
    helper compare and sweep figures use; zeros alone are dropped from a log axis, nothing positive is linear."""
    from matplotlib.figure import Figure

    from eosflow.compare import log_scale_where_positive
    from eosflow.edge_log import figure, overlay_figure

    ds = read_from(tmp_path, loss)
    assert figure(ds).axes[0].get_yscale() == scale
    assert overlay_figure({"a": ds, "b": ds}).axes[0].get_yscale() == scale
    ax = Figure().subplots()
    ax.plot([0, 1, 2], [np.inf, 2.0, 30.0])
    ax.plot([0, 1, 2], loss)
    log_scale_where_positive(ax)
    assert ax.get_yscale() == ("linear" if np.nanmin(loss) < 0 else "log")  # with a positive line beside it


def test_a_narrow_positive_range_stays_linear():
    """A loss from 0.56 to 0.50 on a log axis read "5.1 x 10^-1" (from a probe): log needs a factor of 10."""
    from matplotlib.figure import Figure

    from eosflow.compare import log_scale_where_positive

    for values, scale in [([0.56, 0.52, 0.5], "linear"), ([0.0, 0.96, 1.01], "linear"), ([0.0, 0.09, 1.0], "log")]:
        ax = Figure().subplots()
        ax.plot([0, 1, 2], values)
        log_scale_where_positive(ax)
        assert ax.get_yscale() == scale, values


def read_from(tmp_path, loss):
    path = tmp_path / "log.jsonl"
    with EdgeLog(path) as log:
        for t, value in enumerate(loss):
            log.write(t, loss=value, sharpness=1.0 + t, threshold=4.0)
    return read(path)


def test_a_threshold_of_zero_has_no_edge_ratio_and_no_numpy_warning(tmp_path):
    """sharpness / 0 printed numpy's 'divide by zero' as an eosflow warning (from a probe): it reads NaN."""
    path = tmp_path / "log.jsonl"
    with EdgeLog(path) as log:
        for t, threshold in enumerate([0.0, 4.0, -1.0, 4.0]):
            log.write(t, sharpness=2.0 + t, threshold=threshold, loss=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = summary(read(path))
        plot(path, tmp_path / "log.png")
    assert found["max_edge_ratio"] == pytest.approx(5.0 / 4.0)  # steps 1 and 3 only


def test_a_second_run_on_a_log_is_refused_unless_it_resumes(tmp_path):
    """Two runs logged one after the other to one path merged into one series by step (a probe: steps 0-19 from
    the lr 0.02 run, 20-39 from the lr 0.01 run, a stepped threshold): a file holding records is refused, byte
    for byte untouched, unless resume=True; a torn last line alone is not a record."""
    path = tmp_path / "log.jsonl"
    with EdgeLog(path) as log:
        for t in range(4):
            log.write(t, loss=1.0 / (t + 1), threshold=3800.0)
    before = path.read_bytes()
    with pytest.raises(EdgeLogError, match=r"already holds 4 records of a run: EdgeLog\(path, resume=True\)"):
        EdgeLog(path)
    assert path.read_bytes() == before
    with EdgeLog(path, resume=True) as log:
        log.write(2, loss=9.0)
    assert list(read(path).loss.values) == [1.0, 0.5, 9.0, 0.25]
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(b'{"step": 0, "lo')
    with pytest.warns(UserWarning, match="cut off 15 bytes"), EdgeLog(torn) as log:
        log.write(0, loss=2.0)
    assert list(read(torn).loss.values) == [2.0]


def test_two_loops_sharing_one_log_are_refused_at_their_first_common_record(tmp_path):
    """Two monitored optimizers given one EdgeLog recorded their readings at the same steps, and the second
    replaced the first's at every step (run A's threshold gone): a name recorded twice at a step by one log is
    refused, naming it, and the first loop's record stays."""
    path = tmp_path / "log.jsonl"
    with EdgeLog(path) as log:
        log.write(0, loss=1.0, sharpness=2.0)
        log.write(0, lr=0.1)  # another name at the same step: one record
        with pytest.raises(EdgeLogError, match=r"'sharpness' already recorded at step 0 by this EdgeLog"):
            log.write(0, sharpness=5.0)
        for t in range(1, 100):  # only the last RECENT steps are remembered, and the steps go on
            log.write(t, loss=1.0)
    ds = read(path)
    assert float(ds.sharpness.sel(step=0)) == 2.0 and float(ds.lr.sel(step=0)) == 0.1


def test_a_float32_threshold_that_jitters_by_an_ulp_is_drawn_as_constant(tmp_path, monkeypatch):
    """A float32 loop's threshold is logged as S / ratio, which jitters (1899.99993, 1900.0000006): the flatness test
    at 1e-12 drew it as a moving curve, as a schedule's; a real schedule's threshold still is one."""
    import eosflow.edge_log as edge_log

    drawn = []
    monkeypatch.setattr("eosflow.compare.threshold_line", lambda ax, value, label: drawn.append(value))
    for name, thresholds, constant in [
        ("jitter", [1899.99993, 1900.0000006, 1900.0], True),
        ("schedule", [1900.0, 1890.0, 1880.0], False),
    ]:
        path = tmp_path / f"{name}.jsonl"
        with EdgeLog(path) as log:
            for t, threshold in enumerate(thresholds):
                log.write(t, sharpness=1000.0 + t, threshold=threshold, loss=1.0 / (t + 1))
        drawn.clear()
        edge_log.plot(path, tmp_path / f"{name}.png")
        assert (drawn == [pytest.approx(1900.0, rel=1e-6)]) == constant, (name, drawn)


def at_the_edge_after_a_start_transient(transient: int, fall: int, rise: int) -> tuple[np.ndarray, np.ndarray]:
    """An edge ratio by construction, measured every 5 steps: 1.2 for the first ``transient`` measurements (Adam's P
    from one gradient), 0.05 from measurement ``fall`` on, climbing linearly to 1 at measurement ``rise`` and
    holding there within 3%."""
    steps = np.arange(0, 600, 5)
    i = np.arange(steps.size)
    ratio = np.where(i < transient, 1.2, 0.6)  # between: below the edge, above half
    climb = 0.05 + 0.95 * (i - fall) / (rise - fall)
    ratio = np.where(i >= fall, np.minimum(climb, 1.0 + 0.03 * np.sin(i)), ratio)
    return steps, ratio


@pytest.mark.parametrize("transient, fall, rise", [(1, 1, 40), (3, 3, 20), (1, 4, 60), (2, 2, 3)])
def test_an_adaptive_logs_start_transient_is_reported_apart_from_its_edge(tmp_path, capsys, transient, fall, rise):
    """A log marked adaptive (as monitored and eosflow.torch write it for Adam and RMSProp) whose ratio opens above
    the edge and falls below 1/2: the first step at the edge is where the ratio climbs back (known by
    construction), the opening stretch is reported apart; the same records without the mark (GD's log) keep the
    old answer, step 0. From the CLI too."""
    from eosflow.cli import main

    steps, ratio = at_the_edge_after_a_start_transient(transient, fall, rise)
    paths = {}
    for adaptive in (True, False):
        paths[adaptive] = tmp_path / f"adaptive-{adaptive}.jsonl"
        with EdgeLog(paths[adaptive]) as log:
            for t, r in zip(steps, ratio):
                log.write(int(t), sharpness=r * 3800.0, threshold=3800.0, **({"adaptive": 1} if adaptive else {}))
    found = summary(read(paths[True]))
    assert found["start_transient_until"] == steps[fall]
    assert found["start_transient_max_edge_ratio"] == pytest.approx(1.2)
    assert found["first_step_at_edge"] == steps[np.flatnonzero((np.arange(steps.size) >= fall) & (ratio >= 0.95))[0]]
    assert found["max_edge_ratio"] == pytest.approx(ratio[fall:].max())
    assert found["longest_window_start"] > steps[fall]
    unmarked = summary(read(paths[False]))
    assert unmarked["first_step_at_edge"] == 0 and "start_transient_until" not in unmarked
    assert unmarked["max_edge_ratio"] == pytest.approx(1.2)
    assert main(["plot-log", str(paths[True])]) == 0
    out = capsys.readouterr().out
    assert (
        f"first_step_at_edge: {found['first_step_at_edge']}" in out and f"start_transient_until: {steps[fall]}" in out
    )


@pytest.mark.parametrize("seed", range(4))
def test_without_a_fall_below_half_there_is_no_start_transient(seed):
    """An adaptive log that opens below half its edge (progressive sharpening from the start), or opens at the edge
    and never falls below half (a run resumed at its edge, a dip to 0.6), has no start transient: every answer is
    the one without the rule."""
    from eosflow.report import edge_of_stability_window

    rng = np.random.default_rng(seed)
    rising = np.concatenate([rng.uniform(0.0, 0.49, 3), np.linspace(0.5, 1.05, 40), 1 + 0.05 * rng.normal(size=30)])
    resumed = np.concatenate([1 + 0.04 * rng.normal(size=20), [0.6], 1 + 0.04 * rng.normal(size=20)])
    for ratio in (rising, resumed):
        ratio[rng.integers(ratio.size, size=5)] = np.nan  # unmeasured steps
        with_rule = edge_of_stability_window(2 * ratio, start_transient=True)
        assert with_rule.pop("start_transient_until") is None
        assert np.isnan(with_rule.pop("start_transient_max_lr_sharpness"))
        assert with_rule == edge_of_stability_window(2 * ratio)
