"""Models started on their optimizer's state at step k instead of w0: what they predict from there.

    ds = eosflow.anchored.anchored(table, at="onset")     # or at=115
    eosflow.compare.compare_dataset(ds)                   # every metric over steps k .. steps - 1

The spec's first process, GD or a momentum or adaptive optimizer (``adam``, ``rmsprop``, ...), runs from
w0, or with ``start`` (a :class:`eosflow.checkpoint.Checkpoint` of your own training run) from that state,
steps then counting from it. Every other process, a model of that optimizer, starts at step k on the
optimizer's states at k-2 .. k+2 (:meth:`~eosflow.flows.flow.Flow.start_on`: the centre of the iterates;
the rod flows' rod; for the models of momentum and adaptive optimizers, the centred moments) and runs to
the end. ``at = "onset"`` is the optimizer's first step with edge ratio >= ``ONSET`` (0.95; lr S / 2 for
GD): the comparison then scores what the models do at the edge of stability, apart from how far they
drifted before it. It runs in memory (no run directory, no checkpoints) and returns the Dataset of
:func:`eosflow.load` on the steps k .. steps - 1. Its last process, ``<optimizer>_nudged``, is the optimizer
itself restarted at k from its own state with w moved by its dtype's rounding (eps ||w_k||, along a fixed
random direction): the floor of every metric, what a model that were the optimizer itself would score
from a state known to the last bit (:func:`nudged`). :func:`write_anchored` saves the Dataset in a run
directory (``eosflow compare SPEC --from k``), and :func:`check_anchorable` refuses, before any step is
run, what ``anchored`` would refuse of the spec and of k.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from eosflow.checkpoint import Checkpoint, check_settings, injected_settings, optimizer_state
from eosflow.config import SpecError
from eosflow.experiment import (
    add_distances,
    cut_at_divergence,
    prepare,
    run_dtype,
    stopping_rules,
    with_problem_dtype,
)
from eosflow.flows.flow import Flow
from eosflow.load import rows_dataset, summary_attrs, summary_of
from eosflow.optim.adaptive import AdaptiveOptimizer
from eosflow.optim.gd import GradientDescent
from eosflow.precision import precision
from eosflow.process import PROCESSES, Process
from eosflow.spec import Spec, load_spec_table
from eosflow.store import RunStore, divergence_limit, divergence_reason, first_divergent, not_a_run_directory

if TYPE_CHECKING:
    import xarray as xr

    from eosflow.problems import Problem

NUDGED = "_nudged"  # the suffix of the optimizer restarted at k a rounding away (the metrics' floor)
NOT_ANCHORED = ("langevin",)  # models SGD, whose iterates GD's window is not
ONSET = 0.95  # the edge ratio at which "onset" starts the models (as benchmarks/adaptive_edge_metrics.py)


def onset_step(edge_ratio: np.ndarray, level: float = ONSET) -> int | None:
    """The first step whose edge ratio (preconditioned sharpness / threshold) is >= ``level`` (None: none)."""
    above = np.flatnonzero(np.asarray(edge_ratio, dtype=np.float64) >= level)
    return int(above[0]) if above.size else None


class NoAnchorStep(SpecError):
    """The optimizer's run from w0 gave no step to start its models at: it never reached its edge onset (or
    too late to run a model after it), or it diverged. Known only once the optimizer has run."""


def check_anchorable(
    table: dict, at: int | str, problem: Problem | None = None, where: str = "`at`", recorded: dict | None = None
) -> None:
    """Raise the SpecError that :func:`anchored` would raise before running a step: the first process is
    not GD or a momentum or adaptive optimizer, another is not a model of it, ``at`` is neither "onset" nor
    a step in [2, steps - 3], or "onset" with the edge ratio never measured. ``where`` names ``at`` in the
    message (``--from`` on the command line). ``recorded``: the summary of the run directory the comparison is
    added to; if its optimizer diverged, a step outside the window says so, with the steps it recorded. Builds
    the problem and the processes, runs nothing."""
    table = with_problem_dtype(table, problem)
    diverged_at = recorded["steps_done"] - 1 if recorded and recorded.get("status") == "diverged" else None
    with precision(run_dtype(table)):
        spec, _, _, processes = prepare(table, problem)
        _anchorable(spec, processes, at, where, diverged_at)


def anchored(
    table: dict, at: int | str = "onset", problem: Problem | None = None, start: Checkpoint | None = None
) -> xr.Dataset:
    """Run ``table``'s optimizer from w0 and its models from the optimizer's state at step ``at``
    (module docstring); ``problem`` as in :func:`eosflow.experiment.run`. With ``start`` (your training
    run's parameters and optax state, :class:`eosflow.checkpoint.Checkpoint`) the optimizer runs from
    there instead of w0, and steps count from it (``at = 2``: the models start two steps after it). Raises
    a SpecError naming the process or the step that cannot be anchored (:func:`check_anchorable`), or what
    of ``start`` does not fit, and :class:`NoAnchorStep` when the optimizer's run has no onset to start at
    or diverged."""
    table = with_problem_dtype(table, problem)
    with precision(run_dtype(table)):
        return _anchored(table, at, problem, start)


def write_anchored(run_dir: str | Path, at: int | str) -> Path:
    """:func:`anchored` of the run directory's own spec, saved in it as ``from_step_<k>.nc`` (netCDF, written
    atomically under the directory's writer lock; :func:`eosflow.compare.write_report` renders it). Reruns
    the optimizer in memory, reads nothing else of the run. Returns the file. When the optimizer gives no
    step to start at (:class:`NoAnchorStep`), its reason is kept as ``from_step.missing.txt`` (the report
    shows it) before the error is raised."""
    store = RunStore(run_dir)
    if not store.exists():
        raise not_a_run_directory(run_dir)
    try:
        ds = anchored(load_spec_table(store.root / "spec.toml"), at)
    except NoAnchorStep as error:  # recorded, so that the report says why its section is missing
        with store.locked():
            store.write_file(RunStore.ANCHOR_MISSING, f"from {at}: {error}\n".encode())
        raise
    data = bytes(ds.to_netcdf())  # netCDF-3 (scipy's writer: the one engine eosflow's dependencies bring)
    name = RunStore.ANCHORED.format(k=int(ds.attrs["anchored_at"]))
    with store.locked():
        store.write_file(name, data)
        (store.root / RunStore.ANCHOR_MISSING).unlink(missing_ok=True)
    return store.root / name


def _anchorable(
    spec: Spec, processes: dict[str, Process], at: int | str, where: str, diverged_at: int | None = None
) -> tuple[GradientDescent | AdaptiveOptimizer, dict[str, Flow]]:
    """The optimizer and its models, or the SpecError that names what cannot be anchored (the process,
    or ``at`` and the steps it may take; ``diverged_at``: the step where the recorded run's optimizer diverged)."""
    names = list(processes)
    optimizer = processes[names[0]]
    if not isinstance(optimizer, GradientDescent | AdaptiveOptimizer):
        raise SpecError(
            f"the first process, {names[0]!r}, is not GD or a momentum or adaptive optimizer (momentum, "
            "nesterov, rmsprop, adam): the models are started on that optimizer's state"
        )
    if len(names) < 2:
        raise SpecError(f"`processes` = {names}: no model of {names[0]!r} to start on its state")
    models: dict[str, Flow] = {}
    for name in names[1:]:
        model = processes[name]
        modelled = PROCESSES[name].optimizer or "gd"
        if not isinstance(model, Flow) or modelled != names[0] or name in NOT_ANCHORED:
            raise SpecError(f"process {name!r} is not a model of {names[0]!r}; only its models start on its state")
        models[name] = model
    if at == "onset":
        if spec.spectrum_of(names[0]).every == 0:
            key = f"{names[0]}.spectrum.every" if "every" in spec.spectra.get(names[0], {}) else "spectrum.every"
            raise SpecError(
                f"{where} = 'onset' needs {names[0]}'s edge ratio, which `{key}` = 0 never measures: "
                f"set {key} or give a step"
            )
    elif not isinstance(at, Integral) or isinstance(at, bool):
        raise SpecError(f"{where} = {at!r}: give a step (an integer) or 'onset'")
    elif not 2 <= at <= spec.steps - 3 and diverged_at is not None:
        raise SpecError(
            f"{where} = {at!r}: {names[0]} diverged at step {diverged_at} of this run (steps 0..{diverged_at} "
            f"recorded, of {spec.steps}): its models, started on its states k-2 .. k+2 and compared with it to the "
            "last step, cannot be compared with it from any step"
        )
    elif not 2 <= at <= spec.steps - 3:
        raise SpecError(f"{where} = {at!r}: {_window(spec.steps)}")
    return optimizer, models


def _anchored(table: dict, at: int | str, problem: Problem | None, start: Checkpoint | None) -> xr.Dataset:
    spec, problem, _, processes = prepare(table, problem)
    names = list(processes)
    optimizer, models = _anchorable(spec, processes, at, "`at`")
    if start is not None:
        read = start.settings if start.settings is not None else injected_settings(names[0], start.opt_state)
        check_settings(spec, read)
    first = optimizer.init(jnp.asarray(problem.w0)) if start is None else optimizer_state(optimizer, problem, start)
    limit = divergence_limit(spec.divergence.loss_blowup, float(problem.objective.value(first.w)))
    _, computed = optimizer.advance(first, spec.steps)
    reference = {key: np.asarray(value) for key, value in computed.items()}
    bad = first_divergent(reference["loss"], limit)
    if bad is not None:
        raise NoAnchorStep(
            f"{names[0]} diverged ({divergence_reason(reference['loss'][bad], bad, limit)}); "
            "its models cannot be compared with it after that"
        )
    k = int(at) if at != "onset" else _onset(reference["edge_ratio"], spec.steps, names[0])
    window = _states(optimizer, first, k)
    rows = {names[0]: {key: value[k:] for key, value in reference.items()}}
    copy = names[0] + NUDGED  # the floor: the optimizer itself, a rounding away
    starts = {name: (model, model.start_on(window)) for name, model in models.items()}
    return _dataset(spec, rows, {**starts, copy: (optimizer, nudged(window[2]))}, k, limit, {"anchored_at": k})


def floor_from_w0(table: dict, problem: Problem | None = None, size: float | None = None) -> xr.Dataset:
    """The table's optimizer from w0 and ``<optimizer>_nudged``, the same optimizer from w0 moved by its
    rounding (:func:`nudged`; by ``size`` when given), over steps 0 .. steps - 1: the floor of the
    comparison from w0, as :func:`anchored`'s last process is the floor of the comparison from step k.
    Only the first process runs (a metric relative to the yardstick takes the yardstick's distance from
    the run itself, :func:`eosflow.leaderboard.floor_columns`). Raises a SpecError when the first
    process is not GD or a momentum or adaptive optimizer, and :class:`NoAnchorStep` when it diverged."""
    table = with_problem_dtype(table, problem)
    with precision(run_dtype(table)):
        spec, problem, _, processes = prepare(table, problem)
        name = next(iter(processes))
        optimizer = processes[name]
        if not isinstance(optimizer, GradientDescent | AdaptiveOptimizer):
            raise SpecError(
                f"the first process, {name!r}, is not GD or a momentum or adaptive optimizer: it has no floor"
            )
        first = optimizer.init(jnp.asarray(problem.w0))
        limit = divergence_limit(spec.divergence.loss_blowup, float(problem.objective.value(first.w)))
        pairs = {name: (optimizer, first), name + NUDGED: (optimizer, nudged(first, size))}
        ds = _dataset(spec, {}, pairs, 0, limit, {})
    if name in (dropped := summary_of(ds)["dropped_processes"]):
        raise NoAnchorStep(f"{name} diverged ({dropped[name]}): it has no floor after that")
    return ds


def _dataset(
    spec: Spec,
    rows: dict[str, dict[str, np.ndarray]],
    starts: Mapping[str, tuple[Process, Any]],
    k: int,
    limit: float,
    attrs: dict,
) -> xr.Dataset:
    """The Dataset of steps k .. steps - 1: ``rows`` (the reference's, already computed, with positions) and
    each process of ``starts`` run from its state at k, cut at its first divergent step; distances to the
    first process of ``rows`` (or of ``starts`` when ``rows`` is empty)."""
    dropped, timing = {}, {}
    for name, (process, state) in starts.items():
        tick = time.perf_counter()
        _, computed = process.advance(state, spec.steps - k)
        timing[name] = {"chunks": [[spec.steps - k, time.perf_counter() - tick, 0]]}
        raw = {key: np.asarray(value) for key, value in computed.items()}
        rows[name], bad, reason = cut_at_divergence(process, raw, k, limit)
        if bad is not None:
            dropped[name] = reason
    add_distances(rows, next(iter(rows)), {})
    for data in rows.values():
        data["step"] = k + np.arange(len(data.pop("position")))
    summary: dict[str, Any] = {
        "name": spec.name,
        "processes": list(rows),
        "status": "completed",
        "steps": spec.steps,
        "lr": spec.lr,
        **attrs,
        "dropped_processes": dropped,
        "timing": timing,
        "spectrum_k_max": {name: spec.spectrum_of(name).k_max for name in rows},
        **stopping_rules(spec, rows),
    }
    return rows_dataset(rows, np.arange(k, spec.steps), summary_attrs(summary))


def nudged(state: Any, size: float | None = None, key: int = 0) -> Any:
    """An optimizer's state with w (and ``previous``, ``before``, when the state keeps them) moved by ``size``
    along a fixed random unit direction (from PRNG ``key``); ``size`` defaults to eps ||w||, the rounding of w in
    its dtype. A run restarted from it is the optimizer as a perfect model of it would be, started on a state known to
    the last bit: the floor of every pointwise and smoothed metric (docs/compare.md, "The floor")."""
    w = state.w
    direction = jax.random.normal(jax.random.PRNGKey(key), w.shape, w.dtype)
    direction = direction / jnp.linalg.norm(direction)
    if size is None:
        size = float(jnp.finfo(w.dtype).eps * jnp.linalg.norm(w))
    moved = {"w": w + size * direction}
    for past in ("previous", "before"):  # the iterates before w that the state keeps (GD's: none)
        if past in state._fields:
            moved[past] = getattr(state, past) + size * direction
    return state._replace(**moved)


def _onset(edge_ratio: np.ndarray, steps: int, optimizer: str) -> int:
    """The step "onset" starts the models at: the optimizer's onset, at least 2, at most steps - 3."""
    k = onset_step(edge_ratio)
    if k is None:
        measured = edge_ratio[np.isfinite(edge_ratio)]
        largest = f"its largest was {measured.max():.3g}" if measured.size else "never measured"
        raise NoAnchorStep(
            f"{optimizer} never reached its edge of stability (edge ratio >= {ONSET}; {largest}) in {steps} "
            "steps: no onset to start its models at"
        )
    if k > steps - 3:
        raise NoAnchorStep(
            f"{optimizer} reached its edge of stability at step {k}, too late to start its models there: "
            + _window(steps)
        )
    return max(k, 2)


def _window(steps: int) -> str:
    if steps < 5:  # no k has its states k-2 .. k+2 inside the run
        return (
            f"a model starts on the optimizer's states at k-2 .. k+2, so a run needs at least 5 steps (`steps` = "
            f"{steps})"
        )
    return (
        f"a model starts on the optimizer's states at k-2 .. k+2, so k must lie in [2, {steps - 3}] for a run "
        f"of {steps} steps"
    )


def _states(optimizer: GradientDescent | AdaptiveOptimizer, first: Any, k: int) -> list:
    """The optimizer's states at steps k-2 .. k+2 of its run from state ``first`` (its iterates do not
    depend on how its run is cut)."""
    state = first
    if k > 2:
        state, _ = optimizer.advance(state, k - 2)
    window = [state]
    for _ in range(4):
        state, _ = optimizer.advance(state, 1)
        window.append(state)
    return window
