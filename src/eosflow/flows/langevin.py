"""The underdamped Langevin model of SGD with momentum (finite learning rate and batch size).

With physical time t = lr * step and v = dtheta/dt (one unit of process time is one SGD step):

    m dv = -(1 - beta) v dt - (g(theta) + lam theta) dt + sqrt(lr Xi(theta)) dW,   m = lr (1 + beta) / 2

Xi(theta) = c Sigma_g(theta) + sigma^2 I / S is the per-step covariance of SGD's gradient noise
(c = 1/S, or (N - S) / (S (N - 1)) for batches of distinct examples), with Sigma_g the per-example
gradient covariance of the problem at theta. The noise is sampled as sqrt(c) R^T z with
R = centred per-example gradients / sqrt(n), so no d x d matrix is formed.

Integrators (dt = lr / substeps), both with the force carried over between substeps:

- ``baoab``: half kick, half drift, the exact Ornstein-Uhlenbeck velocity update, half drift,
  half kick. For a quadratic it samples the exact stationary position variance at any stable dt.
- ``euler_maruyama``: theta += v dt, v += (F / m - (1 - beta) v / m) dt + sqrt(lr dt) / m zeta;
  first-order, and needs several substeps when lr h is not small.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from eosflow.config import option
from eosflow.objective import Objective
from eosflow.optim.sgd import (
    Sampling,
    SGDOptions,
    check_batch_size,
    gradient_noise_factor,
    minibatch_noise_scale,
)
from eosflow.process import ScannedProcess, process_key, register_process
from eosflow.spectrum import spectrum_row
from eosflow.theory.linear_regression import friction, mass


@dataclasses.dataclass(frozen=True)
class LangevinOptions:
    integrator: Literal["baoab", "euler_maruyama"] = option("baoab", "stochastic integrator")
    substeps: int = option(1, "integrator steps per optimizer step (dt = lr / substeps)", ge=1)
    batch_size: int | None = option(None, "S in Xi = Sigma_g / S (default: [sgd]'s)", ge=1)
    momentum: float | None = option(None, "beta (default: [sgd]'s)", ge=0, lt=1)
    weight_decay: float | None = option(None, "lam (default: [sgd]'s)", ge=0)
    sampling: Sampling | None = option(None, "sets the finite-population factor of Xi (default: [sgd]'s)")
    gradient_noise: float | None = option(None, "sigma of the extra noise sigma^2 I / S (default: [sgd]'s)", ge=0)
    noise_examples: int = option(0, "examples whose per-example gradients give Sigma_g at each noise draw "
                                    "(0: all)", ge=0)


class LangevinState(NamedTuple):
    theta: Array
    velocity: Array
    vectors: Array
    step: Array


class Langevin(ScannedProcess):
    objective: Objective
    sgd: SGDOptions = eqx.field(static=True)  # batch size, momentum, weight decay, sampling, sigma
    integrator: str = eqx.field(static=True)
    substeps: int = eqx.field(static=True)
    noise_examples: int = eqx.field(static=True)
    noise_key: Array

    def init(self, w0: Array) -> LangevinState:
        return LangevinState(w0, jnp.zeros_like(w0), self.initial_vectors(w0), jnp.asarray(0))

    def force(self, theta: Array) -> Array:
        """F = -(g(theta) + lam theta)."""
        return -(self.objective.grad(theta) + self.sgd.weight_decay * theta)

    def noise(self, theta: Array, key: Array) -> Array:
        """zeta ~ N(0, Xi(theta)): per-example gradient noise and/or the isotropic sigma^2 I / S."""
        data_key, gaussian_key = jax.random.split(key)
        zeta = jnp.zeros_like(theta)
        if self.objective.data is not None:
            n = self.objective.num_examples
            indices = None
            if 0 < self.noise_examples < n:
                indices = jax.random.permutation(jax.random.fold_in(data_key, 1), n)[: self.noise_examples]
            factor = gradient_noise_factor(self.objective, theta, indices)
            scale = minibatch_noise_scale(n, self.sgd.batch_size, self.sgd.sampling)
            zeta = jnp.sqrt(scale) * factor.T @ jax.random.normal(data_key, (factor.shape[0],), theta.dtype)
        if self.sgd.gradient_noise > 0:
            sigma = self.sgd.gradient_noise / jnp.sqrt(self.sgd.batch_size)
            zeta = zeta + sigma * jax.random.normal(gaussian_key, theta.shape, theta.dtype)
        return zeta

    def substep(self, carry: tuple[Array, Array, Array], key: Array) -> tuple[tuple[Array, Array, Array], None]:
        """One integrator step of physical time dt; carry = (theta, v, F(theta))."""
        theta, velocity, force = carry
        m, rate = mass(self.lr, self.sgd.momentum), 2.0 * friction(self.lr, self.sgd.momentum)
        dt = self.lr / self.substeps
        if self.integrator == "baoab":
            velocity = velocity + 0.5 * dt * force / m
            theta = theta + 0.5 * dt * velocity
            decay = jnp.exp(-rate * dt)
            kick = jnp.sqrt(self.lr * -jnp.expm1(-2.0 * rate * dt) / (2.0 * rate)) / m
            velocity = decay * velocity + kick * self.noise(theta, key)
            theta = theta + 0.5 * dt * velocity
            force = self.force(theta)
            velocity = velocity + 0.5 * dt * force / m
        else:
            kick = jnp.sqrt(self.lr * dt) / m
            new_velocity = velocity + dt * (force / m - rate * velocity) + kick * self.noise(theta, key)
            theta = theta + dt * velocity
            velocity, force = new_velocity, self.force(theta)
        return (theta, velocity, force), None

    def step(self, state: LangevinState) -> tuple[LangevinState, dict[str, Array]]:
        theta, step = state.theta, state.step
        loss, grad = self.objective.value_and_grad(theta)
        force = -(grad + self.sgd.weight_decay * theta)
        keys = jax.random.split(jax.random.fold_in(self.noise_key, step), self.substeps)
        carry = (theta, state.velocity, force)
        (new_theta, velocity, _), _ = jax.lax.scan(lambda c, k: self.substep(c, k), carry, keys)
        vectors, row = spectrum_row(self.objective, theta, state.vectors, step, self.lr, self.spectrum)
        row.update(
            position=theta, loss=loss, grad_norm=jnp.linalg.norm(grad), lr=jnp.asarray(self.lr, theta.dtype),
            step_norm_sq=jnp.sum((new_theta - theta) ** 2), velocity_norm_sq=jnp.sum(state.velocity**2),
        )
        return LangevinState(new_theta, velocity, vectors, step + 1), row


def resolve_sgd_options(options: LangevinOptions, spec) -> SGDOptions:
    """The SGD hyperparameters the model describes: its own options, else the spec's [sgd] table."""
    base = spec.options.get("sgd") or SGDOptions()
    fields = ("batch_size", "momentum", "weight_decay", "sampling", "gradient_noise")
    return dataclasses.replace(base, **{f: getattr(options, f) for f in fields if getattr(options, f) is not None})


@register_process(
    "langevin", LangevinOptions,
    "underdamped Langevin model of SGD: inertia lr(1+beta)/2, friction 1-beta, noise lr Sigma_g/S",
)
def build_langevin(problem, spec, options: LangevinOptions) -> Langevin:
    sgd = resolve_sgd_options(options, spec)
    objective = problem.objective
    check_batch_size(objective, sgd.batch_size, "langevin.batch_size")
    return Langevin(
        name="langevin", lr=spec.lr, spectrum=spec.spectrum, key=process_key(spec.seed, "langevin"),
        objective=objective, sgd=sgd, integrator=options.integrator, substeps=options.substeps,
        noise_examples=options.noise_examples, noise_key=process_key(spec.seed, "langevin/noise"),
    )
