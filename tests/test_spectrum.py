"""Eigensolvers against the dense float64 oracle (numpy.linalg.eigh of the full Hessian)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eosflow
from eosflow.problems import build_problem
from eosflow.spectrum import (
    dense_hessian,
    dense_top_eigenpairs,
    grow_tracked,
    hessian_eigenpairs,
    lanczos,
    lobpcg,
    power_iteration,
    power_step,
    random_vectors,
    unmeasured,
)


def _cases():
    quad = build_problem({"name": "quadratic", "eigenvalues": [9.0, 7.0, 6.5, 3.0, 1.0, -2.0, 0.5]}, 0, "float64")[0]
    yield "quadratic", quad.objective, quad.w0
    quart = build_problem({"name": "quartic", "dim": 12, "sharpness": 5.0, "init": 0.7}, 0, "float64")[0]
    yield "quartic", quart.objective, quart.w0
    mlp = build_problem({"name": "mlp", "width": 16, "n_train": 100, "n_test": 0}, 0, "float64")[0]
    w = mlp.w0 + 0.05 * jax.random.normal(jax.random.PRNGKey(0), mlp.w0.shape, jnp.float64)
    yield "mlp", mlp.objective, w


CASES = {name: (obj, w) for name, obj, w in _cases()}


@pytest.mark.parametrize("name", list(CASES))
def test_lobpcg_top3_matches_dense_eigh(name):
    objective, w = CASES[name]
    oracle = dense_top_eigenpairs(objective, w, k=3)
    start = random_vectors(jax.random.PRNGKey(1), w.size, 3, jnp.float64)
    pairs = jax.jit(lambda w, v: hessian_eigenpairs(objective, w, v, tol=1e-8, max_iters=500))(w, start)
    np.testing.assert_allclose(pairs.values, oracle.values, rtol=1e-6)
    assert np.all(pairs.residuals <= 1e-8)
    # eigenvectors up to sign, for well-separated eigenvalues
    overlap = np.abs(np.sum(np.asarray(pairs.vectors) * oracle.vectors, axis=0))
    gaps = np.abs(np.diff(np.concatenate([oracle.values, [dense_top_eigenpairs(objective, w, 4).values[-1]]])))
    separated = np.minimum(gaps[:3], np.concatenate([[np.inf], gaps[:2]])) > 1e-3 * abs(oracle.values[0])
    np.testing.assert_allclose(overlap[separated], 1.0, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_lanczos_matches_dense_eigh(name):
    objective, w = CASES[name]
    oracle = dense_top_eigenpairs(objective, w, k=3)
    pairs = lanczos(objective, w, k=3, tol=1e-12)
    np.testing.assert_allclose(pairs.values, oracle.values, rtol=1e-6)


def test_lobpcg_relative_residual_contract_and_warm_start():
    rng = np.random.default_rng(3)
    d = 200
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    values = np.concatenate([[50.0, 40.0], rng.uniform(-5, 10, d - 2)])
    a = jnp.asarray(q @ np.diag(values) @ q.T)

    def matvec(v):
        return a @ v

    cold = lobpcg(matvec, random_vectors(jax.random.PRNGKey(0), d, 2, jnp.float64), tol=1e-3)
    residual = np.linalg.norm(a @ cold.vectors - cold.vectors * cold.values, axis=0) / np.abs(cold.values)
    assert np.all(residual <= 1e-3)
    assert np.all(np.abs(np.asarray(cold.values) - np.array([50.0, 40.0])) / 50 < 1e-5)
    # a warm start at the converged vectors needs a single block product
    warm = lobpcg(matvec, cold.vectors, tol=1e-3)
    assert int(warm.hvps) == 2
    np.testing.assert_allclose(warm.values, cold.values, rtol=1e-10)


def test_power_iteration_underestimates_at_loose_tolerance_but_converges_tight():
    objective, w = CASES["quadratic"]
    tight = power_iteration(objective, w, tol=1e-12, max_iters=2000)
    assert abs(tight.values[0] - 9.0) < 1e-6


def test_tracker_grows_only_when_all_tracked_values_exceed_threshold():
    v = random_vectors(jax.random.PRNGKey(0), 10, 2, jnp.float64)
    same = grow_tracked(v, np.array([5.0, 1.0]), 2.0, 4, jax.random.PRNGKey(1))
    assert same.shape == (10, 2)
    grown = grow_tracked(v, np.array([5.0, 3.0]), 2.0, 4, jax.random.PRNGKey(1))
    assert grown.shape == (10, 3)
    np.testing.assert_allclose(grown.T @ grown, np.eye(3), atol=1e-12)
    capped = grow_tracked(grown, np.array([5.0, 3.0, 2.5]), 2.0, 3, jax.random.PRNGKey(1))
    assert capped.shape == (10, 3)


def test_tracking_more_eigenpairs_than_dimensions_is_capped():
    objective, w = CASES["quadratic"]  # d = 7
    v = random_vectors(jax.random.PRNGKey(0), 7, 9, jnp.float64)
    assert v.shape == (7, 7)
    pairs = hessian_eigenpairs(objective, w, v, tol=1e-10, max_iters=50)
    np.testing.assert_allclose(
        np.sort(np.asarray(pairs.values)), np.sort([9.0, 7.0, 6.5, 3.0, 1.0, -2.0, 0.5]), atol=1e-8
    )
    assert grow_tracked(v, np.full(7, 100.0), 1.0, 10, jax.random.PRNGKey(1)).shape == (7, 7)


def test_grow_every_grows_the_tracked_eigenspace_within_a_chunk(tmp_path):
    """Spectrum 20, 18, 16, 1 at lr = 0.09 (lr lambda = 1.8, 1.62, 1.44, 0.09; threshold 1.5): the
    tracker grows to k = 3, keeping 16 as its sentinel. With one 40-step chunk it can only grow
    after the chunk; with grow_every = 5 it measures 18 and 16 (dense eigh) within the chunk, and
    GD's iterates are the same either way."""
    from eosflow.experiment import run

    eigenvalues = [20.0, 18.0, 16.0, 1.0]
    runs = {}
    for grow_every in (0, 5):
        spec = {
            "name": "grow",
            "steps": 40,
            "lr": 0.09,
            "dtype": "float64",
            "problem": {"name": "quadratic", "eigenvalues": eigenvalues},
            "processes": ["gd"],
            "spectrum": {"k": 1, "k_max": 4, "grow_every": grow_every, "tol": 1e-8, "max_iters": 50},
            "record": {"chunk": 40},
        }
        run(spec, tmp_path / str(grow_every))
        runs[grow_every] = eosflow.load(tmp_path / str(grow_every)).sel(process="gd")
    assert np.all(np.isnan(runs[0]["eigenvalues"].values[:, 1]))
    measured = runs[5]["eigenvalues"].values
    np.testing.assert_allclose(measured[20:, :3], np.broadcast_to(eigenvalues[:3], (20, 3)), rtol=1e-6)
    assert np.isfinite(measured[10:, 1]).all() and np.isnan(measured[:5, 1]).all()
    np.testing.assert_array_equal(runs[5]["loss"].values, runs[0]["loss"].values)


def _clustered(rng, d, top, bulk_top):
    """A random symmetric d x d matrix with eigenvalues ``top`` above a bulk uniform in [-1, bulk_top]."""
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    values = np.concatenate([top, rng.uniform(-1.0, bulk_top, d - len(top))])
    return q @ np.diag(values) @ q.T, np.sort(values)[::-1]


@pytest.mark.parametrize("d, gap, guard", [(60, 1e-1, 0), (300, 1e-3, 1), (800, 1e-4, 2)])
def test_every_pair_reported_converged_is_converged_on_clustered_spectra(d, gap, guard):
    """Sweep sizes, cluster gaps, k, tol and guards, warm starts near and far: whatever LOBPCG
    reports with a residual <= tol has a true float64 residual <= tol, an eigenvalue of A within
    |r| |theta|, and Ritz values are lower bounds of the top eigenvalues (Cauchy interlacing)."""
    rng = np.random.default_rng(d)
    top = 10.0 * (1.0 - gap * np.arange(4))  # a cluster of 4 at relative spacing ``gap``
    a, exact = _clustered(rng, d, top, 9.0 * (1 - 4 * gap))
    exact_vectors = np.linalg.eigh(a)[1][:, ::-1]
    # tol is traced: one compilation per k
    solve = jax.jit(lambda a, start, tol: lobpcg(lambda v: a @ v, start, tol=tol, max_iters=40, guard=guard))
    for k in (1, 2, 3):
        for tol in (1e-2, 1e-4, 1e-7):
            for noise in (1e-3, 1e-1, 10.0):
                start = exact_vectors[:, :k] + noise * rng.standard_normal((d, k))
                pairs = solve(jnp.asarray(a), jnp.asarray(start), tol)
                values, vectors = np.asarray(pairs.values), np.asarray(pairs.vectors)
                true = np.linalg.norm(a @ vectors - vectors * values, axis=0) / np.abs(values)
                reported = np.asarray(pairs.residuals)
                np.testing.assert_allclose(true, reported, rtol=1e-6, atol=1e-12)
                converged = reported <= tol
                assert np.all(true[converged] <= tol * (1 + 1e-6))
                nearest = np.min(np.abs(values[:, None] - exact[None, :]), axis=1)
                assert np.all(nearest <= true * np.abs(values) * (1 + 1e-6) + 1e-12)
                assert np.all(values <= exact[:k] + 1e-10)


def test_soft_locking_multiplies_only_the_unconverged_residuals():
    """Two exact eigenvectors and a rough third: after the first block product (3 HVPs) each
    iteration costs one HVP, for the one unconverged pair (the guard costs none)."""
    rng = np.random.default_rng(0)
    a, _ = _clustered(rng, 100, [10.0, 9.0, 8.0], 5.0)
    vectors = np.linalg.eigh(a)[1][:, ::-1][:, :3]
    start = vectors + np.concatenate([np.zeros((100, 2)), 0.3 * rng.standard_normal((100, 1))], axis=1)
    solve = jax.jit(lambda a, start, iterations: lobpcg(lambda v: a @ v, start, tol=1e-13, max_iters=iterations))
    for iterations in (1, 2, 3):
        pairs = solve(jnp.asarray(a), jnp.asarray(start), iterations)
        assert int(pairs.hvps) == 3 + iterations
        assert np.all(np.asarray(pairs.residuals)[:2] <= 1e-13) and pairs.residuals[2] > 1e-13


def test_gd_warm_started_at_the_edge_measures_the_dense_eigenvalues_and_leaves_gd_unchanged(tmp_path):
    """GD at the edge of stability on a small MLP (float64): the tracked eigenvalues match dense eigh
    at every 5th step within the residual bound, and GD's iterates are those of a run without
    measurement (spectrum.every = 0), bit for bit."""
    from eosflow.experiment import prepare, run

    base = {
        "steps": 60,
        "lr": 1.2,
        "dtype": "float64",
        "processes": ["gd"],
        "problem": {"name": "mlp", "width": 8, "n_train": 60, "n_test": 0},
        "record": {"chunk": 60, "params_every": 5},
    }
    runs = {}
    for every in (1, 0):
        spectrum = {"every": every, "k": 2, "k_max": 2, "tol": 1e-6, "max_iters": 200}
        spec = {**base, "name": str(every), "spectrum": spectrum}
        run(spec, tmp_path / str(every))
        runs[every] = eosflow.load(tmp_path / str(every)).sel(process="gd")
    np.testing.assert_array_equal(runs[1]["loss"].values, runs[0]["loss"].values)
    measured = runs[1]
    assert np.nanmax(measured["lr_sharpness"].values) > 1.9  # it reaches the edge of stability
    assert np.all(measured["residual"].values <= 1e-6)
    steps, params = eosflow.load_params(tmp_path / "1", "gd")
    objective = prepare({**base, "spectrum": {"k": 2}})[1].objective
    for t, w in zip(steps, params):
        oracle = dense_top_eigenpairs(objective, jnp.asarray(w), k=2).values
        np.testing.assert_allclose(measured["eigenvalues"].values[t, :2], oracle, rtol=1e-5)


def test_spectrum_guard_reaches_the_solver():
    """`[spectrum] guard` is the solver's, for H and for an adaptive optimizer's P^{-1/2} H P^{-1/2}: a
    run's measurement spends what LOBPCG with that guard spends (no guard: more iterations on the
    quadratic's 7 / 6.5 gap), matches dense eigh and records the solver's HVPs and its residual."""
    from eosflow.optim.adaptive import preconditioned_row
    from eosflow.spec import SpectrumSpec
    from eosflow.spectrum import tracked_row, value_grad_and_tracked

    objective, w = CASES["quadratic"]
    start = random_vectors(jax.random.PRNGKey(1), w.size, 2, w.dtype)
    p = jnp.linspace(0.8, 1.2, w.size)  # a diagonal preconditioner that keeps a small gap at the top
    scale = 1 / np.sqrt(np.asarray(p))
    preconditioned = np.linalg.eigvalsh(scale[:, None] * np.asarray(dense_hessian(objective, w)) * scale)[::-1][:2]

    def measured(spectrum, scale=None):
        return value_grad_and_tracked(objective, w, start, jnp.asarray(0), spectrum, preconditioner=scale)[1]

    for measure, oracle in [
        (lambda spectrum: tracked_row(measured(spectrum), 1.0, spectrum), [9.0, 7.0]),
        (lambda spectrum: preconditioned_row(measured(spectrum, lambda g: p), 1.0, spectrum), None),
    ]:
        counts = []
        for guard in (0, 2):
            row = measure(SpectrumSpec(k=2, k_max=2, tol=1e-8, max_iters=100, guard=guard))
            np.testing.assert_allclose(np.asarray(row["eigenvalues"]), oracle or preconditioned, rtol=1e-10)
            assert int(row["measurement_hvps"]) == int(row["hvps"]) and float(row["residual"]) <= 1e-8
            counts.append(int(row["hvps"]))
        assert counts[0] > counts[1]


def _planted(rng, d, cluster_size, spacing, gap):
    """A symmetric d x d matrix: a cluster of ``cluster_size`` eigenvalues 10 (1 - spacing i), then
    two more at 10 (1 - gap) and 10 (1 - 2 gap), and a bulk uniform in [-1, 10 (1 - 3 gap)]."""
    top = np.concatenate([10.0 * (1.0 - spacing * np.arange(cluster_size)), 10.0 * (1.0 - gap * np.array([1.0, 2.0]))])
    return _clustered(rng, d, top, 10.0 * (1.0 - 3 * gap))[0]


@pytest.mark.parametrize("d, cluster_size, spacing", [(80, 2, 1e-2), (400, 4, 1e-5)])
def test_cluster_contract_bounds_the_invariant_subspace_against_dense_eigh(d, cluster_size, spacing):
    """With ``cluster``, on planted clusters (sizes, widths, k, tol, warm starts): the reported
    residuals and subspace residuals are the true float64 ones (the subspace residual, over the
    whole cluster in the block, is >= that of its reported members and >= each pair's own); a
    converged measurement has every pair within tol; the reported members' span is within
    ||R|| / delta of the cluster's invariant subspace (Davis-Kahan, delta the true gap) and the
    Ritz values within ||R||^2 / eta of the eigenvalues (Mathias's quadratic residual bound)."""
    rng = np.random.default_rng(d)
    gap = 0.05
    a = _planted(rng, d, cluster_size, spacing, gap)
    exact, exact_vectors = np.linalg.eigh(a)
    exact, exact_vectors = exact[::-1], exact_vectors[:, ::-1]
    inside = exact_vectors[:, :cluster_size]  # the planted cluster's invariant subspace
    solve = jax.jit(
        lambda a, start, tol: lobpcg(lambda v: a @ v, start, tol=tol, max_iters=60, guard=2, cluster=3 * spacing)
    )
    checked = {"equal": 0, "angle": 0}
    for k in (1, cluster_size, cluster_size + 1):
        for tol in (1e-3, 1e-7):
            for noise in (1e-3, 1e-1):
                start = exact_vectors[:, :k] + noise * rng.standard_normal((d, k))
                pairs = solve(jnp.asarray(a), jnp.asarray(start), tol)
                values, vectors = np.asarray(pairs.values), np.asarray(pairs.vectors)
                residual_vectors = a @ vectors - vectors * values
                true = np.linalg.norm(residual_vectors, axis=0) / np.abs(values)
                np.testing.assert_allclose(np.asarray(pairs.residuals), true, rtol=1e-6, atol=1e-12)
                subspace, ids = np.asarray(pairs.subspace_residuals), np.asarray(pairs.clusters)
                assert np.all(subspace >= true * (1 - 1e-6))
                if np.all(subspace <= tol):
                    assert np.all(true <= tol * (1 + 1e-6))
                for cluster in np.unique(ids):
                    members = ids == cluster
                    q, theta, r = vectors[:, members], values[members], residual_vectors[:, members]
                    dense = np.linalg.norm(r) / np.min(np.abs(theta))
                    assert dense <= subspace[members][0] * (1 + 1e-6) + 1e-12
                    if cluster < ids[-1]:  # the cluster ends before the last reported pair: all of it is reported
                        np.testing.assert_allclose(subspace[members], dense, rtol=1e-6, atol=1e-12)
                        checked["equal"] += 1
                    if theta.min() > exact[cluster_size] + 2 * 10 * gap / 3:  # a member of the planted cluster
                        delta = theta.min() - exact[cluster_size]  # to the rest of the spectrum
                        sine = np.linalg.norm(q - inside @ (inside.T @ q), ord=2)
                        assert sine <= np.linalg.norm(r, ord=2) / delta * (1 + 1e-6) + 1e-12
                        checked["angle"] += 1
                    # Mathias: in the basis [Q, Q_perp], A = [[Theta, E^T], [E, A_2]]; the ordered
                    # eigenvalues of A and of diag(Theta, A_2) differ by <= ||E||^2 / eta
                    complement = np.linalg.qr(np.concatenate([q, rng.standard_normal((d, d - q.shape[1]))], 1))[0]
                    complement = complement[:, q.shape[1] :]
                    rest = np.linalg.eigvalsh(complement.T @ a @ complement)
                    eta = np.min(np.abs(theta[:, None] - rest[None, :]))
                    split = np.sort(np.concatenate([theta, rest]))[::-1]
                    bound = np.linalg.norm(complement.T @ r, ord=2) ** 2 / eta
                    assert np.max(np.abs(split - exact)) <= bound * (1 + 1e-6) + 1e-10
    assert min(checked.values()) > 0


def test_without_cluster_each_pair_is_its_own_cluster():
    rng = np.random.default_rng(1)
    a = _planted(rng, 120, 3, 1e-3, 0.05)
    start = jnp.asarray(rng.standard_normal((120, 3)))
    pairs = jax.jit(lambda a, s: lobpcg(lambda v: a @ v, s, tol=1e-8, max_iters=100))(jnp.asarray(a), start)
    np.testing.assert_array_equal(np.asarray(pairs.clusters), [0, 1, 2])
    np.testing.assert_array_equal(np.asarray(pairs.subspace_residuals), np.asarray(pairs.residuals))
    with pytest.raises(ValueError, match="cluster is a relative gap"):
        lobpcg(lambda v: v, start, cluster=-0.1)
    with pytest.raises(ValueError, match="cluster must be in"):
        eosflow.SharpnessTracker(lambda w: jnp.sum(w**2), cluster=1.5)


@pytest.mark.parametrize("every", [0, 1, 3])
@pytest.mark.parametrize("preconditioned", [False, True])
def test_value_grad_and_tracked_against_value_and_grad_and_dense_eigh(every, preconditioned):
    """A discrete optimizer's (L, g) and measurement from one linearization: (L, g) are value_and_grad's (float64,
    1e-13), on a measured step the pairs are dense eigh's of H (or of P^{-1/2} H P^{-1/2}, P read off g) from the
    start read off (L, g), and on the other steps no HVP is spent and the carried vectors come back."""
    from eosflow.spec import SpectrumSpec
    from eosflow.spectrum import value_grad_and_tracked

    objective, w = CASES["quartic"]
    spectrum = SpectrumSpec(k=2, k_max=2, tol=1e-9, max_iters=300, every=every)
    carried = random_vectors(jax.random.PRNGKey(1), w.size, 2, w.dtype)
    loss, grad = objective.value_and_grad(w)
    scale = 1.0 + jnp.abs(grad) / jnp.max(jnp.abs(grad))  # P = 1 + |g| / max |g|, in [1, 2]
    hessian = np.asarray(dense_hessian(objective, w))
    if preconditioned:
        root = 1.0 / np.sqrt(np.asarray(scale))
        hessian = root[:, None] * hessian * root
    oracle = np.linalg.eigvalsh(hessian)[::-1][:2]

    def start(value):  # the carried vectors, rotated by the sign of the loss: a start that reads (L, g)
        return jnp.sign(value[0]) * carried

    def measure(step):
        return value_grad_and_tracked(
            objective,
            w,
            carried,
            step,
            spectrum,
            start=start,
            preconditioner=(lambda g: 1.0 + jnp.abs(g) / jnp.max(jnp.abs(g))) if preconditioned else None,
        )

    for step in range(4):
        (value, gradient), pairs = jax.jit(measure)(jnp.asarray(step))
        np.testing.assert_allclose(float(value), float(loss), rtol=1e-13)
        np.testing.assert_allclose(np.asarray(gradient), np.asarray(grad), rtol=1e-13, atol=1e-15)
        if every and step % every == 0:
            np.testing.assert_allclose(np.asarray(pairs.values), oracle, rtol=1e-8)
            assert int(pairs.hvps) > 0 and np.all(np.asarray(pairs.residuals) <= 1e-9)
        else:
            assert np.all(np.isnan(np.asarray(pairs.values))) and int(pairs.hvps) == 0
            np.testing.assert_array_equal(np.asarray(pairs.vectors), np.asarray(carried))


@pytest.mark.parametrize("process", ["gd", "momentum", "rmsprop", "adam", "nls", "sgd"])
def test_a_measured_step_evaluates_the_loss_no_more_often_than_an_unmeasured_one(process):
    """The gradient a discrete optimizer steps with is the primal of the linearization its eigensolver's HVPs come
    from: tracing one step that measures three pairs traces the model exactly as often as one that measures none
    (before, GD traced it twice: value_and_grad, then the gradient again for the HVPs)."""
    from eosflow.experiment import prepare

    traces = [0]

    def model(params, inputs):
        traces[0] += 1
        return jnp.tanh(inputs @ params["a"]) @ params["b"]

    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(3, 5)) / 2), "b": jnp.asarray(rng.normal(size=(5, 2)) / 2)}
    inputs, targets = jnp.asarray(rng.normal(size=(20, 3))), jnp.asarray(rng.normal(size=(20, 2)))
    problem = eosflow.Problem.from_model(model, params, inputs, targets)
    counts = []
    for spectrum in ({"every": 0}, {"k": 3, "k_max": 3, "every": 1}):
        table = {"lr": 0.1, "dtype": "float64", "steps": 1, "processes": [process], "spectrum": spectrum}
        options = {"sgd": {"batch_size": 4}} if process == "sgd" else {}
        stepper = prepare({**table, **options}, problem)[3][process]
        traces[0] = 0
        jax.make_jaxpr(stepper.step)(stepper.init(problem.w0))
        counts.append(traces[0])
    assert counts[1] == counts[0] > 0, counts


@pytest.mark.parametrize("d,k,guard", [(60, 1, 1), (200, 2, 1), (200, 3, 2)])
def test_lobpcg_returns_the_images_of_its_vectors_and_power_step_moves_them(d, k, guard):
    """``images`` = H v of the returned vectors (dense float64 product), at no HVP; :func:`power_step` is
    H v / |H v| with v's sign, so along each eigenvector its component is scaled by lambda_j / |H v| (dense
    eigh); unmeasured pairs are carried unchanged."""
    rng = np.random.default_rng(d + k)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    spectrum = np.concatenate([[12.0, 10.0, 9.0][:k], rng.uniform(-2.0, 6.0, d - k)])
    hessian = basis @ np.diag(spectrum) @ basis.T
    start = jnp.asarray(basis[:, :k] + 0.05 * rng.standard_normal((d, k)))
    pairs = lobpcg(lambda v: jnp.asarray(hessian) @ v, start, tol=1e-4, max_iters=200, guard=guard)
    v = np.asarray(pairs.vectors)
    np.testing.assert_allclose(np.asarray(pairs.images), hessian @ v, atol=1e-10 * np.abs(spectrum).max())
    moved = np.asarray(power_step(pairs))
    components, moved_components = basis.T @ v, basis.T @ moved
    np.testing.assert_allclose(
        moved_components, components * spectrum[:, None] / np.linalg.norm(hessian @ v, axis=0), atol=1e-12
    )
    assert np.all(np.sum(moved * v, axis=0) > 0)
    skipped = unmeasured(pairs.values, pairs.vectors, pairs.residuals)
    np.testing.assert_array_equal(np.asarray(power_step(skipped)), v)


def _nan_hessian_at(c):
    """L(w) = sum_i a_i w_i^2 / 2 + h(w_0), h(x) = x^2 / 2, whose gradient is finite everywhere and whose Hessian-vector
    products are NaN where w_0 == c (a custom derivative of h' = x): a measurement at that one step is not finite."""

    @jax.custom_jvp
    def slope(x):
        return x

    @slope.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        return x, t * jnp.where(x == c, jnp.nan, 1.0)

    @jax.custom_jvp
    def h(x):
        return 0.5 * x**2

    @h.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        return h(x), slope(x) * t

    a = jnp.asarray([3.0, 2.0, 1.0, 0.5])
    return lambda w: 0.5 * jnp.sum(a * w**2) + h(w[0])


@pytest.mark.parametrize("process,carry", [("gd", "ritz"), ("gd", "power"), ("adam", "power")])
def test_a_measurement_that_is_not_finite_is_not_carried_into_the_next(process, carry, tmp_path):
    """A problem whose Hessian-vector products are NaN at one step of the optimizer's own trajectory (step 3; its
    gradients stay finite, so the iterates are the same): that step's eigenvalues are NaN, and every later step's
    are those of the run without the NaN, to the tolerance (k = 2). Before, the NaN Ritz vectors were carried and
    every later measurement was NaN."""
    from eosflow.load import load_params

    w0, spectrum = jnp.ones(4, jnp.float64), {"k": 2, "k_max": 2, "carry": carry, "tol": 1e-8, "max_iters": 100}
    options = {"lr": 0.02 if process == "adam" else 0.3, "steps": 8, "processes": [process], "spectrum": spectrum}
    plain = eosflow.simulate(
        eosflow.Problem.from_function(_nan_hessian_at(jnp.inf), w0), record={"params_every": 1}, out=tmp_path, **options
    )
    c = load_params(tmp_path, process)[1][3, 0]
    ds = eosflow.simulate(eosflow.Problem.from_function(_nan_hessian_at(c), w0), **options)
    clean, read = plain.eigenvalues.sel(process=process).values, ds.eigenvalues.sel(process=process).values
    assert np.array_equal(ds.loss.values, plain.loss.values)
    assert np.isnan(read[3]).all() and np.isfinite(np.delete(read, 3, axis=0)).all()
    np.testing.assert_allclose(np.delete(read, 3, axis=0), np.delete(clean, 3, axis=0), rtol=1e-10)


@pytest.mark.parametrize("process,lr", [("gd", 0.5), ("gd", 0.85), ("adam", 0.01), ("nls", 0.05)])
def test_the_power_carry_leaves_the_iterates_alone_and_meets_the_contract(process, lr):
    """``spectrum.carry = "power"`` on a tiny float64 MLP: the iterates, losses and rows other than the
    measurement's are bitwise those of the Ritz carry (a measurement never feeds back), and every measured top-3
    eigenvalue of GD and the line search is dense eigh's to the tolerance's square (a start changes nothing
    the contract promises)."""
    from eosflow.experiment import prepare

    problem = build_problem({"name": "mlp", "width": 12, "n_train": 60, "n_test": 0}, 0, "float64")[0]
    spectrum = {"k": 3, "k_max": 3, "tol": 1e-4, "max_iters": 60}
    rows = {}
    for carry in ("ritz", "power"):
        table = {"lr": lr, "dtype": "float64", "steps": 60, "processes": [process]}
        stepper = prepare({**table, "spectrum": {**spectrum, "carry": carry}}, problem)[3][process]
        rows[carry] = {k: np.asarray(v) for k, v in stepper.advance(stepper.init(problem.w0), 60)[1].items()}
    assert np.isfinite(rows["ritz"]["loss"]).all()
    for name in ("position", "loss", "grad_norm"):
        np.testing.assert_array_equal(rows["power"][name], rows["ritz"][name])
    assert not np.array_equal(rows["power"]["residual"], rows["ritz"]["residual"])  # the option reached the solver
    if process != "adam":
        hessian = jax.jit(lambda w: problem.objective.hessian(w))
        for t in range(0, 60, 7):
            dense = np.linalg.eigvalsh(np.asarray(hessian(rows["power"]["position"][t])))[::-1][:3]
            np.testing.assert_allclose(rows["power"]["eigenvalues"][t], dense, rtol=1e-6)


def test_the_power_carry_costs_fewer_hvps_along_gd_on_the_digits_mlp():
    """GD on the digits MLP (d = 3466, float32, lr = 0.4, k = 1 and 3, tol 1e-3): carrying H v / |H v| instead
    of v spends fewer HVPs over 150 steps of sharpening (benchmarks/sharpness.py: 2.17 -> 1.70 and 5.26 -> 3.62
    per step before the edge; the default since, for every leaderboard entry's optimizer spent fewer with it)."""
    from eosflow.cli import demo_table
    from eosflow.experiment import prepare

    for k in (1, 3):
        spent = {}
        for carry in ("ritz", "power"):
            table = {**demo_table(), "steps": 150, "spectrum": {"k": k, "k_max": k, "carry": carry}}
            _, problem, _, built = prepare(table)
            rows = built["gd"].advance(built["gd"].init(problem.w0), 150)[1]
            spent[carry] = int(np.asarray(rows["hvps"]).sum())
        assert spent["power"] < 0.9 * spent["ritz"], (k, spent)
