"""The engine end to end: GD against its own update rule, resume, divergence, run-directory safety."""

import json
import os
import re
import sys
from functools import partial

import jax
import numpy as np
import pytest

import eosflow
from eosflow.config import SpecError
from eosflow.experiment import run
from eosflow.problems import build_problem
from eosflow.spectrum import dense_top_eigenpairs
from eosflow.store import RunStore, StoreError

SMALL_MLP = {"name": "mlp", "width": 8, "n_train": 60, "n_test": 0}


def spec(**overrides):
    table = {
        "steps": 60,
        "lr": 0.5,
        "dtype": "float64",
        "problem": dict(SMALL_MLP),
        "spectrum": {"k": 2, "k_max": 3, "tol": 1e-7, "max_iters": 200},
        "record": {"chunk": 16},
    }
    table.update(overrides)
    return table


def test_gd_trajectory_and_sharpness_match_independent_computation(tmp_path):
    table = spec(record={"chunk": 16, "params_every": 1})
    outcome = run(table, tmp_path / "run")
    assert outcome.status == "completed" and outcome.steps_done == 60
    ds = eosflow.load(tmp_path / "run")
    assert list(ds.process.values) == ["gd"] and ds.sizes["step"] == 60
    problem = build_problem(SMALL_MLP, 0, "float64")[0]
    obj = problem.objective
    w = np.asarray(problem.w0)
    steps, params = eosflow.load_params(tmp_path / "run", "gd")
    for t in range(60):  # plain numpy GD loop as the oracle
        np.testing.assert_allclose(params[t], w, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ds.loss.values[0, t], float(obj.value(w)), rtol=1e-10)
        w = w - 0.5 * np.asarray(obj.grad(w))
    for t in (0, 31, 59):
        oracle = dense_top_eigenpairs(obj, params[t], k=2).values
        np.testing.assert_allclose(ds.eigenvalues.values[0, t, :2], oracle, rtol=1e-6)
        np.testing.assert_allclose(ds.lr_sharpness.values[0, t], 0.5 * oracle[0], rtol=1e-6)


def test_resume_after_interruption_is_bitwise_identical(tmp_path):
    table = spec(
        steps=40,
        dtype="float32",
        processes=["gd", "gradient_flow"],
        spectrum={"k": 1, "k_max": 2, "threshold": 0.5},
        record={"chunk": 10},
    )
    run(table, tmp_path / "whole")
    # stops in the chunk in progress, halfway: the stopped chunk and the resumed rest (5 steps each)
    # share one compiled scan per process and k (stop_after=23 compiled 3 and 7 steps: 4 scans more)
    partial = run(table, tmp_path / "cut", stop_after=25)
    assert partial.status == "interrupted"
    # simulate a kill after a chunk was flushed but before its checkpoint: an extra chunk file
    store = RunStore(tmp_path / "cut")
    first, last, path = store.chunk_files("gd")[-1]
    extra = path.with_name(f"{last + 1:010d}-{last + 10:010d}.npz")
    extra.write_bytes(path.read_bytes())
    run(table, tmp_path / "cut", resume=True)
    whole, resumed = eosflow.load(tmp_path / "whole"), eosflow.load(tmp_path / "cut")
    for name in ("loss", "sharpness", "eigenvalues", "grad_norm", "distance", "centre_distance"):
        np.testing.assert_array_equal(whole[name].values, resumed[name].values)
    # the checkpoint carried the offset across the interrupted chunk (steps 20-24) and the resume
    assert np.isnan(resumed.centre_distance.values[1, 0]) and np.isfinite(resumed.centre_distance.values[1, 1:]).all()
    assert resumed.attrs["status"] == "completed"
    assert np.isfinite(resumed.eigenvalues.values[0, -1, 1])  # the tracker grew, and resumed with k = 2+


def test_a_resume_in_the_same_process_compiles_no_scan_again(tmp_path, monkeypatch):
    """A checkpoint's arrays restore the state with its fresh program types: a weakly typed step
    counter came back strongly typed, and every resume (a sweep worker's, a test's) compiled every
    scan of every process again."""
    import collections

    import eosflow.process as process_module

    traces = []

    def counted(process, state, n_steps):
        traces.append(n_steps)
        return process_module._scan_steps(process, state, n_steps)

    monkeypatch.setattr(process_module._scan, "fn", counted)
    monkeypatch.setattr(process_module._scan, "compiled", collections.OrderedDict())  # not the other tests' scans
    table = {
        "steps": 20,
        "lr": 0.1,
        "dtype": "float64",
        "processes": ["gd"],
        "problem": {"name": "quadratic", "eigenvalues": [3.0, 1.0]},
        "spectrum": {"k": 1, "k_max": 1},
        "record": {"chunk": 10},
    }
    run(table, tmp_path / "run", stop_after=10)
    assert traces == [10]
    assert run(table, tmp_path / "run", resume=True).status == "completed"
    assert traces == [10]


@pytest.mark.parametrize("chunk", [50, 3])  # diverging in the first chunk, and after a checkpoint
def test_divergence_stops_cleanly_with_reason_and_keeps_data(tmp_path, chunk):
    table = {
        "steps": 200,
        "lr": 0.2,
        "dtype": "float64",
        "processes": ["gd", "gradient_flow"],  # a model's rows end with the run (they went on to the chunk's end)
        "problem": {"name": "quadratic", "eigenvalues": [30.0, 1.0]},
        "spectrum": {"every": 0},  # the loss is under test: no eigensolver to compile
        "record": {"chunk": chunk},
        "divergence": {"loss_blowup": 1e6},
    }
    outcome = run(table, tmp_path / "boom")
    assert outcome.status == "diverged"
    ds = eosflow.load(tmp_path / "boom")
    summary = json.loads((tmp_path / "boom" / "summary.json").read_text())
    # lr * 30 = 6: |1 - 6| = 5, so the loss grows 25x per step; 1e6 is passed after ~4.3 steps
    loss = ds.loss.values[0]
    bad = int(np.flatnonzero(loss > 1e6 * loss[0])[0])
    assert summary["status"] == "diverged" and f"step {bad}" in summary["reason"]
    assert summary["xla_flags"] == os.environ.get("XLA_FLAGS", "")  # float32 digits depend on the threading
    assert summary["reason"].startswith("gd: loss")  # the run's reason names the reference
    assert ds.sizes["step"] == bad + 1 and np.all(np.isfinite(loss))
    assert np.isfinite(ds.loss.sel(process="gradient_flow").values).all()  # every model row up to the divergence
    assert all(len(rows) == bad + 1 for _, rows in RunStore(tmp_path / "boom").read_checked("gradient_flow")[0].items())
    problem = build_problem(table["problem"], 0, "float64")[0]
    values, vectors = np.linalg.eigh(np.asarray(problem.objective.hessian(problem.w0)))
    coords = vectors.T @ np.asarray(problem.w0)
    exact = [0.5 * np.sum(values * coords**2 * (1 - 0.2 * values) ** (2 * t)) for t in range(bad + 1)]
    np.testing.assert_allclose(loss, exact, rtol=1e-9)
    assert run(table, tmp_path / "boom", resume=True).status == "diverged"  # a resume changes nothing
    assert np.array_equal(eosflow.load(tmp_path / "boom").loss.values, ds.loss.values)


def test_a_chunk_of_a_new_length_is_timed_as_compiling(tmp_path):
    """60 steps in chunks of 16 end with a chunk of 12, whose scan compiles again: it was marked warm, and
    with one other warm chunk its compilation set the median ms per step (100-500x too high, from a probe).
    A resume compiles each length again."""
    quick = {"spectrum": {"every": 0}, "processes": ["gd", "gradient_flow"]}
    run(spec(**quick), tmp_path / "r", stop_after=32)
    run(spec(**quick), tmp_path / "r", resume=True)
    timing = json.loads((tmp_path / "r" / "summary.json").read_text())["timing"]
    for name in ("gd", "gradient_flow"):
        chunks = timing[name]["chunks"]
        assert [c[0] for c in chunks] == [16, 16, 16, 12] and [c[2] for c in chunks] == [0, 1, 0, 0], chunks


def test_a_chunk_after_the_tracker_grew_is_timed_as_compiling(tmp_path):
    """A tracker grown to more pairs changes the state's shapes and the scan compiles again: such a chunk was
    marked warm (a leaderboard's ms / step read 2.24 where the steady state is ~0.02, from a probe). Oracle: the
    number of pairs the rows hold at each chunk's first step; a chunk is warm iff one before it had as many."""
    run(spec(lr=1.0, steps=96, processes=["gd"], spectrum={"k": 1, "k_max": 3, "tol": 1e-7}), tmp_path / "r")
    eigenvalues = eosflow.load(tmp_path / "r")["eigenvalues"].sel(process="gd").values
    tracked = np.isfinite(eigenvalues[::16]).sum(axis=1)
    assert len(set(tracked)) > 1, tracked  # the tracker grew
    expected = [int(count in tracked[:i]) for i, count in enumerate(tracked)]
    chunks = json.loads((tmp_path / "r" / "summary.json").read_text())["timing"]["gd"]["chunks"]
    assert [c[2] for c in chunks] == expected, (chunks, tracked)


def test_existing_run_directory_is_never_overwritten(tmp_path):
    quick = {"steps": 5, "spectrum": {"every": 0}}  # the directory is under test: no eigensolver to compile
    run(spec(**quick), tmp_path / "r")
    before = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match="already holds a run"):
        run(spec(**quick, lr=0.1), tmp_path / "r")
    after = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    assert before == after


F32 = {"dtype": "float32", "spectrum": {"k": 1, "k_max": 1}}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stpes": 10}, "unknown key `stpes` (did you mean `steps`?)"),
        ({"lr": -0.1}, "`lr` = -0.1 is out of range: it must be greater than 0"),
        ({"lr": 0}, "`lr` = 0.0 is out of range"),
        ({"steps": "many"}, "`steps` must be an integer, got 'many' (str)"),
        ({"spectrum": {"every": 1, "tol": 2.0}}, "`spectrum.tol` = 2.0 is out of range"),
        ({"spectrum": {"evry": 1}}, "unknown key `spectrum.evry` (did you mean `spectrum.every`?)"),
        ({"problem": {"name": "mpl"}}, "unknown problem `problem.name` = 'mpl' (did you mean `mlp`?)"),
        ({"problem": {"name": "mlp", "widht": 3}}, "unknown key `problem.width`"[:20]),
        ({"problem": {"name": "mlp", "activation": "sigmoidd"}}, "`problem.activation` = 'sigmoidd' is not allowed"),
        ({"processes": ["gd", "central_flw"]}, "unknown process 'central_flw'"),
        ({"dtype": "float16"}, "`dtype` = 'float16' is not allowed"),
        # a held eigenvalue flickered just under 2/lr at margin 0 and overshot (a period-3 cycle at 2.095)
        ({"processes": ["gd", "central_flow"], "central_flow": {"margin": 0.0}}, "`central_flow.margin` = 0.0 is out"),
        ({"processes": ["rmsprop", "rmsprop_central_flow"], "rmsprop_central_flow": {"margin": 0.0}}, "greater than 0"),
        # one example's gradient covariance is 0: the noise was switched off without a word
        ({"processes": ["sgd"], "sgd": {"noise_every": 1, "noise_examples": 1}}, "`sgd.noise_examples` = 1 estimates"),
        ({"processes": ["sgd", "langevin"], "langevin": {"noise_examples": 1}}, "`langevin.noise_examples` = 1"),
        ({"processes": ["sgd", "langevin"], "langevin": {"noise_examples": 10**6}}, "= 1000000 exceeds the problem's"),
        # values beyond float32 ran, and stopped as diverged at step 0 over the run --overwrite replaced (a probe)
        (F32 | {"problem": {"name": "quadratic", "eigenvalues": [1e39, 1.0]}}, "the loss at w0 is inf on problem 'qua"),
        (F32 | {"problem": {"name": "quartic", "init": 1e20}}, "the loss at w0 is nan on problem 'quartic' (float32)"),
        (F32 | {"problem": {"name": "sharp_valley", "x0": 200.0}}, "the loss at w0 is inf on problem 'sharp_valley'"),
        (
            {"problem": {"name": "sharp_valley", "x0": 800.0}},
            "the loss at w0 is inf on problem 'sharp_valley' (float64",
        ),
    ],
)
def test_invalid_spec_names_the_field_and_writes_nothing(tmp_path, overrides, message):
    with pytest.raises(SpecError) as error:
        run(spec(**overrides), tmp_path / "bad")
    assert message in str(error.value)
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and calls glibc's malloc_trim")
def test_compiled_scans_are_bounded(monkeypatch):
    """A long-lived Python process (a Dask worker, a notebook) running many configurations keeps only
    the most recently used compiled scans: memory and memory maps stay flat after the bound is
    reached. One module-level jit kept all of them (~8 MB and ~200 memory maps per configuration of
    GD here; 38 MB and 1010 maps over these five), and a jit per configuration kept one executable per
    chunk length in each. A run compiles its scan once per chunk length it uses. The eigensolver is
    off (``spectrum.every = 0``): the bound does not depend on what a scan computes, and GD's scan
    without it compiles in ~0.8 s instead of ~4.5 s (the loop: 63 -> 12 s)."""
    import collections
    import ctypes
    import gc
    import os

    import eosflow.process as process_module
    from eosflow.experiment import prepare

    def resident_mb():
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed memory to the OS so that RSS shows it
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def memory_maps():
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)

    traces = []

    def counted(process, state, n_steps):
        traces.append(n_steps)
        return process_module._scan_steps(process, state, n_steps)

    monkeypatch.setattr(process_module._scan, "fn", counted)
    monkeypatch.setattr(process_module._scan, "kept", 3)
    monkeypatch.setattr(process_module._scan, "compiled", collections.OrderedDict())  # not the other tests' scans
    factorization = {"name": "matrix_factorization", "dim": 2, "depth": 3, "rank": 1, "target_scale": 5.5}
    sizes, maps = [], []
    for i in range(7):  # a new lr is a new configuration: new compilations (k fixed: one shape of the state)
        spectrum = {"k": 1, "k_max": 1, "every": 0}
        table = {"lr": 0.07 + 1e-3 * i, "processes": ["gd"], "problem": factorization, "spectrum": spectrum}
        _, problem, _, processes = prepare(table)
        state = processes["gd"].init(problem.w0)
        for n in (5, 5, 5, 3):  # chunks of 5 steps, then a shorter last one: two programs
            state, _ = processes["gd"].advance(state, n)
        del processes, problem, state
        sizes.append(resident_mb())
        maps.append(memory_maps())
        assert len(traces) == 2 * (i + 1)
        assert len(process_module._scan.compiled) == min(2 * (i + 1), 3)
    assert sizes[-1] - sizes[1] < 30.0, sizes
    assert maps[-1] - maps[1] < 300, maps  # a GD executable here maps ~100 regions


def test_a_divergence_past_the_edge_says_so():
    """A process whose edge ratio went far past 1 before diverging names it and advises a lower lr; one that
    hovered at the edge (1.2 at most) or recorded none gets no such hint."""
    from eosflow.process import ScannedProcess

    hint = ScannedProcess.divergence_hint(None, {"edge_ratio": np.array([1.0, np.nan, 3.0])})  # type: ignore[arg-type]
    assert "edge ratio (sharpness / stability threshold) reached 3, far past 1" in hint and "lower lr" in hint
    assert ScannedProcess.divergence_hint(None, {"edge_ratio": np.array([0.9, 1.2])}) == ""  # type: ignore[arg-type]
    assert ScannedProcess.divergence_hint(None, {"loss": np.array([1.0])}) == ""  # type: ignore[arg-type]


def test_a_stop_asked_before_a_run_began_stops_it_before_its_first_chunk(tmp_path):
    """A leaderboard worker signalled while it set a run up (before the run's own handler was in place) ignored the
    signal and ran its whole entry (111 s after Ctrl-C, from a probe): the stop is recorded and the next run honours
    it, once."""
    import signal

    from eosflow import signals

    signals.record_stop(signal.SIGTERM)
    with pytest.raises(signals.Interrupted):
        run(spec(processes=["gd"], spectrum={"every": 0}), tmp_path / "a")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps_done"] == 0 and "SIGTERM" in summary["reason"]
    assert run(spec(processes=["gd"], spectrum={"every": 0}), tmp_path / "b").status == "completed"  # once only


@pytest.mark.parametrize("processes, dropped", [(["sgd", "langevin"], {}), (["gd", "rod_flow"], {"rod_flow": 2})])
def test_a_model_is_dropped_only_at_a_step_the_run_records(tmp_path, processes, dropped):
    """A probe: SGD diverged at step 4 and its Langevin model, in the same chunk, at step 5: the summary said
    "dropped langevin ... at step 5" of a run whose last step is 4. A model that diverges after the reference's
    last step is not dropped (the run ends first); one that diverges before it still is, at its own step."""
    table = {
        "steps": 60,
        "lr": 3.0,
        "dtype": "float64",
        "processes": processes,
        "problem": {"name": "linear_regression", "dim": 8, "n_train": 64},
        "spectrum": {"k_max": 2},
        "record": {"chunk": 20},
        "sgd": {"batch_size": 8, "momentum": 0.9},
    }
    if "sgd" not in processes:
        del table["sgd"]
    outcome = run(table, tmp_path / "run")
    assert outcome.status == "diverged" and outcome.steps_done == 5
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    steps = {name: int(re.search(r"at step (\d+)", why)[1]) for name, why in summary["dropped_processes"].items()}
    assert steps == dropped and all(step < outcome.steps_done for step in steps.values())


@pytest.mark.parametrize("block_rows", [1, 3, 1000])
@pytest.mark.parametrize("known_offset", [False, True])
@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("reference_top", [False, True])
def test_distances_in_blocks_equal_the_whole_chunk_formula(
    monkeypatch, block_rows, known_offset, on_device, reference_top
):
    """add_distances works in blocks of rows (the whole C x d chunk in float64 at once was superlinear in C: 3.8 ms a
    step at d = 30k, C = 1000, from a probe) and reads the reference's distances to itself off its rows' finiteness
    (no C x d float64 differences, unless it reports a top vector): bitwise the whole-chunk formula, the bits of
    every NaN included, inf and NaN positions included, across block edges, with and without the offset of the
    step before the chunk and a top vector. ``on_device``: the rows as JAX arrays, as an accelerator's are
    left (their distances in jnp, float64 under a scoped x64): the same numbers to the last bits of a reduction."""
    import eosflow.experiment as experiment

    rng = np.random.default_rng(4)
    d, steps = 6, 10
    reference = rng.standard_normal((steps, 2, 3)).astype(np.float32)
    reference[7, 0, 1] = np.inf
    model = rng.standard_normal((steps, 2, 3)).astype(np.float32)
    model[4, 1, 2] = np.nan
    top = rng.standard_normal((8, d))
    before = {name: rng.standard_normal(d) for name in ("gd", "m")} if known_offset else {}

    def whole(base, position, previous, top=None):
        if position is base:  # the reference's e = w - w, with np.nan where w is not finite (x86's inf - inf is -nan)
            diff = np.where(np.isfinite(position), 0.0, np.nan).reshape(len(position), -1)
        else:
            diff = (base[: len(position)].astype(np.float64) - position).reshape(len(position), -1)
        centre = np.full(len(position), np.nan)
        e = diff if previous is None else np.concatenate([previous[None], diff])
        centre[len(position) - len(e) + 1 :] = np.linalg.norm(e[:-1] + e[1:], axis=1) / 2
        offset = None if top is None else np.einsum("nd,nd->n", diff[: len(top)], top)
        return np.linalg.norm(diff, axis=1), centre, diff[-1], offset

    monkeypatch.setattr(experiment, "DISTANCE_BLOCK", block_rows * d)
    kind = (lambda a: jax.device_put(a)) if on_device else (lambda a: a)  # (device_put keeps float64 as it is)
    reference_vector = np.abs(rng.standard_normal((steps, d))) if reference_top else None
    chunk = {"gd": {"position": kind(reference)}, "m": {"position": kind(model[:8]), "top_vector": kind(top)}}
    if reference_top:
        chunk["gd"]["top_vector"] = kind(reference_vector)
    offsets = {name: value.copy() for name, value in before.items()}

    def bitwise(actual, expected):  # (assert_array_equal takes every NaN for every other)
        np.testing.assert_array_equal(np.asarray(actual).view(np.uint64), np.asarray(expected).view(np.uint64))

    same = bitwise if not on_device else partial(np.testing.assert_allclose, rtol=1e-14)
    with np.errstate(invalid="ignore"):
        experiment.add_distances(chunk, "gd", offsets)
        for name, base, position, vector in [
            ("gd", reference, reference, reference_vector),
            ("m", reference, model[:8], top),
        ]:
            distance, centre, last, offset = whole(base, position, before.get(name), vector)
            assert all(type(chunk[name][key]) is np.ndarray for key in ("distance", "centre_distance"))
            same(chunk[name]["distance"], distance)
            same(chunk[name]["centre_distance"], centre)
            same(np.asarray(offsets[name]), last)
            if vector is not None:
                same(chunk[name]["reference_offset"], offset)
    assert not experiment._stays_on_device("position", jax.numpy.zeros(3))  # on the CPU every row is a host view


def test_the_saved_parameters_of_rows_left_on_the_device_come_to_the_host():
    """``params_every`` takes its steps from a device row (an accelerator's position) as from a host one."""
    import eosflow.experiment as experiment

    position = np.arange(12.0, dtype=np.float32).reshape(6, 2)
    written = {}
    store = type("Store", (), {"write_chunk": lambda self, name, first, rows: written.update({name: rows})})()
    for rows in ({"position": position}, {"position": jax.device_put(position)}):
        experiment._write_chunk(store, {"gd": rows}, 10, params_every=4)  # steps 10..15: 12 is saved
        assert type(written["gd"]["params"]) is np.ndarray and written["gd"]["params_step"].tolist() == [12]
        np.testing.assert_array_equal(written["gd"]["params"], position[[2]])


def test_a_problem_too_large_for_memory_is_a_spec_error(tmp_path, monkeypatch):
    """numpy's "Unable to allocate 7.28 TiB" (mlp width 10**6, moons n_train 10**12; from a probe) ended in a
    traceback naming no field, exit 1. The allocation is imitated here: the machine may overcommit a real one."""
    import eosflow.experiment as experiment

    def allocate(*args):
        raise MemoryError("Unable to allocate 7.28 TiB for an array with shape (1000000, 1000000)")

    monkeypatch.setattr(experiment, "build_problem", allocate)
    with pytest.raises(SpecError, match=r"building problem 'mlp' takes more memory .* 7.28 TiB.*size in \[problem\]"):
        run(spec(), tmp_path / "big")
    assert not (tmp_path / "big").exists()


@pytest.mark.parametrize("every", [0, 2])
def test_rows_made_once_a_chunk_are_bitwise_those_of_every_step(every):
    """With ``spectrum.every = 0`` GD names its unmeasured tracker's rows (NaN, 0 HVPs) and ``grads`` constant: its
    chunk takes them from one step outside the scan and broadcasts them (written at every step they were ~6% of a
    digits-MLP step). Its state and every row, NaNs' bits included, are those of a plain ``lax.scan`` of its step;
    its vectors, and their history, never move."""
    from eosflow.experiment import prepare
    from eosflow.precision import precision
    from eosflow.process import _scan

    def same(actual, expected):
        actual, expected = np.asarray(actual), np.asarray(expected)
        assert (actual.dtype, actual.shape, actual.tobytes()) == (expected.dtype, expected.shape, expected.tobytes())

    with precision("float32"):
        _, problem, _, processes = prepare(spec(dtype="float32", spectrum={"every": every, "k": 1, "k_max": 2}))
        gd = processes["gd"]
        assert ("sharpness" in gd.constant_rows()) == (every == 0)
        start = gd.init(problem.w0)
        plain_state, plain_rows = jax.jit(lambda s: jax.lax.scan(lambda s, _: gd.step(s), s, None, length=7))(start)
        state, rows = _scan(gd, start, 7)
    assert list(rows) == list(plain_rows)
    for key in rows:
        same(rows[key], plain_rows[key])
    for leaf, plain_leaf in zip(jax.tree.leaves(state), jax.tree.leaves(plain_state), strict=True):
        same(leaf, plain_leaf)
    if every == 0:
        same(state.vectors, start.vectors)
        same(state.older, start.older)


@pytest.mark.parametrize("k_max", [1, 2])
def test_a_chunk_sends_nothing_to_the_device_between_its_steps_and_the_next(k_max):
    """On a GPU an implicit host-to-device transfer waits for the device. After every chunk (or grow_every block)
    a tracker folded its step into a PRNG key as a Python int, fetched with int() and sent back (a transfer
    refused under jax.transfer_guard), also when it was full (k = k_max) and could not grow; now a full tracker
    reads nothing, and a growing one folds the step where it is."""
    from eosflow.experiment import prepare
    from eosflow.precision import precision

    with precision("float64"):
        _, problem, _, processes = prepare(spec(spectrum={"k": 1, "k_max": k_max}))
        gd = processes["gd"]
        state, _ = gd.advance(gd.init(problem.w0), 4)  # compiled
        with jax.transfer_guard("disallow"):
            state, rows = gd.advance(state, 4)
        assert rows["loss"].shape == (4,)
