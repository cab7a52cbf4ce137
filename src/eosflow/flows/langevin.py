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
from collections.abc import Callable
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from eosflow.config import option
from eosflow.flows.flow import Flow, Measured, position_grads, register_flow, value_and_grad_at
from eosflow.optim.sgd import (
    Sampling,
    SGDOptions,
    check_batch_size,
    check_noise_examples,
    gradient_noise_factor,
    minibatch_noise_scale,
)
from eosflow.process import process_key
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
    noise_examples: int = option(
        0, "examples whose per-example gradients give Sigma_g at each noise draw (0: all; else at least 2)", ge=0
    )

    def check(self, where: str) -> None:
        check_noise_examples(self.noise_examples, where)


class LangevinTerms(NamedTuple):
    """What the stochastic updates need: m dv = (F(theta) - rate m v) dt + sqrt(lr) zeta(theta) dW."""

    force: Callable[[Array], Array]  # F(theta) = -(g(theta) + lam theta)
    noise: Callable[[Array, Array], Array]  # (theta, key) -> zeta ~ N(0, Xi(theta))
    mass: float  # m = lr (1 + beta) / 2
    rate: float  # the velocity's decay rate, 2 friction(lr, beta)
    lr: float
    dt: float | Array  # physical time of one substep, lr / substeps


def baoab(
    terms: LangevinTerms, z: tuple[Array, Array, Array], h, key: Array
) -> tuple[tuple[Array, Array, Array], None]:
    """Half kick, half drift, exact Ornstein-Uhlenbeck velocity update, half drift, half kick; z = (theta, v, F)."""
    (theta, velocity, force), dt, m, rate = z, terms.dt, terms.mass, terms.rate
    velocity = velocity + 0.5 * dt * force / m
    theta = theta + 0.5 * dt * velocity
    decay = jnp.exp(-rate * dt)
    kick = jnp.sqrt(terms.lr * -jnp.expm1(-2.0 * rate * dt) / (2.0 * rate)) / m
    velocity = decay * velocity + kick * terms.noise(theta, key)
    theta = theta + 0.5 * dt * velocity
    force = terms.force(theta)
    velocity = velocity + 0.5 * dt * force / m
    return (theta, velocity, force), None


def euler_maruyama(
    terms: LangevinTerms, z: tuple[Array, Array, Array], h, key: Array
) -> tuple[tuple[Array, Array, Array], None]:
    """theta += v dt, v += (F / m - rate v) dt + sqrt(lr dt) / m zeta; z = (theta, v, F)."""
    (theta, velocity, force), dt, m = z, terms.dt, terms.mass
    kick = jnp.sqrt(terms.lr * dt) / m
    new_velocity = velocity + dt * (force / m - terms.rate * velocity) + kick * terms.noise(theta, key)
    theta = theta + dt * velocity
    return (theta, new_velocity, terms.force(theta)), None


UPDATES = {"baoab": baoab, "euler_maruyama": euler_maruyama}


class Langevin(Flow):
    options: LangevinOptions = eqx.field(static=True)
    sgd: SGDOptions = eqx.field(static=True)  # batch size, momentum, weight decay, sampling, sigma
    noise_key: Array

    def start(self, w0: Array) -> tuple[Array, Array]:
        """(theta, v) = (w0, 0)."""
        return w0, jnp.zeros_like(w0)

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
            if 0 < self.options.noise_examples < n:
                indices = jax.random.permutation(jax.random.fold_in(data_key, 1), n)[: self.options.noise_examples]
            factor = gradient_noise_factor(self.objective, theta, indices)
            scale = minibatch_noise_scale(n, self.sgd.batch_size, self.sgd.sampling)
            zeta = jnp.sqrt(scale) * factor.T @ jax.random.normal(data_key, (factor.shape[0],), theta.dtype)
        if self.sgd.gradient_noise > 0:
            sigma = self.sgd.gradient_noise / jnp.sqrt(self.sgd.batch_size)
            zeta = zeta + sigma * jax.random.normal(gaussian_key, theta.shape, theta.dtype)
        return zeta

    def prepare(self, z, measured: Measured, step: Array) -> tuple[tuple[Array, Array, Array], tuple[Array, ...]]:
        """The force rides along the substeps (one gradient per substep): z = (theta, v, F(theta)), F(theta) from the
        measurement's (L, g); setup = (L, g, the gradients they cost: :func:`~eosflow.flows.flow.position_grads`)."""
        theta, velocity = z
        loss, grad = value_and_grad_at(self.objective, measured)(theta)
        return (theta, velocity, -(grad + self.sgd.weight_decay * theta)), (loss, grad, position_grads(measured))

    def substeps(self, measured: Measured, setup) -> int:
        return self.options.substeps

    def term(self, setup, n: Array | int) -> LangevinTerms:
        momentum = self.sgd.momentum
        return LangevinTerms(
            self.force, self.noise, mass(self.lr, momentum), 2.0 * friction(self.lr, momentum), self.lr, self.lr / n
        )

    def update(self, terms: LangevinTerms, z, h, key):
        return UPDATES[self.options.integrator](terms, z, h, key)

    def substep_key(self, step: Array) -> Array:
        return jax.random.fold_in(self.noise_key, step)

    def finish(self, z, end, aux, step: Array) -> tuple[Array, Array]:
        return end[:2]

    def observe(self, z, aux: None, setup: tuple[Array, ...], n: Array | int) -> dict[str, Array]:
        (theta, velocity, _), (loss, grad, spent) = z, setup
        return {
            "loss": loss,
            "grad_norm": jnp.linalg.norm(grad),
            "lr": jnp.asarray(self.lr, theta.dtype),
            "velocity_norm_sq": jnp.sum(velocity**2),
            "grads": spent + jnp.asarray(n * (1.0 + self.noise_share), theta.dtype),
        }

    @property
    def noise_share(self) -> float:
        """A substep's per-example gradients for the noise, in full-batch gradients: m / N (0 without data)."""
        if self.objective.data is None:
            return 0.0
        n, m = self.objective.num_examples, self.options.noise_examples
        return (m if 0 < m < n else n) / n

    def step(self, state):
        """The wrapper's step, and the squared length of the step taken."""
        new, row = super().step(state)
        row["step_norm_sq"] = jnp.sum((new.z[0] - row["position"]) ** 2)
        return new, row


def resolve_sgd_options(options: LangevinOptions, spec) -> SGDOptions:
    """The SGD hyperparameters the model describes: its own options, else the spec's [sgd] table."""
    base = spec.options.get("sgd") or SGDOptions()
    fields = ("batch_size", "momentum", "weight_decay", "sampling", "gradient_noise")
    return dataclasses.replace(base, **{f: getattr(options, f) for f in fields if getattr(options, f) is not None})


def langevin_fields(problem, spec, options: LangevinOptions) -> dict:
    """The SGD hyperparameters (checked against the problem) and the noise's own key."""
    sgd = resolve_sgd_options(options, spec)
    check_batch_size(problem.objective, sgd.batch_size, "langevin.batch_size")
    check_batch_size(problem.objective, options.noise_examples, "langevin.noise_examples")
    return {"sgd": sgd, "noise_key": process_key(spec.seed, "langevin/noise")}


register_flow(
    "langevin",
    Langevin,
    LangevinOptions,
    "underdamped Langevin model of SGD: inertia lr(1+beta)/2, friction 1-beta, noise lr Sigma_g/S",
    fields=langevin_fields,
    optimizer="sgd",
)
