"""Rod and edge flow at GD's period-2 orbits: fixed points, and why the full parity kick broke them.

For each step size: whether GD settles on a period-2 orbit (res2 = max |w_{k+2} - w_k| over the last
50 steps, half = |w_{k+1} - w_k|/2), then for rod and edge flow the spread (max - min) of the
predicted loss and amplitude over the last 50 steps and amplitude / half - 1. With --jacobian, at
GD's orbit (x, r) = ((w_+ + w_-)/2, (w_+ - w_-)/2) the most negative eigenvalue of the rod flow's two-step
map (steps k and k + 1, Jacobian by forward-mode AD; below -1 the fixed point gives way to a period-4
cycle): with the kick as it is now, with the full
parity kick of the first version (every component of tau into the rod), and with no kick, and GD's own; and the
reduction to the rod direction u: mu = eta u.Hbar u and delta = eta u.(H(x+r) - H(x-r))u/2, the
centre-rod coupling through the curvature asymmetry between the ends (docs/rod_flow.md section 5),
with the eigenvalues of GD's lifted map reduced to u, M = [[1 - mu, -delta], [delta, mu - 1]], and of M^2.
With --kick full the runs use the full parity kick of the first version (rod and edge flow) and each
line ends with the last four predicted losses (a period-4 cycle shows as four different values).

    .venv/bin/python benchmarks/rod_fixed_points.py [--problem matrix_factorization|quartic]
        [--lrs 0.07,0.08,0.085] [--steps 1500] [--jacobian] [--kick now|full]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from eosflow.experiment import prepare
from eosflow.flows.edge import EdgeFlow, EdgePoint
from eosflow.flows.flow import FlowState
from eosflow.flows.rod import RodFlow, parity_kick

jax.config.update("jax_enable_x64", True)

PROBLEMS = {
    "matrix_factorization": {"name": "matrix_factorization", "dim": 2, "depth": 3, "rank": 1, "target_scale": 5.5},
    "quartic": {"name": "quartic", "sharpness": 30.0, "dim": 2, "init": 0.1},
}


def build(process: str, problem: dict, lr: float):
    table = {"lr": lr, "dtype": "float64", "processes": [process], "problem": problem, "spectrum": {"every": 0}}
    _, built, _, processes = prepare(table)
    return processes[process], built


def gd_iterates(objective, w0, lr: float, steps: int) -> np.ndarray:
    def body(w, _):
        new = w - lr * objective.grad(w)
        return new, new

    _, ws = jax.jit(lambda w: jax.lax.scan(body, w, None, length=steps))(w0)
    return np.asarray(ws)


def leading(jacobian: np.ndarray) -> complex:
    """The eigenvalue with the most negative real part: the mode that flips every two steps (period 4),
    unstable below -1 (the problem's slow and neutral modes sit near +1 and are not the question)."""
    values = np.linalg.eigvals(jacobian)
    return complex(values[np.argmin(values.real)])


class FullKick(RodFlow):
    """The first version: the whole parity kick into the rod."""

    def finish(self, z, end, ends, step):
        centre, rod = end
        return centre, rod + parity_kick(step, z[0], centre, ends, self.lr)


class FullKickEdge(EdgeFlow):
    """The first version of edge flow: the signed magnitude takes the whole kick along u."""

    def finish(self, z, end, terms, step):
        centre, direction, magnitude = end
        signed = magnitude + jnp.vdot(direction, parity_kick(step, z[0], centre, terms.ends, self.lr))
        return EdgePoint(centre, jnp.where(signed < 0, -direction, direction), jnp.abs(signed))


FULL_KICK = {"rod_flow": FullKick, "edge_flow": FullKickEdge}


def variant(process, kind: type):
    """``process`` rebuilt as the class ``kind`` (same fields)."""
    return kind(**{field.name: getattr(process, field.name) for field in dataclasses.fields(process)})


class NoKick(RodFlow):
    """No parity kick at all."""

    def finish(self, z, end, ends, step):
        return end


def two_step_radius(process, x: jax.Array, r: jax.Array, kick: str) -> complex:
    """The flip eigenvalue (:func:`leading`) of d(z_{k+2})/d(z_k), z = (x, r), at a fixed point of the one-step map,
    for the rod flow as it is (``now``), with the ``full`` kick of its first version, or with ``none``."""
    d = x.size
    kind = {"now": type(process), "full": FullKick, "none": NoKick}[kick]
    model = variant(process, kind)
    vectors = process.initial_vectors(x)

    def one(z, k):
        state = FlowState(
            (z[:d], z[d:]), vectors, jnp.stack([vectors] * 2), jnp.asarray(jnp.nan, z.dtype), jnp.asarray(k)
        )
        new, _ = model.step(state)
        return jnp.concatenate(new.z)

    z = jnp.concatenate([x, r])
    first = jax.jacfwd(lambda z: one(z, 0))(z)
    second = jax.jacfwd(lambda z: one(z, 1))(z)
    return leading(np.asarray(second @ first))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="matrix_factorization", choices=list(PROBLEMS))
    parser.add_argument("--lrs", default="0.07,0.075,0.08,0.083,0.084,0.085,0.0853,0.0855")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--jacobian", action="store_true", help="two-step spectral radii at GD's orbit")
    parser.add_argument("--kick", default="now", choices=["now", "full"], help="full: the first version's kick")
    args = parser.parse_args()
    for lr in [float(value) for value in args.lrs.split(",")]:
        rod, problem = build("rod_flow", PROBLEMS[args.problem], lr)
        gd = gd_iterates(problem.objective, problem.w0, lr, args.steps)
        tail = gd[-52:]
        residual = np.max(np.linalg.norm(tail[2:] - tail[:-2], axis=1))
        half = np.linalg.norm(gd[-1] - gd[-2]) / 2
        line = f"lr {lr:.4f}  GD res2 {residual:.1e} half {half:.5f}"
        for name in ("rod_flow", "edge_flow"):
            process, _ = build(name, PROBLEMS[args.problem], lr)
            if args.kick == "full":
                process = variant(process, FULL_KICK[name])
            _, rows = process.advance(process.init(problem.w0), args.steps)
            loss, amplitude = np.asarray(rows["predicted_loss"][-50:]), np.asarray(rows["amplitude"][-50:])
            line += (
                f" | {name}: spread loss {np.ptp(loss):.1e} amp {np.ptp(amplitude):.1e}"
                f" amp/half-1 {amplitude[-1] / half - 1:+.1e}"
            )
            if args.kick == "full":
                line += " last 4 loss " + " -> ".join(f"{value:.2f}" for value in loss[-4:])
        print(line, flush=True)
        if args.jacobian:
            x, r = jnp.asarray((gd[-2] + gd[-1]) / 2), jnp.asarray((gd[-2] - gd[-1]) / 2)
            u = r / jnp.linalg.norm(r)
            curvature = [lr * float(u @ problem.objective.hvp(x + sign * r, u)) for sign in (1.0, -1.0)]
            gd_map = jax.jacfwd(lambda w, lr=lr, objective=problem.objective: w - lr * objective.grad(w))
            gd_two_step = leading(np.asarray(gd_map(jnp.asarray(gd[-1])) @ gd_map(jnp.asarray(gd[-2]))))
            radii = {kick: two_step_radius(rod, x, r, kick) for kick in ("now", "full", "none")}
            mu, delta = sum(curvature) / 2, abs(curvature[0] - curvature[1]) / 2
            reduced = np.linalg.eigvals(np.array([[1 - mu, -delta], [delta, mu - 1]]))
            print(
                f"    most negative two-step eigenvalue at GD's orbit: kick now {radii['now']:.3f}, full "
                f"kick {radii['full']:.3f}, no kick {radii['none']:.3f}; GD {gd_two_step:.3f};  mu "
                f"{mu:.3f} delta {delta:.3f}; M's eigenvalues {reduced[0]:.3f}, {reduced[1]:.3f}, "
                f"M^2 = {(1 - mu) ** 2 - delta**2:.3f} I",
                flush=True,
            )


if __name__ == "__main__":
    main()
