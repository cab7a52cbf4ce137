"""eosflow.HessianOperator: scipy's eigsh on it equals dense float64 eigh, and it counts its HVPs."""

import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg

import eosflow
import user_models
from eosflow.spectrum import dense_hessian


def test_eigsh_on_the_operator_matches_dense_eigh_and_counts_hvps():
    problem = user_models.make_problem(dtype="float64", width=8)
    params = problem.objective.unravel(problem.w0)
    inputs, targets = problem.objective.data

    def loss(params, batch):
        return user_models.log_cosh(user_models.apply(params, batch[0]), batch[1])

    H = eosflow.HessianOperator.from_function(loss, params, (inputs, targets))
    assert H.shape == (52, 52) and H.dtype == np.float64
    dense = dense_hessian(problem.objective, problem.w0)
    rng = np.random.default_rng(0)
    v, block = rng.standard_normal(52), rng.standard_normal((52, 3))
    np.testing.assert_allclose(H @ v, dense @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(H @ block, dense @ block, rtol=1e-10, atol=1e-12)
    assert H.hvps == 4
    H.hvps = 0
    values = scipy.sparse.linalg.eigsh(H, k=3, which="LA", tol=1e-12, return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(values)[::-1], np.linalg.eigvalsh(dense)[::-1][:3], rtol=1e-9)
    assert H.hvps > 3  # every product scipy asked for was counted
    # the same operator from an Objective and a flat w, and from a flat loss
    same = eosflow.HessianOperator(problem.objective, problem.w0)
    np.testing.assert_allclose(same @ v, dense @ v, rtol=1e-10, atol=1e-12)
    quadratic = eosflow.HessianOperator.from_function(lambda w: 0.5 * jnp.sum(jnp.arange(1.0, 4.0) * w**2), jnp.ones(3))
    np.testing.assert_allclose(quadratic @ np.eye(3), np.diag([1.0, 2.0, 3.0]), atol=1e-12)


def test_operators_of_one_model_at_many_points_compile_once():
    """Sharpness along a training run: one operator per checkpoint of the same model. The products are
    compiled once per model, not once per operator (each operator compiled its own: ~0.3 s apiece), and a
    process keeps a bounded number of models' compiled products (eosflow.compiled)."""
    from eosflow import compiled

    problem = user_models.make_problem(dtype="float64", width=6)
    rng = np.random.default_rng(1)
    points = [problem.w0 + 0.1 * rng.standard_normal(problem.w0.shape) for _ in range(4)]
    v = rng.standard_normal(problem.w0.size)
    for w in points:
        H = eosflow.HessianOperator(problem.objective, w)
        np.testing.assert_allclose(H @ v, dense_hessian(problem.objective, w) @ v, rtol=1e-10, atol=1e-12)
        H @ np.stack([v, v], axis=1)
    functions = [f for f in compiled.hvp.compiled.values()]
    assert functions[-1]._cache_size() == 1  # this model's H v: one compilation for the four points
    others = [user_models.make_problem(dtype="float64", width=2 + i) for i in range(compiled.hvp.kept + 2)]
    for other in others:  # more models than are kept
        eosflow.HessianOperator(other.objective, other.w0) @ np.ones(other.w0.size)
    assert len(compiled.hvp.compiled) == compiled.hvp.kept
