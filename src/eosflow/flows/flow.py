"""The process every flow is: measure eigenpairs -> choose n substeps -> integrate -> observe.

A model subclasses :class:`Flow` and writes its mathematics as a few methods:

    start(w0) -> z                                  its variables at t = 0 (a pytree of arrays)
    field(z) -> (dz/dt, aux)                        its vector field (aux: what the row reports)
    observe(z, aux, setup, n) -> dict               the row at the start of the step (see ROW below)

and, when it needs them,

    position(z)                                     the centre, where eigenpairs are measured (z or z[0])
    measure(z, vectors, step) -> (vectors, row, S, value)  the tracked eigenpairs there (default: of H;
                                                    the adaptive models': of P^-1/2 H P^-1/2), and (L, g)
                                                    there, from the linearization the eigensolver's HVPs
                                                    come from (:func:`measured_value`)
    prepare(z, measured, step) -> (z, setup)        per-step quantities held fixed (default: measured)
    term(setup, n)                                  the field given to the update (default: self.field)
    update(field, z, h, key)                        the solver (default :func:`euler`)
    substeps(measured, setup) -> n                  default: ``substep_count`` at the measured sharpness
    finish(z, end, aux, step) -> z(t + 1)           a jump after the unit of time (the rod's parity kick)
    substep_key(step)                               a PRNG key per step for stochastic updates

:meth:`Flow.step` runs them in that order, once, for every flow, and :func:`register_flow` makes
a model a process under its name (see docs/architecture.md for a worked example).

A model that evaluates (L, g) at the position (its first substep starts there) takes them from
``Measured.value`` through :func:`value_and_grad_at`: each step then computes the gradient at the
position once, as the linearization's primal, not a second time in the field.

ROW: the fields a flow's row shares with every process (``position``, ``loss``, the spectrum's
``sharpness``/``eigenvalues``/``hvps``, ``grads``) and the predictions of the oscillation
(:func:`prediction_row`) are listed in docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array

from eosflow.flows.integrate import SubstepOptions, euler, integrate, substep_count
from eosflow.objective import Objective
from eosflow.process import ScannedProcess, register_process, scanned_fields
from eosflow.spectrum import Eigenpairs, tracked_row, value_grad_and_tracked
from eosflow.tracker import fitted_extrapolation


class FlowState(NamedTuple):
    z: Any  # the model's variables (a pytree of arrays, e.g. (centre, rod))
    vectors: Array  # (d, k) tracked Hessian eigenvectors measured at the last step (warm start)
    older: Array  # (2, d, k) those of the two steps before it (the fitted start's history)
    sharpness: Array  # the last measured S (sets the substep count on steps without a measurement)
    step: Array


class Measured(NamedTuple):
    """The spectrum at the start of a step."""

    vectors: Array  # d x k tracked eigenvectors at the position
    values: Array  # (k,) their eigenvalues, descending (NaN when not measured this step)
    sharpness: Array  # the last finite S
    previous: Array  # d x k the vectors carried from the previous step
    value: tuple[Array, Array] | None = None  # (L, g (d,)) at the position, when the measurement gave them
    position: Array | None = None  # (d,) where they were measured


def value_and_grad_at(objective: Objective, measured: Measured | None) -> Callable[[Array], tuple[Array, Array]]:
    """w -> (L(w), g(w)): the measurement's ``value`` at the point it was made at (no evaluation), else
    one gradient. A branch taken at run time, since a step's substeps run in one loop (compiled once)
    whose first starts at the position; without a measured value, always the gradient."""
    if measured is None or measured.value is None or measured.position is None:
        return objective.value_and_grad
    value, position = measured.value, measured.position

    def value_and_grad(w: Array) -> tuple[Array, Array]:
        return jax.lax.cond(jnp.all(w == position), lambda _: value, lambda x: objective.value_and_grad(x), w)

    return value_and_grad


def position_grads(measured: Measured) -> Array:
    """The gradients a step spends on (L, g) at the position (its row's ``grads``, however often the model reads
    them through :func:`value_and_grad_at`): none on a step that measured (the linearization's primal), one on
    the others (:func:`measured_value`'s)."""
    return jnp.where(jnp.isfinite(measured.values[0]), 0, 1).astype(jnp.int32)


def measured_value(
    objective: Objective, w: Array, vectors: Array, step: Array, spectrum, preconditioner: Array | None = None
) -> tuple[tuple[Array, Array], Eigenpairs]:
    """((L(w), g(w)), the tracked eigenpairs at w) as a flow measures them: one linearization of (L, g) on
    a measured step (:func:`~eosflow.spectrum.value_grad_and_tracked`), whose HVPs are the solver's, of H or
    of P^-1/2 H P^-1/2 for a ``preconditioner`` P that does not read g; one gradient on the other steps
    (dropped by the compiler where the flow does not read it). A ``lax.cond`` on ``step % every`` even when
    every step measures (``every = 1``), as a flow's measurement always ran: XLA compiles the branch apart from
    the step's substeps, so its products round as they did (inlined, they did not: the solver then stopped an
    iteration apart on some steps, which moved free_energy's trajectory, which reads the eigenvectors)."""
    scale = None if preconditioner is None else (lambda _: preconditioner)

    def tracked(every: int) -> Callable[[Any], tuple[tuple[Array, Array], Eigenpairs]]:
        fixed = dataclasses.replace(spectrum, every=every)  # 1: measure, 0: one gradient
        return lambda _: value_grad_and_tracked(objective, w, vectors, step, fixed, preconditioner=scale)

    if spectrum.every == 0:
        return tracked(0)(None)
    return jax.lax.cond(step % spectrum.every == 0, tracked(1), tracked(0), None)


def critical_count(values: Array, threshold: Array | float, m_max: int, dimension: int) -> tuple[Array, Array]:
    """(m, complete) for tracked eigenvalues ``values`` (descending, NaN if unmeasured) of a
    ``dimension`` x ``dimension`` Hessian: m = the number at or above ``threshold``, at most ``m_max``;
    ``complete`` = 1 when the (m+1)-th tracked eigenvalue is below the threshold (or all ``dimension``
    are tracked), which shows that the critical set holds every eigenvalue above it, else 0: every
    tracked eigenvalue is critical (the next is not measured; raise ``spectrum.k_max``) or ``m_max``
    cut the set."""
    m = jnp.minimum(jnp.sum(values >= threshold), m_max).astype(jnp.int32)
    beyond = -jnp.inf if values.shape[0] >= dimension else jnp.inf  # no eigenvalue left / one not measured
    after = jnp.concatenate([values, jnp.full((1,), beyond, values.dtype)])[m]
    return m, (after < threshold).astype(jnp.int32)


class Flow(ScannedProcess):
    """Base of every continuous-time model; see the module docstring for what a model writes."""

    objective: Objective

    # ---- the model ------------------------------------------------------------------------------
    def start(self, w0: Array) -> Any:
        raise NotImplementedError

    def field(self, z: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def observe(self, z: Any, aux: Any, setup: Any, n: Array | int) -> dict[str, Array]:
        raise NotImplementedError

    def position(self, z: Any) -> Array:
        return z[0] if isinstance(z, tuple) else z  # a NamedTuple or a tuple of variables, else the array itself

    def measure(self, z: Any, vectors: Array, step: Array) -> tuple[Array, dict[str, Array], Array, Any]:
        """(tracked vectors, the spectrum's row fields, the sharpness measured this step or NaN, (L, g) at
        the position: :func:`measured_value`'s)."""
        value, pairs = measured_value(self.objective, self.position(z), vectors, step, self.spectrum)
        row = tracked_row(pairs, self.lr, self.spectrum)
        return pairs.vectors, row, row["sharpness"], value

    def prepare(self, z: Any, measured: Measured, step: Array) -> tuple[Any, Any]:
        return z, measured

    def term(self, setup: Any, n: Array | int) -> Any:
        return self.field

    def update(self, field: Any, z: Any, h: Any, key: Array | None) -> tuple[Any, Any]:
        return euler(field, z, h, key)

    def substeps(self, measured: Measured, setup: Any) -> Array | int:
        options: SubstepOptions = self.options  # type: ignore[attr-defined]
        return substep_count(self.lr, measured.sharpness, options)

    def finish(self, z: Any, end: Any, aux: Any, step: Array) -> Any:
        return end

    def substep_key(self, step: Array) -> Array | None:
        return None

    def anchor(self, window: Sequence[Any]) -> Any:
        """The model's variables at the optimizer's step k from its states at k-2 .. k+2 (each with ``w``):
        :meth:`start` at the centre c_k(w) of :func:`centred`. Models with an oscillation variable that
        the iterates determine (the rod flows) set it too; others start it as at w0."""
        return self.start(centred([s.w for s in window]))

    def start_on(self, window: Sequence[Any]) -> FlowState:
        """The process state at the optimizer's step k = ``window[2].step`` (instead of :meth:`init` at
        w0; ``window`` = its states at k-2 .. k+2): :meth:`anchor`, warm-started from the optimizer's
        tracked vectors there (the leading ``spectrum.k_max`` of them), its step counter (and so its parity) at k."""
        steps = [int(s.step) for s in window]
        if steps != list(range(steps[0], steps[0] + 5)):
            raise ValueError(f"the window must hold 5 consecutive states of the optimizer, got steps {steps}")
        here = window[2]
        vectors = here.vectors[:, : self.spectrum.k_max]  # (d, k): the optimizer's tracker may hold more
        older = jnp.stack([vectors] * 2)  # no motion to extend yet: the fitted start is these vectors
        nan = jnp.asarray(jnp.nan, here.w.dtype)
        return FlowState(self.anchor(window), vectors, older, nan, jnp.asarray(steps[2]))

    # ---- the process ----------------------------------------------------------------------------
    def init(self, w0: Array) -> FlowState:
        vectors = self.initial_vectors(w0)
        nan = jnp.asarray(jnp.nan, w0.dtype)
        return FlowState(self.start(w0), vectors, jnp.stack([vectors] * 2), nan, jnp.asarray(0))

    def step(self, state: FlowState) -> tuple[FlowState, dict[str, Array]]:
        position = self.position(state.z)
        start = state.vectors
        if self.spectrum.every == 1:  # the centre does not bounce: the last measurement, moved on by its fitted change
            start = fitted_extrapolation(state.vectors, state.older[0], state.older[1])
        vectors, row, measured_sharpness, value = self.measure(state.z, start, state.step)
        sharpness = jnp.where(jnp.isfinite(measured_sharpness), measured_sharpness, state.sharpness)
        values = row["eigenvalues"][: vectors.shape[1]]
        measured = Measured(vectors, values, sharpness, state.vectors, value, None if value is None else position)
        z, setup = self.prepare(state.z, measured, state.step)
        n = self.substeps(measured, setup)
        end, aux = integrate(self.term(setup, n), z, n, self.update, self.substep_key(state.step))
        observed = self.observe(z, aux, setup, n)
        row.update(observed, position=position, hvps=row["hvps"] + observed.get("hvps", 0))
        older = jnp.stack([state.vectors, state.older[0]])
        return FlowState(self.finish(z, end, aux, state.step), vectors, older, sharpness, state.step + 1), row


def probe_floor(w: Array) -> Array:
    """sqrt(eps) (1 + |w|_inf): the smallest step s of a central difference at w along a unit vector that the
    rounding of w + s u (eps |w_i| per component) does not swamp, as for any finite difference."""
    return jnp.sqrt(jnp.finfo(w.dtype).eps) * (1.0 + jnp.max(jnp.abs(w)))


def centred(values: Sequence[Array], j: int = 2) -> Array:
    """c_j(x) = (x_{j-1} + 2 x_j + x_{j+1}) / 4: exact on a linear trend, zero on a period-2 oscillation
    (x_j = a + b j + (-1)^j r gives a + b j); the centre of an optimizer's iterates around step j."""
    return 0.25 * (values[j - 1] + 2.0 * values[j] + values[j + 1])


def rod_of(values: Sequence[Array], k: int) -> Array:
    """The sign-free rod r with x_k = c_k + (-1)^k r, from x at k-2 .. k+2 (``values``)."""
    return (1 - 2 * (k % 2)) * (values[2] - centred(values))


def centre_and_rod(window: Sequence[Any]) -> tuple[Array, Array]:
    """(c_k, r_k) of the optimizer's iterates w in its states at k-2 .. k+2: w_k = c_k + (-1)^k r_k."""
    w = [s.w for s in window]
    return centred(w), rod_of(w, int(window[2].step))


def prediction_row(lr: float, loss: Array, grad: Array, sigma_values: Array, top_vector: Array, k_max: int) -> dict:
    """The row fields a flow predicts, from its centre and Sigma's eigenvalues (descending).

    time-averaged loss       L + 1/2 <Sigma, H> = L + tr(Sigma) / eta     (H = 2/eta on Sigma's range)
    time-averaged ||g||^2    ||g||^2 + tr(H Sigma H) = ||g||^2 + 4 tr(Sigma) / eta^2
    amplitude                sqrt(largest eigenvalue of Sigma)
    """
    trace = jnp.sum(sigma_values)
    return {
        "loss": loss,
        "grad_norm": jnp.linalg.norm(grad),
        "predicted_loss": loss + trace / lr,
        "predicted_grad_norm_sq": jnp.sum(grad**2) + 4.0 * trace / lr**2,
        "covariance": padded(sigma_values, k_max),
        "amplitude": jnp.sqrt(jnp.maximum(sigma_values[0], 0.0)),
        "top_vector": top_vector,
    }


def padded(values: Array, size: int) -> Array:
    """values followed by zeros, to length ``size`` (rows have static shapes)."""
    return jnp.concatenate([values, jnp.zeros((size - values.shape[0],), values.dtype)])


def register_flow(
    name: str,
    flow: type[Flow],
    options: type,
    summary: str,
    every_step: bool = False,
    problems: tuple[str, ...] | None = None,
    fields: Callable[[Any, Any, Any], dict] | None = None,
    optimizer: str | None = None,
) -> Callable[..., Flow]:
    """Register ``flow`` as the process ``name`` with its options table ``[name]``.

    The process gets ``name``, ``lr``, ``spectrum`` (measured at every step if ``every_step``), a
    key of its own, the problem's ``objective`` and the parsed ``options``; ``fields(problem, spec,
    options)`` returns any further (or overriding) fields of the model. A model of an optimizer
    other than GD names it in ``optimizer`` (whose table holds the shared hyperparameters).
    """

    def build(problem, spec, parsed) -> Flow:
        spectrum = dataclasses.replace(spec.spectrum_of(name), every=1) if every_step else spec.spectrum_of(name)
        extra = fields(problem, spec, parsed) if fields else {}
        base = {**scanned_fields(name, spec, problem.objective, spectrum), "options": parsed}
        return flow(**{**base, **extra})

    build.__doc__ = f"The {name} process ({flow.__name__})."
    return register_process(name, options, summary, problems=problems, optimizer=optimizer)(build)
