"""The mean-field particle model as a process: every neuron's centre and its share of the oscillation.

On ``two_layer_meanfield`` (f(x) = (1/N) sum_i a_i sigma(w_i . x), GD with lr = N eta) GD visits
p_i +- delta_i on alternate steps, and averaging two steps gives (:mod:`eosflow.meanfield`,
docs/meanfield.md)

    dp_i/dt     = -eta/2 [grad V(p_i + delta_i; rho_+) + grad V(p_i - delta_i; rho_-)]
    ddelta_i/dt =  eta/2 [grad V(p_i + delta_i; rho_+) - grad V(p_i - delta_i; rho_-)] - 2 delta_i,

seeded with the half-step rod delta(0) = lr/2 g(w0). Rows: ``position`` (the centres, flat),
``loss`` = L(centres), ``predicted_loss`` = 1/2 (L(w + delta) + L(w - delta)) (GD's two-step
average), ``free_energy`` FF = predicted_loss - |delta|^2 / lr, and ``amplitude`` = |delta|, which
is GD's |w_{k+1} - 2 w_k + w_{k-1}| / 4 (``oscillation``). Cost per substep: two gradients
(:func:`eosflow.meanfield.euler_step`).
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array

from eosflow import meanfield as mf
from eosflow.flows.gradient import SubstepOptions, substep_count
from eosflow.objective import Objective
from eosflow.process import ScannedProcess, process_key, register_process
from eosflow.spectrum import spectrum_row


class ParticleState(NamedTuple):
    w: Array  # the centres p_i, flat (a_1..a_N, w_1..w_N)
    delta: Array  # the oscillation shares delta_i, same layout
    vectors: Array  # tracked Hessian eigenvectors at the centres (warm start)
    sharpness: Array  # last measured S (sets the substep count)
    step: Array


class ParticleModel(ScannedProcess):
    objective: Objective
    width: int = eqx.field(static=True)
    options: SubstepOptions = eqx.field(static=True)

    def init(self, w0: Array) -> ParticleState:
        delta = 0.5 * self.lr * self.objective.grad(w0)
        return ParticleState(w0, delta, self.initial_vectors(w0), jnp.asarray(jnp.nan, w0.dtype), jnp.asarray(0))

    def step(self, state: ParticleState) -> tuple[ParticleState, dict[str, Array]]:
        vectors, row = spectrum_row(self.objective, state.w, state.vectors, state.step, self.lr, self.spectrum)
        sharpness = jnp.where(jnp.isfinite(row["sharpness"]), row["sharpness"], state.sharpness)
        n = substep_count(self.lr, sharpness, self.options)
        particles = mf.Particles(mf.to_particles(state.w, self.width), mf.to_particles(state.delta, self.width))
        new, observed = mf.euler_step(self.objective, particles, self.lr / self.width, n)
        row.update(
            position=state.w, loss=observed.risk, predicted_loss=observed.averaged_risk,
            free_energy=observed.free_energy, amplitude=jnp.linalg.norm(state.delta),
            substeps=n, grads=2 * n + 1,
        )
        return ParticleState(mf.to_flat(new.centres), mf.to_flat(new.oscillation), vectors, sharpness,
                             state.step + 1), row


@register_process("particle_model", SubstepOptions,
                  "mean-field particle model: each neuron's centre and its share of GD's period-2 oscillation",
                  problems=("two_layer_meanfield",))
def build(problem, spec, options: SubstepOptions) -> ParticleModel:
    return ParticleModel(
        name="particle_model", lr=spec.lr, spectrum=spec.spectrum, key=process_key(spec.seed, "particle_model"),
        objective=problem.objective, width=int(problem.info["width"]), options=options,
    )
