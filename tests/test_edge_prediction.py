"""The central flow's reading at a point of a user's loop (eosflow.edge_prediction).

Oracles: GD's exact period-2 orbit of L = 1/2 sum_i (a_i + b_i . y) x_i^2 + c . y in closed form; dense float64
eigh of jax.hessian, its eigenvalues' derivative along -g by central differences and the pair gradients
grad (u_i^T H u_j) by central differences of dense Hessians; the complementarity conditions checked in numpy.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import eosflow
from eosflow import edge_prediction
from eosflow.precision import precision


class Pairs:
    def __init__(self, values, vectors):
        self.values, self.vectors = values, vectors


def valley(a, b, c):
    """L(x, y) = 1/2 sum_i (a_i + b_i . y) x_i^2 + c . y (x in R^m, y in R^q), w = (x, y) flat."""
    m = len(a)

    def loss(w):
        x, y = w[:m], w[m:]
        return 0.5 * jnp.sum((a + b @ y) * x**2) + c @ y

    return loss


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("m", [1, 2])
def test_covariance_is_gds_period_two_orbit_in_closed_form(seed, m):
    """On the valley, GD at lr has the exact period-2 orbit x_i = +-s_i, y = y* with a_i + b_i . y* = 2/lr and
    c + 1/2 B s^2 = 0, so s^2 = -2 B^{-1} c: the prediction at the orbit's centre (x = 0, y*) is X = diag(s^2),
    and its loss L + 1/2 sum X_ii lambda_i is the loss GD has at both points of the orbit; GD's offsets there
    are +-s. Checked by running GD's two steps on the orbit."""
    rng = np.random.default_rng(seed)
    lr = float(rng.uniform(0.05, 0.5))
    with precision("float64"):
        b = -np.abs(rng.normal(1.0, 0.3, (m, m))) - 2.0 * np.eye(m)  # sharpness falls along y: a valley
        s2 = rng.uniform(0.01, 0.2, m)  # the orbit's squared amplitudes
        c = -0.5 * b.T @ s2  # dL/dy = c + 1/2 B^T s^2 = 0 on the orbit
        y = rng.normal(size=m)
        a = 2.0 / lr - b @ y  # every lambda_i = a_i + b_i . y = 2/lr exactly
        loss = valley(jnp.asarray(a), jnp.asarray(b), jnp.asarray(c))
        centre = jnp.concatenate([jnp.zeros(m), jnp.asarray(y)])
        vectors = np.eye(2 * m)[:, :m]
        values = np.full(m, 2.0 / lr)
        prediction = edge_prediction.predict(loss, centre, None, Pairs(values, vectors), lr)
        assert int(prediction.critical) == m
        np.testing.assert_allclose(np.asarray(prediction.covariance), np.diag(s2), rtol=1e-9, atol=1e-12)
        orbit = jnp.concatenate([jnp.sqrt(jnp.asarray(s2)), jnp.asarray(y)])
        step = jax.grad(loss)
        after = orbit - lr * step(orbit)
        np.testing.assert_allclose(after, jnp.concatenate([-orbit[:m], orbit[m:]]), atol=1e-12)  # a 2-cycle
        assert float(prediction.predicted_loss) == pytest.approx(float(loss(orbit)), rel=1e-12)
        assert float(loss(orbit)) == pytest.approx(float(loss(after)), rel=1e-12)
        np.testing.assert_allclose(edge_prediction.offsets(after, orbit, Pairs(values, vectors)), -np.sqrt(s2))
        # below the edge nothing is critical and X = 0; above it the slack must be pulled back by more than X
        lower = edge_prediction.predict(loss, centre, None, Pairs(values, vectors), 0.9 * lr)
        assert int(lower.critical) == 0 and not np.any(np.asarray(lower.covariance))
        assert float(lower.predicted_loss) == float(prediction.loss)


def mlp_loss(sizes, activation, n, seed):
    keys = jax.random.split(jax.random.key(seed), len(sizes) + 1)
    params = [
        (jax.random.normal(k, (i, o)) / np.sqrt(i), 0.1 * jax.random.normal(jax.random.fold_in(k, 1), (o,)))
        for k, i, o in zip(keys[: len(sizes) - 1], sizes[:-1], sizes[1:], strict=True)
    ]
    x = jax.random.normal(keys[-1], (n, sizes[0]))
    y = jnp.sin(x @ jnp.ones((sizes[0], sizes[-1])))

    def loss(params, batch):
        h, target = batch
        for W, bias in params[:-1]:
            h = activation(h @ W + bias)
        W, bias = params[-1]
        return 0.5 * jnp.mean(jnp.sum((h @ W + bias - target) ** 2, axis=-1))

    return loss, params, (x, y)


@pytest.mark.parametrize(
    "sizes,activation,seed,k",
    [((3, 6, 2), jnp.tanh, 0, 1), ((4, 5, 5, 1), jax.nn.softplus, 1, 2), ((2, 8, 3), jnp.tanh, 2, 3)],
)
def test_against_dense_hessians_and_central_differences(sizes, activation, seed, k):
    """On random MLPs (float64) plus a linear term r . w that tilts the gradient up the sharpness (r leaves H and
    D^3 L alone; at a random init the eigenvalues fall along -g and X would be 0): G_ij = grad (u_i^T H u_j) by
    central differences of dense Hessians, coordinate by coordinate; sharpening_i = d lambda_i / dt along -g by
    central differences of dense eigh; with lr putting exactly m of the top k at 2/lr, X solves the SDCP built
    from those G in numpy: X >= 0, Z = alpha + beta[X] >= 0, <X, Z> = 0, X != 0, and the predicted loss is
    L + 1/2 sum X_ii lambda_i."""
    with precision("float64"):
        loss, params, batch = mlp_loss(sizes, activation, 12, seed)
        flat, unravel = ravel_pytree(params)
        hessian = jax.jit(jax.hessian(lambda w: loss(unravel(w), batch)))
        values, vectors = np.linalg.eigh(np.asarray(hessian(flat)))
        values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
        rows = [np.asarray(hessian(flat + 1e-5 * e)) - np.asarray(hessian(flat - 1e-5 * e)) for e in np.eye(flat.size)]
        G = np.einsum("cpq,pi,qj->ijc", np.stack(rows) / 2e-5, vectors, vectors)  # (k, k, d)
        rng = np.random.default_rng(seed)
        uphill = sum(rng.uniform(0.5, 1.5) * G[i, i] / np.linalg.norm(G[i, i]) for i in range(k))
        r = jnp.asarray(-3.0 * np.linalg.norm(jax.grad(lambda w: loss(unravel(w), batch))(flat)) * uphill)

        def tilted(params, batch):
            return loss(params, batch) + r @ ravel_pytree(params)[0]

        L = lambda w: tilted(unravel(w), batch)  # noqa: E731
        g = np.asarray(jax.grad(L)(flat))
        h = 1e-5 / np.linalg.norm(g)
        ahead, behind = (np.linalg.eigvalsh(np.asarray(hessian(flat + s * h * g)))[::-1][:k] for s in (-1.0, 1.0))
        for m in range(1, k + 1):
            lr = 2.0 / values[m - 1] * (1 + 1e-9)  # lambda_1..m >= 2/lr > lambda_{m+1}
            p = edge_prediction.predict(tilted, params, batch, Pairs(values, vectors), lr, margin=0.0)
            np.testing.assert_allclose(p.sharpening, (ahead - behind) / (2 * h), rtol=1e-5, atol=1e-7)
            assert int(p.critical) == m and int(p.complete) == int(m < k)
            X = np.asarray(p.covariance)
            assert not np.any(X[m:]) and not np.any(X[:, m:])
            X = X[:m, :m]
            alpha = np.einsum("ijc,c->ij", G[:m, :m], g)
            Z = alpha + 0.5 * np.einsum("ijc,klc,kl->ij", G[:m, :m], G[:m, :m], X)
            scale = np.abs(alpha).max()
            assert np.trace(X) > 0 and np.linalg.eigvalsh(X).min() >= -1e-9 * np.abs(X).max()
            assert np.linalg.eigvalsh(Z).min() >= -1e-6 * scale
            assert abs(np.sum(X * Z)) <= 1e-6 * scale * np.trace(X)
            if m == 1:  # the closed form of self-stabilization
                grad_s = G[0, 0]
                assert X[0, 0] == pytest.approx(-2 * grad_s @ g / (grad_s @ grad_s), rel=1e-6)
            expected = float(L(flat)) + 0.5 * np.sum(np.diag(X) * values[:m])
            assert float(p.predicted_loss) == pytest.approx(expected, rel=1e-12)


def test_an_equinox_module_and_wrt_measure_the_flattened_part():
    """An Equinox MLP measured whole and by its last layer only (wrt): the same numbers as a loss of the flat
    vector of that part, with the rest held fixed."""
    with precision("float64"):
        model = eqx.nn.MLP(3, 2, 5, 1, activation=jnp.tanh, key=jax.random.key(3))
        x = jax.random.normal(jax.random.key(4), (10, 3))
        y = jnp.cos(x[:, :2])

        def loss(model, batch):
            inputs, targets = batch
            return jnp.mean((jax.vmap(model)(inputs) - targets) ** 2)

        last = jax.tree.map(lambda _: False, model)
        last = eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), last, replace=(True, True))
        for wrt in (None, last):
            part, rest = eqx.partition(model, eqx.is_inexact_array if wrt is None else wrt)
            flat, unravel = ravel_pytree(part)
            L = lambda w: loss(eqx.combine(unravel(w), rest), (x, y))  # noqa: E731, B023
            values, vectors = np.linalg.eigh(np.asarray(jax.hessian(L)(flat)))
            pairs = Pairs(values[::-1][:2], vectors[:, ::-1][:, :2])
            lr = 2.0 / pairs.values[1] * (1 + 1e-9)
            ours = edge_prediction.predict(loss, model, (x, y), pairs, lr, wrt=wrt)
            oracle = edge_prediction.predict(L, flat, None, pairs, lr)
            for field in ("loss", "sharpening", "covariance", "predicted_loss"):
                np.testing.assert_allclose(getattr(ours, field), getattr(oracle, field), rtol=1e-9, atol=1e-14)
            assert int(ours.critical) == 2


def test_one_compilation_per_loss_and_shapes():
    """Repeated calls with the same loss function reuse one program (the tracker's loop calls it every step)."""
    loss, params, batch = mlp_loss((3, 4, 1), jnp.tanh, 6, 5)
    flat, unravel = ravel_pytree(params)
    pairs = Pairs(np.array([1.0, 0.5], np.float32), np.eye(flat.size, 2, dtype=np.float32))
    before = set(edge_prediction._compiled.compiled)
    for lr in (0.5, 1.0, 2.0):
        edge_prediction.predict(loss, params, batch, pairs, lr)
    assert len(set(edge_prediction._compiled.compiled) - before) == 1


def test_bad_input_is_named():
    loss, params, batch = mlp_loss((3, 4, 1), jnp.tanh, 6, 5)
    d = ravel_pytree(params)[0].size
    good = Pairs(np.ones(2, np.float32), np.eye(d, 2, dtype=np.float32))
    with pytest.raises(ValueError, match=f"rows, the measured parameters {d}"):
        edge_prediction.predict(loss, params, batch, Pairs(good.values, np.eye(d + 1, 2)), 0.1)
    with pytest.raises(ValueError, match=r"\(k,\) and eig.vectors \(d, k\)"):
        edge_prediction.predict(loss, params, batch, Pairs(np.ones(3), good.vectors), 0.1)
    with pytest.raises(ValueError, match="margin"):
        edge_prediction.predict(loss, params, batch, good, 0.1, margin=1.0)
    with pytest.raises(ValueError, match="lr must be positive"):
        edge_prediction.predict(loss, params, batch, good, 0.0)
    with pytest.raises(ValueError, match="previous 3"):
        edge_prediction.offsets(params, jnp.ones(3), good)
    assert eosflow.edge_prediction is edge_prediction
