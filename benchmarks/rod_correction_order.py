"""Order of the rod-like models' centre below the edge, with either correction (HVP or lookahead).

    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/rod_correction_order.py [--fractions 0.2 0.1 0.05]

On a smooth non-quadratic loss (least squares plus a quartic, w in R^4, float64), each model runs from
w0 for a fixed physical time eta t = 2 at eta S = each fraction, and its centre is compared with GD's
iterate there. Prints the distances and the ratios between consecutive step sizes: 4 is second order
(docs/rod_flow.md section 4; the test `test_centre_follows_gd_to_second_order_below_eos` asserts > 3.5).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from eosflow.flows.edge import EdgeFlow
from eosflow.flows.rod import RodFlow, RodFlowOptions
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.2, 0.1, 0.05])
    args = parser.parse_args(argv)
    with precision("float64"):
        rng = np.random.default_rng(3)
        a, b = jnp.asarray(rng.standard_normal((6, 4)) / 2), jnp.asarray(rng.standard_normal(6))
        objective = Objective.from_function(lambda w: 0.5 * jnp.sum((a @ w - b) ** 2) + 0.25 * jnp.sum(w**4))
        w0 = jnp.asarray(rng.standard_normal(4))
        sharpness = float(np.linalg.eigvalsh(np.asarray(objective.hessian(w0)))[-1])
        print("| model | correction | distance at eta S = " + " / ".join(map(str, args.fractions)) + " | ratios |")
        print("|---|---|---|---|")
        for cls in (RodFlow, EdgeFlow):
            for curvature in ("hvp", "lookahead"):
                d = [distance_to_gd(cls, objective, w0, f / sharpness, curvature) for f in args.fractions]
                ratios = ", ".join(f"{x / y:.2f}" for x, y in zip(d, d[1:]))
                print(f"| {cls.__name__} | {curvature} | " + " / ".join(f"{x:.3g}" for x in d) + f" | {ratios} |")


if __name__ == "__main__":
    main()
