"""The live tracker, the optax preconditioners and the monitor, against dense float64 oracles.

Oracles: numpy's eigh of the dense Hessian (and of P^{-1/2} H P^{-1/2}); optax's own updates
(for RMSProp and Adam without momentum terms, update = -lr * m_hat / P, which pins P's
conventions: eps inside or outside the root, bias correction and its step count).
"""

import pickle
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eosflow
import user_models
from eosflow import optimizer_edges
from eosflow.cli import demo_table
from eosflow.experiment import prepare
from eosflow.monitor import monitored
from eosflow.precision import precision
from eosflow.spectrum import dense_hessian, lanczos


def small_problem():
    return user_models.make_problem(dtype="float64", width=8)


def ravel_flat(params):
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(params)])


def dense_top(matrix, k):
    values = np.linalg.eigvalsh(0.5 * (matrix + matrix.T))
    return values[::-1][:k]


@pytest.mark.parametrize(
    "every, cluster, warm_start, carry",
    [
        (1, None, "previous", "power"),
        (3, None, "previous", "power"),
        (3, 1e-2, "previous", "power"),
        (1, None, "fitted", "power"),
        (3, None, "previous", "ritz"),
        (1, None, "fitted", "ritz"),
    ],
)
def test_tracker_in_a_scanned_gd_loop_matches_dense_eigh(every, cluster, warm_start, carry):
    problem = small_problem()
    params0 = problem.objective.unravel(problem.w0)
    batch = problem.objective.data

    def loss(params, batch):
        return user_models.log_cosh(user_models.apply(params, batch[0]), batch[1])

    tracker = eosflow.SharpnessTracker(
        loss, k=3, tol=1e-6, max_iters=100, every=every, cluster=cluster, warm_start=warm_start, carry=carry
    )

    @jax.jit
    def train(params, state):
        def step(carry, _):
            params, state = carry
            state, eig = tracker.update(state, params, batch)
            grads = jax.grad(loss)(params, batch)
            return (jax.tree.map(lambda p, g: p - 0.8 * g, params, grads), state), (
                params,
                eig.values,
                eig.hvps,
                eig.residuals,
            )

        return jax.lax.scan(step, (params, state), None, length=12)

    (_, state), (trajectory, values, hvps, residuals) = train(params0, tracker.init(params0, jax.random.PRNGKey(1)))
    hvps = np.asarray(hvps)
    assert np.all((hvps > 0) == (np.arange(12) % every == 0))
    assert int(state.hvps) == hvps.sum() and int(state.count) == 12
    for t in range(0, 12, every):
        w = ravel_flat(jax.tree.map(lambda leaf, t=t: leaf[t], trajectory))
        exact = dense_top(dense_hessian(problem.objective, w), 3)
        np.testing.assert_allclose(values[t], exact, rtol=1e-8)
        assert np.all(residuals[t] <= 1e-6)
        if every > 1 and t + 1 < 12:  # skipped updates repeat the last measurement
            np.testing.assert_array_equal(values[t + 1], values[t])
    # warm starts: later measurements cost less than the cold first one
    assert hvps[every * 2 :][hvps[every * 2 :] > 0].mean() < hvps[0]
    if warm_start != "previous":  # GD at lr 0.8 bounces here, so the same-side start was in use
        steps = np.diff(
            np.stack([ravel_flat(jax.tree.map(lambda leaf, t=t: leaf[t], trajectory)) for t in range(12)]), axis=0
        )
        assert np.sum(np.sum(steps[1:] * steps[:-1], axis=1) < 0) >= 3


def test_the_trackers_power_carry_spends_fewer_hvps_along_gd_on_the_demo_mlp():
    """carry = "power" (the default) starts each measurement from the last vectors moved by H v / |H v|, free:
    along GD on the demo's MLP (d = 3466, lr = 0.4, 150 steps, k = 3, the fitted start) it spends fewer HVPs than
    the Ritz vectors' start (at 300 steps 1184 against 1632, a probe), and both read the same top eigenvalues to
    1e-4 relative (tol 1e-3: errors ~ tol^2 / gap, float32)."""
    _, problem, _, _ = prepare(demo_table())

    def loss(w):
        return problem.objective.value(w)

    grad = jax.jit(jax.grad(loss))
    spent, read = {}, {}
    for carry in ("ritz", "power"):
        tracker = eosflow.SharpnessTracker(loss, k=3, warm_start="fitted", carry=carry)
        update, state, w, values = (
            jax.jit(tracker.update),
            tracker.init(problem.w0, jax.random.PRNGKey(0)),
            problem.w0,
            [],
        )
        for _ in range(150):
            state, eig = update(state, w)
            values.append(np.asarray(eig.values))
            w = w - 0.4 * grad(w)
        spent[carry], read[carry] = int(state.hvps), np.array(values)
    assert spent["power"] < 0.9 * spent["ritz"], spent
    np.testing.assert_allclose(read["power"], read["ritz"], rtol=1e-4)


def test_tracker_warm_start_rejects_what_it_cannot_do():
    for options, message in (
        ({"warm_start": "sideways"}, "warm_start must be"),
        ({"warm_start": "extrapolated", "every": 2}, "needs every = 1"),
    ):
        with pytest.raises(ValueError, match=message):
            eosflow.SharpnessTracker(lambda params: 0.0, **options)


def run_optax(optimizer, problem, steps):
    params = problem.objective.unravel(problem.w0)

    def loss(params):
        return problem.objective.value(ravel_flat(params))

    @jax.jit
    def step(params, state):
        updates, state = optimizer.transform.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = optimizer.transform.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize(
    "loss_fn, message",
    [
        (lambda p, b: (b @ p["w"]) ** 2, r"loss_fn\(params, batch\) returns shape \(4,\), not a scalar"),
        (lambda p, b: (jnp.sum(p["w"] ** 2), {"acc": 1.0}), r"loss_fn\(params, batch\) returns a tuple.*has_aux"),
    ],
)
def test_tracker_names_a_loss_that_is_not_a_scalar(loss_fn, message):
    """Before: JAX's "Gradient only defined for scalar-output functions" from inside the solver."""
    params, batch = {"w": jnp.ones(3)}, jnp.ones((4, 3))
    tracker = eosflow.SharpnessTracker(loss_fn, k=1)
    with pytest.raises(ValueError, match=message):
        tracker.update(tracker.init(params, jax.random.PRNGKey(0)), params, batch)


def test_a_loss_that_cannot_take_the_call_is_told_how_eosflow_calls_it():
    """loss_fn(params, x, y) given a batch (x, y), and loss_fn(params, batch) given none: the tracker, predict,
    HessianOperator.from_function and batch_sharpness say how they call it and how to adapt it, where JAX's own
    error was "missing 1 required positional argument" from inside the trace. A callable that can take the call
    (jitted, filter-jitted, a partial, a module, *args) is measured, to the same top eigenvalue."""
    import functools

    params, x, y = {"w": jnp.asarray([0.3, -0.2, 0.5])}, jnp.asarray(np.linspace(-1, 1, 12).reshape(4, 3)), jnp.ones(4)

    def three(p, x, y):
        return jnp.mean(jnp.tanh(x @ p["w"] - y) ** 2)

    def two(p, batch):
        return three(p, *batch)

    key = jax.random.PRNGKey(0)
    tracker = eosflow.SharpnessTracker(three, k=1)
    taken = r"missing a required argument: 'y'\): the batch is one argument .* loss_fn\(params, \*batch\)"
    calls = {
        "SharpnessTracker.update": lambda: tracker.update(tracker.init(params, key), params, (x, y)),
        "HessianOperator.from_function": lambda: eosflow.HessianOperator.from_function(three, params, (x, y)),
        "batch_sharpness": lambda: eosflow.batch_sharpness.batch_sharpness(three, params, [(x, y)]),
    }
    for where, call in calls.items():
        with pytest.raises(
            TypeError, match=rf"{where} calls loss_fn\(params, batch\), which three\(p, x, y\) .*{taken}"
        ):
            call()
    eig = eosflow.SharpnessTracker(two, k=1, tol=1e-9, max_iters=100)
    measured = eig.update(eig.init(params, key), params, (x, y))[1]
    with pytest.raises(TypeError, match=rf"edge_prediction.predict calls loss_fn\(params, batch\).*{taken}"):
        eosflow.edge_prediction.predict(three, params, (x, y), measured, 0.1)
    with pytest.raises(TypeError, match=r"calls loss_fn\(params\), which two\(p, batch\) .*pass the batch too"):
        tracker = eosflow.SharpnessTracker(two, k=1)
        tracker.update(tracker.init(params, key), params)

    def scaled(p, batch, scale):
        return scale * two(p, batch)

    class Loss(eqx.Module):
        def __call__(self, p, batch):
            return two(p, batch)

    expected = float(measured.values[0])
    for loss in (jax.jit(two), eqx.filter_jit(two), functools.partial(scaled, scale=1.0), Loss(), lambda *a: two(*a)):
        tracker = eosflow.SharpnessTracker(loss, k=1, tol=1e-9, max_iters=100)
        value = tracker.update(tracker.init(params, key), params, (x, y))[1].values[0]
        assert float(value) == pytest.approx(expected, rel=1e-10)


def test_a_state_for_other_parameters_is_named():
    """A state from init() on a model that since grew a bias: before, "linearized function called on tangent values
    inconsistent with the original primal values" from inside the solver."""
    params, batch = {"w": jnp.ones(3)}, jnp.ones((4, 3))
    tracker = eosflow.SharpnessTracker(lambda p, b: jnp.mean((b @ p["w"] + p.get("b", 0.0)) ** 2), k=1)
    state = tracker.init(params, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"directions of 3 parameters \(from tracker.init\).* have 4: .*tracker.init"):
        tracker.update(state, {**params, "b": jnp.zeros(1)}, batch)
    single = {"w": jnp.ones(3, jnp.float32)}
    state = tracker.init(single, jax.random.PRNGKey(0))
    promoted = jax.tree.map(lambda p: p - np.float64(0.1) * p, single)  # a float64 lr under x64: float64 params
    with pytest.raises(ValueError, match=r"the state is float32 \(from tracker.init\) and these params are float64"):
        tracker.update(state, promoted, batch.astype(jnp.float32))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_tracker_names_half_precision_parameters_and_k_above_their_size(dtype):
    """Before: bfloat16 gave NotImplementedError('Unsupported dtype bfloat16') from inside the solver, and
    k above the parameter count returned d pairs without a word; both are refused, by name, in init and update."""
    params = {"w": jnp.ones(3, dtype), "b": jnp.zeros(2, dtype)}
    key = jax.random.PRNGKey(0)
    tracker = eosflow.SharpnessTracker(lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 4), k=1)
    with pytest.raises(ValueError, match=rf"parameters are {dtype}; eosflow measures curvature in float32 or float64"):
        tracker.init(params, key)
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    with pytest.raises(ValueError, match=rf"parameters are {dtype}"):
        tracker.update(tracker.init(params32, key), params)
    # one such leaf among float32 ones (a probe: one bfloat16 bias among float64 weights read S 3.3x off at tol
    # 1e-6, its directions rounded to bfloat16 when the flat vector is put back)
    mixed = {"w": params32["w"], "b": params["b"]}
    with pytest.raises(ValueError, match=rf"the parameter \['b'\] is {dtype} among float32 ones"):
        tracker.init(mixed, key)
    for k in (5, 6):
        tracker = eosflow.SharpnessTracker(lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 4), k=k)
        if k == 6:
            with pytest.raises(ValueError, match="k = 6 exceeds the parameter count 5"):
                tracker.init(params32, key)
        else:  # k = d is measured: 2, 2, 2 and the quartic's flat 0, 0
            _, pairs = tracker.update(tracker.init(params32, key), params32)
            np.testing.assert_allclose(np.sort(pairs.values)[::-1], [2, 2, 2, 0, 0], atol=1e-5)


def test_monitored_names_an_optimizer_that_is_not_an_edge_optimizer():
    """Before: AttributeError "'GradientTransformationExtraArgs' object has no attribute 'transform'"."""
    with pytest.raises(TypeError, match=r"eosflow.optimizer_edges.adam\(lr, ...\).*got GradientTransformation"):
        monitored(optax.adam(1e-3), lambda p, b: jnp.sum(p**2))
    adam = eosflow.optimizer_edges.adam(1e-3)
    with pytest.raises(TypeError, match=r"log must be a function .* got str 'runs/x.jsonl': .* log=EdgeLog\(path\)"):
        monitored(adam, lambda p, b: jnp.sum(p**2), log="runs/x.jsonl")  # failed inside jit, at the first update


@pytest.mark.parametrize(
    "make, first_moment",
    [
        (lambda: optimizer_edges.adam(0.01, b1=0.0, b2=0.9, eps=1e-3, eps_root=1e-4), "g"),
        (lambda: optimizer_edges.rmsprop(0.01, decay=0.8, eps=1e-3), "g"),
        (lambda: optimizer_edges.rmsprop(0.01, decay=0.8, eps=1e-3, eps_in_sqrt=False, bias_correction=True), "g"),
        (lambda: optimizer_edges.amsgrad(0.01, b1=0.0, b2=0.5, eps=1e-3, eps_root=1e-4), "g"),
        (lambda: optimizer_edges.rmsprop(0.01, decay=0.8, eps=1e-3, centered=True), "g"),
        (lambda: optimizer_edges.rmsprop(0.01, decay=0.8, eps=1e-3, centered=True, eps_in_sqrt=False), "g"),
        (lambda: optimizer_edges.rmsprop(0.01, decay=0.8, eps=1e-3, centered=True, bias_correction=True), "g"),
    ],
)
def test_preconditioner_is_the_denominator_optax_divides_by(make, first_moment):
    """With no first moment (b1 = 0, no momentum) optax's update is -lr g / P: P read from the state is it.
    AMSGrad's P is the running max of the corrected nu, which here is not the current nu (reading nu fails)."""
    optimizer = make()
    problem = small_problem()
    params, state = run_optax(optimizer, problem, 8)
    grads = jax.grad(lambda p: problem.objective.value(ravel_flat(p)))(params)
    updates, new_state = optimizer.transform.update(grads, state, params)
    P = optimizer.preconditioner(new_state)
    jax.tree.map(lambda u, g, p: np.testing.assert_allclose(u, -0.01 * g / p, rtol=1e-12), updates, grads, P)
    moments = optimizer_edges.substate(new_state, lambda s: isinstance(s, optax.ScaleByAmsgradState))
    if moments is not None:
        current = jax.tree.map(lambda nu: nu / (1 - 0.5**moments.count), moments.nu)
        gaps = jax.tree.map(lambda top, nu: float(np.max(np.abs(top - nu) / top)), moments.nu_max, current)
        assert max(jax.tree.leaves(gaps)) > 0.1


def test_thresholds():
    assert optimizer_edges.adam(1e-3).threshold == pytest.approx(38 / 1e-3)
    assert optimizer_edges.amsgrad(1e-3).threshold == pytest.approx(38 / 1e-3)
    assert optimizer_edges.sgd(0.1).threshold == pytest.approx(20.0)
    assert optimizer_edges.sgd(0.1, momentum=0.9).threshold == pytest.approx(38.0)
    assert optimizer_edges.rmsprop(0.1).threshold == pytest.approx(20.0)
    assert optimizer_edges.adamw(0.1, weight_decay=0.5).threshold == pytest.approx(380.0 * (1 - 0.1 * 0.5 / 2))
    schedule = optimizer_edges.sgd(optax.linear_schedule(0.1, 0.2, 10))
    assert float(schedule.threshold_at(0)) == pytest.approx(20.0) and float(schedule.threshold_at(10)) == pytest.approx(
        10.0
    )


def test_edge_optimizers_name_what_they_cannot_take():
    with pytest.raises(TypeError, match=r"lr is a schedule.*threshold_at\(count\)"):
        _ = optimizer_edges.adam(optax.linear_schedule(0.0, 1e-3, 10)).threshold
    with pytest.raises(ValueError, match=r"lr must be positive, got -0.1"):
        optimizer_edges.sgd(-0.1)
    with pytest.raises(ValueError, match=r"weight_decay must be >= 0, got -0.01"):
        optimizer_edges.adamw(1e-3, weight_decay=-0.01)
    # a bias-corrected state no update has made: nu / (1 - b2^0) = 0 / 0 (it was a silent NaN)
    params = {"w": jnp.ones(3)}
    corrected = optimizer_edges.rmsprop(0.1, bias_correction=True)
    for read, state in (
        (optimizer_edges.adam(1e-3).preconditioner, optimizer_edges.adam(1e-3).transform.init(params)),
        (corrected.preconditioner, corrected.transform.init(params)),
        (corrected.second_moment, corrected.transform.init(params)),
    ):
        with pytest.raises(ValueError, match=r"state has count 0: no update has made its second moment yet"):
            read(state)
    plain = optimizer_edges.rmsprop(0.1, eps=1e-4)  # uncorrected: P = sqrt(0 + eps) before any update
    np.testing.assert_allclose(plain.preconditioner(plain.transform.init(params))["w"], 1e-2, rtol=1e-6)


@pytest.mark.parametrize("lr, b1, weight_decay", [(1.0, 0.9, 0.0), (1.0, 0.9, 0.2), (0.5, 0.5, 0.6), (2.0, 0.8, 0.3)])
def test_adamw_threshold_is_where_optaxs_own_iteration_loses_stability(lr, b1, weight_decay):
    """optax.adamw on L = a w^2 / 2 with P = eps (w tiny: sqrt(nu) << eps), float64: |w| shrinks for a 1% below
    the threshold and grows 1% above it. Adam's 38/lr would put the edge 1 / (1 - lr wd / 2) higher: the
    decoupled decay is what moves it (lr wd = 0.2 in the second case, so 1% above ours is 9% below Adam's). Each
    late step of optax's equals the (w, m) map whose determinant and trace the threshold is derived from."""
    with precision("float64"):
        optimizer = optimizer_edges.adamw(lr, b1=b1, b2=0.999, eps=1.0, weight_decay=weight_decay)
        for factor in (0.99, 1.01):
            a = factor * optimizer.threshold  # P = eps = 1, so the preconditioned curvature is a
            w, state = jnp.array([1e-100]), optimizer.transform.init(jnp.array([1e-100]))

            @jax.jit
            def step(w, state, a=a):
                updates, state = optimizer.transform.update(a * w, state, w)
                return optax.apply_updates(w, updates), state

            delta, h = lr * weight_decay, lr * a
            matrix = np.array([[1 - delta - (1 - b1) * h, -lr * b1], [(1 - b1) * a, b1]])  # (w, m) -> (w+, m+)
            sizes = []
            for t in range(250):
                before = np.array([float(w[0]), float(state[0].mu[0])])
                w, state = step(w, state)
                sizes.append(abs(float(w[0])))
                if t >= 200:  # past the bias-correction transient (b1^200 < 1e-9), optax's step is the 2 x 2 map
                    after = np.array([float(w[0]), float(state[0].mu[0])])
                    np.testing.assert_allclose(after, matrix @ before, rtol=1e-7, atol=1e-7 * np.abs(after).max())
            rate = (max(sizes[240:]) / max(sizes[190:200])) ** (1 / 50)  # maxima over 10 steps: modes may rotate
            assert (max(abs(np.linalg.eigvals(matrix))) > 1.0) == (factor > 1.0)
            assert (rate > 1.0) == (factor > 1.0), (factor, rate)
        if weight_decay:
            assert optimizer.threshold < 0.99 * optimizer_edges.adam(lr, b1=b1).threshold


INJECTED = [0.004, 0.02, 0.01, 0.002, 0.03, 0.006, 0.015]  # set by hand in the state before update t


@pytest.mark.parametrize("how", ["schedule", "injected", "multisteps"])
def test_monitor_reads_a_schedules_step_size_at_optaxs_count(how):
    """With lr an optax schedule, or set by hand in an ``optax.inject_hyperparams`` state before each update,
    each reading's lr * S uses the lr optax applied in that update: recovered from the update itself (b1 = 0:
    update = -lr(t) g / P), not from the schedule; edge ratio = lr(t) S / 2 (b1 = 0). (Before, an injected lr
    was not read: the constructor's 0.01 was used.)"""
    problem = small_problem()
    if how == "schedule":
        optimizer = optimizer_edges.adam(
            optax.linear_schedule(0.002, 0.03, transition_steps=6), b1=0.0, b2=0.9, eps=1e-3
        )
    elif how == "multisteps":  # gradient accumulation: a real update every 2nd call, lr(t) at the inner count t
        schedule = optax.linear_schedule(0.002, 0.03, transition_steps=3)
        accumulated = optax.MultiSteps(optax.adam(schedule, b1=0.0, b2=0.9, eps=1e-3), every_k_schedule=2)
        optimizer = optimizer_edges.adam(schedule, b1=0.0, b2=0.9, eps=1e-3)._replace(
            transform=accumulated.gradient_transformation()
        )
    else:  # the constructor's b2 and eps are not the ones injected: the state's are read
        injected = optax.inject_hyperparams(optax.adam)(learning_rate=0.01, b1=0.0, b2=0.99, eps=1e-2)
        optimizer = optimizer_edges.adam(0.01, b1=0.0, b2=0.9, eps=1e-3)._replace(transform=injected)

    def loss(params, batch):
        return user_models.log_cosh(user_models.apply(params, batch[0]), batch[1])

    opt = monitored(optimizer, loss, every=1 if how == "multisteps" else 2, tol=1e-6, max_iters=100, log=None)
    params, batch = problem.objective.unravel(problem.w0), problem.objective.data
    state = opt.init(params)
    update = jax.jit(lambda g, s, p: opt.update(g, s, p, batch=batch))  # one program for every step
    checked = []
    for t in range(8 if how == "multisteps" else 7):
        if how == "injected":
            state.inner.hyperparams.update(
                learning_rate=jnp.asarray(INJECTED[t], jnp.float64),
                b2=jnp.asarray(0.9, jnp.float64),
                eps=1e-3 * (t + 1),
            )
        grads = jax.grad(loss)(params, batch)
        updates, state = update(grads, state, params)
        if how == "multisteps" and t % 2 == 0:  # no update made yet at t = 0, none applied in between
            assert np.all(ravel_flat(updates) == 0)
            assert t > 0 or np.isnan(float(state.reading.sharpness))
        elif how == "multisteps":
            P = ravel_flat(optimizer.preconditioner(state.inner))
            applied = -ravel_flat(updates) / (ravel_flat(grads) / P)
            lr_t = float(state.reading.lr_sharpness) / float(state.reading.sharpness)
            np.testing.assert_allclose(applied, lr_t, rtol=1e-4)  # (the mean of two equal gradients: params held)
            checked.append(lr_t)
        elif t % 2 == 0:
            P = ravel_flat(optimizer.preconditioner(state.inner))
            applied = -ravel_flat(updates) / (ravel_flat(grads) / P)  # optax's lr of this update, per coordinate
            reading = state.reading
            assert int(reading.step) == t
            lr_t = float(reading.lr_sharpness) / float(reading.sharpness)
            np.testing.assert_allclose(applied, lr_t, rtol=1e-4)
            assert float(reading.edge_ratio) == pytest.approx(lr_t * float(reading.sharpness) / 2.0, rel=1e-6)
            checked.append(lr_t)
        params = optax.apply_updates(params, updates)
    if how == "schedule":
        assert len(checked) == 4 and checked == sorted(checked) and checked[0] < 0.5 * checked[-1]  # warm-up moved it
    elif how == "multisteps":  # inner updates 0..3 at lr(0..3), not the schedule at calls 1, 3, 5, 7
        np.testing.assert_allclose(checked, [float(schedule(t)) for t in range(4)], rtol=1e-6)
    else:
        np.testing.assert_allclose(checked, INJECTED[::2], rtol=1e-12)


def test_preconditioned_tracker_and_monitor_match_dense():
    """Adam's P^{-1/2} H P^{-1/2} at the monitored steps equals the dense float64 computation."""
    problem = small_problem()
    lr, every = 0.02, 4
    optimizer = optimizer_edges.adam(lr, eps=1e-6)

    def loss(params, batch):
        return user_models.log_cosh(user_models.apply(params, batch[0]), batch[1])

    readings = []
    opt = monitored(optimizer, loss, every=every, k=2, tol=1e-7, max_iters=100, log=readings.append)
    params = problem.objective.unravel(problem.w0)
    batch = problem.objective.data
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params, batch)
        updates, state = opt.update(grads, state, params, batch=batch)
        return optax.apply_updates(params, updates), state

    checked = 0
    for t in range(9):
        before = params
        params, state = step(params, state)
        if t % every == 0:
            P = ravel_flat(optimizer.preconditioner(state.inner))
            scale = 1.0 / np.sqrt(np.asarray(P))
            dense = scale[:, None] * dense_hessian(problem.objective, ravel_flat(before)) * scale[None, :]
            exact = dense_top(dense, 1)[0]
            assert float(state.reading.sharpness) == pytest.approx(exact, rel=1e-9)
            assert float(state.reading.edge_ratio) == pytest.approx(exact * lr / 38, rel=1e-9)
            checked += 1
    jax.effects_barrier()
    assert checked == 3 and [int(r.step) for r in readings] == [0, 4, 8]
    assert float(readings[-1].lr_sharpness) == pytest.approx(float(state.reading.lr_sharpness))


@pytest.mark.parametrize(
    "warm_start, carry, every", [("fitted", "power", 1), ("previous", "ritz", 1), ("previous", "power", 2)]
)
def test_a_measurement_that_is_not_finite_leaves_the_warm_start_alone(warm_start, carry, every):
    """GD's iterates of a float64 MLP measured one by one; at the fifth update the parameters hold a NaN. That reading
    is NaN, and the next measurement reads what a tracker that never saw the NaN reads: bitwise at every = 1 (the
    same start), finite at every = 2, where the NaN update shifted the schedule (before, the NaN became the warm
    start and every later reading was NaN)."""
    problem = small_problem()

    def loss(params, batch):
        return user_models.log_cosh(user_models.apply(params, batch[0]), batch[1])

    batch = problem.objective.data
    params = [problem.objective.unravel(problem.w0)]
    for _ in range(7):
        params.append(jax.tree.map(lambda p, g: p - 0.5 * g, params[-1], jax.grad(loss)(params[-1], batch)))
    tracker = eosflow.SharpnessTracker(
        loss, k=2, tol=1e-6, max_iters=100, warm_start=warm_start, carry=carry, every=every
    )
    poisoned = jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), params[4])
    readings = {}
    for name, sequence in (("clean", params), ("nan", params[:4] + [poisoned] + params[4:])):
        state, seen = tracker.init(params[0], jax.random.key(3)), []
        for p in sequence:
            state, eig = tracker.update(state, p, batch)
            seen.append(np.asarray(eig.values))
        readings[name] = seen
    clean, after = readings["clean"], readings["nan"]
    assert all(np.array_equal(a, b) for a, b in zip(clean[:4], after[:4], strict=True))
    assert np.isnan(after[4]).all()
    if every == 1:
        assert all(np.array_equal(a, b) for a, b in zip(clean[4:], after[5:], strict=True))
    else:  # update 5 is skipped (it reports the NaN measurement); 6 measures GD's iterate 5
        assert np.isnan(after[5]).all() and np.isfinite(after[6]).all() and np.isfinite(after[8]).all()
        exact = dense_top(dense_hessian(problem.objective, ravel_flat(params[5])), 2)  # (the objective's own batch)
        np.testing.assert_allclose(after[6], exact, rtol=1e-5)


def test_a_monitored_state_saved_with_the_loop_continues_bitwise():
    """The monitored optimizer's state is a pytree of arrays: saved as NumPy arrays (pickled) after 5 of 10 Adam steps
    and loaded into a new optimizer and a new compiled step, it measures steps 6-10 bitwise as the loop that went on
    (readings, eigenpairs and the HVPs spent). The same loop resumed with a fresh tracker state does not."""
    problem = small_problem()

    def loss(params, batch):
        return user_models.log_cosh(user_models.apply(params, batch[0]), batch[1])

    batch = problem.objective.data

    def run(steps: int, params, state, restart_tracker: bool = False):
        opt = monitored(optimizer_edges.adam(0.05, eps=1e-6), loss, every=1, k=2, tol=1e-8, max_iters=100, log=None)
        if state is None:
            state = opt.init(params)
        elif restart_tracker:
            state = state._replace(tracker=opt.init(params).tracker)

        @jax.jit
        def step(params, state):
            updates, state = opt.update(jax.grad(loss)(params, batch), state, params, batch=batch)
            return optax.apply_updates(params, updates), state

        seen = []
        for _ in range(steps):
            params, state = step(params, state)
            seen.append(
                jax.tree.map(
                    np.asarray, (state.reading, state.tracker.values, state.tracker.vectors, state.tracker.hvps)
                )
            )
        return params, state, seen

    params0 = problem.objective.unravel(problem.w0)
    _, _, whole = run(10, params0, None)
    params, state, first = run(5, params0, None)
    saved = pickle.loads(pickle.dumps(jax.tree.map(np.asarray, (params, state))))
    _, _, rest = run(5, *jax.tree.map(jnp.asarray, saved))
    resumed = first + rest
    assert all(
        np.array_equal(a, b)
        for went_on, came_back in zip(whole, resumed, strict=True)
        for a, b in zip(jax.tree.leaves(went_on), jax.tree.leaves(came_back), strict=True)
    )
    _, _, restarted = run(5, *jax.tree.map(jnp.asarray, saved), restart_tracker=True)
    assert not all(
        np.array_equal(a, b)
        for went_on, came_back in zip(whole[5:], restarted, strict=True)
        for a, b in zip(jax.tree.leaves(went_on), jax.tree.leaves(came_back), strict=True)
    )


def test_docs_example_loop_runs_and_adam_reaches_its_edge(capsys):
    """The example loop of docs/monitor.md, as written: Adam's S/threshold climbs to ~1 and holds."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "monitor.md").read_text()
    code = text.split("## An example loop")[1].split("```python\n")[1].split("```")[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 22  # 18: a 20-line loop (blank lines aside)
    namespace: dict = {}
    exec(compile(code, "docs/monitor.md", "exec"), namespace)  # noqa: S102  (the page's example, as written)
    jax.effects_barrier()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    ratios = [float(line.rsplit("=", 1)[1]) for line in lines]
    assert len(ratios) == 10 and max(ratios[1:5]) < 0.6  # it starts well below the edge ...
    assert 0.95 < ratios[-1] < 1.05 and 0.95 < float(namespace["state"].reading.edge_ratio) < 1.05  # ... and holds it


@pytest.mark.slow
def test_tracker_on_the_demo_mlp_in_an_optax_sgd_loop_matches_arpack():
    """lr * S from the tracker (float32, tol 1e-3, warm-started every 40 steps) vs float64 ARPACK at tol 0,
    itself checked against dense eigh by test_spectrum.py::test_lanczos_matches_dense_eigh (forming this
    3466-parameter MLP's H for eigh took ~8 s a check; ARPACK ~1 s, a throwaway timing).

    Two checks; benchmarks/monitor.py checks the edge-of-stability phase.
    """
    table = demo_table()
    lr = table["lr"]
    with precision("float64"):
        problem64 = prepare({**table, "dtype": "float64"})[1]
    with precision("float32"):
        problem = prepare(table)[1]
        objective = problem.objective

        def loss(params, batch):
            return objective.loss_on(ravel_flat(params), batch)

        tracker = eosflow.SharpnessTracker(loss, k=1, tol=1e-3, every=40)
        sgd = optax.sgd(lr)
        params = objective.unravel(problem.w0)

        @jax.jit
        def step(params, opt_state, state):
            state, eig = tracker.update(state, params, objective.data)
            updates, opt_state = sgd.update(jax.grad(loss)(params, objective.data), opt_state, params)
            return optax.apply_updates(params, updates), opt_state, state, eig.values[0]

        opt_state, state = sgd.init(params), tracker.init(params, jax.random.PRNGKey(0))
        checks = []
        for t in range(41):
            w = np.asarray(ravel_flat(params), np.float64)
            params, opt_state, state, top = step(params, opt_state, state)
            if t % 40 == 0:
                checks.append((w, lr * float(top)))
    assert len(checks) == 2
    with precision("float64"):
        for w, measured in checks:
            exact = lr * lanczos(problem64.objective, jnp.asarray(w), 1).values[0]
            assert measured == pytest.approx(exact, rel=1e-4)


def test_extrapolated_warm_start_is_second_order_and_ignores_signs_and_order():
    """A tracked basis rotating at a constant rate: 2 X_a - X_b Q is within O(step^2) of the next
    basis (the last measurement alone is O(step) away), whatever the signs and order of X_b's columns;
    gd_warm_start takes the same-side history when GD bounces."""
    from eosflow.tracker import extrapolated_vectors, gd_warm_start

    rng = np.random.default_rng(0)
    frame, _ = np.linalg.qr(rng.standard_normal((40, 4)))

    def basis(t):  # two vectors turning in the planes (e1, e3) and (e2, e4)
        c, s = np.cos(t), np.sin(t)
        return frame @ np.array([[c, 0], [0, c], [s, 0], [0, s]])

    def distance(x, target):  # sine of the largest principal angle between the column spans
        q, _ = np.linalg.qr(x)
        return np.linalg.norm(q - target @ (target.T @ q), 2)

    for step in (0.1, 0.03, 0.01):
        earlier = basis(0.0)[:, ::-1] * np.array([-1.0, 1.0])  # reordered, one sign flipped
        start = np.asarray(extrapolated_vectors(jnp.asarray(basis(step)), jnp.asarray(earlier)))
        assert distance(start, basis(2 * step)) < 0.6 * step**2
        assert distance(basis(step), basis(2 * step)) > 0.9 * step
    history = jnp.asarray(np.stack([basis(0.4), basis(0.3), basis(0.2), basis(0.1)]))  # steps t-1, ..., t-4
    bounced = gd_warm_start(history, jnp.asarray(True), "extrapolated")  # from t-2 and t-4
    np.testing.assert_array_equal(bounced, extrapolated_vectors(history[1], history[3]))
    smooth = gd_warm_start(history, jnp.asarray(False), "extrapolated")  # from t-1 and t-2
    np.testing.assert_array_equal(smooth, extrapolated_vectors(history[0], history[1]))
    np.testing.assert_array_equal(gd_warm_start(history, jnp.asarray(True), "same_side"), history[1])
    np.testing.assert_array_equal(gd_warm_start(history, jnp.asarray(False), "same_side"), history[0])
    np.testing.assert_array_equal(gd_warm_start(history, jnp.asarray(True), "previous"), history[0])
    with pytest.raises(ValueError, match="reads 6 measurements, got 4"):
        gd_warm_start(history, jnp.asarray(True), "fitted")


def test_fitted_warm_start_extrapolates_drift_and_not_noise():
    """The fitted start (X_a moved on by its last change, damped by the factor that best predicted X_a)
    is second order on a steadily rotating basis, as the extrapolated one; on measurements of a basis
    that does not move, perturbed by independent tol-level noise, it is as close as the same-side
    start, where the extrapolated one is ~sqrt(5) times further off (2.2 here); and a jump of the span
    (a new tracked direction) falls back to the same-side start. gd_warm_start reads t-1, t-2, t-3
    (smooth) or t-2, t-4, t-6 (bouncing)."""
    from eosflow.tracker import extrapolated_vectors, fitted_extrapolation, gd_warm_start

    rng = np.random.default_rng(1)
    frame, _ = np.linalg.qr(rng.standard_normal((40, 4)))

    def basis(t):  # as in the test above: two vectors turning in the planes (e1, e3) and (e2, e4)
        c, s = np.cos(t), np.sin(t)
        return frame @ np.array([[c, 0], [0, c], [s, 0], [0, s]])

    def distance(x, target):
        q, _ = np.linalg.qr(x)
        return np.linalg.norm(q - target @ (target.T @ q), 2)

    for step in (0.1, 0.03, 0.01):  # measurements at 0, step, 2 step (X_c, X_b, X_a), signs and order scrambled
        oldest = basis(0.0)[:, ::-1] * np.array([1.0, -1.0])
        earlier = -basis(step)
        start = np.asarray(fitted_extrapolation(*(jnp.asarray(x) for x in (basis(2 * step), earlier, oldest))))
        assert distance(start, basis(3 * step)) < 0.6 * step**2

    still = basis(0.3)
    misses = {"same": [], "fitted": [], "extrapolated": []}
    for _ in range(40):  # converged measurements of a still basis: each off by ~1e-3 at random
        noisy = [np.linalg.qr(still + 1e-3 * rng.standard_normal(still.shape))[0] for _ in range(3)]
        latest, earlier, oldest = (jnp.asarray(x) for x in noisy)
        misses["same"].append(distance(noisy[0], still))
        misses["fitted"].append(distance(np.asarray(fitted_extrapolation(latest, earlier, oldest)), still))
        misses["extrapolated"].append(distance(np.asarray(extrapolated_vectors(latest, earlier)), still))
    mean = {rule: np.mean(values) for rule, values in misses.items()}
    assert mean["fitted"] < 1.1 * mean["same"] and mean["extrapolated"] > 1.5 * mean["same"]

    jumped = np.concatenate([basis(0.2)[:, :1], frame[:, 3:] @ np.ones((1, 1))], axis=1)  # new column at t-2s
    latest, earlier, oldest = basis(0.3), jumped, basis(0.1)
    start = fitted_extrapolation(*(jnp.asarray(x) for x in (latest, earlier, oldest)))
    np.testing.assert_array_equal(start, latest)

    history = jnp.asarray(np.stack([basis(0.1 * (6 - i)) for i in range(6)]))  # steps t-1, ..., t-6
    bounced = gd_warm_start(history, jnp.asarray(True), "fitted")
    np.testing.assert_array_equal(bounced, fitted_extrapolation(history[1], history[3], history[5]))
    smooth = gd_warm_start(history, jnp.asarray(False), "fitted")
    np.testing.assert_array_equal(smooth, fitted_extrapolation(history[0], history[1], history[2]))


def test_gd_default_warm_start_costs_no_more_than_same_side_on_a_settled_orbit(tmp_path):
    """Deep matrix factorization at lr 0.077 (the leaderboard's): GD settles into an exact period-2
    orbit, so the same-side vectors X(t-2) already meet tol and the undamped extrapolation, which
    doubles their noise, costs ~1.3x more HVPs (it was the default before "fitted"). Replaying GD's
    iterates with GD's default start must cost no more than with the same-side start."""
    from eosflow.optim.gd import GDOptions
    from eosflow.spectrum import lobpcg, random_vectors
    from eosflow.tracker import gd_warm_start

    spec = {
        "name": "settled",
        "steps": 200,
        "lr": 0.077,
        "dtype": "float64",
        "processes": ["gd"],
        "problem": {"name": "matrix_factorization", "dim": 2, "depth": 3, "rank": 1, "target_scale": 5.5},
        "spectrum": {"every": 0},
        "record": {"chunk": 200, "params_every": 1},
    }
    eosflow.experiment.run(spec, tmp_path)
    params = np.asarray(eosflow.load_params(tmp_path, "gd")[1])
    objective = prepare(spec)[1].objective

    @jax.jit
    def measure(w, start):
        return lobpcg(jax.vmap(jax.linearize(objective.grad, w)[1], in_axes=1, out_axes=1), start, tol=1e-3)

    start_at = jax.jit(gd_warm_start, static_argnums=2)
    steps = np.diff(params, axis=0)
    hvps = {}
    for rule in ("same_side", GDOptions().warm_start):
        history = jnp.stack([random_vectors(jax.random.PRNGKey(0), params.shape[1], 2, params.dtype)] * 6)
        spent = []
        for t, w in enumerate(params[:-1]):
            bouncing = jnp.asarray(t >= 1 and np.vdot(steps[t], steps[t - 1]) < 0)
            pairs = measure(jnp.asarray(w), start_at(history, bouncing, rule))
            assert np.all(np.asarray(pairs.residuals) <= 1e-3)
            spent.append(int(pairs.hvps))
            history = jnp.concatenate([pairs.vectors[None], history[:-1]])
        hvps[rule] = np.mean(spent[100:])  # the settled orbit
    assert hvps[GDOptions().warm_start] <= 1.02 * hvps["same_side"], hvps


class _PermutedMLP(eqx.Module):
    """An Equinox model with fields that are not parameters: a function, an integer buffer, a float."""

    mlp: eqx.nn.MLP
    perm: jax.Array  # int32 (inputs,): the order the inputs are read in
    scale: float = eqx.field(static=True)

    def __call__(self, x):
        return self.scale * self.mlp(x[self.perm])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_equinox_module_is_measured_over_its_floating_arrays(seed):
    """tracker.update(state, model, batch) with the module itself: the top pairs (and those of P^-1/2 H P^-1/2,
    P shaped like the module) equal dense eigh of the Hessian over jax.flatten_util's flattening of the
    module's floating arrays, and HessianOperator.from_function on the module is that Hessian."""
    from jax.flatten_util import ravel_pytree

    rng = np.random.default_rng(seed)
    n_in, width, n = int(rng.integers(3, 6)), int(rng.integers(4, 9)), int(rng.integers(20, 40))
    with precision("float64"):
        key = jax.random.PRNGKey(seed)
        mlp = eqx.nn.MLP(n_in, 2, width, 2, activation=jnp.tanh, key=key)
        mlp = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, mlp)
        model = _PermutedMLP(mlp, jnp.asarray(rng.permutation(n_in), jnp.int32), float(rng.uniform(0.5, 2)))
        batch = (jnp.asarray(rng.normal(size=(n, n_in))), jnp.asarray(rng.normal(size=(n, 2))))

        def loss(m, batch):
            return jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)

        arrays, rest = eqx.partition(model, eqx.is_inexact_array)
        flat, unflatten = ravel_pytree(arrays)
        dense = np.asarray(jax.jit(jax.hessian(lambda w: loss(eqx.combine(unflatten(w), rest), batch)))(flat))
        tracker = eosflow.SharpnessTracker(loss, k=2, tol=1e-9, max_iters=200)
        state = tracker.init(model, key)
        state, pairs = eqx.filter_jit(tracker.update)(state, model, batch)
        np.testing.assert_allclose(pairs.values, dense_top(dense, 2), rtol=1e-9)
        for value, vector in zip(pairs.values, np.asarray(pairs.vectors).T):  # the module's flattening order
            np.testing.assert_allclose(dense @ vector, value * vector, atol=1e-7 * abs(float(value)))
        # where each eigenvector lives, leaf by leaf: dense eigh's vectors put back into the module by ravel_pytree
        shares = eosflow.tracker.parameter_shares(pairs, model)
        _, vectors = np.linalg.eigh(dense)
        for i in range(2):
            leaves = jax.tree_util.tree_flatten_with_path(unflatten(jnp.asarray(vectors[:, -1 - i])))[0]
            expected = {jax.tree_util.keystr(path): float(jnp.sum(leaf**2)) for path, leaf in leaves}
            assert list(shares) == list(expected) and ".mlp.layers[0].weight" in shares
            np.testing.assert_allclose([shares[name][i] for name in expected], list(expected.values()), atol=1e-8)
            assert sum(share[i] for share in shares.values()) == pytest.approx(1.0, abs=1e-12)
        with pytest.raises(ValueError, match="the measured parameters have"):
            eosflow.tracker.parameter_shares(pairs.vectors[1:], model)
        with pytest.raises(TypeError, match="parameter_shares: eig must be the eigenpairs .* got NoneType"):
            eosflow.tracker.parameter_shares(None, model)

        diagonal = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 2, a.shape)), arrays)
        preconditioner = eqx.combine(diagonal, rest)  # shaped like the module, as an optax state over it
        scale = 1 / np.sqrt(np.asarray(ravel_pytree(diagonal)[0]))
        _, pairs = eqx.filter_jit(tracker.update)(state, model, batch, preconditioner)
        np.testing.assert_allclose(pairs.values, dense_top(scale[:, None] * dense * scale[None, :], 2), rtol=1e-9)

        operator = eosflow.HessianOperator.from_function(loss, model, batch)
        np.testing.assert_allclose(operator @ np.eye(flat.size), dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("custom", [False, True])
def test_a_typed_prng_key_in_the_batch_is_measured(custom):
    """A loss drawing a dropout mask from a `jax.random.key` in its batch, through an operation that returns a
    key (a typed key, whose dtype is no NumPy dtype: the half-precision scan failed on it): the tracker's top 2
    and HessianOperator equal the dense Hessian of the same fixed-mask loss, with a plain tanh and with a
    custom_vjp one (the reverse-mode chain)."""
    from jax.flatten_util import ravel_pytree

    rng = np.random.default_rng(7)
    with precision("float64"):
        x, y = jnp.asarray(rng.normal(size=(30, 4))), jnp.asarray(rng.normal(size=(30, 1)))
        params = {"a": jnp.asarray(rng.normal(size=(4, 8))) / 2, "b": jnp.asarray(rng.normal(size=(8, 1))) / 3}
        activation = user_models.swish if custom else jnp.tanh

        def loss(p, batch):
            x, y, key = batch
            h = activation(x @ p["a"])
            key = jax.random.fold_in(key, 1)  # an operation whose output is a key (as a Flax NNX RNG stream's)
            mask = jax.random.bernoulli(key, 0.8, h.shape)
            return jnp.mean((jnp.where(mask, h / 0.8, 0.0) @ p["b"] - y) ** 2)

        batch = (x, y, jax.random.key(3))
        flat, unflatten = ravel_pytree(params)
        # reverse over reverse: JAX takes no forward-mode derivative of a custom_vjp function
        dense = np.asarray(jax.jit(jax.jacrev(jax.jacrev(lambda w: loss(unflatten(w), batch))))(flat))
        tracker = eosflow.SharpnessTracker(loss, k=2, tol=1e-9, max_iters=200)
        _, pairs = jax.jit(tracker.update)(tracker.init(params, jax.random.key(0)), params, batch)
        np.testing.assert_allclose(pairs.values, dense_top(dense, 2), rtol=1e-9)
        operator = eosflow.HessianOperator.from_function(loss, params, batch)
        np.testing.assert_allclose(operator @ np.eye(flat.size), dense, rtol=1e-10, atol=1e-12)


def test_a_preconditioner_not_shaped_like_the_parameters_is_refused():
    """P's diagonal must be shaped like the parameters (leaf for leaf, in order) or be one vector of their size:
    the same leaves permuted, of the same total size, would pair P's entries with the wrong parameters, so they
    are refused naming both shapes; the flat vector and the matching pytree give dense eigh's top pair."""
    rng = np.random.default_rng(3)
    with precision("float64"):
        params = {"a": jnp.asarray(rng.normal(size=(4, 8))) / 2, "b": jnp.asarray(rng.normal(size=(8, 1))) / 3}
        x = jnp.asarray(rng.normal(size=(20, 4)))

        def loss(p, x):
            return jnp.mean(jnp.tanh(x @ p["a"]) @ p["b"]) ** 2

        diagonal = {"a": jnp.asarray(rng.uniform(0.5, 2, (4, 8))), "b": jnp.asarray(rng.uniform(0.5, 2, (8, 1)))}
        flat_p = np.concatenate([np.ravel(diagonal["a"]), np.ravel(diagonal["b"])])
        dense = np.asarray(
            jax.jit(jax.hessian(lambda w: loss({"a": w[:32].reshape(4, 8), "b": w[32:].reshape(8, 1)}, x)))(
                jnp.concatenate([params["a"].ravel(), params["b"].ravel()])
            )
        )
        expected = dense_top(dense / np.sqrt(flat_p)[:, None] / np.sqrt(flat_p)[None, :], 1)
        tracker = eosflow.SharpnessTracker(loss, k=1, tol=1e-10, max_iters=200)
        state = tracker.init(params, jax.random.key(0))
        for good in (diagonal, jnp.asarray(flat_p)):
            _, pairs = tracker.update(state, params, x, good)
            np.testing.assert_allclose(pairs.values, expected, rtol=1e-9)
        for bad, shapes in [
            ((diagonal["b"], diagonal["a"]), r"\[\(8, 1\), \(4, 8\)\]"),
            (jnp.ones(39), r"\[\(39,\)\]"),
        ]:
            with pytest.raises(
                ValueError, match=r"preconditioner's leaves have shapes " + shapes + r", the parameters'"
            ):
                tracker.update(state, params, x, bad)


@pytest.mark.parametrize("seed", [0, 1])
def test_wrt_measures_the_part_a_filter_spec_selects(seed):
    """wrt as eqx.partition takes it: the last layer of an Equinox MLP (a pytree of bools), and the leaf "b" of a
    plain dict (a dict of bools); the top pairs equal dense eigh of the Hessian over that part alone, the rest
    held at its value, for the tracker under filter_jit, HessianOperator and batch sharpness."""
    from jax.flatten_util import ravel_pytree

    rng = np.random.default_rng(seed)
    n_in, n = int(rng.integers(3, 6)), int(rng.integers(20, 40))
    with precision("float64"):
        mlp = eqx.nn.MLP(n_in, 2, 5, 2, activation=jnp.tanh, key=jax.random.PRNGKey(seed))
        mlp = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, mlp)
        last = jax.tree.map(lambda _: False, mlp)
        last = eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), last, replace=(True, True))
        plain = {"a": jnp.asarray(rng.normal(size=(n_in, 4))), "b": jnp.asarray(rng.normal(size=(4, 2)))}
        batch = (jnp.asarray(rng.normal(size=(n, n_in))), jnp.asarray(rng.normal(size=(n, 2))))

        def loss_mlp(m, batch):
            return jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)

        def loss_plain(p, batch):
            return jnp.mean((jnp.tanh(batch[0] @ p["a"]) @ p["b"] - batch[1]) ** 2)

        for params, wrt, loss in [(mlp, last, loss_mlp), (plain, {"a": False, "b": True}, loss_plain)]:
            part, rest = eqx.partition(params, wrt)
            flat, unflatten = ravel_pytree(part)
            assert flat.size < ravel_pytree(eqx.filter(params, eqx.is_inexact_array))[0].size

            def on_flat(w, loss=loss, rest=rest, unflatten=unflatten):
                return loss(eqx.combine(unflatten(w), rest), batch)

            dense = np.asarray(jax.jit(jax.hessian(on_flat))(flat))
            tracker = eosflow.SharpnessTracker(loss, k=2, tol=1e-9, max_iters=200, wrt=wrt)
            state = tracker.init(params, jax.random.PRNGKey(seed))
            _, pairs = eqx.filter_jit(tracker.update)(state, params, batch)
            np.testing.assert_allclose(pairs.values, dense_top(dense, 2), rtol=1e-9)
            operator = eosflow.HessianOperator.from_function(loss, params, batch, wrt=wrt)
            np.testing.assert_allclose(operator @ np.eye(flat.size), dense, rtol=1e-10, atol=1e-12)
            value, _ = eosflow.batch_sharpness.batch_sharpness(loss, params, [batch], wrt=wrt)
            g = np.asarray(jax.grad(on_flat)(flat))
            assert float(value) == pytest.approx(g @ dense @ g / (g @ g), rel=1e-10)
            problem = eosflow.Problem.from_function(lambda p, loss=loss: loss(p, batch), params, wrt=wrt)
            np.testing.assert_array_equal(problem.w0, flat)
            np.testing.assert_allclose(problem.objective.hvp(flat, jnp.eye(flat.size)[-1]), dense[-1], rtol=1e-10)
        with pytest.raises(ValueError, match="selects no array"):
            eosflow.SharpnessTracker(loss_plain, k=1, wrt={"a": False, "b": False}).init(plain, jax.random.PRNGKey(0))
        # a key left out: before, JAX's "pytree structure error" named neither wrt nor what it should be
        for build in (
            lambda: eosflow.SharpnessTracker(loss_plain, k=1, wrt={"b": True}).init(plain, jax.random.PRNGKey(0)),
            lambda: eosflow.Problem.from_function(lambda p: loss_plain(p, batch), plain, wrt={"b": True}),
        ):
            with pytest.raises(ValueError, match=r"wrt = \{'b': True\} is not a filter spec of the parameters.*\ba\b"):
                build()


@pytest.mark.parametrize(
    "edge, transform, changed, threshold",
    [
        ("adam", optax.inject_hyperparams(optax.adam), {"b1": 0.5}, lambda lr: 2 * 1.5 / (0.5 * lr)),
        ("sgd", optax.inject_hyperparams(optax.sgd), {"momentum": 0.5}, lambda lr: 2 * 1.5 / lr),
        ("rmsprop", optax.inject_hyperparams(optax.rmsprop), {"momentum": 0.5}, lambda lr: 2 * 1.5 / lr),
        (
            "adamw",
            optax.inject_hyperparams(optax.adamw),
            {"weight_decay": 5.0},
            lambda lr: 2 * 1.9 * (1 - lr * 5.0 / 2) / (0.1 * lr),
        ),
    ],
)
def test_monitor_reads_the_injected_betas_momentum_and_weight_decay(edge, transform, changed, threshold):
    """An ``inject_hyperparams`` optimizer whose b1 / momentum / weight decay is changed in its state: the threshold
    of every later reading is the closed form at the state's value (the constructor's was kept before: Adam at
    b1 = 0.5 read 38/lr instead of 6/lr). The closed forms are where optax's own iteration loses stability
    (test_adamw_threshold_is_where_optaxs_own_iteration_loses_stability and the quadratic tests)."""
    lr, problem = 0.01, small_problem()
    settings = {"sgd": {"momentum": 0.9}, "rmsprop": {"momentum": 0.9}}.get(edge, {})
    optimizer = getattr(optimizer_edges, edge)(lr, **settings)._replace(
        transform=transform(learning_rate=lr, **settings)
    )

    def loss(params, batch):
        return user_models.log_cosh(user_models.apply(params, batch[0]), batch[1])

    opt = monitored(optimizer, loss, every=1, log=None)
    params, batch = problem.objective.unravel(problem.w0), problem.objective.data
    state = opt.init(params)
    before = None
    for t in range(4):
        if t == 2:
            state.inner.hyperparams.update({key: jnp.asarray(value) for key, value in changed.items()})
        updates, state = opt.update(jax.grad(loss)(params, batch), state, params, batch=batch)
        params = optax.apply_updates(params, updates)
        read = float(state.reading.sharpness) / float(state.reading.edge_ratio)
        before = read if t == 1 else before
    assert read == pytest.approx(threshold(lr), rel=1e-6)
    assert before == pytest.approx(optimizer.threshold, rel=1e-6) and abs(before / read - 1) > 0.01


def test_monitor_passes_extra_arguments_to_the_inner_transform():
    """``update(..., value=loss)`` reaches a transform that needs it (optax.contrib.reduce_on_plateau): the updates
    are plain optax's (it raised a TypeError from inside optax before)."""
    problem = small_problem()
    chain = optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=1, factor=0.5))
    opt = monitored(optimizer_edges.sgd(0.1)._replace(transform=chain), lambda p: loss_of(problem, p), log=None)
    params = problem.objective.unravel(problem.w0)
    state, plain = opt.init(params), chain.init(params)
    for _ in range(6):
        value, grads = jax.value_and_grad(lambda p: loss_of(problem, p))(params)
        updates, state = opt.update(grads, state, params, value=value)
        expected, plain = chain.update(grads, plain, params, value=value)
        np.testing.assert_array_equal(ravel_flat(updates), ravel_flat(expected))
        params = optax.apply_updates(params, updates)


def loss_of(problem, params):
    return problem.objective.value(ravel_flat(params))


def test_a_multi_transform_and_a_centered_state_are_named():
    """Two refusals a probe found unclear: monitored() of an optax.multi_transform (moments only under one label)
    named two lists of shapes; a centered RMSProp's state given to the uncentered reader named a tuple."""
    problem = small_problem()
    params = problem.objective.unravel(problem.w0)
    names = list(params)
    labels = {name: "adam" if i == 0 else "sgd" for i, name in enumerate(names)}
    multi = optax.multi_transform({"adam": optax.adam(0.01), "sgd": optax.sgd(0.01)}, labels)
    opt = monitored(optimizer_edges.adam(0.01)._replace(transform=multi), lambda p: loss_of(problem, p), log=None)
    grads = jax.grad(lambda p: loss_of(problem, p))(params)
    with pytest.raises(ValueError, match=r"Fewer leaves: an optax.multi_transform .* wrt=its labels as booleans"):
        opt.update(grads, opt.init(params), params)
    centered = optax.rmsprop(0.01, centered=True)
    _, state = centered.update(grads, centered.init(params), params)
    with pytest.raises(ValueError, match=r"a centered RMSProp's: optimizer_edges.rmsprop\(\.\.\., centered=True\)"):
        optimizer_edges.rmsprop(0.01).preconditioner(state)


def test_an_eager_update_compiles_once_and_measures_as_under_jit():
    """tracker.update called outside jax.jit (as the module docstring and docs/monitor.md's first bullet do) was
    traced and compiled again at every call, skipped ones too (0.7-1.4 s a call on the docs' MLP, from a probe):
    its lax.cond and LOBPCG's while_loop are keyed on closures made per call. Now an eager call runs a program
    kept per tracker: the loss is traced for the first call of each kind only, and the readings are jit's."""
    traces = []
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 3)))

    def loss(p, x):
        traces.append(1)  # a Python side effect: runs when the loss is traced, never when a program runs
        return jnp.mean(jnp.tanh(x @ p["a"]) @ p["b"]) ** 2

    params = {"a": jnp.ones((3, 5)) / 2, "b": jnp.linspace(-1, 1, 5)}
    tracker = eosflow.SharpnessTracker(loss, k=1, tol=1e-4, every=2)
    state = eager = tracker.init(params, jax.random.key(0))
    jitted = jax.jit(tracker.update)
    counts = []
    for step in range(6):
        params = jax.tree_util.tree_map(lambda leaf, s=step: leaf * (1 + 0.01 * s), params)
        eager, pairs = tracker.update(eager, params, x)
        state, expected = jitted(state, params, x)
        counts.append(len(traces))
        np.testing.assert_allclose(pairs.values, expected.values, rtol=1e-6)
    assert counts[2:] == [counts[1]] * 4, counts  # no trace after the first call and the first jitted one


def test_a_skipped_update_does_not_flatten_the_preconditioner():
    """P was flattened (a concatenate of its leaves) on every update, skipped ones included: fused with the Adam
    update that made P, that concatenate took 32 ms a step of a 301k-parameter MLP and made a monitored Adam step
    5.8 times the plain one with no measurement due (from a probe). In the program, P's leaves may now go only into
    the measurement's branch of the cond."""
    params = {"a": jnp.ones((3, 5)), "b": jnp.ones(5)}
    preconditioner = {"a": jnp.full((3, 5), 2.0), "b": jnp.full(5, 3.0)}
    tracker = eosflow.SharpnessTracker(lambda p, x: jnp.mean(jnp.tanh(x @ p["a"]) @ p["b"]) ** 2, k=1, every=3)
    state = tracker.init(params, jax.random.key(0))
    x = jnp.ones((4, 3))
    closed = jax.make_jaxpr(lambda state, params, x, p: tracker.update(state, params, x, p))(
        state, params, x, preconditioner
    )
    inputs = closed.jaxpr.invars[-len(jax.tree_util.tree_leaves(preconditioner)) :]
    users = [eqn.primitive.name for eqn in closed.jaxpr.eqns if any(v in inputs for v in eqn.invars)]
    assert users == ["cond"], users


def test_an_eager_preconditioner_compiles_nothing_per_step_and_reads_as_under_jit(caplog):
    """adam.preconditioner(opt_state) read outside jit (docs/monitor.md's loop without an optax wrapper): its
    1 - b2^t was jnp's eager ``b2 ** count``, an integer_pow specialized on the count's value, so every step
    compiled a new program (2 compilations and ~58 ms a step in a probe), and its digits were not those of the
    jitted step's pow. Now it is the jitted step's program, compiled once."""
    params = {"w": jnp.linspace(0.5, 1.5, 6)}
    adam = optimizer_edges.adam(1e-2)
    state = adam.transform.init(params)
    jitted = jax.jit(lambda count: optimizer_edges.bias_correction(count, 0.999))
    for step in range(6):
        _, state = adam.transform.update({"w": jnp.sin(params["w"] * (step + 1))}, state, params)
        count = optimizer_edges.substate(state, lambda s: isinstance(s, optax.ScaleByAdamState)).count
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level("WARNING", logger="jax"):
            eager = optimizer_edges.bias_correction(count, 0.999)
            adam.preconditioner(state)
        if step >= 2:  # its first call compiles once
            assert not [r for r in caplog.records if "compil" in r.getMessage().lower()], step
        assert np.asarray(eager).tobytes() == np.asarray(jitted(count)).tobytes(), step
