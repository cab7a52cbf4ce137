"""An experiment: every process of a spec from the same w0, in lockstep on one time grid.

Chunks of ``record.chunk`` steps are computed for every process, flushed to the run directory
and followed by a checkpoint; chunk boundaries are multiples of the chunk size, so a resumed run
computes exactly the chunks an uninterrupted run does (bitwise-equal trajectories on one machine).
The first process is the reference: each process's ``distance`` to it is recorded at every step,
and when the reference diverges (non-finite loss, or a loss blow-up) the run stops with the
reason and the step recorded. Another process that diverges is dropped and the run goes on.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tomli_w

from eosflow.precision import DTYPES, precision
from eosflow.problems import Problem, build_problem
from eosflow.process import PROCESSES, Process
from eosflow.spec import Spec, parse_spec, resolved_table
from eosflow.store import RunStore, StoreError

Progress = Callable[[int, dict[str, dict[str, np.ndarray]]], None]


@dataclasses.dataclass
class Outcome:
    """How a run ended: ``completed``, ``diverged`` or ``interrupted``, and where."""

    run_dir: Path
    status: str
    steps_done: int
    reason: str = ""


def prepare(table: dict, problem: Problem | None = None) -> tuple[Spec, Problem, dict, dict[str, Process]]:
    """Validate a spec table and build its problem and processes (no files touched).

    ``problem`` is given for a problem built in memory (:func:`eosflow.simulate`); otherwise the
    spec's ``[problem]`` table builds it. Either way its arrays must have the spec's dtype.
    """
    spec = parse_spec(table)
    if problem is None:
        problem, params = build_problem(spec.problem, spec.seed, spec.dtype)
    else:
        params = {key: value for key, value in spec.problem.items() if key != "name"}
    problem.check_dtype(spec.dtype)
    resolved = resolved_table(spec, params)
    processes = {name: PROCESSES[name].build(problem, spec, spec.options[name]) for name in spec.processes}
    return spec, problem, resolved, processes


def run(
    table: dict,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    stop_after: int | None = None,
    problem: Problem | None = None,
) -> Outcome:
    """Run (or resume) the experiment described by ``table`` into the run directory ``out``.

    The run computes in its spec's ``dtype`` (:func:`eosflow.precision.precision`), whatever the
    caller's JAX configuration. ``problem`` replaces the spec's ``[problem]`` table by a problem
    built in memory (what :func:`eosflow.simulate` passes). ``stop_after`` ends the run early
    after that many steps (as an interruption would), which tests use to exercise resuming.
    """
    with precision(_run_dtype(table)):
        return _run(table, out, resume=resume, overwrite=overwrite, progress=progress, stop_after=stop_after,
                    problem=problem)


def _run_dtype(table: dict) -> str:
    """The spec's dtype, read before validation (an invalid one fails in parse_spec, in float32)."""
    dtype = table.get("dtype", "float32") if isinstance(table, dict) else "float32"
    return dtype if dtype in DTYPES else "float32"


def _run(table: dict, out: str | Path, *, resume: bool, overwrite: bool, progress: Progress | None,
         stop_after: int | None, problem: Problem | None) -> Outcome:
    spec, problem, resolved, processes = prepare(table, problem)
    store = RunStore(out)
    resolved_text = tomli_w.dumps(resolved)
    names = list(processes)
    reference = names[0]

    if resume and store.exists():
        differences = spec_differences((store.root / "spec.resolved.toml").read_text(), resolved)
        if differences:
            raise StoreError(
                f"cannot resume {str(store.root)!r}: its resolved spec differs from this one "
                f"({'; '.join(differences[:5])}); use --overwrite to start again"
            )
        checkpoint = store.read_checkpoint()
    else:
        store.create(tomli_w.dumps(table), resolved_text, overwrite=overwrite)
        checkpoint = None

    if checkpoint is None:
        step, inactive = 0, {}
        states = {name: p.init(problem.w0) for name, p in processes.items()}
    else:
        step, leaves, meta = checkpoint
        inactive = meta.get("inactive", {})
        written_by = meta.get("eosflow", "an eosflow that did not record its version")
        states = {
            name: _restore(name, p.init(problem.w0), leaves[name], written_by)
            for name, p in processes.items() if name in leaves
        }
    store.truncate(step)
    started = time.perf_counter()
    initial_loss = float(problem.objective.value(problem.w0))
    limit = spec.divergence.loss_blowup * max(abs(initial_loss), 1e-12)
    outcome = Outcome(store.root, "running", step)
    summary_base = _summary_base(spec, problem, names)
    end = spec.steps if stop_after is None else min(spec.steps, stop_after)
    timing = _Timing(store.read_summary().get("timing", {}) if checkpoint is not None else {})

    try:
        while step < end:
            n = min(spec.record.chunk - step % spec.record.chunk, end - step)
            chunk: dict[str, dict[str, np.ndarray]] = {}
            for name in names:
                if name in inactive:
                    continue
                tick = time.perf_counter()
                new_state, rows = processes[name].advance(states[name], n)
                rows = {key: np.asarray(value) for key, value in rows.items()}
                timing.add(name, time.perf_counter() - tick, n)
                bad = _first_divergent(rows["loss"], limit)
                if bad is not None:
                    reason = _divergence_reason(rows["loss"][bad], step + bad, limit)
                    rows = {key: value[: bad + 1] for key, value in rows.items()}
                    if hint := processes[name].divergence_hint(rows):
                        reason = f"{reason}: {hint}"
                    if name == reference:
                        outcome = Outcome(store.root, "diverged", step + bad + 1, reason)
                    else:
                        inactive[name] = reason
                else:
                    states[name] = new_state
                chunk[name] = rows
            timing.warm = True
            _add_distances(chunk, reference)
            _write_chunk(store, chunk, step, spec.record.params_every)
            if outcome.status == "diverged":
                break
            step += n
            store.write_checkpoint(
                step,
                {name: [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(states[name])]
                 for name in names if name not in inactive},
                {"inactive": inactive, "eosflow": _version()},
            )
            outcome = Outcome(store.root, "running", step)
            if progress is not None:
                progress(step, chunk)
        if outcome.status == "running":
            outcome.status = "completed" if step >= spec.steps else "interrupted"
            outcome.reason = "" if step >= spec.steps else f"stopped after {step} of {spec.steps} steps"
    except KeyboardInterrupt:
        # The checkpoint is what a resume starts from; a chunk flushed after it (the interrupt can
        # land between the two writes) would be recomputed, so it goes now and the summary agrees.
        checkpoint = store.read_checkpoint()
        done = 0 if checkpoint is None else checkpoint[0]
        store.truncate(done)
        outcome = Outcome(store.root, "interrupted", done, f"interrupted by the user; steps 0..{done - 1} are on disk")
        _finish(store, summary_base, outcome, inactive, started, timing.table)
        raise
    except OSError as error:
        raise StoreError(
            f"writing to {str(store.root)!r} failed ({error.strerror or error}); every step before "
            f"{outcome.steps_done} is on disk and the run can be resumed with --resume"
        ) from None
    _finish(store, summary_base, outcome, inactive, started, timing.table)
    return outcome


def spec_differences(stored_text: str, resolved: dict) -> list[str]:
    """What differs between a run directory's ``spec.resolved.toml`` and the resolved spec
    ``resolved`` ([] if nothing). The stored spec is re-resolved with today's defaults first, so
    a run written before an option existed matches the spec that leaves it at its default."""
    if stored_text == tomli_w.dumps(resolved):
        return []
    stored = tomllib.loads(stored_text)
    try:
        stored = prepare(stored)[2]
    except Exception:  # a spec this eosflow cannot read is compared as written
        pass
    return _differences(stored, resolved)


def _differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested tables, as "`key` = old there, new here"."""
    found = []
    for key in sorted(set(stored) | set(current), key=str):
        old, new = stored.get(key, "(absent)"), current.get(key, "(absent)")
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"`{prefix}{key}` = {old!r} there, {new!r} here")
    return found


def _restore(name: str, template: Any, leaves: list[np.ndarray], written_by: str) -> Any:
    """Process ``name``'s state from its checkpointed arrays, refused unless there are as many as
    this eosflow's state has (their shapes may differ: the tracked eigenspace grows)."""
    treedef = jax.tree_util.tree_structure(template)
    if len(leaves) != treedef.num_leaves:
        raise StoreError(
            f"the checkpoint's state of process {name!r} does not fit this eosflow: it holds {len(leaves)} "
            f"arrays, this version's state has {treedef.num_leaves} (the checkpoint was written by {written_by}, "
            f"this is eosflow {_version()}); use --overwrite to start again"
        )
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(leaf) for leaf in leaves])


def _version() -> str:
    return importlib.metadata.version("eosflow")


def _first_divergent(loss: np.ndarray, limit: float) -> int | None:
    bad = np.flatnonzero(~np.isfinite(loss) | (np.abs(loss) > limit))
    return int(bad[0]) if bad.size else None


def _divergence_reason(loss: float, step: int, limit: float) -> str:
    if not np.isfinite(loss):
        return f"loss became {loss} at step {step}"
    return f"loss {loss:.4g} at step {step} exceeded the blow-up limit {limit:.4g}"


def _add_distances(chunk: dict[str, dict[str, np.ndarray]], reference: str) -> None:
    """Compare every process with the reference at each step both have.

    ``distance`` = ||position - reference position||; for a process that reports its
    ``top_vector`` u (a model's oscillation direction), also ``reference_offset`` =
    <reference position - position, u>, the reference's displacement from the model's centre
    along u (whose running RMS is the oscillation envelope the model predicts).
    """
    base = chunk[reference]["position"]
    for rows in chunk.values():
        n = min(len(base), len(rows["position"]))
        diff = base[:n].astype(np.float64) - rows["position"][:n]
        distance = np.full(len(rows["position"]), np.nan)
        distance[:n] = np.linalg.norm(diff.reshape(n, -1), axis=1)
        rows["distance"] = distance
        if "top_vector" in rows:
            offset = np.full(len(rows["position"]), np.nan)
            offset[:n] = np.einsum("nd,nd->n", diff, rows.pop("top_vector")[:n])
            rows["reference_offset"] = offset


def _write_chunk(store: RunStore, chunk: dict, first_step: int, params_every: int) -> None:
    for name, rows in chunk.items():
        position = rows.pop("position")
        if params_every:
            steps = first_step + np.arange(len(position))
            keep = steps % params_every == 0
            rows["params"], rows["params_step"] = position[keep], steps[keep]
        store.write_chunk(name, first_step, rows)


def _summary_base(spec: Spec, problem: Problem, names: list[str]) -> dict:
    device = jax.devices()[0]
    return {
        "name": spec.name,
        "processes": names,
        "steps": spec.steps,
        "lr": spec.lr,
        "dimension": int(problem.w0.size),
        "problem": {"name": spec.problem["name"], **problem.info},
        "eosflow": _version(),
        "jax": jax.__version__,
        "device": f"{device.platform}:{device.device_kind}",
    }


class _Timing:
    """Wall-clock time of every chunk per process: ``{name: {"chunks": [[steps, seconds, warm], ...]}}``.

    ``warm`` is 0 for the first chunk of each invocation (it compiles), 1 afterwards.
    """

    def __init__(self, previous: dict):
        self.table = {name: {"chunks": list(entry.get("chunks", []))} for name, entry in previous.items()}
        self.warm = False

    def add(self, name: str, seconds: float, steps: int) -> None:
        self.table.setdefault(name, {"chunks": []})["chunks"].append([steps, seconds, int(self.warm)])


def _finish(store: RunStore, base: dict, outcome: Outcome, inactive: dict, started: float,
            timing: dict | None = None) -> None:
    previous = store.read_summary()
    elapsed = previous.get("seconds", 0.0) if previous.get("steps_done", 0) else 0.0
    summary = {
        **base,
        "status": outcome.status,
        "reason": outcome.reason,
        "steps_done": outcome.steps_done,
        "dropped_processes": inactive,
        "seconds": elapsed + time.perf_counter() - started,
    }
    if timing is not None:
        summary["timing"] = timing  # per process: the wall time of every chunk
    store.write_summary(summary)
