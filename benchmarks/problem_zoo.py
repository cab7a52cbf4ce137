"""Measured facts quoted in docs/problems.md: GD on the sharp valley and on deep matrix factorization.

    python benchmarks/problem_zoo.py

Plain GD in float64 with the dense Hessian's top eigenvalue at every step (no eosflow tracker).
"""

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)  # this script's choice: its oracles and prepare() compute in float64

import eosflow  # noqa: F401
from eosflow.problems import build_problem


def gd_trajectory(table: dict, lr: float, steps: int):
    """(sharpness, loss, w) at every step of GD on the problem ``table`` (seed 0, float64)."""
    problem, _ = build_problem(table, 0, "float64")
    objective = problem.objective

    @jax.jit
    def scan(w):
        def step(w, _):
            loss, grad = objective.value_and_grad(w)
            return w - lr * grad, (jnp.linalg.eigvalsh(objective.hessian(w))[-1], loss, w)

        return jax.lax.scan(step, w, None, length=steps)[1]

    return (np.asarray(a) for a in scan(problem.w0))


def sharp_valley_table(lr: float = 0.1, steps: int = 2500) -> None:
    print(f"sharp_valley (defaults), lr = {lr}, 2/lr = {2 / lr:g}, {steps} steps")
    print("| bend | first step with S > 2/lr | max S | mean S over the last 1000 steps |")
    for bend in (0.0, 0.5, 1.0):
        sharpness, _, _ = gd_trajectory({"name": "sharp_valley", "bend": bend}, lr, steps)
        first = int(np.argmax(sharpness > 2 / lr)) if np.any(sharpness > 2 / lr) else -1
        print(f"| {bend} | {first} | {sharpness.max():.1f} | {sharpness[-1000:].mean():.3f} |")


def factorization_table(lr: float = 0.077, steps: int = 4000) -> None:
    print(f"\nmatrix_factorization d = 2, L = 3, lr = {lr}, 2/lr = {2 / lr:.2f}, {steps} steps")
    print("| target_scale s | 3 s^(4/3) | mean S, last 500 | loss range, last 500 |")
    for scale in (3.0, 5.0, 5.5, 6.0):
        table = {"name": "matrix_factorization", "dim": 2, "depth": 3, "target_scale": scale}
        sharpness, loss, _ = gd_trajectory(table, lr, steps)
        print(
            f"| {scale} | {3 * scale ** (4 / 3):.2f} | {sharpness[-500:].mean():.2f} | "
            f"{loss[-500:].min():.3g} .. {loss[-500:].max():.3g} |"
        )


if __name__ == "__main__":
    sharp_valley_table()
    factorization_table()
