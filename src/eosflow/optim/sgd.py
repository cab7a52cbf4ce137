"""Stochastic gradient descent with heavy-ball momentum and weight decay (PyTorch convention).

    b_{k+1} = beta b_k + g_B(w_k) + lam w_k,     w_{k+1} = w_k - lr b_{k+1},     b_0 = 0

g_B is the gradient of the mean loss over a minibatch B of S examples, so that
g_B = g + xi with Cov(xi) = Sigma_g / S (times (N - S) / (N - 1) for a batch of distinct
examples), Sigma_g = 1/N sum_i (g_i - g)(g_i - g)^T the per-example gradient covariance.
Objectives without data (toys) get the optional Gaussian noise xi ~ N(0, sigma^2 I / S).

Every random draw of step k comes from the process key folded with k (and, for shuffled epochs,
with the epoch), so a resumed run draws exactly the batches an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from eosflow.batch_sharpness import batch_quotient
from eosflow.config import SpecError, SpecWarning, option, warn_unused
from eosflow.objective import Objective
from eosflow.process import ScannedProcess, process_key, register_process, scanned_fields
from eosflow.spectrum import carried, tracked_row, value_grad_and_tracked

Sampling = Literal["with_replacement", "without_replacement", "shuffle"]
_EPOCH_STREAM = 0x7FFFFFFE  # fold-in tag of the shuffled epochs' permutations


@dataclasses.dataclass(frozen=True)
class SGDOptions:
    batch_size: int = option(32, "examples per minibatch S", ge=1)
    momentum: float = option(0.0, "heavy-ball momentum beta: b <- beta b + g_B + lam w", ge=0, lt=1)
    weight_decay: float = option(0.0, "L2 coefficient lam added to the minibatch gradient", ge=0)
    sampling: Sampling = option(
        "with_replacement",
        "with_replacement: S iid examples; without_replacement: S distinct examples; "
        "shuffle: a fresh permutation every epoch, cut into N // S batches",
    )
    gradient_noise: float = option(0.0, "sigma of extra Gaussian gradient noise N(0, sigma^2 I / S)", ge=0)
    loss_every: int = option(
        1, "full-batch loss and gradient norm every n steps (in between: the minibatch loss)", ge=1
    )
    noise_every: int = option(0, "estimate tr(Sigma_g) from per-example gradients every n steps (0: never)", ge=0)
    noise_examples: int = option(0, "examples drawn for that estimate (0: all; else at least 2)", ge=0)
    batch_sharpness_every: int = option(
        0,
        "record the step's own batch quotient every n steps (0: never): batch_curvature = b^T (H_B + lam I) b and "
        "batch_descent = (g_B + lam w)^T b along the buffer b, one minibatch HVP each (eosflow.batch_sharpness)",
        ge=0,
    )

    def check(self, where: str) -> None:
        check_noise_examples(self.noise_examples, where)


def check_noise_examples(count: int | None, where: str) -> None:
    """A SpecError for ``noise_examples`` = 1: the covariance of one example's gradient about their mean is 0, so
    the noise would be switched off without a word (0 means every example)."""
    if count == 1:
        raise SpecError(
            f"`{where}.noise_examples` = 1 estimates the gradient covariance from one example, which is 0 (no noise "
            "at all): use at least 2, or 0 for every example"
        )


class SGDState(NamedTuple):
    w: Array
    buffer: Array  # the momentum buffer b_k
    vectors: Array
    step: Array


# ---- minibatches -------------------------------------------------------------------------


def sample_batch(key: Array, step: Array, num_examples: int, batch_size: int, sampling: Sampling) -> Array:
    """Indices of the minibatch of step ``step``, a pure function of (key, step)."""
    draw = jax.random.fold_in(key, step)
    if sampling == "with_replacement":
        return jax.random.randint(draw, (batch_size,), 0, num_examples)
    if sampling == "without_replacement":
        return jax.random.permutation(draw, num_examples)[:batch_size]
    per_epoch = num_examples // batch_size
    epoch_key = jax.random.fold_in(jax.random.fold_in(key, _EPOCH_STREAM), step // per_epoch)
    order = jax.random.permutation(epoch_key, num_examples)
    return jax.lax.dynamic_slice(order, ((step % per_epoch) * batch_size,), (batch_size,))


def minibatch_noise_scale(num_examples: int | None, batch_size: int, sampling: Sampling) -> float:
    """c with Cov(g_B - g) = c Sigma_g: 1/S with replacement, (N - S) / (S (N - 1)) for distinct examples.

    (For ``shuffle`` this is the covariance of one batch given the epoch start, the usual model.)
    """
    if num_examples is None or sampling == "with_replacement":
        return 1.0 / batch_size
    if num_examples == 1:
        return 0.0
    return (num_examples - batch_size) / (batch_size * (num_examples - 1))


# ---- the per-example gradient covariance Sigma_g -----------------------------------------


def gradient_noise_factor(objective: Objective, w: Array, indices: Array | None = None) -> Float[Array, "n d"]:
    """R with Sigma_g = R^T R: the centred per-example gradients divided by sqrt(n).

    A Gaussian with covariance Sigma_g is R^T z, z ~ N(0, I_n), without forming the d x d matrix.
    """
    grads = objective.per_example_grads(w, indices)
    return (grads - jnp.mean(grads, axis=0)) / jnp.sqrt(grads.shape[0])


def gradient_noise_trace(objective: Objective, w: Array, indices: Array | None = None) -> Array:
    """tr(Sigma_g) = 1/n sum_i ||g_i - g||^2."""
    return jnp.sum(gradient_noise_factor(objective, w, indices) ** 2)


def gradient_noise_top(
    objective: Objective, w: Array, k: int = 1, indices: Array | None = None
) -> tuple[Float[Array, " k"], Float[Array, "d k"]]:
    """Top-k eigenpairs of Sigma_g = R^T R (descending), from the smaller of R R^T and R^T R."""
    factor = gradient_noise_factor(objective, w, indices)
    n, d = factor.shape
    if n < d:
        values, left = jnp.linalg.eigh(factor @ factor.T)
        values, left = values[::-1][:k], left[:, ::-1][:, :k]
        vectors = factor.T @ left / jnp.sqrt(jnp.maximum(values, jnp.finfo(factor.dtype).tiny))
    else:
        values, vectors = jnp.linalg.eigh(factor.T @ factor)
        values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
    return values, vectors


def step_noise(
    objective: Objective, w: Array, options: SGDOptions, directions: Array | None = None
) -> tuple[Array, Array | None]:
    """SGD's per-step noise Xi = c Sigma_g + sigma^2 I / S at w: (tr Xi, U^T Xi U for the columns U).

    c is :func:`minibatch_noise_scale`; objectives without data contribute only sigma^2 I / S.
    """
    isotropic = options.gradient_noise**2 / options.batch_size
    trace: float | Array = isotropic * w.size
    projected = None if directions is None else isotropic * jnp.eye(directions.shape[1], dtype=w.dtype)
    if objective.data is not None:
        scale = minibatch_noise_scale(objective.num_examples, options.batch_size, options.sampling)
        factor = gradient_noise_factor(objective, w)
        trace = trace + scale * jnp.sum(factor**2)
        if directions is not None and projected is not None:  # projected is None only without directions
            along = factor @ directions
            projected = projected + scale * along.T @ along
    return jnp.asarray(trace), projected


# ---- the process -------------------------------------------------------------------------


class SGD(ScannedProcess):
    objective: Objective
    options: SGDOptions = eqx.field(static=True)
    sample_key: Array  # the stream of minibatches and noise draws (a pure function of the step)

    @property
    def num_examples(self) -> int | None:
        return None if self.objective.data is None else self.objective.num_examples

    def init(self, w0: Array) -> SGDState:
        return SGDState(w0, jnp.zeros_like(w0), self.initial_vectors(w0), jnp.asarray(0))

    def minibatch_gradient(self, w: Array, step: Array) -> tuple[Array, Array]:
        """(minibatch loss, g_B(w)) of step ``step``: a sampled batch, plus Gaussian noise if asked."""
        o = self.options
        if self.num_examples is None:
            loss, grad = self.objective.value_and_grad(w)
        else:
            indices = sample_batch(self.sample_key, step, self.num_examples, o.batch_size, o.sampling)
            batch = jax.tree_util.tree_map(lambda leaf: leaf[indices], self.objective.data)
            loss, grad = self.objective.with_data(batch).value_and_grad(w)
        if o.gradient_noise > 0:
            key = jax.random.fold_in(jax.random.fold_in(self.sample_key, _GAUSSIAN_STREAM), step)
            grad = grad + o.gradient_noise / jnp.sqrt(o.batch_size) * jax.random.normal(key, w.shape, w.dtype)
        return loss, grad

    @property
    def gradient_share(self) -> float:
        """The step's own gradient cost in full-batch gradients, B / N (1 without data): the minibatch
        gradient. The full-batch loss of the record (``loss_every``) is a measurement, like the eigensolver."""
        n = self.num_examples
        return 1.0 if n is None else self.options.batch_size / n

    def step(self, state: SGDState) -> tuple[SGDState, dict[str, Array]]:
        o, w, step = self.options, state.w, state.step
        batch_loss, batch_grad = self.minibatch_gradient(w, step)
        recorded = step % o.loss_every == 0  # full-batch loss and gradient norm (else the minibatch loss, NaN)

        def sometimes(w: Array) -> tuple[Array, Array]:  # (L, g) where recorded, on a step without a measurement
            full, nan = self.objective.value_and_grad, (batch_loss, jnp.nan * w)
            return jax.lax.cond(recorded, lambda w: full(w), lambda _: nan, w)

        (loss, grad), pairs = value_grad_and_tracked(
            self.objective, w, state.vectors, step, self.spectrum, otherwise=None if o.loss_every == 1 else sometimes
        )
        loss, grad_norm = jnp.where(recorded, loss, batch_loss), jnp.where(recorded, jnp.linalg.norm(grad), _nan(w))
        buffer = o.momentum * state.buffer + batch_grad + o.weight_decay * w
        vectors, row = carried(pairs, self.spectrum.carry, state.vectors), tracked_row(pairs, self.lr, self.spectrum)
        row.update(
            position=w,
            loss=loss,
            batch_loss=batch_loss,
            grad_norm=grad_norm,
            lr=jnp.asarray(self.lr, w.dtype),
            step_norm_sq=self.lr**2 * jnp.sum(buffer**2),
            grads=jnp.asarray(self.gradient_share, w.dtype),
        )
        if o.noise_every:
            row["noise_trace"] = self.noise_trace_row(w, step)
        if o.batch_sharpness_every:
            row["batch_curvature"], row["batch_descent"] = self.batch_quotient_row(w, step, batch_grad, buffer)
        return SGDState(w - self.lr * buffer, buffer, vectors, step + 1), row

    def batch_quotient_row(self, w: Array, step: Array, batch_grad: Array, buffer: Array) -> tuple[Array, Array]:
        """The step's own (b^T (H_B + lam I) b, (g_B + lam w)^T b) every ``batch_sharpness_every`` steps (NaN
        otherwise): :func:`eosflow.batch_sharpness.batch_quotient` on this step's minibatch."""

        def measure(_):
            def hvp(v: Array) -> Array:  # H_B v on this step's minibatch (its noise, if any, is constant in w)
                return jax.jvp(lambda x: self.minibatch_gradient(x, step)[1], (w,), (v,))[1]

            quotient = batch_quotient(hvp, w, batch_grad, buffer, self.options.weight_decay)
            return quotient.curvature, quotient.descent

        nan = _nan(w)
        return jax.lax.cond(step % self.options.batch_sharpness_every == 0, measure, lambda _: (nan, nan), None)

    def noise_trace_row(self, w: Array, step: Array) -> Array:
        """tr(Sigma_g) at steps that are multiples of ``noise_every`` (NaN otherwise)."""
        o, n = self.options, self.num_examples
        if n is None:
            return _nan(w)

        def measure(_):
            indices = None
            if 0 < o.noise_examples < n:
                key = jax.random.fold_in(jax.random.fold_in(self.sample_key, _NOISE_ESTIMATE_STREAM), step)
                indices = jax.random.permutation(key, n)[: o.noise_examples]
            return gradient_noise_trace(self.objective, w, indices)

        return jax.lax.cond(step % o.noise_every == 0, measure, lambda _: _nan(w), None)


_GAUSSIAN_STREAM = 0x7FFFFFFD  # fold-in tags separating the random streams of one process key
_NOISE_ESTIMATE_STREAM = 0x7FFFFFFC


def check_batch_size(objective: Objective, batch_size: int, where: str) -> None:
    """A SpecError naming ``where`` when a batch would need more examples than the problem has."""
    if objective.data is not None and batch_size > objective.num_examples:
        raise SpecError(
            f"`{where}` = {batch_size} exceeds the problem's {objective.num_examples} "
            "training examples; choose at most that many"
        )


def _nan(like: Array) -> Array:
    return jnp.full((), jnp.nan, like.dtype)


@register_process("sgd", SGDOptions, "minibatch SGD with heavy-ball momentum and weight decay", discrete=True)
def build_sgd(problem, spec, options: SGDOptions) -> SGD:
    objective = problem.objective
    check_batch_size(objective, options.batch_size, "sgd.batch_size")
    check_batch_size(objective, options.noise_examples, "sgd.noise_examples")  # (it was clipped to N)
    if not options.noise_every:
        warn_unused(options, "sgd", {"noise_examples": "it sizes the noise estimate, and noise_every = 0"})
    if objective.data is None and options.gradient_noise == 0:
        warnings.warn(
            "sgd on a problem without data (a loss of w alone) has no minibatches to sample, and "
            "`sgd.gradient_noise` = 0 adds no noise: this run is full-batch GD with sgd's momentum and "
            "weight decay; set `sgd.gradient_noise` > 0 for the Gaussian model of minibatch noise",
            SpecWarning,
            stacklevel=2,
        )
    if objective.data is None and options.noise_every:
        warnings.warn(
            "`sgd.noise_every` estimates tr(Sigma_g) from per-example gradients, and a problem without data has "
            "none: noise_trace reads NaN",
            SpecWarning,
            stacklevel=2,
        )
    return SGD(
        **scanned_fields("sgd", spec, objective),
        options=options,
        sample_key=process_key(spec.seed, "sgd/minibatches"),
    )
