"""A user's own model, not registered anywhere: in memory (eosflow.simulate) and by import path.

The model and loss live in tests/user_models.py (a softplus network with a skip connection and a
log-cosh loss; eosflow ships neither). Oracle: the same problem run from a spec that names its
factory by import path gives bitwise the same trajectories, and a 2-point sweep on two Dask
worker processes completes with it and equals the in-process run.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eosflow
import user_models
from eosflow.config import SpecError
from eosflow.experiment import run
from eosflow.signals import Interrupted
from eosflow.store import StoreError
from eosflow.sweep import load_sweep, local_cluster, run_sweep

PATH = "user_models:make_problem"
LR, STEPS, CHUNK = 0.8, 40, 8
PROCESSES = ["gd", "central_flow", "rod_flow"]
SPECTRUM = {"k_max": 2}
TABLE = {
    "steps": STEPS,
    "lr": LR,
    "dtype": "float32",
    "processes": PROCESSES,
    "problem": {"name": PATH},
    "spectrum": SPECTRUM,
    "record": {"chunk": CHUNK},
}


def assert_same_trajectories(a, b):
    assert list(a.process.values) == list(b.process.values)
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        assert np.array_equal(a[name].values, b[name].values, equal_nan=True), name


@pytest.fixture(scope="module")
def in_memory():
    return eosflow.simulate(
        user_models.make_problem(), lr=LR, steps=STEPS, processes=PROCESSES, spectrum=SPECTRUM, record={"chunk": CHUNK}
    )


def test_in_memory_run_of_a_float32_user_model(in_memory):
    assert in_memory.attrs["status"] == "completed" and in_memory.sizes["step"] == STEPS
    assert list(in_memory.process.values) == PROCESSES
    for process in PROCESSES:
        loss = in_memory.loss.sel(process=process).values
        assert np.all(np.isfinite(loss)) and loss[-1] < 0.2 * loss[0]
    # GD's sharpness reaches the edge of stability, and the flows' predicted sharpness stays at or below it
    assert np.nanmax(in_memory.lr_sharpness.sel(process="gd").values) > 1.9
    assert in_memory.attrs["dimension"] == 52


def test_import_path_spec_equals_in_memory_bitwise(in_memory, tmp_path):
    assert run(TABLE, tmp_path / "run").status == "completed"
    from_spec = eosflow.load(tmp_path / "run")
    assert_same_trajectories(in_memory, from_spec)
    resolved = (tmp_path / "run" / "spec.resolved.toml").read_text()
    assert f'name = "{PATH}"' in resolved


def test_simulate_out_writes_a_run_directory_the_cli_resumes(tmp_path):
    """A factory's problem is recorded by its import path, so the spec in the directory rebuilds it."""
    problem = user_models.make_problem(width=5)
    assert problem.source is None  # built in memory: recorded as in_memory
    from eosflow.problems import build_problem

    problem, _ = build_problem({"name": PATH, "width": 5}, 0, "float32")
    ds = eosflow.simulate(problem, lr=0.3, steps=10, out=tmp_path / "run", record={"chunk": 5})
    from eosflow.cli import main

    assert (
        main(["run", str(tmp_path / "run" / "spec.toml"), "--out", str(tmp_path / "run"), "--resume", "--quiet"]) == 0
    )
    assert_same_trajectories(ds, eosflow.load(tmp_path / "run"))


@pytest.mark.slow
def test_every_process_that_runs_on_any_problem_runs_on_a_user_model():
    """Every registered process not limited to one problem, from one in-memory w0, for a few steps.

    The eigenpairs are not measured here (``spectrum.every = 0``): the fixture's run measures them on
    this model along GD and two flows, and their program is much of what each process compiles (this
    test alone, ``pytest --durations``: 45 s, against 67 s measuring them)."""
    from eosflow.process import PROCESSES

    names = ["gd"] + [name for name, entry in PROCESSES.items() if entry.problems is None and name != "gd"]
    assert len(names) >= 12
    ds = eosflow.simulate(
        user_models.make_problem(),
        lr=LR,
        steps=8,
        processes=names,
        spectrum={"every": 0},
        options={"sgd": {"batch_size": 10}},
    )
    assert ds.attrs["status"] == "completed" and list(ds.process.values) == names
    assert np.all(np.isfinite(ds.loss.values))  # a dropped process would leave NaN after its divergence


def test_in_memory_directory_explains_how_to_resume(tmp_path):
    # the run of the test above (width 5, lr 0.3, chunks of 5): its compiled step is reused
    eosflow.simulate(user_models.make_problem(width=5), lr=0.3, steps=5, out=tmp_path / "run", record={"chunk": 5})
    with pytest.raises(SpecError, match="given to eosflow.simulate in memory.*resume=True"):
        run(eosflow.spec.load_spec_table(tmp_path / "run" / "spec.toml"), tmp_path / "run", resume=True)


@pytest.mark.parametrize(
    "name, message",
    [
        ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
        ("user_models:missing", "module 'user_models' has no attribute 'missing'"),
        ("user_models:not_a_factory", "is a int, not a callable returning a Problem"),
        ("user_models:returns_a_dict", "returned a dict, not an eosflow.Problem"),
        ("user_models", "unknown problem"),
    ],
)
def test_import_path_errors_name_the_path(name, message, tmp_path):
    with pytest.raises(SpecError, match=message) as error:
        run({**TABLE, "problem": {"name": name}}, tmp_path / "run")
    assert name in str(error.value)


def test_factory_keys_are_checked_against_its_signature(tmp_path):
    with pytest.raises(SpecError, match=r"does not fit user_models:make_problem\(width.*unexpected keyword.*depth"):
        run({**TABLE, "problem": {"name": PATH, "depth": 2}}, tmp_path / "run")


def test_a_float64_leaf_in_a_float32_run_is_named():
    problem = user_models.make_problem(width=3)
    params = problem.objective.unravel(problem.w0)
    params["out"] = params["out"].astype(jnp.float64)
    inputs, targets = problem.objective.data
    mixed = eosflow.Problem.from_model(user_models.apply, params, inputs, targets, loss=user_models.log_cosh)
    with pytest.raises(SpecError) as error:
        eosflow.simulate(mixed, lr=0.1, steps=2)  # default dtype: float32, since most leaves are
    message = str(error.value)
    assert "params['out'] is float64 but this run computes in float32" in message
    assert '.astype("float32")' in message and 'dtype = "float64"' in message
    with pytest.raises(SpecError, match=r"data inputs is float64 but this run computes in float32"):
        eosflow.simulate(
            eosflow.Problem.from_model(
                user_models.apply,
                problem.objective.unravel(problem.w0),
                np.asarray(inputs, np.float64),
                targets,
                loss="mse",
            ),
            lr=0.1,
            steps=2,
        )


def test_float64_numpy_params_beside_float32_data_are_named_with_fixes_that_run():
    """Parameters drawn with NumPy (float64) beside float32 data: eosflow.simulate's dtype follows the parameters,
    so the run is float64 and the float32 inputs do not fit it. The error names the float64 parameter leaves and the
    spec's `dtype`, and each fix it gives runs (before, it blamed the inputs alone and offered dtype = "float32",
    which the float64 parameters then refused)."""
    problem = user_models.make_problem(width=3)
    inputs, targets = (np.asarray(a) for a in problem.objective.data)

    def from_model(params, inputs, targets):
        return eosflow.Problem.from_model(user_models.apply, params, inputs, targets, loss=user_models.log_cosh)

    params = jax.tree.map(lambda a: np.asarray(a, np.float64), problem.objective.unravel(problem.w0))
    with pytest.raises(SpecError) as error:
        eosflow.simulate(from_model(params, inputs, targets), lr=0.1, steps=2)
    message = str(error.value)
    assert message.startswith("data inputs is float32 but this run computes in float64, its spec's `dtype`")
    assert (
        "every one is float64 here (params['hidden']['b'], params['hidden']['w'], params['out'] and 1 more;" in message
    )
    assert 'for a float32 run cast the parameters (`jax.tree.map(lambda a: a.astype("float32"), params)`' in message
    assert 'for a float64 run cast the data (`.astype("float64")`)' in message and "set dtype" not in message
    cast_params = jax.tree.map(lambda a: a.astype("float32"), params)
    cast_data = (inputs.astype("float64"), targets.astype("float64"))
    for fixed in (from_model(cast_params, inputs, targets), from_model(params, *cast_data)):
        ds = eosflow.simulate(fixed, lr=0.1, steps=2)
        assert ds.attrs["status"] == "completed" and np.isfinite(ds.loss.values).all()


def test_from_function_takes_a_pytree_or_a_vector():
    """GD on L(w) = 1/2 sum h_i w_i^2 from a pytree start and from the same start flattened (a zero-size leaf
    of the pytree carries no direction)."""
    h = {"a": jnp.array([4.0, 1.0]), "b": jnp.array(9.0)}

    def quadratic(w):
        return 0.5 * (jnp.sum(h["a"] * w["a"] ** 2) + h["b"] * w["b"] ** 2)

    w0 = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(0.5), "empty": jnp.zeros((2, 0))}
    tree = eosflow.simulate(
        eosflow.Problem.from_function(quadratic, w0),
        lr=0.1,
        steps=20,
        dtype="float64",
        spectrum={"tol": 1e-8, "max_iters": 100},
        record={"params_every": 1},
    )
    flat_h = np.array([4.0, 1.0, 9.0])
    vector = eosflow.simulate(
        eosflow.Problem.from_function(lambda w: 0.5 * jnp.sum(flat_h * w**2), jnp.array([1.0, -2.0, 0.5])),
        lr=0.1,
        steps=20,
        dtype="float64",
    )
    closed = (1 - 0.1 * flat_h)[None, :] ** np.arange(20)[:, None] * np.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(tree.loss.sel(process="gd").values, 0.5 * (closed**2 * flat_h).sum(1), rtol=1e-12)
    np.testing.assert_allclose(vector.loss.values, tree.loss.values, rtol=1e-12)
    np.testing.assert_allclose(tree.sharpness.sel(process="gd").values, 9.0, rtol=1e-8)


def test_sweep_of_an_import_path_problem_on_two_worker_processes(in_memory, tmp_path, monkeypatch):
    """Workers import the user's module as a remote worker would: from PYTHONPATH (no registration).

    Workers run XLA single-threaded, so their float32 reductions may round differently from this
    process's: GD's loss is compared to 1e-5 over the first steps rather than bitwise.
    """
    tests_dir = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    cluster = local_cluster(2, cache_dir=tmp_path / "jax-cache")
    try:
        assert len(cluster.workers) == 2
        table = {**TABLE, "processes": ["gd"], "steps": 20, "record": {"chunk": 20}}  # one chunk: one compile
        out = run_sweep(
            table, ["problem.scale=1.5,1.2"], tmp_path / "sweep", scheduler=cluster.scheduler_address, progress=False
        )
    finally:
        cluster.close()
    swept = load_sweep(out)
    assert swept.sizes["problem.scale"] == 2
    for scale in ("1.5", "1.2"):
        point = eosflow.load(out / "points" / f"problem.scale={scale}")
        assert point.attrs["status"] == "completed" and point.sizes["step"] == 20
        assert f'name = "{PATH}"' in (out / "points" / f"problem.scale={scale}" / "spec.resolved.toml").read_text()
    point = eosflow.load(out / "points" / "problem.scale=1.5")
    np.testing.assert_allclose(
        point.loss.sel(process="gd").values[:10], in_memory.loss.sel(process="gd").values[:10], rtol=1e-5
    )
    assert sys.modules["user_models"] is user_models


def _mlp(params, inputs):
    return jnp.tanh(inputs @ params["w1"]) @ params["w2"]


def _user_arrays(n=12):
    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((3, 4)).astype("float32"), "w2": rng.standard_normal((4, 1)).astype("float32")}
    inputs = rng.standard_normal((n, 3)).astype("float32")
    return params, inputs, np.sin(inputs[:, :1])


@pytest.mark.parametrize(
    "build, message",
    [
        (  # mse would broadcast (12, 1) - (12,) to (12, 12) and train on a wrong loss, silently
            lambda p, x, y: eosflow.Problem.from_model(_mlp, p, x, y[:, 0]),
            r"targets have shape \(12,\) but apply_fn\(params, inputs\) returns shape \(12, 1\)",
        ),
        (
            lambda p, x, y: eosflow.Problem.from_model(_mlp, p, x, y[:8]),
            r"targets have 8 examples \(leading axis\) but inputs have 12",
        ),
        (
            lambda p, x, y: eosflow.Problem.from_model(_mlp, p, x, y[:, 0], loss="cross_entropy"),
            r"targets have shape \(12,\).*one-hot rows of shape \(12, 1\) or integer labels of shape \(12,\)",
        ),
        (
            lambda p, x, y: eosflow.Problem.from_model(lambda x, p: _mlp(p, x), p, x, y),
            r"apply_fn\(params, inputs\) failed.*TypeError",
        ),
        (  # a model of one example given the batch: the error says the batch is (12, 3) and to map the model
            lambda p, x, y: eosflow.Problem.from_model(lambda q, z: jnp.tanh(q["w1"].T @ z), p, x, y),
            r"apply_fn\(params, inputs\) failed.*whole batch of inputs, \(12, 3\).*jax.vmap.*from_equinox",
        ),
        (  # a model that also returns an auxiliary output: before, "unsupported operand type(s) for -: 'tuple'"
            lambda p, x, y: eosflow.Problem.from_model(lambda q, z: (_mlp(q, z), {"norm": 0.0}), p, x, y),
            r"apply_fn\(params, inputs\) returns a tuple of 2, not an array of predictions.*built-in mse loss",
        ),
        (
            lambda p, x, y: eosflow.Problem.from_model(_mlp, p, x, y, loss=lambda f, t: (f - t) ** 2),
            r"loss\(predictions, targets\) returns shape \(12, 1\), not a scalar",
        ),
        (
            lambda p, x, y: eosflow.Problem.from_function(lambda q: jnp.sum(q["w1"] ** 2, axis=0), p),
            r"loss_fn\(w0\) returns shape \(4,\), not a scalar",
        ),
        (
            lambda p, x, y: eosflow.Problem.from_function(lambda q: (jnp.sum(q["w1"] ** 2), 0.0), p),
            r"loss_fn\(w0\) returns a tuple, not a scalar",
        ),
        (  # "ZeroDivisionError: integer modulo by zero" with mse, a NaN run with cross entropy (from a probe)
            lambda p, x, y: eosflow.Problem.from_model(_mlp, p, x[:0], y[:0]),
            r"inputs has 0 examples \(0, 3\)",
        ),
        (  # every leaf empty: before, "`spectrum.k` = 1 exceeds the number of parameters (0)" at the run
            lambda p, x, y: eosflow.Problem.from_model(
                lambda q, z: z[:, :1] + jnp.sum(q["b"]), {"b": jnp.zeros((3, 0)), "c": jnp.zeros(0)}, x, y
            ),
            r"from_model: every leaf of `params` has size zero \(params\['b'\] \(3, 0\), params\['c'\] \(0,\)\)",
        ),
        (
            lambda p, x, y: eosflow.Problem.from_function(lambda q: jnp.sum(q["e"]), {"e": jnp.zeros((0,))}),
            r"from_function: every leaf of `w0` has size zero \(w0\['e'\] \(0,\)\)",
        ),
        (  # a label past the classes: the loss was NaN at w0 (JAX's out-of-range gather), from a probe
            lambda p, x, y: eosflow.Problem.from_model(
                lambda q, z: _mlp(q, z) * jnp.arange(1.0, 4.0),
                p,
                x,
                np.where(np.arange(12) == 7, 3, np.arange(12) % 3),
                "cross_entropy",
            ),
            r"labels from 0 to 3, but the logits have 3 classes: .* 0..2 \(1 outside, the first targets\[7\] = 3\)",
        ),
        (  # -1 read as the last class: a finite, wrong loss (1.340 for optax's 1.285 in a probe)
            lambda p, x, y: eosflow.Problem.from_model(
                lambda q, z: _mlp(q, z) * jnp.arange(1.0, 4.0), p, x, np.r_[-1, np.arange(11) % 3], "cross_entropy"
            ),
            r"labels from -1 to 2, but the logits have 3 classes: .*first targets\[0\] = -1\)",
        ),
        (  # "AttributeError: 'float' object has no attribute 'shape'" (from a probe)
            lambda p, x, y: eosflow.Problem.from_model(_mlp, p, x, y.tolist()),
            r"targets\[0\]\[0\] is a float, not an array \(pass targets as arrays",
        ),
    ],
)
def test_a_model_that_does_not_fit_its_data_or_loss_is_refused_at_construction(build, message):
    """Checked by tracing (jax.eval_shape) when the Problem is built, so the error names the user's
    function and shapes instead of surfacing deep inside a run (or not at all), and no run directory
    is started."""
    with pytest.raises(SpecError, match=message):
        build(*_user_arrays())


def test_a_finite_problem_is_checked_by_one_compiled_program(caplog):
    """Problem.check_finite counts every leaf's non-finite entries in one program: counted leaf by leaf, isfinite, ~
    and sum compiled for each leaf's shape (26 programs, a second or more of a first run, for a 3-layer MLP).
    Shapes no other test compiles for, so that no program is cached."""
    rng = np.random.default_rng(1)
    params = {"w1": rng.standard_normal((3, 7)).astype("float32"), "w2": rng.standard_normal((7, 1)).astype("float32")}
    inputs = rng.standard_normal((11, 3)).astype("float32")
    problem = eosflow.Problem.from_model(_mlp, params, inputs, np.sin(inputs[:, :1]))
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        problem.check_finite()
    assert sum("Finished XLA compilation" in record.getMessage() for record in caplog.records) == 1


@pytest.mark.parametrize(
    "where, message",
    [
        ("inputs", r"data inputs has 1 non-finite entry \(nan at \[3, 1\]\)"),
        ("targets", r"data targets has 1 non-finite entry \(inf at \[5, 0\]\)"),
        ("params", r"params\['w1'\] has 1 non-finite entry \(nan at \[0, 2\]\)"),
    ],
)
def test_a_nan_in_the_data_or_the_start_is_named_before_anything_is_written(where, message, tmp_path):
    """Before, the run started, wrote its directory and stopped as 'diverged' at step 0."""
    params, inputs, targets = _user_arrays()
    if where == "inputs":
        inputs[3, 1] = np.nan
    elif where == "targets":
        targets[5, 0] = np.inf
    else:
        params["w1"][0, 2] = np.nan
    problem = eosflow.Problem.from_model(_mlp, params, inputs, targets)
    with pytest.raises(SpecError, match=message):
        eosflow.simulate(problem, lr=0.1, steps=2, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _sum_of_squares(w):
    """L(w) = |w|^2, one function for the tests below: a run of it at lr 0.1 in chunks of 10 steps
    compiles once in this process, and the later tests reuse that program (a lambda each compiled its own)."""
    return jnp.sum(w**2)


def test_a_misspelled_setting_of_simulate_is_named_with_the_fix():
    """Before: TypeError "simulation_table() got an unexpected keyword argument 'proceses'"."""
    problem = eosflow.Problem.from_function(_sum_of_squares, np.ones(2, np.float32))
    with pytest.raises(SpecError, match=r"eosflow.simulate: unknown setting `proceses` \(did you mean `processes`\?\)"):
        eosflow.simulate(problem, lr=0.1, steps=2, proceses=["gd"])
    with pytest.raises(SpecError, match=r"eosflow.simulate needs `lr` and `steps`"):
        eosflow.simulate(problem, steps=2)


@pytest.mark.parametrize("given, shown", [("quartic", "str 'quartic'"), ({"name": "quartic"}, "dict {'name'")])
def test_a_problem_given_by_name_is_refused_with_the_way_that_runs_it(tmp_path, given, shown):
    """Before: AttributeError "'str' object has no attribute 'default_dtype'". The way the message names runs."""
    with pytest.raises(TypeError, match=rf"eosflow.simulate takes a Problem .*, got {shown}.*A built-in problem runs"):
        eosflow.simulate(given, lr=0.1, steps=2)
    eosflow.experiment.run({"problem": {"name": "quartic"}, "lr": 0.1, "steps": 2}, tmp_path)
    assert eosflow.load(tmp_path).sizes["step"] == 2


def test_a_misspelled_factory_key_is_named_with_the_closest_parameter(tmp_path):
    with pytest.raises(SpecError, match=r"unexpected keyword argument 'widht'.*\(did you mean `problem.width`\?\)"):
        run({**TABLE, "problem": {"name": PATH, "widht": 4}}, tmp_path / "run")


def test_simulate_into_an_existing_run_says_the_python_arguments(tmp_path):
    """The refusal named only the CLI's --resume / --overwrite, which eosflow.simulate does not take."""
    problem = eosflow.Problem.from_function(_sum_of_squares, np.ones(2, np.float32))
    eosflow.simulate(problem, lr=0.1, steps=10, out=tmp_path / "run", record={"chunk": 10})
    with pytest.raises(
        StoreError, match=r"`eosflow resume .*` \(resume=True in Python\).*--overwrite \(overwrite=True\)"
    ):
        eosflow.simulate(problem, lr=0.1, steps=2, out=tmp_path / "run")
    with pytest.raises(StoreError, match=r"--overwrite \(overwrite=True\)"):
        eosflow.simulate(problem, lr=0.2, steps=2, out=tmp_path / "run", resume=True)


def test_an_interrupted_simulate_without_out_keeps_its_steps_and_continues():
    """Ctrl-C during eosflow.simulate(out=None) once deleted the steps done with its temporary
    directory; now the directory stays, named in the message, loadable and resumable (and extendable)."""
    problem = eosflow.Problem.from_function(_sum_of_squares, np.ones(2, np.float32))

    def interrupt(step, chunk):
        if step == 10:
            os.kill(os.getpid(), signal.SIGINT)

    settings = {"lr": 0.1, "record": {"chunk": 10}}
    with pytest.raises(Interrupted) as error:
        eosflow.simulate(problem, steps=40, progress=interrupt, **settings)
    message = str(error.value)
    assert "SIGINT after 10 of 40 steps" in message and error.value.exit_code == 130
    kept = re.search(r"kept in '([^']+)'", message).group(1)
    try:
        assert f"eosflow.load({kept!r})" in message and "resume=True" in message
        assert eosflow.load(kept).sizes["step"] == 10
        resumed = eosflow.simulate(problem, steps=50, out=kept, resume=True, **settings)
        whole = eosflow.simulate(problem, steps=50, **settings)
        np.testing.assert_array_equal(resumed.loss.values, whole.loss.values)
    finally:
        shutil.rmtree(kept)


def test_simulate_without_out_leaves_no_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    problem = eosflow.Problem.from_function(_sum_of_squares, np.ones(2, np.float32))
    eosflow.simulate(problem, lr=0.1, steps=10, record={"chunk": 10})
    with pytest.raises(SpecError):
        eosflow.simulate(problem, lr=-0.1, steps=3)
    assert list(tmp_path.iterdir()) == []


def test_a_resume_on_other_data_or_another_start_is_refused(tmp_path):
    """simulate(out=..., resume=True) continued a run on a different in-memory problem without a word; its w0 and
    data are now recorded as a fingerprint. The same problem (rebuilt) resumes; the import path's CLI resume of
    test_simulate_out_writes_a_run_directory_the_cli_resumes, which has no fingerprint to compare, still does."""
    settings = {"lr": 0.3, "steps": 5, "record": {"chunk": 5}}
    out = tmp_path / "run"
    eosflow.simulate(user_models.make_problem(width=5), out=out, **settings)
    resumed = eosflow.simulate(user_models.make_problem(width=5), out=out, resume=True, **{**settings, "steps": 10})
    assert resumed.attrs["status"] == "completed"
    for other in (user_models.make_problem(width=5, seed=1), user_models.make_problem(width=5, scale=1.4)):
        with pytest.raises(StoreError, match=r"`problem.fingerprint` = .*another w0 or other data than the run's"):
            eosflow.simulate(other, out=out, resume=True, **{**settings, "steps": 15})
    assert eosflow.load(out).attrs["steps_done"] == 10


def test_numpy_scalars_are_numbers_of_the_spec():
    """np.float32 from np.linspace, np.int64 from np.arange: refused as "not a number" before."""
    problem = user_models.make_problem(width=5)
    for lr in np.linspace(0.2, 0.3, 2).astype("float32"):
        ds = eosflow.simulate(problem, lr=lr, steps=np.int64(3), seed=np.int32(0), spectrum={"k_max": np.int64(1)})
        assert ds.attrs["lr"] == float(lr) and ds.sizes["step"] == 3


def test_no_submodule_shadows_a_function_the_package_exports():
    """`import eosflow.simulate` (the module then had the function's name) made ``eosflow.simulate`` the module:
    "'module' object is not callable" (from a probe). Importing a submodule binds it on the package, so no
    submodule may be named as a lazily exported function; in a fresh interpreter the function survives every
    import of every submodule."""
    import pkgutil

    modules = {module.name for module in pkgutil.iter_modules(eosflow.__path__)}
    assert not modules & set(eosflow._LAZY), modules & set(eosflow._LAZY)
    check = (
        "import importlib, pkgutil, eosflow\n"
        "for m in pkgutil.iter_modules(eosflow.__path__):\n"
        "    if m.name not in ('torch', '__main__'): importlib.import_module('eosflow.' + m.name)\n"
        "assert callable(eosflow.simulate) and callable(eosflow.run), (eosflow.simulate, eosflow.run)\n"
    )
    src = str(Path(eosflow.__file__).parents[1])
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src}
    )
    assert result.returncode == 0, result.stderr
