"""Models started on their optimizer's state at step k instead of w0: what they predict from there.

    ds = eosflow.anchored.anchored(table, at="onset")     # or at=115
    eosflow.compare.compare_dataset(ds)                   # every metric over steps k .. steps - 1

The spec's first process, GD or a momentum or adaptive optimizer (``adam``, ``rmsprop``, ...), runs from
w0. Every other process, a model of that optimizer, starts at step k on the optimizer's states at k-2 ..
k+2 (:meth:`~eosflow.flows.flow.Flow.start_on`: the centre of the iterates; the rod flows' rod; for the
models of momentum and adaptive optimizers, the centred moments) and runs to the end. ``at = "onset"``
is the optimizer's first step with edge ratio >= ``ONSET`` (0.95; lr S / 2 for GD): the comparison then
scores what the models do at the edge of stability, apart from how far they drifted before it. It runs
in memory (no run directory, no checkpoints) and returns the Dataset of :func:`eosflow.load` on the steps
k .. steps - 1.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from eosflow.config import SpecError
from eosflow.experiment import add_distances, divergence_reason, first_divergent, prepare, run_dtype
from eosflow.flows.flow import Flow
from eosflow.load import rows_dataset, summary_attrs
from eosflow.optim.adaptive import AdaptiveOptimizer
from eosflow.optim.gd import GradientDescent
from eosflow.precision import precision
from eosflow.process import PROCESSES

if TYPE_CHECKING:
    import xarray as xr

    from eosflow.problems import Problem

NOT_ANCHORED = ("langevin",)  # models SGD, whose iterates GD's window is not
ONSET = 0.95  # the edge ratio at which "onset" starts the models (as benchmarks/adaptive_edge_metrics.py)


def onset_step(edge_ratio: np.ndarray, level: float = ONSET) -> int | None:
    """The first step whose edge ratio (preconditioned sharpness / threshold) is >= ``level`` (None: none)."""
    above = np.flatnonzero(np.asarray(edge_ratio, dtype=np.float64) >= level)
    return int(above[0]) if above.size else None


def anchored(table: dict, at: int | str = "onset", problem: Problem | None = None) -> xr.Dataset:
    """Run ``table``'s optimizer from w0 and its models from the optimizer's state at step ``at``
    (module docstring); ``problem`` as in :func:`eosflow.experiment.run`. Raises a SpecError naming the
    process or the step that cannot be anchored."""
    with precision(run_dtype(table)):
        return _anchored(table, at, problem)


def _anchored(table: dict, at: int | str, problem: Problem | None) -> xr.Dataset:
    spec, problem, _, processes = prepare(table, problem)
    names = list(processes)
    optimizer = processes[names[0]]
    if not isinstance(optimizer, GradientDescent | AdaptiveOptimizer):
        raise SpecError(
            f"the first process, {names[0]!r}, is not GD or a momentum or adaptive optimizer (momentum, "
            "nesterov, rmsprop, adam): the models are started on that optimizer's state"
        )
    models: dict[str, Flow] = {}
    for name in names[1:]:
        model = processes[name]
        modelled = PROCESSES[name].optimizer or "gd"
        if not isinstance(model, Flow) or modelled != names[0] or name in NOT_ANCHORED:
            raise SpecError(f"process {name!r} is not a model of {names[0]!r}; only its models start on its state")
        models[name] = model
    w0 = jnp.asarray(problem.w0)
    limit = spec.divergence.loss_blowup * max(abs(float(problem.objective.value(w0))), 1e-12)
    _, computed = optimizer.advance(optimizer.init(w0), spec.steps)
    reference = {key: np.asarray(value) for key, value in computed.items()}
    bad = first_divergent(reference["loss"], limit)
    if bad is not None:
        raise SpecError(
            f"{names[0]} diverged ({divergence_reason(reference['loss'][bad], bad, limit)}); "
            "its models cannot be compared with it after that"
        )
    k = _anchor_step(at, reference["edge_ratio"], spec.steps, names[0])
    window = _states(optimizer, w0, k)
    rows = {names[0]: {key: value[k:] for key, value in reference.items()}}
    dropped, timing = {}, {}
    for name, model in models.items():
        tick = time.perf_counter()
        _, computed = model.advance(model.start_on(window), spec.steps - k)
        rows[name] = {key: np.asarray(value) for key, value in computed.items()}
        timing[name] = {"chunks": [[spec.steps - k, time.perf_counter() - tick, 0]]}
        if (bad := first_divergent(rows[name]["loss"], limit)) is not None:
            dropped[name] = divergence_reason(rows[name]["loss"][bad], k + bad, limit)
            rows[name] = {key: value[: bad + 1] for key, value in rows[name].items()}
    add_distances(rows, names[0], {})
    for data in rows.values():
        data["step"] = k + np.arange(len(data.pop("position")))
    summary: dict[str, Any] = {
        "name": spec.name,
        "processes": names,
        "status": "completed",
        "steps": spec.steps,
        "lr": spec.lr,
        "anchored_at": k,
        "dropped_processes": dropped,
        "timing": timing,
    }
    return rows_dataset(rows, np.arange(k, spec.steps), summary_attrs(summary))


def _anchor_step(at: int | str, edge_ratio: np.ndarray, steps: int, optimizer: str) -> int:
    if at == "onset":
        k = onset_step(edge_ratio)
        if k is None:
            measured = edge_ratio[np.isfinite(edge_ratio)]
            largest = f"its largest was {measured.max():.3g}" if measured.size else "never measured: spectrum.every = 0"
            raise SpecError(
                f"{optimizer} never reached its edge of stability (edge ratio >= {ONSET}; {largest}) in {steps} "
                "steps: no onset to start its models at"
            )
        k = max(k, 2)
    elif isinstance(at, (str, bool)):
        raise SpecError(f"`at` = {at!r}: give a step (an integer) or 'onset'")
    else:
        k = int(at)
    if not 2 <= k <= steps - 3:
        raise SpecError(
            f"`at` = {at!r} (step {k}): a model starts on the optimizer's states at k-2 .. k+2, so k must lie "
            f"in [2, {steps - 3}] for a run of {steps} steps"
        )
    return k


def _states(optimizer: GradientDescent | AdaptiveOptimizer, w0: jax.Array, k: int) -> list:
    """The optimizer's states at steps k-2 .. k+2 (its iterates do not depend on how its run is cut)."""
    state = optimizer.init(w0)
    if k > 2:
        state, _ = optimizer.advance(state, k - 2)
    window = [state]
    for _ in range(4):
        state, _ = optimizer.advance(state, 1)
        window.append(state)
    return window
