"""A live, warm-started sharpness tracker for the user's own training loop (optax style).

    tracker = eosflow.SharpnessTracker(loss_fn, k=3, tol=1e-3)       # loss_fn(params, batch)
    state = tracker.init(params, key)
    state, eig = tracker.update(state, params, batch)                 # jittable, scannable

``params`` is a pytree of floating arrays, or an Equinox module: its floating arrays are measured
(as ``eqx.filter_grad`` differentiates them) and ``loss_fn`` gets the whole module.

``eig.values`` are the top-k eigenvalues of the Hessian H of ``loss_fn(., batch)`` at ``params``
(descending), ``eig.vectors`` their unit eigenvectors (d x k, in the order of
``jax.flatten_util``-style flattening of ``params``), ``eig.residuals`` the relative residuals
||H v - lambda v|| / |lambda| (each <= tol unless ``max_iters`` ran out) and ``eig.hvps`` the
Hessian-vector products spent. Each update warm-starts :func:`eosflow.spectrum.lobpcg` from
the previous eigenvectors, so tracking a slowly moving spectrum costs a few HVPs per step.

Given ``preconditioner=P`` (P's diagonal, a pytree like ``params`` or a flat vector, e.g. from
:mod:`eosflow.optimizer_edges`), the eigenvalues are those of P^{-1/2} H P^{-1/2}, the
preconditioned sharpness that adaptive optimizers hold at ``edge_threshold``.

With ``every = N`` the solver runs on every N-th update only (``lax.cond``); the other updates
return the last measurement with ``hvps = 0``.

``warm_start="same_side"``, ``"extrapolated"`` or ``"fitted"`` (with ``every = 1``) start each
measurement as GD's does (:func:`gd_warm_start`): the tracker keeps its last 2, 4 or 6 measurements
and the last parameters and step, and an optimizer that bounces (consecutive steps pointing against
each other, as GD at the edge of stability) is measured from the vectors of the same side of its
orbit; the default, ``"previous"``, starts from the last measurement and keeps nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from eosflow.compiled import BoundedJit
from eosflow.objective import (
    check_example_count,
    check_loss_call,
    chunked_mean,
    differentiable_loss,
    differentiable_part,
    ravel,
)
from eosflow.precision import HALF_PRECISION, MATMUL_PRECISION
from eosflow.preconditioning import preconditioned_matvec
from eosflow.spectrum import Carry, Eigenpairs, lobpcg, power_step, random_vectors, unmeasured
from eosflow.tracing import equations

PyTree = Any
WarmStart = Literal["fitted", "extrapolated", "same_side", "previous"]


def _procrustes(earlier: Float[Array, "d k"], latest: Float[Array, "d k"]) -> tuple[Array, Array]:
    """Q = U V^T from the SVD U diag(c) V^T of X_b^T X_a, the rotation that best aligns X_b with X_a
    (orthogonal Procrustes), and c, the cosines of the principal angles between the two spans."""
    left, cosines, right = jnp.linalg.svd(earlier.T @ latest)
    return left @ right, cosines


def extrapolated_vectors(latest: Float[Array, "d k"], earlier: Float[Array, "d k"]) -> Float[Array, "d k"]:
    """The linear extrapolation 2 X_a - X_b Q of a tracked eigenbasis, one interval past ``latest`` X_a.

    Q (:func:`_procrustes`) is the rotation that best aligns X_b with X_a, so sign flips and
    reorderings of the tracked vectors between the two measurements do not count as motion; for k = 1
    it is the sign of <x_b, x_a>. Not normalized: LOBPCG orthonormalizes its start.
    """
    return 2.0 * latest - earlier @ _procrustes(earlier, latest)[0]


def warm_start_depth(rule: WarmStart) -> int:
    """How many past measurements :func:`gd_warm_start` reads (t-1, ..., t-depth)."""
    return {"previous": 1, "same_side": 2, "extrapolated": 4, "fitted": 6}[rule]


def start_history(vectors: Float[Array, "d k"], rule: WarmStart) -> Float[Array, "h d k"]:
    """The measurements before t - 1 that :func:`gd_warm_start` reads, all ``vectors`` at the start
    (h = 3 at least: the shape of GD's state before ``fitted``, so that its checkpoints still fit)."""
    return jnp.stack([vectors] * (max(warm_start_depth(rule), 4) - 1))


def grown_history(older: Float[Array, "h d k"], vectors: Float[Array, "d k2"]) -> Float[Array, "h d k2"]:
    """``older`` with the directions that the tracked block gained (the last k2 - k columns of
    ``vectors``) joined to every past measurement."""
    k = older.shape[2]
    fresh = jnp.broadcast_to(vectors[:, k:], (older.shape[0], *vectors[:, k:].shape))
    return jnp.concatenate([older, fresh], axis=2)


def fitted_extrapolation(
    latest: Float[Array, "d k"], earlier: Float[Array, "d k"], oldest: Float[Array, "d k"]
) -> Float[Array, "d k"]:
    """X_a + a (X_a - X_b Q_ab), a damped extrapolation of three equally spaced measurements X_c, X_b, X_a.

    Per column j, a_j in [0, 1] is the damping that would best have predicted X_a from the two before:
    with the change D = X_a - X_b Q_ab and the one before it, D' = (X_b - X_c Q_bc) Q_ab (both aligned
    to X_a, :func:`_procrustes`), a_j = clip(<D_j, D'_j> / |D'_j|^2, 0, 1), the least-squares fit of
    D_j by a_j D'_j. A basis that moves steadily has D = D' + O(step^2), so a = 1 + O(step) and the
    prediction stays second order; measurements of a basis that does not move differ by their
    tol-level noise only, D = e_a - e_b and D' = e_b - e_c, whose inner product is -|e_b|^2 < 0 in
    expectation, so a is mostly clipped to 0 and the noise is not doubled. a = 0 also where a
    tracked direction turns by more than 45 degrees between X_b and X_a (a new tracked direction, a
    catapult): there is no linear motion to extend.
    """
    rotation, cosines = _procrustes(earlier, latest)
    change = latest - earlier @ rotation
    before = (earlier - oldest @ _procrustes(oldest, earlier)[0]) @ rotation
    fit = jnp.sum(change * before, axis=0) / jnp.maximum(jnp.sum(before**2, axis=0), jnp.finfo(latest.dtype).tiny)
    damping = jnp.where(jnp.min(cosines) >= jnp.sqrt(0.5), jnp.clip(fit, 0.0, 1.0), 0.0)
    return latest + damping * change


def gd_warm_start(history: Float[Array, "h d k"], bouncing: Array, rule: WarmStart) -> Float[Array, "d k"]:
    """The warm start of GD's eigensolver at step t from the vectors measured at t-1, ..., t-h (``history``).

    ``previous``: those of step t-1. ``same_side``: when GD bounces (consecutive steps point against
    each other) those of step t-2, measured on the same side of its period-2 orbit, else t-1 (at the
    edge of stability GD bounces along the top eigenvectors and H alternates with the side, so the
    vectors of step t-2 are the closer start). ``extrapolated``: the same-side vectors moved on
    by their last same-side change, 2 X_{t-2} - X_{t-4} when bouncing, else 2 X_{t-1} - X_{t-2}
    (:func:`extrapolated_vectors`): the residual left by the drift of the eigenvectors is then second
    order in the step (docs/sharpness.md). ``fitted`` (h = 6): that change damped per vector by the
    factor in [0, 1] that would have predicted the last same-side measurement best
    (:func:`fitted_extrapolation` of X_{t-3s}, X_{t-2s}, X_{t-s}, s = 2 when bouncing, else 1), which
    is 0 where the vectors move less than their own tol-level noise (a settled period-2 orbit, where
    extrapolating only doubles that noise) and ~1 where they drift steadily. No HVP is spent on it.
    """
    if history.shape[0] < warm_start_depth(rule):
        raise ValueError(f"gd_warm_start({rule!r}) reads {warm_start_depth(rule)} measurements, got {history.shape[0]}")
    if rule == "previous":
        return history[0]
    latest = jnp.where(bouncing, history[1], history[0])
    if rule == "same_side":
        return latest
    earlier = jnp.where(bouncing, history[3], history[1])
    if rule == "extrapolated":
        return extrapolated_vectors(latest, earlier)
    return fitted_extrapolation(latest, earlier, jnp.where(bouncing, history[5], history[2]))


def warm_start_memory(vectors: Float[Array, "d k"], flat: Float[Array, " d"], rule: WarmStart) -> tuple[Array, Array]:
    """What a tracker keeps for ``rule`` before its first measurement: the measurements t-2, ..., t-depth
    (:func:`warm_start_depth`; the first start ``vectors`` repeated) and its last parameters and step (``flat`` and 0;
    none for ``"previous"``)."""
    older = jnp.broadcast_to(vectors, (warm_start_depth(rule) - 1, *vectors.shape))
    return older, jnp.stack([flat, jnp.zeros_like(flat)])[: 0 if rule == "previous" else 2]


def check_start_options(warm_start: str, carry: str) -> None:
    """A ValueError naming a tracker's ``warm_start`` or ``carry`` that is not one of its choices (both trackers')."""
    for name, value, choices in (("warm_start", warm_start, WarmStart), ("carry", carry, Carry)):
        if value not in get_args(choices):
            raise ValueError(
                f"SharpnessTracker {name} must be one of {', '.join(map(repr, get_args(choices)))}, got {value!r}"
            )


def tracked_warm_start(
    last: Float[Array, "d k"],
    older: Float[Array, "h d k"],
    params_and_step: Float[Array, "2 d"],
    flat: Float[Array, " d"],
    count: Array,
    rule: WarmStart,
) -> tuple[Float[Array, "d k"], Float[Array, "h d k"], Float[Array, "2 d"]]:
    """The start of a tracker's measurement at the parameters ``flat`` (:func:`gd_warm_start` of ``last``, what the
    last measurement left, and the ``older`` ones), and what it keeps for the next: the history shifted by one and
    ``flat`` with its step. The optimizer bounces when the parameters of the update before the last are nearer
    than the last's, |w - w_(t-2)| < |w - w_(t-1)| (from the third update, ``count`` >= 2, on; the tracker's
    updates so far), as the adaptive optimizers' own test: steps that merely point apart, as a minibatch's
    noise makes them half the time, are not a bounce."""
    step = flat - params_and_step[0]
    nearer = jnp.linalg.norm(step + params_and_step[1]) < jnp.linalg.norm(step)
    bouncing = jnp.logical_and(count >= 2, nearer)
    history = jnp.concatenate([last[None], older])  # measurements t-1, t-2, ...
    return gd_warm_start(history, bouncing, rule), history[:-1], jnp.stack([flat, step])


class TrackerState(NamedTuple):
    """The warm start and the last measurement (d parameters, k tracked eigenpairs)."""

    vectors: Float[Array, "d k"]  # eigenvectors of the last measurement (random before the first)
    values: Float[Array, " k"]  # eigenvalues of the last measurement (NaN before the first)
    residuals: Float[Array, " k"]  # their relative residuals (NaN before the first)
    count: Array  # type: ignore[assignment]  # updates so far (int32); the field shadows tuple.count
    hvps: Array  # Hessian-vector products spent so far (int32)
    older: Float[Array, "h d k"] | None = None  # measurements t-2, ..., t-1-h (h = warm_start_depth - 1)
    params: Float[Array, "h d"] | None = None  # parameters and step of the last update (h = 2, or 0)
    start: Float[Array, "d k"] | None = None  # carry = "power": the last vectors moved by H v / |H v| (None: vectors)


class SharpnessTracker(eqx.Module):
    """Top-k eigenpairs of the Hessian of ``loss_fn`` (optionally preconditioned), warm-started.

    Attributes:
        loss_fn: ``loss_fn(params, batch) -> scalar``, or ``loss_fn(params)`` when updates pass no batch.
        k: eigenpairs tracked.
        tol: relative residual ||H v - lambda v|| / |lambda| accepted for every pair.
        max_iters: LOBPCG iterations at most per measurement.
        every: measure on every ``every``-th update (the first update always measures).
        cluster: relative gap below which Ritz values form a cluster whose invariant subspace is
            converged as a whole (:func:`eosflow.spectrum.lobpcg`; None: per pair). Skipped updates
            report NaN subspace residuals.
        warm_start: where a measurement starts: ``"previous"`` (the last one's vectors),
            ``"same_side"``, ``"extrapolated"`` or ``"fitted"`` (as GD's, :func:`gd_warm_start`; needs
            every = 1).
        carry: what a measurement leaves for the next one to start from: ``"power"``, each vector moved by
            one power step H v / |H v| (:func:`eosflow.spectrum.power_step`, no HVP: its tol-level error along
            the bulk shrinks), or ``"ritz"``, the vectors themselves. The reported pairs are the same kind.
        microbatch: evaluate ``loss_fn`` on chunks of this many examples of the batch (the mean of
            their losses, each rematerialized; :func:`eosflow.objective.chunked_mean`), so that an HVP
            holds one chunk's activations (None: the whole batch; the loss must be a mean over examples).
        wrt: the part of the parameters measured, the rest held fixed, as your optimizer is told what to
            train: a Flax NNX filter (``nnx.LoRAParam``; default ``nnx.Param``) or an Equinox filter spec
            (default: the floating arrays; for a plain pytree, all leaves)
            (:func:`eosflow.objective.differentiable_part`). A preconditioner is then shaped like that part.
    """

    loss_fn: Callable = eqx.field(static=True)
    k: int = eqx.field(static=True, default=3)
    tol: float = eqx.field(static=True, default=1e-3)
    max_iters: int = eqx.field(static=True, default=30)
    every: int = eqx.field(static=True, default=1)
    cluster: float | None = eqx.field(static=True, default=None)
    warm_start: WarmStart = eqx.field(static=True, default="previous")
    carry: Carry = eqx.field(static=True, default="power")
    microbatch: int | None = eqx.field(static=True, default=None)
    wrt: Any = eqx.field(static=True, default=None)

    def __check_init__(self):
        check_start_options(self.warm_start, self.carry)
        if self.warm_start != "previous" and self.every != 1:
            raise ValueError(
                f"SharpnessTracker warm_start={self.warm_start!r} reads the last "
                f"{warm_start_depth(self.warm_start)} updates' measurements and needs every = 1 "
                f"(got every = {self.every})"
            )
        if self.k < 1 or self.max_iters < 1 or self.every < 1:
            raise ValueError(
                f"SharpnessTracker needs k, max_iters, every >= 1 (got {self.k}, {self.max_iters}, {self.every})"
            )
        if not 0 < self.tol < 1:
            raise ValueError(f"SharpnessTracker tol must be in (0, 1), got {self.tol!r}")
        check_example_count(self.microbatch, "SharpnessTracker microbatch")
        if self.cluster is not None and not 0 <= self.cluster < 1:
            raise ValueError(f"SharpnessTracker cluster must be in [0, 1) or None, got {self.cluster!r}")

    def _flat(self, params: PyTree) -> tuple[Array, Callable[[Array], PyTree], tuple]:
        """``ravel`` of the parameters (a module's differentiable part: :func:`differentiable_part`) with the
        map from a flat vector back to ``params`` and the measured leaves' shapes, or a ValueError if the
        tracker cannot measure
        them: k above their size, or a precision below float32 (the relative-residual contract needs more
        digits than bfloat16's 8 bits)."""
        arrays, rebuild = differentiable_part(params, self.wrt)
        leaves = jax.tree_util.tree_flatten_with_path(arrays)[0]
        common = jnp.result_type(*(leaf for _, leaf in leaves)).name if leaves else "float32"
        for path, leaf in leaves:  # one half-precision leaf among others: promoted, its directions round to it
            if (dtype := jnp.result_type(leaf).name) in HALF_PRECISION and common not in HALF_PRECISION:
                raise ValueError(
                    f"SharpnessTracker: the parameter {jax.tree_util.keystr(path) or 'leaf'} is {dtype} among {common} "
                    f"ones: a product along it rounds to {dtype}, below what the eigensolver's relative-residual "
                    "contract needs; measure a copy with that leaf cast to the others' dtype"
                )
        flat, unravel = ravel(arrays)
        if flat.dtype not in (jnp.float32, jnp.float64):
            raise ValueError(
                f"SharpnessTracker: the parameters are {flat.dtype.name}; eosflow measures curvature in float32 "
                "or float64 (its eigensolver's relative-residual contract needs more precision than "
                f"{flat.dtype.name} has): measure a float32 copy, e.g. "
                "`jax.tree.map(lambda a: a.astype(jnp.float32), params)`, with the batch cast likewise"
            )
        if self.k > flat.size:
            raise ValueError(f"SharpnessTracker k = {self.k} exceeds the parameter count {flat.size}")
        return flat, lambda w: rebuild(unravel(w)), unravel.shapes

    def init(self, params: PyTree, key: Array) -> TrackerState:
        """k random orthonormal directions in parameter space; no measurement yet."""
        flat, _, _ = self._flat(params)
        vectors = random_vectors(key, flat.size, self.k, flat.dtype)
        nan = jnp.full((vectors.shape[1],), jnp.nan, flat.dtype)
        zero = jnp.zeros((), jnp.int32)
        older, params_and_step = warm_start_memory(vectors, flat, self.warm_start)  # the last step tells a bounce
        start = vectors if self.carry == "power" else None
        return TrackerState(vectors, nan, nan, zero, zero, older, params_and_step, start)

    def update(
        self, state: TrackerState, params: PyTree, batch: PyTree = None, preconditioner: PyTree = None
    ) -> tuple[TrackerState, Eigenpairs]:
        """Measure at ``params`` (on ``batch``), warm-started from ``state``; skip unless count % every == 0.

        Called outside ``jax.jit`` (no argument is being traced), it runs a compiled program kept per tracker
        and argument types, as inside the user's jitted step: traced afresh, its ``lax.cond`` and LOBPCG's
        ``while_loop`` compiled again at every call (0.7-1.4 s each on a small MLP, skipped calls too)."""
        leaves = jax.tree_util.tree_leaves((state, params, batch, preconditioner))
        if not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return _compiled_update(self, state, params, batch, preconditioner)
        return self._update(state, params, batch, preconditioner)

    def _update(
        self, state: TrackerState, params: PyTree, batch: PyTree, preconditioner: PyTree
    ) -> tuple[TrackerState, Eigenpairs]:
        flat, unravel, shapes = self._flat(params)
        if state.vectors.shape[0] != flat.size:
            raise ValueError(
                f"SharpnessTracker.update: the state holds directions of {state.vectors.shape[0]} parameters (from "
                f"tracker.init) and these params have {flat.size}: a model that changed its parameters needs a new "
                "state, tracker.init(params, key)"
            )
        if state.vectors.dtype != flat.dtype:  # e.g. p - np.float64(lr) * g under x64 promotes float32 params
            raise ValueError(
                f"SharpnessTracker.update: the state is {state.vectors.dtype} (from tracker.init) and these params "
                f"are {flat.dtype}: keep the params' dtype through the loop (a float64 step size promotes float32 "
                "params under jax_enable_x64), or start a new state, tracker.init(params, key)"
            )

        call = check_loss_call(self.loss_fn, batch, "SharpnessTracker.update")

        def loss_on(w, batch):
            value = self.loss_fn(unravel(w)) if batch is None else self.loss_fn(unravel(w), batch)
            if isinstance(value, tuple):
                raise ValueError(
                    f"SharpnessTracker: {call} returns a tuple; it must return the loss alone (for a loss "
                    "with has_aux, pass `lambda p, b: loss_fn(p, b)[0]`)"
                )
            if jnp.shape(value) != ():
                raise ValueError(
                    f"SharpnessTracker: {call} returns shape {jnp.shape(value)}, not a scalar: the loss "
                    "must reduce over examples and outputs (e.g. jnp.mean)"
                )
            return value

        differentiable = differentiable_loss(loss_on, equations(loss_on, flat, batch), f"SharpnessTracker: {call}")

        def loss(w):
            if self.microbatch is None or batch is None:
                return differentiable(w, batch)
            return chunked_mean(differentiable, w, batch, self.microbatch)

        older, params_and_step = state.older, state.params
        last = state.vectors if state.start is None else state.start  # what the last measurement left to start from
        start = last
        if self.warm_start != "previous":
            assert older is not None and params_and_step is not None, "a state from init() of this tracker"
            start, older, params_and_step = tracked_warm_start(
                last, older, params_and_step, flat, state.count, self.warm_start
            )

        def measure(state: TrackerState) -> Eigenpairs:
            with jax.default_matmul_precision(MATMUL_PRECISION):  # whatever the loop's own (eosflow.precision)
                _, hvp = jax.linearize(jax.grad(loss), flat)
                matvec = jax.vmap(hvp, in_axes=1, out_axes=1)
                if preconditioner is not None:  # flattened here, not on skipped updates (a concatenate of
                    # P fused with the optimizer's update that made it took 32 ms a step on a 301k MLP)
                    precondition = flat_like_parameters(
                        preconditioner, shapes, flat.dtype, "SharpnessTracker: the preconditioner"
                    )
                    matvec = preconditioned_matvec(matvec, precondition)
                pairs = lobpcg(matvec, start, tol=self.tol, max_iters=self.max_iters, cluster=self.cluster)
            return pairs._replace(hvps=jnp.asarray(pairs.hvps, jnp.int32))

        def skip(state: TrackerState) -> Eigenpairs:
            return unmeasured(state.values, state.vectors, state.residuals)

        due = state.count % self.every == 0
        pairs = measure(state) if self.every == 1 else jax.lax.cond(due, measure, skip, state)
        # a measurement that is not finite (NaN or inf in the parameters, the batch or the loss) is reported as it
        # is, and leaves the warm start as it was: the next update starts from the last finite one
        finite = jnp.all(jnp.isfinite(pairs.vectors))
        vectors, older, params_and_step = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            (pairs.vectors, older, params_and_step),
            (state.vectors, state.older, state.params),
        )
        carried = None
        if self.carry == "power":  # an unmeasured update keeps the last start
            carried = jnp.where(due & finite, power_step(pairs), last)
        new_state = TrackerState(
            vectors,
            pairs.values,
            pairs.residuals,
            state.count + 1,
            state.hvps + pairs.hvps,
            older,
            params_and_step,
            carried,
        )
        return new_state, pairs


# SharpnessTracker.update called eagerly: per tracker (its static fields) and argument types (eosflow.compiled)
_compiled_update = BoundedJit(lambda tracker, *args: tracker._update(*args), kept=8)


def flat_like_parameters(tree: PyTree, expected: tuple, dtype, what: str) -> Array:
    """A diagonal (P, or an optimizer's moment) as one vector in the parameters' order: from a pytree whose leaves
    have the measured parameters' shapes ``expected`` (leaf for leaf, e.g. an optax state's moment) or a flat vector
    of their size; anything else is a ValueError naming ``what`` and both shapes (a permuted pytree of the same size
    would otherwise pair P with the wrong entries)."""
    flat, unravel = ravel(differentiable_part(tree)[0], "preconditioner", on_device=True)  # used by jnp: no host copy
    size = sum(math.prod(shape) for shape in expected)
    if unravel.shapes != expected and unravel.shapes != ((size,),):
        raise ValueError(
            f"{what}'s leaves have shapes {list(unravel.shapes)}, the parameters' "
            f"{list(expected)}: pass P's diagonal shaped like the parameters, leaf for leaf in the same order "
            f"(as an optax state holds it), or as one vector of their {size} entries"
            + (
                ". Fewer leaves: an optax.multi_transform (or a masked optimizer) holds moments only where it "
                "preconditions, so measure that part, SharpnessTracker(loss_fn, wrt=its labels as booleans), with "
                "P read from the state (docs/monitor.md); monitored() measures every parameter"
                if len(unravel.shapes) < len(expected)
                else ""
            )
        )
    return flat.astype(dtype)


def eigenpairs_of(eig: Any, where: str, size: int | None = None) -> tuple[Any, Any]:
    """(eig.values, eig.vectors) of the tracker's eigenpairs (or anything with those two arrays); a TypeError that
    names ``where`` and what it got for anything else (None, a tuple, a dict, jnp.linalg.eigh's result). With
    ``size``, a ValueError unless the vectors are (size, k): eigenpairs of these parameters."""
    values, vectors = getattr(eig, "values", None), getattr(eig, "vectors", None)
    if values is None or vectors is None or callable(values) or callable(vectors):
        raise TypeError(
            f"{where}: eig must be the eigenpairs the tracker returns (.values (k,) descending and .vectors (d, k)), "
            f"got {type(eig).__name__}" + (": pass what tracker.update(...) returned" if eig is None else "")
        )
    shape = tuple(np.shape(vectors))  # (a torch tensor's too, without a copy)
    if size is not None and (len(shape) != 2 or shape[0] != size):
        raise ValueError(
            f"{where}: eig.vectors is {shape}, the measured parameters have {size} entries: pass the eigenpairs "
            "measured on these parameters (the same model, the same wrt), d x k"
        )
    return values, vectors


def parameter_shares(eig: Any, params: PyTree, wrt: Any = None) -> dict[str, np.ndarray]:
    """Where the tracked eigenvectors live: for every measured leaf of ``params`` (named by its path, as
    ``jax.tree_util.keystr`` writes it), the share sum_{j in leaf} u_ij^2 of each unit eigenvector u_i, (k,);
    over the leaves a vector's shares sum to 1. ``eig`` is the tracker's eigenpairs (or their vectors, d x k),
    measured on ``params`` with the same ``wrt``."""
    leaves = jax.tree_util.tree_flatten_with_path(differentiable_part(params, wrt)[0])[0]
    names = [jax.tree_util.keystr(path) for path, _ in leaves]
    vectors = eig if isinstance(eig, np.ndarray | jax.Array) else eigenpairs_of(eig, "parameter_shares")[1]
    return shares_by_block(vectors, names, [math.prod(np.shape(leaf)) for _, leaf in leaves])


def shares_by_block(vectors: Any, names: list[str], sizes: list[int]) -> dict[str, np.ndarray]:
    """{name: sum of u_ij^2 over the block's rows j, per column i} for consecutive row blocks of ``sizes``."""
    vectors = np.asarray(vectors, dtype=float)
    if vectors.ndim != 2 or vectors.shape[0] != sum(sizes):
        raise ValueError(
            f"parameter_shares: the eigenvectors are {vectors.shape}, the measured parameters have {sum(sizes)} "
            "entries: pass the eigenpairs measured on these parameters (the same wrt, the same model), d x k"
        )
    bounds = np.cumsum([0, *sizes])
    return {
        name: np.sum(vectors[start:stop] ** 2, axis=0)
        for name, start, stop in zip(names, bounds[:-1], bounds[1:], strict=True)
    }
