"""Whether an optimizer is *held* at its edge on the bent valley (examples/sharp_valley.toml), or cycles around it.

    PYTHONPATH=src .venv/bin/python benchmarks/momentum_edge_cycle.py [--steps 6000] [--window 600]

Each optimizer (optax, float64) runs ``--steps`` steps from the example's start; per window of steps it prints the
range of S / edge, S the top eigenvalue of P^-1/2 H P^-1/2 (dense eigh, 2 x 2) at the midpoint of consecutive
iterates (the centre of a period-2 oscillation), the edge 2/lr for GD and RMSProp, 2 (1 + b) / lr for heavy ball
and 2 (1 + b1) / ((1 - b1) lr) for Adam. GD and RMSProp settle at 1 (self-stabilization: the stationary state
that the central flow's reading at a point describes); heavy ball and Adam overshoot and collapse, window after
window. This is why :func:`eosflow.edge_prediction.predict` refuses momentum (docs/monitor.md, "Adam without
momentum").
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from eosflow import optimizer_edges
from eosflow.experiment import prepare
from eosflow.precision import precision
from eosflow.spec import load_spec_table


def ratios(edge: optimizer_edges.EdgeOptimizer, loss_fn, w0, steps: int) -> np.ndarray:
    """S / edge at the midpoint of each of ``steps`` updates, with P after it."""

    def step(carry, _):
        w, state = carry
        updates, state = edge.transform.update(jax.grad(loss_fn)(w), state, w)
        centre = w + updates / 2  # the midpoint of w_t and w_{t+1}, where the reading is taken
        p = jnp.ones_like(w) if edge.preconditioner is None else edge.preconditioner(state)
        scaled = jax.hessian(loss_fn)(centre) / jnp.sqrt(jnp.outer(p, p))
        return (w + updates, state), jnp.linalg.eigvalsh(scaled)[-1] / edge.threshold

    return np.asarray(jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))((w0, edge.transform.init(w0)))[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--window", type=int, default=600)
    args = parser.parse_args()
    optimizers = {
        "GD, lr 0.1": optimizer_edges.sgd(0.1),
        "RMSProp, lr 0.01, decay 0.99": optimizer_edges.rmsprop(0.01, decay=0.99),
        "heavy ball, lr 0.1, b 0.2": optimizer_edges.sgd(0.1, momentum=0.2),
        "heavy ball, lr 0.1, b 0.5": optimizer_edges.sgd(0.1, momentum=0.5),
        "Adam, lr 0.01, b1 0.9, b2 0.99": optimizer_edges.adam(0.01, b2=0.99),
    }
    with precision("float64"):
        problem = prepare(load_spec_table("examples/sharp_valley.toml"))[1]
        loss_fn = problem.objective.value
        rows = {name: ratios(edge, loss_fn, problem.w0, args.steps) for name, edge in optimizers.items()}
    starts = range(0, args.steps, args.window)
    print("S / edge on the bent valley (examples/sharp_valley.toml, float64): min-max per window of steps")
    print("| optimizer | " + " | ".join(f"{s}-{s + args.window - 1}" for s in starts) + " |")
    print("|---" * (len(starts) + 1) + "|")
    for name, ratio in rows.items():
        cells = [f"{ratio[s : s + args.window].min():.2f}-{ratio[s : s + args.window].max():.2f}" for s in starts]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
