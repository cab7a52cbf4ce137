"""Models started from a user's own training state (eosflow.checkpoint): a user's optax loop on a user's
pytree model, stopped at step j and handed over, against the same loop run on (optax itself is the
oracle of the optimizer's continuation) and against the models started at step j + 2 of eosflow's own run
from w0; and the refusals, each naming what does not fit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eosflow.anchored import anchored
from eosflow.checkpoint import Checkpoint, optimizer_state
from eosflow.config import SpecError
from eosflow.experiment import prepare
from eosflow.precision import precision
from test_adaptive import CASES as ADAPTIVE_CASES
from user_models import make_problem

CASES = {  # eosflow process, its options, lr, the same optimizer in optax (test_adaptive's, where optax has one)
    "gd": ("gd", {}, 0.2, lambda lr: optax.sgd(lr)),
    **{case: ADAPTIVE_CASES[case] for case in ("momentum ema", "nesterov", "rmsprop bias-corrected", "adam")},
}
MODEL = {"gd": "gradient_flow"}  # else <optimizer>_stable_flow


def table(case: str, steps: int) -> dict:
    name, options, lr, _ = CASES[case]
    model = MODEL.get(name, f"{name}_stable_flow")
    return {  # no eigensolver: `at` is a step, and nothing compared reads the eigenpairs
        "lr": lr,
        "steps": steps,
        "dtype": "float64",
        "processes": [name, model],
        "spectrum": {"every": 0},
        name: options,
    }


def user_loop(transform, problem, params, steps):
    """A user's own training loop: (params after each of ``steps`` steps, their optax states)."""
    state, out = transform.init(params), []
    loss = jax.jit(lambda p: problem.objective.value(jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(p)])))
    grad = jax.jit(jax.grad(loss))
    for _ in range(steps):
        updates, state = transform.update(grad(params), state, params)
        params = optax.apply_updates(params, updates)
        out.append((params, state))
    return out


def flat(params) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(params)])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("j", [5])  # odd: the models' rod parity differs from the run from w0's
def test_a_run_started_from_a_users_checkpoint_continues_the_users_run(case, j):
    """The optimizer continues the user's optax run to 1e-12 at every step, and (Adam, EMA momentum) the model
    started two steps after the checkpoint is the one started at step j + 2 of eosflow's own run from w0 (to
    1e-10: the same states, the bias correction's count read off the moments, not the run's step)."""
    problem = make_problem(dtype="float64")
    params0 = problem.objective.unravel(jnp.asarray(problem.w0))
    steps = 20
    history = user_loop(CASES[case][3](CASES[case][2]), problem, params0, j + steps)
    params, opt_state = history[j - 1]  # after j steps
    start = Checkpoint(params, None if case == "gd" else opt_state, previous=history[j - 2][0])
    spec_table = table(case, steps)
    with precision("float64"):
        _, _, _, processes = prepare(spec_table, problem)
        optimizer = processes[spec_table["processes"][0]]
        _, rows = optimizer.advance(optimizer_state(optimizer, problem, start), steps)
    # the user's params after j, j + 1, ..., j + steps - 1 steps
    expected = np.stack([flat(history[j + i - 1][0]) for i in range(steps)])
    np.testing.assert_allclose(np.asarray(rows["position"]), expected, rtol=1e-12, atol=1e-14)

    ds = anchored(spec_table, at=2, problem=problem, start=start)
    optimizer_name, model = (str(p) for p in ds["process"].values[:2])
    user_loss = np.asarray([float(problem.objective.value(jnp.asarray(w))) for w in expected[2:]])
    np.testing.assert_allclose(ds["loss"].sel(process=optimizer_name).values, user_loss, rtol=1e-12)

    if case not in ("adam", "momentum ema"):  # the models' start reads the moments (and Adam's count) alike
        return
    whole = anchored(table(case, j + steps), at=j + 2, problem=problem)
    for variable in ("loss", "distance"):
        np.testing.assert_allclose(
            ds[variable].sel(process=model).values,
            whole[variable].sel(process=model).values[: steps - 2],
            rtol=1e-10,
            atol=1e-14,
            err_msg=variable,
        )


def test_what_does_not_fit_the_problem_or_the_optimizer_is_named():
    problem = make_problem(dtype="float64")
    params = problem.objective.unravel(jnp.asarray(problem.w0))
    adam = optax.adam(0.01)
    with pytest.raises(SpecError, match=r"checkpoint.params: its pytree structure"):
        anchored(table("adam", 10), 2, problem, Checkpoint({"w": params["out"]}, adam.init(params)))
    with pytest.raises(SpecError, match="no ScaleByAdamState in it .* the state of optax.adam"):
        anchored(table("adam", 10), 2, problem, Checkpoint(params, optax.sgd(0.1, momentum=0.9).init(params)))
    with pytest.raises(SpecError, match="GD keeps no state"):
        anchored(table("gd", 10), 2, problem, Checkpoint(params, adam.init(params)))
    scalar = {**table("rmsprop bias-corrected", 10), "rmsprop": {"second_moment": "scalar"}}
    with pytest.raises(SpecError, match="scalar RMSProp has no optax state"):
        anchored(scalar, 2, problem, Checkpoint(params, optax.rmsprop(0.01).init(params)))
    size = np.asarray(problem.w0).size
    with pytest.raises(SpecError, match=rf"checkpoint.params: {size + 1} numbers where the problem has {size} "):
        anchored(table("gd", 10), 2, make_problem_flat(problem), Checkpoint(np.zeros(size + 1)))
    with pytest.raises(SpecError, match=r"checkpoint.params\['out'\] is int64"):
        anchored(table("gd", 10), 2, problem, Checkpoint({**params, "out": np.arange(3)}))
    with pytest.raises(SpecError, match=r"checkpoint.params: \d+ numbers where the problem has"):
        anchored(table("gd", 10), 2, problem, Checkpoint({**params, "out": np.zeros(3)}))


def make_problem_flat(problem):
    """A loss of a flat vector the size of ``problem``'s (no pytree structure to compare)."""
    import eosflow

    return eosflow.Problem.from_function(lambda w: jnp.sum(jnp.cos(w)), np.asarray(problem.w0))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_table_without_dtype_takes_the_in_memory_problems(dtype, tmp_path):
    """As eosflow.simulate does: anchored (and run) given a problem built in memory and a table naming no dtype
    compute in the problem's (before, float64 was refused: "w0 is float64 but this run computes in
    float32"), every variable bitwise that of the table with the dtype named."""
    from eosflow.experiment import run
    from eosflow.load import load

    problem = make_problem(dtype=dtype)
    named = {**table("adam", 10), "dtype": dtype}
    bare = {key: value for key, value in named.items() if key != "dtype"}
    for made in (
        lambda spec, name: anchored(spec, at=3, problem=problem),
        lambda spec, name: load(run(spec, tmp_path / name, problem=problem).run_dir),
    ):
        expected, got = made(named, "named"), made(bare, "bare")
        for name, variable in expected.data_vars.items():
            assert got[name].dtype == variable.dtype and got[name].values.tobytes() == variable.values.tobytes(), name


INJECTED = {  # case: optax.inject_hyperparams(...) of the case's optimizer, with each hyperparameter it keeps
    "gd": lambda **k: optax.inject_hyperparams(optax.sgd)(**{"learning_rate": 0.2, **k}),
    "nesterov": lambda **k: optax.inject_hyperparams(optax.sgd, static_args=("nesterov",))(
        **{"learning_rate": 0.1, "momentum": 0.7, "nesterov": True, **k}
    ),
    "rmsprop bias-corrected": lambda **k: optax.inject_hyperparams(
        optax.rmsprop, static_args=("eps_in_sqrt", "bias_correction")
    )(**{"learning_rate": 0.01, "decay": 0.9, "eps": 1e-6, "eps_in_sqrt": False, "bias_correction": True, **k}),
    "adam": lambda **k: optax.inject_hyperparams(optax.adam)(
        **{"learning_rate": 0.01, "b1": 0.9, "b2": 0.99, "eps": 1e-6, "eps_root": 1e-9, **k}
    ),
}


@pytest.mark.parametrize(
    "case, changed, message",
    [
        ("gd", {}, None),
        ("gd", {"learning_rate": 0.21}, r"lr = 0.21 where the spec has 0.2"),
        ("gd", {"learning_rate": optax.linear_schedule(0.2, 0.1, 100)}, r"lr = 0.19\d* where the spec has 0.2"),
        ("nesterov", {}, None),
        ("nesterov", {"momentum": 0.6}, r"nesterov.beta = 0.6 where the spec has 0.7"),
        ("rmsprop bias-corrected", {}, None),
        ("rmsprop bias-corrected", {"decay": 0.95}, r"rmsprop.beta2 = 0.95 where the spec has 0.9"),
        ("rmsprop bias-corrected", {"momentum": 0.5}, r"optax.rmsprop with momentum"),
        ("adam", {}, None),
        ("adam", {"b2": 0.999, "eps": 1e-8}, r"adam.beta2 = 0.999 where the spec has 0.99; adam.eps = 1e-08 where"),
        ("adam", {"eps_root": 0.0}, r"adam.eps_root = 0.0 where the spec has 1e-09"),
    ],
)
def test_hyperparameters_that_inject_hyperparams_keeps_are_checked_against_the_spec(case, changed, message):
    """optax.inject_hyperparams keeps lr, the betas and eps in the state: a spec that contradicts them is refused
    by name (the optimizer would continue with other numbers than the run, without a word); one that agrees
    continues the user's run to 1e-12, as the plain optax state does."""
    problem = make_problem(dtype="float64")
    params0 = problem.objective.unravel(jnp.asarray(problem.w0))
    history = user_loop(INJECTED[case](**changed), problem, params0, 12)
    params, opt_state = history[4]
    if message is not None:
        with pytest.raises(SpecError, match=message):
            anchored(table(case, 6), 2, problem, Checkpoint(params, opt_state))
        return
    ds = anchored(table(case, 6), 2, problem, Checkpoint(params, opt_state))
    user_loss = [float(problem.objective.value(jnp.asarray(flat(history[4 + i][0])))) for i in range(2, 6)]
    np.testing.assert_allclose(ds["loss"].isel(process=0).values, user_loss, rtol=1e-12)
    float32 = opt_state._replace(hyperparams={k: jnp.float32(v) for k, v in opt_state.hyperparams.items()})
    anchored(table(case, 6), 2, problem, Checkpoint(params, float32))  # the spec's numbers in float32 agree
