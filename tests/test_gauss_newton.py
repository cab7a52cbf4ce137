"""The Gauss-Newton operators (eosflow.gauss_newton, eosflow.torch.gauss_newton_operator) against dense float64
oracles built another way: J from jax.jacfwd / torch.autograd.functional.jacobian and H_out from a dense Hessian
in the outputs; the decomposition H = G + sum_o (d loss / d f_o) d^2 f_o / dw^2 with H and each d^2 f_o dense;
G = H for a model linear in its parameters; positive semi-definiteness; the custom_vjp (reverse-only) path;
chunks of a microbatched problem; the part ``wrt`` selects; and what is refused."""

import copy

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from eosflow.gauss_newton import GaussNewtonOperator
from eosflow.objective import LOSSES
from eosflow.precision import precision
from eosflow.problems import Problem
from user_models import swish


def log_cosh(outputs, targets):
    """A loss of the user's own, convex in the outputs (not a built-in)."""
    return jnp.mean(jnp.sum(jnp.log(jnp.cosh(outputs - targets)), axis=-1))


def network(seed: int, sizes: tuple[int, ...], n: int, loss: str):
    """A tanh MLP's params, inputs and targets of the loss's kind (float64, inside ``precision``)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) + 2)
    params = [
        {"w": jax.random.normal(key, (a, b)) / np.sqrt(a), "b": 0.1 * jax.random.normal(key, (b,))}
        for key, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]
    inputs = jax.random.normal(keys[-2], (n, sizes[0]))
    labels = jax.random.randint(keys[-1], (n,), 0, sizes[-1])
    targets = labels if loss == "cross_entropy" else jax.nn.one_hot(labels, sizes[-1]) + 0.3
    return params, inputs, targets


def mlp(params, inputs):
    for layer in params[:-1]:
        inputs = jnp.tanh(inputs @ layer["w"] + layer["b"])
    return inputs @ params[-1]["w"] + params[-1]["b"]


def dense_gauss_newton(apply_fn, params, inputs, targets, loss_fn):
    """J^T H_out J with J = jax.jacfwd of the outputs (n c x d) and H_out = jax.hessian of the loss in them."""
    flat, unravel = ravel_pytree(params)
    outputs = apply_fn(params, inputs)
    # under jax.jit: one program each, not one per op
    jacobian = jax.jit(jax.jacfwd(lambda w: apply_fn(unravel(w), inputs).ravel()))(flat)
    h_out = jax.jit(jax.hessian(lambda f: loss_fn(f.reshape(outputs.shape), targets)))(outputs.ravel())
    return np.asarray(jacobian.T @ h_out @ jacobian)


LOSS_FNS = {"mse": LOSSES["mse"], "cross_entropy": LOSSES["cross_entropy"], "log_cosh": log_cosh}


@pytest.mark.parametrize(
    "loss, seed", [("cross_entropy", 0), ("mse", 1), ("log_cosh", 2), ("cross_entropy", 3), ("log_cosh", 4)]
)
def test_gauss_newton_is_the_dense_jacobian_product(loss, seed):
    """G @ I equals J^T H_out J to 1e-12 on MLPs of random depth and widths, for built-in and user losses; every
    column of G @ V is the single product G @ v; the products are counted."""
    rng = np.random.default_rng(seed)
    sizes = tuple(int(s) for s in rng.integers(2, 7, size=rng.integers(3, 5)))
    n = int(rng.integers(3, 15))
    with precision("float64"):
        params, inputs, targets = network(seed, sizes, n, loss)
        given = loss if loss in LOSSES else LOSS_FNS[loss]
        operator = GaussNewtonOperator.from_model(mlp, params, inputs, targets, given)
        d = operator.shape[0]
        matrix = operator @ np.eye(d)
        dense = dense_gauss_newton(mlp, params, inputs, targets, LOSS_FNS[loss])
        single = operator @ np.eye(d)[:, 1]
    assert operator.products == d + 1
    np.testing.assert_allclose(matrix, dense, rtol=0, atol=1e-12 * np.abs(dense).max())
    np.testing.assert_allclose(single, matrix[:, 1], rtol=0, atol=1e-14 * np.abs(dense).max())
    assert np.linalg.eigvalsh(matrix)[0] >= -1e-12 * np.abs(dense).max()  # convex in the outputs: PSD


@pytest.mark.parametrize("seed", [3, 4])
def test_hessian_is_gauss_newton_plus_the_functional_part(seed):
    """H - G = sum_o (d loss / d f_o) d^2 f_o / dw^2, every term dense (jax.hessian of the whole loss, of each
    output), to 1e-11; and H - G is not small, so the identity says something."""
    with precision("float64"):
        params, inputs, targets = network(seed, (3, 5, 2), 7, "cross_entropy")
        operator = GaussNewtonOperator.from_model(mlp, params, inputs, targets, "cross_entropy")
        flat, unravel = ravel_pytree(params)
        gauss_newton = operator @ np.eye(flat.size)
        loss_fn = LOSSES["cross_entropy"]
        hessian = np.asarray(jax.jit(jax.hessian(lambda w: loss_fn(mlp(unravel(w), inputs), targets)))(flat))
        outputs = mlp(params, inputs)
        residuals = np.asarray(jax.grad(lambda f: loss_fn(f, targets))(outputs)).ravel()
        curvatures = np.asarray(jax.jit(jax.hessian(lambda w: mlp(unravel(w), inputs).ravel()))(flat))  # (n c, d, d)
    functional = np.einsum("o,oij->ij", residuals, curvatures)
    scale = np.abs(hessian).max()
    assert np.abs(functional).max() > 1e-2 * scale
    np.testing.assert_allclose(hessian - gauss_newton, functional, rtol=0, atol=1e-11 * scale)


def test_a_model_with_two_heads_and_its_own_loss():
    """Outputs that are a tuple (two heads) and a loss of the user's on both (one head's term quartic): G equals
    J^T H_out J over the concatenated outputs, dense, to 1e-12."""
    with precision("float64"):
        keys = jax.random.split(jax.random.PRNGKey(11), 3)
        params = {"a": jax.random.normal(keys[0], (3, 4)), "b": jax.random.normal(keys[1], (3, 2))}
        inputs, targets = jax.random.normal(keys[2], (6, 3)), jnp.full((6, 4), 0.2)

        def two_heads(p, x):
            return jnp.tanh(x @ p["a"]), jnp.sin(x @ p["b"])

        def loss(outputs, t):
            return 0.5 * jnp.mean(jnp.sum((outputs[0] - t) ** 2, -1)) + jnp.mean(jnp.sum(outputs[1] ** 4, -1))

        operator = GaussNewtonOperator.from_model(two_heads, params, inputs, targets, loss)
        flat, unravel = ravel_pytree(params)

        def outputs(w):
            return jnp.concatenate([head.ravel() for head in two_heads(unravel(w), inputs)])

        jacobian = jax.jit(jax.jacfwd(outputs))(flat)
        h_out = jax.jit(jax.hessian(lambda f: loss((f[:24].reshape(6, 4), f[24:].reshape(6, 2)), targets)))(
            outputs(flat)
        )
        dense = np.asarray(jacobian.T @ h_out @ jacobian)
        matrix = operator @ np.eye(flat.size)
    np.testing.assert_allclose(matrix, dense, rtol=0, atol=1e-12 * np.abs(dense).max())


def test_a_model_linear_in_its_parameters_has_g_equal_to_h():
    """Random features (outputs linear in w): the functional part vanishes and G = H, for a non-quadratic loss."""
    with precision("float64"):
        key1, key2, key3 = jax.random.split(jax.random.PRNGKey(5), 3)
        features = jnp.tanh(jax.random.normal(key1, (13, 4)))
        params = {"readout": jax.random.normal(key2, (4, 3))}
        labels = jax.random.randint(key3, (13,), 0, 3)

        def linear(p, x):
            return x @ p["readout"]

        operator = GaussNewtonOperator.from_model(linear, params, features, labels, "cross_entropy")
        flat, unravel = ravel_pytree(params)
        hessian = jax.jit(jax.hessian(lambda w: LOSSES["cross_entropy"](linear(unravel(w), features), labels)))(flat)
        matrix = operator @ np.eye(flat.size)
    np.testing.assert_allclose(matrix, np.asarray(hessian), rtol=0, atol=1e-13 * np.abs(hessian).max())


def test_a_custom_vjp_model_is_multiplied_in_reverse_mode():
    """A model calling a jax.custom_vjp activation (forward mode cannot enter it) takes J v by transposing the
    pullback: G equals the dense product of the same model written with plain jax.nn.swish, to 1e-12."""
    with precision("float64"):
        params, inputs, targets = network(6, (4, 6, 3), 9, "mse")

        def custom(p, x):
            return swish(x @ p[0]["w"] + p[0]["b"]) @ p[1]["w"] + p[1]["b"]

        def plain(p, x):
            return jax.nn.swish(x @ p[0]["w"] + p[0]["b"]) @ p[1]["w"] + p[1]["b"]

        operator = GaussNewtonOperator.from_model(custom, params, inputs, targets, "mse")
        assert operator.product.reverse_only
        matrix = operator @ np.eye(operator.shape[0])
        dense = dense_gauss_newton(plain, params, inputs, targets, LOSSES["mse"])
    np.testing.assert_allclose(matrix, dense, rtol=0, atol=1e-12 * np.abs(dense).max())


@pytest.mark.parametrize("size", [1, 3, 4])
def test_a_microbatched_problem_is_multiplied_chunk_by_chunk(size):
    """Problem.with_microbatch(size) on 11 examples (chunks of size, and a shorter last one): G is the whole
    batch's, to 1e-13."""
    with precision("float64"):
        params, inputs, targets = network(7, (3, 4, 2), 11, "cross_entropy")
        problem = Problem.from_model(mlp, params, inputs, targets, "cross_entropy")
        whole = GaussNewtonOperator(problem.objective, problem.w0) @ np.eye(problem.w0.size)
        chunked = problem.with_microbatch(size)
        operator = GaussNewtonOperator(chunked.objective, chunked.w0)
        matrix = operator @ np.eye(problem.w0.size)
    np.testing.assert_allclose(matrix, whole, rtol=0, atol=1e-13 * np.abs(whole).max())


def test_the_part_wrt_selects_of_an_equinox_model():
    """``wrt`` (an eqx.partition filter spec) selects the last layer: G over it is the dense product over the
    last layer's weights alone, the rest held fixed."""
    with precision("float64"):
        model = eqx.nn.MLP(3, 2, 4, 2, activation=jnp.tanh, key=jax.random.PRNGKey(8))
        inputs = jax.random.normal(jax.random.PRNGKey(9), (10, 3))
        labels = jax.random.randint(jax.random.PRNGKey(10), (10,), 0, 2)
        last = jax.tree_util.tree_map(lambda _: False, model)
        last = eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), last, replace=(True, True))

        def apply_fn(m, x):
            return jax.vmap(m)(x)

        operator = GaussNewtonOperator.from_model(apply_fn, model, inputs, labels, "cross_entropy", wrt=last)
        trained, fixed = eqx.partition(model, last)

        def over_last(part, x):
            return apply_fn(eqx.combine(part, fixed), x)

        dense = dense_gauss_newton(over_last, trained, inputs, labels, LOSSES["cross_entropy"])
        matrix = operator @ np.eye(operator.shape[0])
    assert operator.shape[0] == 4 * 2 + 2
    np.testing.assert_allclose(matrix, dense, rtol=0, atol=1e-12 * np.abs(dense).max())


def test_a_loss_of_w_alone_is_refused():
    """Problem.from_function has no outputs to split: a TypeError that says what to build instead."""
    with precision("float64"):
        problem = Problem.from_function(lambda w: jnp.sum(jnp.cos(w)), jnp.ones(4))
        with pytest.raises(TypeError, match=r"function of w alone.*Problem\.from_model"):
            GaussNewtonOperator(problem.objective, problem.w0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_a_torch_models_gauss_newton_operator(dtype, loss):
    """eosflow.torch.gauss_newton_operator: G @ I equals J^T H_out J from torch.autograd.functional's dense
    Jacobian and Hessian (float64 oracle) on a CNN with a frozen layer and BatchNorm in eval mode, eigsh's top 2
    its eigenvalues; H - G is the functional part (dense), and G is PSD."""
    torch = pytest.importorskip("torch")
    import scipy.sparse.linalg

    import eosflow.torch

    torch.manual_seed(1 if loss == "mse" else 2)
    kind = getattr(torch, dtype)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3),
        torch.nn.BatchNorm2d(3),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(12, 4),
    ).to(kind)
    model[1].eval()
    model[0].bias.requires_grad_(False)
    inputs = torch.randn(7, 1, 4, 4, dtype=kind)
    labels = torch.randint(0, 4, (7,))
    targets = labels if loss == "cross_entropy" else torch.nn.functional.one_hot(labels, 4).to(kind)
    loss_fn = getattr(torch.nn.functional, "cross_entropy" if loss == "cross_entropy" else "mse_loss")
    operator = eosflow.torch.gauss_newton_operator(model, loss_fn, (inputs, targets))
    oracle = copy.deepcopy(model).double()
    trainable = {name: p for name, p in oracle.named_parameters() if p.requires_grad}
    w = torch.cat([p.detach().reshape(-1) for p in trainable.values()])
    target64 = targets if loss == "cross_entropy" else targets.double()

    def outputs(flat):
        pieces = torch.split(flat, [p.numel() for p in trainable.values()])
        shaped = {name: piece.view(p.shape) for (name, p), piece in zip(trainable.items(), pieces)}
        return torch.func.functional_call(oracle, shaped, (inputs.double(),))

    out = outputs(w).detach()
    jacobian = torch.autograd.functional.jacobian(lambda flat: outputs(flat).reshape(-1), w)
    h_out = torch.autograd.functional.hessian(lambda f: loss_fn(f.reshape(out.shape), target64), out.reshape(-1))
    dense = (jacobian.T @ h_out @ jacobian).numpy()
    rtol = 1e-10 if dtype == "float64" else 2e-4
    matrix = operator @ np.eye(w.numel())
    np.testing.assert_allclose(matrix, dense, rtol=0, atol=rtol * np.abs(dense).max())
    assert operator.products == w.numel()
    values = np.linalg.eigvalsh(dense)
    assert values[0] >= -1e-10 * values[-1]
    top = scipy.sparse.linalg.eigsh(operator, k=2, which="LA", tol=1e-8)[0][::-1]
    np.testing.assert_allclose(top, values[::-1][:2], rtol=10 * rtol)
    hessian = torch.autograd.functional.hessian(lambda flat: loss_fn(outputs(flat), target64), w).numpy()
    residual = torch.func.grad(lambda f: loss_fn(f, target64))(out).reshape(-1)
    curvature = torch.autograd.functional.hessian(lambda flat: torch.dot(outputs(flat).reshape(-1), residual), w)
    np.testing.assert_allclose(hessian - dense, curvature.numpy(), rtol=0, atol=1e-10 * np.abs(hessian).max())


@pytest.mark.parametrize("microbatch", [1, 3])
def test_torch_operators_multiply_chunk_by_chunk(microbatch):
    """``microbatch=B`` on 7 rows: H and G are the whole batch's to 1e-12 (float64), one chunk at a time; a
    summed loss, which chunks cannot average, is refused by name."""
    torch = pytest.importorskip("torch")
    import eosflow.torch
    from eosflow.config import SpecError

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    batch = (torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 2, (7,)))
    loss_fn = torch.nn.functional.cross_entropy
    for build in (eosflow.torch.hessian_operator, eosflow.torch.gauss_newton_operator):
        whole = build(model, loss_fn, batch)
        chunked = build(model, loss_fn, batch, microbatch=microbatch)
        identity = np.eye(whole.shape[0])
        np.testing.assert_allclose(chunked @ identity, whole @ identity, rtol=0, atol=1e-12)
        # columns NumPy strides backwards (eigh's, reversed) or by rows: the same products
        np.testing.assert_allclose(whole @ identity[:, ::-1], (whole @ identity)[:, ::-1], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(
            chunked @ np.asfortranarray(identity[:, :3]), (chunked @ identity)[:, :3], rtol=1e-13
        )
        summed = lambda f, y: torch.nn.functional.cross_entropy(f, y, reduction="sum")  # noqa: E731
        with pytest.raises(SpecError, match="not a mean over examples"):
            build(model, summed, batch, microbatch=microbatch)
