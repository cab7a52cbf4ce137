"""Order of the rod-like models' centre below the edge, with each correction (HVP, lookahead, secant).

    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/rod_correction_order.py [--fractions 0.2 0.1 0.05]

On a smooth non-quadratic loss (least squares plus a quartic, w in R^4, float64), each model runs from
w0 for a fixed physical time eta t = 2 at eta S = each fraction, and its centre is compared with GD's
iterate there. Prints the distances and the ratios between consecutive step sizes: 4 is second order
(docs/rod_flow.md section 4; the test `test_centre_follows_gd_to_second_order_below_eos` asserts > 3.5).
The secant is the rod flow's only. ``--stability`` prints instead the secant's and the HVP correction's
multiplier per unit of time of a centre mode relaxing at rate eta lambda on a quadratic (section 4).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from eosflow.flows.edge import EdgeFlow
from eosflow.flows.rod import RodFlow, RodFlowOptions, correction_coefficient
from eosflow.objective import Objective
from eosflow.precision import precision
from eosflow.spec import SpectrumSpec


def distance_to_gd(cls, objective: Objective, w0: jax.Array, lr: float, curvature: str) -> float:
    steps = int(round(2.0 / lr))
    w = w0
    for _ in range(steps):
        w = w - lr * objective.grad(w)
    model = cls(
        name="model",
        lr=lr,
        spectrum=SpectrumSpec(every=0),
        key=jax.random.PRNGKey(0),
        objective=objective,
        options=RodFlowOptions(substeps=4, curvature=curvature),
    )
    _, rows = model.advance(model.init(w0), steps + 1)
    return float(jnp.linalg.norm(rows["position"][-1] - w))


def secant_multiplier(rate: float, substeps: int) -> float:
    """|zeta|^n, zeta the largest root of zeta^2 - (1 - (h - c) a) zeta + c a (the secant's centre on a quadratic,
    x_(i+1) = x_i + (h - c) v_i + c v_(i-1), v = -a x; h = 1/n, c = (1 - h)/2): its multiplier per unit of time."""
    h, c = 1.0 / substeps, correction_coefficient(substeps, True)
    return float(np.max(np.abs(np.roots([1.0, -(1.0 - (h - c) * rate), c * rate])))) ** substeps


def hvp_multiplier(rate: float, substeps: int) -> float:
    """|1 - h a (1 + c a)|^n: Euler on the HVP-corrected centre, per unit of time."""
    h, c = 1.0 / substeps, correction_coefficient(substeps, True)
    return abs(1.0 - h * rate * (1.0 + c * rate)) ** substeps


def stability(rates: list[float]) -> None:
    print("| scheme | substeps | multiplier per unit of time at eta lambda = " + " / ".join(map(str, rates)) + " |")
    print("|---|---|---|")
    for substeps in (2, 3, 4):
        for name, multiplier in (("secant", secant_multiplier), ("hvp (Euler)", hvp_multiplier)):
            cells = " / ".join(f"{multiplier(a, substeps):.3g}" for a in rates)
            print(f"| {name} | {substeps} | {cells} |")
        c = correction_coefficient(substeps, True)
        exact = " / ".join(f"{np.exp(-a * (1 + c * a)):.3g}" for a in rates)
        print(f"| corrected flow, exact | {substeps} | {exact} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.2, 0.1, 0.05])
    parser.add_argument("--stability", nargs="*", type=float, help="eta lambda values (default 0.5 1 1.5 2 2.5 3)")
    args = parser.parse_args(argv)
    if args.stability is not None:
        stability(args.stability or [0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
        return
    with precision("float64"):
        rng = np.random.default_rng(3)
        a, b = jnp.asarray(rng.standard_normal((6, 4)) / 2), jnp.asarray(rng.standard_normal(6))
        objective = Objective.from_function(lambda w: 0.5 * jnp.sum((a @ w - b) ** 2) + 0.25 * jnp.sum(w**4))
        w0 = jnp.asarray(rng.standard_normal(4))
        sharpness = float(np.linalg.eigvalsh(np.asarray(objective.hessian(w0)))[-1])
        print("| model | correction | distance at eta S = " + " / ".join(map(str, args.fractions)) + " | ratios |")
        print("|---|---|---|---|")
        cases = [(cls, c) for cls in (RodFlow, EdgeFlow) for c in ("hvp", "lookahead")] + [(RodFlow, "secant")]
        for cls, curvature in cases:
            d = [distance_to_gd(cls, objective, w0, f / sharpness, curvature) for f in args.fractions]
            ratios = ", ".join(f"{x / y:.2f}" for x, y in zip(d, d[1:]))
            print(f"| {cls.__name__} | {curvature} | " + " / ".join(f"{x:.3g}" for x in d) + f" | {ratios} |")


if __name__ == "__main__":
    main()
