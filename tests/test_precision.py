"""Importing eosflow changes no JAX configuration; a run computes in its spec's dtype anyway.

The test session itself enables x64 (tests/conftest.py), so these checks run in fresh
interpreters, where JAX has its defaults.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from eosflow.config import SpecError
from eosflow.precision import check_dtypes

SRC = str(Path(__file__).resolve().parents[1] / "src")


def fresh_python(code: str, tmp_path) -> str:
    """Run ``code`` in a new interpreter with eosflow's sources first on the path; its stdout."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("JAX_ENABLE_X64", None)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_leaves_jax_config_unchanged(tmp_path):
    out = fresh_python(
        """
        import jax
        def config():  # every option's current value (a dict kept in sync by jax.config.update)
            return dict(jax.config.values)
        before = config()
        import eosflow, eosflow.problems, eosflow.flows, eosflow.optim, eosflow.cli
        after = config()
        changed = {k: (before[k], after.get(k)) for k in before if before[k] != after.get(k)}
        print(len(before), changed, jax.config.jax_enable_x64)
    """,
        tmp_path,
    )
    count, changed, x64 = out.split(" ", 1)[0], out.split(" ", 1)[1].rsplit(" ", 1)[0], out.split()[-1]
    assert int(count) > 50  # the whole configuration was compared
    assert changed == "{}" and x64 == "False"


def test_float64_spec_runs_in_float64_without_global_x64(tmp_path):
    """A float64 spec, run where x64 is off, computes in float64 (the saved parameters are float64
    and GD matches the closed form to float64 rounding), and leaves x64 off afterwards. Chunks of 10 steps: the
    chunks after the first are computed ahead in the runner's thread, which enters the run's precision too."""
    out = fresh_python(
        """
        import jax, numpy as np, eosflow
        table = {"steps": 30, "lr": 0.099, "dtype": "float64", "processes": ["gd"],
                 "problem": {"name": "quadratic", "rotate": False, "eigenvalues": [20.0, 0.5]},
                 "spectrum": {"k_max": 1}, "record": {"params_every": 1, "chunk": 10}}
        eosflow.run(table, "run")
        steps, params = eosflow.load_params("run", "gd")
        closed = (1 - 0.099 * np.array([20.0, 0.5])) ** steps[:, None] * params[0]
        print(params.dtype, np.max(np.abs(params - closed)), jax.config.jax_enable_x64)
    """,
        tmp_path,
    )
    dtype, error, x64 = out.split()
    assert dtype == "float64" and float(error) < 1e-14 and x64 == "False"


def test_check_dtypes_names_the_leaf_its_dtype_and_the_fix():
    tree = {"layer": [jnp.zeros(2, jnp.float32), np.zeros(3, np.float64)], "labels": np.zeros(3, np.int32)}
    with pytest.raises(SpecError) as error:
        check_dtypes(tree, "float32", "params")
    message = str(error.value)
    assert "params['layer'][1] is float64" in message and "computes in float32" in message
    assert '.astype("float32")' in message and 'dtype = "float64"' in message
    check_dtypes({"labels": tree["labels"], "w": tree["layer"][0]}, "float32", "data")  # integer labels pass


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_check_dtypes_names_a_half_precision_leaf(dtype):
    """bfloat16 is not a NumPy floating type (np.issubdtype says no): such a leaf was let through and
    the model then computed with rounded weights in a float32 run. The fix names float32 only."""
    with pytest.raises(SpecError) as error:
        check_dtypes({"w": jnp.zeros(2, jnp.float32), "head": jnp.zeros(2, dtype)}, "float32", "params")
    message = str(error.value)
    assert f"params['head'] is {jnp.dtype(dtype).name} but this run computes in float32" in message
    assert '.astype("float32")' in message and "set dtype" not in message


def test_importing_every_module_changes_no_global_state(tmp_path):
    """Every eosflow module imported: matplotlib's backend, the warning filters, logging's root
    handlers, NumPy's print options and JAX's configuration are what they were. The third-party
    libraries are imported first: some (torch, scipy) add warning filters of their own."""
    out = fresh_python(
        """
        import importlib, logging, pkgutil, warnings
        import jax, matplotlib, numpy as np
        import dask, distributed, equinox, optax, pandas, rich, scipy.special, scipy.sparse.linalg, torch, xarray
        def state():
            return (
                dict(matplotlib.rcParams.copy()),  # 'backend' included, unresolved
                list(warnings.filters),
                list(logging.getLogger().handlers), logging.getLogger().level,
                np.get_printoptions(),
                dict(jax.config.values),
            )
        before = state()
        import eosflow
        names = [m.name for m in pkgutil.walk_packages(eosflow.__path__, "eosflow.")]
        for name in names:
            importlib.import_module(name)
        after = state()
        labels = ["matplotlib.rcParams", "warnings.filters", "logging handlers", "logging level",
                  "numpy print options", "jax.config"]
        print(len(names), [label for label, a, b in zip(labels, before, after) if a != b])
    """,
        tmp_path,
    )
    count, changed = out.split(" ", 1)
    assert int(count) > 40  # every module was imported
    assert changed.strip() == "[]"


@pytest.mark.parametrize("leaf", ["pytree", "vector"])
def test_float64_numpy_start_keeps_its_digits_where_x64_is_off(leaf, tmp_path):
    """Problem.from_function with a float64 NumPy start (a dict of arrays, and a flat vector), in
    an interpreter where JAX's x64 is off: the run is float64 and GD's loss equals the closed form
    of the unrounded start to 1e-13 (the start's 1e-9 offsets are lost in float32)."""
    out = fresh_python(
        f"""
        import numpy as np, jax.numpy as jnp, eosflow
        h = np.array([4.0, 1.0, 9.0])
        start = np.array([1.0 + 3e-9, -2.0 + 1e-9, 0.5 - 7e-9])
        if "{leaf}" == "pytree":
            w0 = {{"a": start[:2].copy(), "b": start[2:].copy()}}
            loss = lambda w: 0.5 * (jnp.sum(h[:2] * w["a"] ** 2) + jnp.sum(h[2:] * w["b"] ** 2))
        else:
            w0, loss = start, lambda w: 0.5 * jnp.sum(h * w**2)
        problem = eosflow.Problem.from_function(loss, w0)
        result = eosflow.simulate(problem, lr=0.1, steps=15)
        closed = (1 - 0.1 * h)[None, :] ** np.arange(15)[:, None] * start
        expected = 0.5 * (closed**2 * h).sum(1)
        got = result.loss.sel(process="gd").values
        print(problem.w0.dtype, str(result.loss.dtype), np.max(np.abs(got - expected) / expected))
    """,
        tmp_path,
    )
    w0_dtype, loss_dtype, error = out.split()
    assert (w0_dtype, loss_dtype) == ("float64", "float64")
    assert float(error) < 1e-13


def _dots(lowered) -> list[str]:
    return [line for line in lowered.as_text().splitlines() if "stablehlo.dot_general" in line]


def test_measurements_trace_their_products_at_full_precision_and_the_cpu_does_not_care():
    """JAX's default computes float32 dots in TF32 on recent NVIDIA GPUs and in bfloat16 passes on TPUs. A run
    (under eosflow.precision) and the tracker's measurement (under the user's own jit, in the user's default
    context) trace every dot at HIGHEST; outside them the user's precision is left alone. On the CPU the two
    precisions give the same numbers bit for bit, so CPU results do not depend on the scoping."""
    import equinox as eqx
    import jax

    import eosflow
    from eosflow.objective import Objective, mse
    from eosflow.precision import precision

    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(7, 2)), jnp.float32),
    }
    x, y = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32), jnp.asarray(rng.normal(size=(12, 2)), jnp.float32)

    def apply(p, x):
        return jnp.tanh(x @ p["w"]) @ p["v"]

    objective, w = Objective.from_model(apply, params, x, y)
    w, v = jnp.asarray(w), jnp.asarray(rng.normal(size=w.size), jnp.float32)
    hvp = eqx.filter_jit(lambda o, w, v: o.hvp(w, v))
    plain = _dots(hvp.lower(objective, w, v))
    assert plain and all("DEFAULT" in line for line in plain)  # the user's context, untouched
    with precision("float32"):
        scoped = _dots(hvp.lower(objective, w, v))
        in_run = np.asarray(hvp(objective, w, v))
    assert len(scoped) == len(plain) and all("HIGHEST" in line for line in scoped)
    np.testing.assert_array_equal(in_run, np.asarray(hvp(objective, w, v)))  # the CPU: the same bits

    tracker = eosflow.SharpnessTracker(lambda p, b: mse(apply(p, b[0]), b[1]), k=2)
    state = tracker.init(params, jax.random.PRNGKey(0))
    measured = _dots(jax.jit(tracker.update).lower(state, params, (x, y)))
    assert measured and all("HIGHEST" in line for line in measured)
    loop = _dots(jax.jit(lambda p: jax.grad(lambda q: mse(apply(q, x), y))(p)).lower(params))
    assert all("DEFAULT" in line for line in loop)  # importing and using eosflow left the default alone
