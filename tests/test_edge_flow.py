"""Edge flow's direction and magnitude against dense float64 eigenvectors and the GD iterates.

(The quartic period-2 orbit and the second-order centre are checked for both rod-like models in
test_rod_flow.py.)
"""

import numpy as np
import pytest

from test_rod_flow import advance, build, gd_iterates


@pytest.mark.parametrize("lr_sharpness", [1.9, 2.1])
def test_magnitude_multiplies_by_gd_multiplier_on_a_quadratic(lr_sharpness):
    """Once u is the top eigenvector, m(t+1)/m(t) = |1 - eta S|: GD's own per-step multiplier of
    its oscillation along that eigenvector, so m grows exactly when eta S > 2."""
    eigenvalues = (10.0, 4.0, 1.0)
    lr = lr_sharpness / eigenvalues[0]
    process, problem = build("edge_flow", {"name": "quadratic", "eigenvalues": list(eigenvalues)}, lr)
    _, rows = advance(process, problem.w0, 80)
    growth = rows["amplitude"][-1] / rows["amplitude"][-2]
    top = np.linalg.eigh(np.asarray(problem.objective.hessian(problem.w0)))[1][:, -1]
    along = gd_iterates(problem.objective, problem.w0, lr, 80) @ top
    np.testing.assert_allclose(growth, abs(1 - lr_sharpness), rtol=1e-6)
    np.testing.assert_allclose(growth, abs(along[-1] / along[-2]), rtol=1e-6)
    np.testing.assert_allclose(rows["sharpness_along"][-1], eigenvalues[0], rtol=1e-9)


def test_direction_becomes_the_top_eigenvector_of_the_centre_hessian():
    """Oja's flow on a matrix factorization at the edge of stability: u ends as the top eigenvector
    of the dense Hessian at the centre, the curvature averaged over the oscillation is held at
    2/eta, and m is GD's own half-step on its period-2 orbit."""
    problem_table = {"name": "matrix_factorization", "dim": 2, "depth": 3, "rank": 1, "target_scale": 5.5}
    lr = 0.077
    process, problem = build("edge_flow", problem_table, lr)
    state, rows = advance(process, problem.w0, 600)
    hessian = np.asarray(problem.objective.hessian(state.z.centre))
    values, vectors = np.linalg.eigh(hessian)
    assert abs(np.dot(vectors[:, -1], np.asarray(state.z.direction))) > 1 - 1e-6
    np.testing.assert_allclose(rows["rayleigh_quotient"][-1], values[-1], rtol=1e-4)
    np.testing.assert_allclose(rows["sharpness_along"][-1], 2 / lr, rtol=1e-4)
    gd = gd_iterates(problem.objective, problem.w0, lr, 600)
    np.testing.assert_allclose(rows["amplitude"][-1], np.linalg.norm(gd[-1] - gd[-2]) / 2, rtol=1e-6)


@pytest.mark.parametrize("correction, hvps", [(True, 12), (False, 4)])
def test_cost_is_two_gradients_and_one_hvp_per_substep(correction, hvps):
    process, problem = build("edge_flow", {"name": "quartic"}, 0.08, correction=correction)
    _, rows = advance(process, problem.w0, 2)
    assert rows["grads"][0] == 8 and rows["hvps"][0] == hvps
