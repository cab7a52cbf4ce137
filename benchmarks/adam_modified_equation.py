"""Adam's stable flow against its uncorrected ODE: which one carries the first backward-error term.

    PYTHONPATH=src python benchmarks/adam_modified_equation.py [--problem quadratic|mlp] [--eps 0.1]
        [--time 1.0] [--lrs 0.01,0.005,0.0025]

For each lr, Adam (b1 = 0.9, b2 = 0.99, bias correction) and three continuous models run lr t = ``--time``
from the same w0 (float64); printed: each model's ||w_model - w_adam|| / ||w_adam - w0|| at that time, and
the ratio between consecutive lrs (~4 for a second-order model, ~2 for a first-order one):

- ``stable_flow``: eosflow's ``adam_stable_flow``, the phase-space flow (w, D, nu) with the lag-matched
  rates c = 1/(L + 1/2) (docs/adaptive.md section 3a: its slow manifold carries Adam's first-order
  backward-error term);
- ``uncorrected``: the same phase-space ODE with the forward rates 1 - b (dm/dt = (1 - b1)(g - m), dnu/dt =
  (1 - b2)(g^2 - nu), bias corrections 1 - exp(-(1 - b) t)), integrated by scipy to 1e-10;
- ``w_only``: the w-only modified equation with the moments slaved, dw/dt = -lr u - lr^2 P^-2
  [(l1 - l2)|g| + (l1 + 1/2) eps] H u, u = g/P, P = |g| + eps, l = the bias-corrected lags (section 3a).

``--problem quadratic``: L = w^T H w / 2, eigenvalues (1, 0.5, 0.2, 0.1) in a random basis, |w0| = 3.
``--problem mlp``: the leaderboard's digits MLP (d = 3466; the w-only model is skipped there).
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import numpy as np
from scipy.integrate import solve_ivp

from eosflow.experiment import prepare

B1, B2 = 0.9, 0.99
PROBLEMS = {
    "quadratic": {"name": "quadratic", "eigenvalues": [1.0, 0.5, 0.2, 0.1], "rotate": True, "init_scale": 3.0},
    "mlp": {"name": "mlp", "dataset": "digits", "n_train": 300, "n_test": 0, "width": 32, "depth": 2},
}


def corrected_lag(b: float, t: float) -> float:
    """The lag of the bias-corrected EMA m_k / (1 - b^k) behind its newest input g_{k-1}, at k = t."""
    return b / (1 - b) - t * b**t / (1 - b**t)


def uncorrected(grad, w0: np.ndarray, lr: float, eps: float, steps: int) -> np.ndarray:
    """The phase-space ODE with the forward rates, in the corrected moments mh = m/q, nh = nu/q2:
    dmh/dt = ((1 - b)/q)(g - mh), q = 1 - exp(-(1 - b) t); w(steps)."""
    d = w0.size

    def field(t, z):
        w, mh, nh = z[:d], z[d : 2 * d], z[2 * d :]
        g = grad(w)
        r1, r2 = ((1 - b) / -np.expm1(-(1 - b) * t) for b in (B1, B2))
        return np.concatenate([-lr * mh / (np.sqrt(np.maximum(nh, 0.0)) + eps), r1 * (g - mh), r2 * (g * g - nh)])

    g0 = grad(w0)
    sol = solve_ivp(field, (1e-9, steps), np.concatenate([w0, g0, g0 * g0]), rtol=1e-10, atol=1e-12, method="DOP853")
    return sol.y[:d, -1]


def w_only(grad, hvp, w0: np.ndarray, lr: float, eps: float, steps: int) -> np.ndarray:
    """The w-only modified equation (docs/adaptive.md section 3a); w(steps)."""

    def field(t, w):
        g = grad(w)
        p = np.abs(g) + eps
        u = g / p
        l1, l2 = corrected_lag(B1, t + 1), corrected_lag(B2, t + 1)
        return -lr * u - lr**2 * ((l1 - l2) * np.abs(g) + (l1 + 0.5) * eps) / p**2 * hvp(w, u)

    return solve_ivp(field, (0, steps), w0, rtol=1e-10, atol=1e-12, method="DOP853").y[:, -1]


def distances(problem: dict, lr: float, eps: float, time: float) -> dict[str, float]:
    steps = round(time / lr)
    table = {
        "lr": lr,
        "dtype": "float64",
        "seed": 1,
        "processes": ["adam", "adam_stable_flow"],
        "problem": problem,
        "spectrum": {"every": 0},
        "adam": {"beta1": B1, "beta2": B2, "eps": eps},
    }
    with jax.enable_x64(True):
        _, built, _, processes = prepare(table)
        ends = {
            n: np.asarray(p.advance(p.init(built.w0), steps + 1)[1]["position"][steps]) for n, p in processes.items()
        }
        objective, w0 = built.objective, np.asarray(built.w0)
        grad = eqx.filter_jit(objective.grad)
        hvp = eqx.filter_jit(objective.hvp)
        models = {"stable_flow": ends["adam_stable_flow"]}
        models["uncorrected"] = uncorrected(lambda w: np.asarray(grad(w)), w0, lr, eps, steps)
        if w0.size <= 100:
            models["w_only"] = w_only(
                lambda w: np.asarray(grad(w)), lambda w, v: np.asarray(hvp(w, v)), w0, lr, eps, steps
            )
    adam = ends["adam"]
    travelled = np.linalg.norm(adam - w0)
    return {name: float(np.linalg.norm(w - adam) / travelled) for name, w in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", choices=list(PROBLEMS), default="quadratic")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--time", type=float, default=1.0)
    parser.add_argument("--lrs", default="0.01,0.005,0.0025")
    args = parser.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    rows = [distances(PROBLEMS[args.problem], lr, args.eps, args.time) for lr in lrs]
    print(f"{args.problem}, eps = {args.eps}, lr t = {args.time}, lrs {lrs}: ||w - w_adam|| / ||w_adam - w0||")
    for name in rows[0]:
        values = [row[name] for row in rows]
        ratios = [a / b for a, b in zip(values, values[1:])]
        print(
            f"  {name:12s} "
            + "  ".join(f"{v:.2e}" for v in values)
            + "   ratios "
            + "  ".join(f"{r:.2f}" for r in ratios)
        )


if __name__ == "__main__":
    main()
