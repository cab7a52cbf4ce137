"""eosflow.spectral_density against closed forms: Gauss quadrature's exactness (every probe's nodes and weights
reproduce v^T A^p v for p < 2 order, and at order d they are A's eigenvalues and (v . u_j)^2), the moments
tr(A^p) / d and Hutchinson's trace within their standard errors, Hutchinson's variance 2 sum_{i != j} A_ij^2,
a Krylov space that closes early, and a network's Hessian through HessianOperator against dense eigh."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eosflow
from eosflow.precision import precision
from eosflow.spectral_density import hutchinson_trace, stochastic_lanczos


def spectrum_matrix(d: int, seed: int, outliers=(3.0, 2.5)) -> np.ndarray:
    """A symmetric d x d matrix: a bulk in [-0.5, 1] and a few outliers, in a random basis."""
    rng = np.random.default_rng(seed)
    values = np.concatenate([np.asarray(outliers), rng.uniform(-0.5, 1.0, d - len(outliers))])
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (basis * values) @ basis.T


def probe_vectors(d: int, probes: int, seed: int) -> np.ndarray:
    """The unit start vectors stochastic_lanczos draws from ``seed`` (its first draw)."""
    q = np.random.default_rng(seed).standard_normal((d, probes))
    return q / np.linalg.norm(q, axis=0)


@pytest.mark.parametrize("d, order, seed", [(40, 6, 0), (90, 10, 1), (150, 4, 2)])
def test_each_probe_is_a_gauss_quadrature_exact_below_degree_2m(d, order, seed):
    a = spectrum_matrix(d, seed)
    density = stochastic_lanczos(a, order=order, probes=3, seed=seed)
    for p, v in enumerate(probe_vectors(d, 3, seed).T):
        power = v.copy()
        for degree in range(2 * order):
            exact = v @ power  # v^T A^degree v
            quadrature = np.sum(density.weights[p] * density.nodes[p] ** degree)
            assert quadrature == pytest.approx(exact, rel=1e-9, abs=1e-12 * 3.0**degree)
            power = a @ power
    assert density.hvps == 3 * order and density.dimension == d


def test_at_full_order_the_nodes_are_the_eigenvalues_with_their_overlaps():
    a = spectrum_matrix(30, 3)
    values, vectors = np.linalg.eigh(a)
    density = stochastic_lanczos(a, order=30, probes=2, seed=4)
    for p, v in enumerate(probe_vectors(30, 2, 4).T):
        np.testing.assert_allclose(density.nodes[p], values, atol=1e-10)
        np.testing.assert_allclose(density.weights[p], (vectors.T @ v) ** 2, atol=1e-10)


def test_a_krylov_space_that_closes_early_stops_its_probe():
    """Three distinct eigenvalues: Lanczos closes after 3 steps; the later weights are zero and the moments of
    every degree are exact."""
    rng = np.random.default_rng(5)
    basis, _ = np.linalg.qr(rng.standard_normal((50, 50)))
    values = np.repeat([2.0, -1.0, 0.5], [10, 15, 25])
    a = (basis * values) @ basis.T
    density = stochastic_lanczos(a, order=12, probes=2, seed=6)
    assert np.all(density.weights[:, 3:] == 0) and density.hvps == 3 * 2
    np.testing.assert_allclose(np.sort(density.nodes[:, :3], axis=1), [[-1.0, 0.5, 2.0]] * 2, atol=1e-10)
    for p, v in enumerate(probe_vectors(50, 2, 6).T):
        for degree in range(8):
            exact = v @ np.linalg.matrix_power(a, degree) @ v
            assert np.sum(density.weights[p] * density.nodes[p] ** degree) == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("per_block", [1, 2, 3])
def test_probes_in_blocks_under_a_memory_bound_give_the_same_density(per_block):
    """A memory bound of ``per_block`` probes' bases (8 order d bytes each) runs 7 probes in blocks of that many:
    the nodes and weights are those of one block of 7 (each probe's Lanczos is its own) to 1e-12, at the same
    count of products."""
    d, order = 60, 9
    a = spectrum_matrix(d, 3)
    whole = stochastic_lanczos(a, order=order, probes=7, seed=4)
    blocked = stochastic_lanczos(a, order=order, probes=7, seed=4, memory=8 * order * d * per_block + 7)
    np.testing.assert_allclose(blocked.nodes, whole.nodes, rtol=0, atol=1e-12)
    np.testing.assert_allclose(blocked.weights, whole.weights, rtol=0, atol=1e-12)
    assert blocked.hvps == whole.hvps == order * 7


@pytest.mark.parametrize("seed", [0, 1])
def test_moments_density_and_traces_estimate_the_spectrum(seed):
    """d = 400: the moments tr(A^p)/d (p = 1, 2) within 4 standard errors of the per-probe spread; the smoothed
    density integrates to 1 and puts the outliers' mass 2/d near 3 and 2.5; Hutchinson's trace within 4 of its
    standard errors, which match the closed form sqrt(2 sum_{i != j} A_ij^2 / probes) to 10%."""
    d = 400
    a = spectrum_matrix(d, seed)
    density = stochastic_lanczos(a, order=30, probes=40, seed=seed)
    for power in (1, 2):
        per_probe = np.sum(density.weights * density.nodes**power, axis=1)
        exact = np.trace(np.linalg.matrix_power(a, power)) / d
        assert abs(per_probe.mean() - exact) <= 4 * per_probe.std(ddof=1) / np.sqrt(per_probe.size)
        assert density.moment(power) == pytest.approx(per_probe.mean())
    trace, trace_error = density.trace()
    assert trace == pytest.approx(d * density.moment(1)) and abs(trace - np.trace(a)) <= 4 * trace_error
    grid = np.linspace(-1.5, 4.0, 2201)
    values = density.at(grid, width=0.05)
    assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=1e-6)
    outliers = np.trapezoid(np.where(grid > 2.0, values, 0.0), grid)
    assert outliers == pytest.approx(2 / d, rel=0.5)
    estimate, error = hutchinson_trace(a, probes=2000, seed=seed)
    assert abs(estimate - np.trace(a)) <= 4 * error
    off = a - np.diag(np.diag(a))
    assert error == pytest.approx(np.sqrt(2 * np.sum(off**2) / 2000), rel=0.1)


def test_a_networks_hessian_through_hessian_operator():
    """A tanh MLP on digits (float64, d = 1290): SLQ's top node is the top eigenvalue of the dense Hessian to
    1e-8 (an outlier, found by every probe), its trace and Hutchinson's within 4 standard errors of tr(H), and
    the operator counts the products."""
    from jax.flatten_util import ravel_pytree
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    with precision("float64"):
        x, y = jnp.asarray(images[:200] / 16), jax.nn.one_hot(labels[:200], 10)
        k1, k2 = jax.random.split(jax.random.PRNGKey(0))
        params = {"w1": jax.random.normal(k1, (64, 18)) / 8, "w2": jax.random.normal(k2, (18, 10)) / 4}

        def loss(p, batch):
            return 0.5 * jnp.mean(jnp.sum((jnp.tanh(batch[0] @ p["w1"]) @ p["w2"] - batch[1]) ** 2, -1))

        operator = eosflow.HessianOperator.from_function(loss, params, (x, y))
        flat, unravel = ravel_pytree(params)
        hessian = np.asarray(jax.jit(jax.hessian(lambda w: loss(unravel(w), (x, y))))(flat))
        density = stochastic_lanczos(operator, order=40, probes=6, seed=1)
        estimate, error = hutchinson_trace(operator, probes=200, seed=2)
    top = np.linalg.eigvalsh(hessian)[-1]
    np.testing.assert_allclose(density.nodes.max(axis=1), top, rtol=1e-8)
    trace, trace_error = density.trace()
    assert abs(trace - np.trace(hessian)) <= 4 * trace_error
    assert abs(estimate - np.trace(hessian)) <= 4 * error
    assert operator.hvps == 6 * 40 + 200


def test_bad_arguments_are_named():
    a = spectrum_matrix(10, 0)
    with pytest.raises(ValueError, match=r"square.*\(10, 4\)"):
        stochastic_lanczos(np.ones((10, 4)))
    for order in (11, 0, True, 3.0):  # a bool or a float met numpy's TypeError (from a probe)
        with pytest.raises(ValueError, match=rf"order must be an integer in \[1, 10\], got {order!r}"):
            stochastic_lanczos(a, order=order)
    with pytest.raises(ValueError, match="probes must be an integer >= 1"):
        stochastic_lanczos(a, order=3, probes=0)
    with pytest.raises(ValueError, match="width must be positive"):
        stochastic_lanczos(a, order=3).at(np.zeros(3), width=0.0)
    with pytest.raises(ValueError, match="probes must be an integer >= 2"):
        hutchinson_trace(a, probes=1)
    for block in (0, -1):  # range()'s and concatenate's errors before
        with pytest.raises(ValueError, match=f"block must be an integer >= 1, got {block}"):
            hutchinson_trace(a, probes=4, block=block)
    broken = a.copy()
    broken[3, 3] = np.nan  # a NaN was (nan, nan) from Hutchinson, scipy's "must not contain infs or NaNs" from SLQ
    for call in (lambda: hutchinson_trace(broken, probes=4), lambda: stochastic_lanczos(broken, order=3)):
        with pytest.raises(ValueError, match="products hold NaN or inf"):
            call()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_torch_models_hessian_operator_and_its_spectrum(dtype):
    """eosflow.torch.hessian_operator: H @ I equals torch.autograd.functional's dense Hessian, eigsh's top 3 and
    SLQ's top node its eigenvalues, the products are counted, and a later step of the model does not move it."""
    torch = pytest.importorskip("torch")
    import scipy.sparse.linalg

    import eosflow.torch

    torch.manual_seed(0)
    kind = getattr(torch, dtype)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(kind)
    batch = (torch.randn(30, 5, dtype=kind), torch.randint(0, 3, (30,)))
    loss_fn = torch.nn.functional.cross_entropy
    operator = eosflow.torch.hessian_operator(model, loss_fn, batch)
    oracle = copy.deepcopy(model).double()  # the dense float64 Hessian of the same weights
    w = torch.cat([p.detach().reshape(-1) for p in oracle.parameters()])
    shapes = {name: p.shape for name, p in oracle.named_parameters()}

    def loss(flat):
        pieces = torch.split(flat, [s.numel() for s in shapes.values()])
        shaped = {name: piece.view(shape) for (name, shape), piece in zip(shapes.items(), pieces)}
        return loss_fn(torch.func.functional_call(oracle, shaped, (batch[0].double(),)), batch[1])

    dense = torch.autograd.functional.hessian(loss, w).numpy()
    rtol = 1e-10 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(operator @ np.eye(w.numel()), dense, rtol=rtol, atol=rtol * np.abs(dense).max())
    assert operator.products == w.numel()
    values = np.linalg.eigvalsh(dense)[::-1]
    top = scipy.sparse.linalg.eigsh(operator, k=3, which="LA", tol=1e-8)[0][::-1]
    np.testing.assert_allclose(top, values[:3], rtol=10 * rtol)
    density = stochastic_lanczos(operator, order=20, probes=3, seed=1)
    np.testing.assert_allclose(density.nodes.max(axis=1), values[0], rtol=10 * rtol)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    np.testing.assert_allclose(
        operator @ np.eye(w.numel())[:, :2], dense[:, :2], rtol=rtol, atol=rtol * np.abs(dense).max()
    )


@pytest.mark.parametrize("top", [1e8, 1e11])
def test_a_spectrum_spanning_many_decades_is_resolved_at_full_order(top):
    """A probe's Krylov space was called closed once a residual fell below 1e-10 of the largest alpha so far: with
    an eigenvalue 1e11 above a bulk in [0.01, 1] the 39 bulk eigenvalues collapsed into 2 nodes (from a probe).
    Closure is now relative to |H q| of the step: at full order the nodes are the eigenvalues."""
    bulk = np.linspace(0.01, 1.0, 39)
    density = stochastic_lanczos(np.diag(np.r_[top, bulk]), order=40, probes=1)
    weighted = np.sort(density.nodes[0][density.weights[0] > 1e-300])
    assert weighted.size == 40
    np.testing.assert_allclose(weighted[:39], bulk, rtol=1e-4)
    assert weighted[39] == pytest.approx(top, rel=1e-9)
