"""An experiment: every process of a spec from the same w0, in lockstep on one time grid.

Chunks of ``record.chunk`` steps are computed for every process (the next one in a thread while
one is written: :class:`_Advance`), flushed to the run directory and followed by a checkpoint;
chunk boundaries are multiples of the chunk size, so a resumed run computes exactly the chunks
an uninterrupted run does (bitwise-equal trajectories on one machine).
The first process is the reference: each process's ``distance`` to it is recorded at every step
(and its ``centre_distance``, the distance between the two trajectories' midpoints of consecutive
steps, blind to the phase of a period-2 oscillation; the checkpoint carries the last offset it
needs), and when the reference diverges (non-finite loss, or a loss blow-up) the run stops with
the reason and the step recorded. Another process that diverges is dropped and the run goes on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import itertools
import os
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tomli_w

from eosflow.config import SpecError, SpecWarning, plain_table
from eosflow.precision import DTYPES, entered, precision, thread_settings
from eosflow.problems import Problem, build_problem
from eosflow.problems.registry import IN_MEMORY
from eosflow.process import PROCESSES, Process
from eosflow.signals import Interrupted, stop_requests
from eosflow.spec import Spec, SpectrumSpec, differences_but_steps, parse_spec, resolve, resolved_table
from eosflow.store import (
    Checkpoint,
    RunDirectoryWarning,
    RunStore,
    StoreError,
    described,
    divergence_limit,
    divergence_reason,
    first_divergent,
    resume_command,
    steps_on_disk,
)
from eosflow.version import __version__

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
    if problem is None:
        resolved = resolve(table)
        spec, resolved_problem = resolved.spec, resolved.table
        try:
            problem, _ = build_problem(spec.problem, spec.seed, spec.dtype)
        except MemoryError as error:  # (numpy's _ArrayMemoryError: a width, dim or n_train of 10**10)
            raise SpecError(
                f"building problem {spec.problem['name']!r} takes more memory than this machine gives ({error}): "
                "look for a size in [problem] (width, depth, dim, n_train, ...) far larger than meant"
            ) from None
    else:  # an in-memory problem: its table records what built it, if anything, and is not rebuilt
        spec = parse_spec(table)
        params = {key: value for key, value in spec.problem.items() if key != "name"}
        resolved_problem = resolved_table(spec, params | {"fingerprint": problem.fingerprint()})
    problem.check_dtype(spec.dtype)
    problem.check_finite()
    if spec.microbatch:
        problem = problem.with_microbatch(spec.microbatch)  # (checked in the problem's own dtype)
    problem.check_initial_loss(str(spec.problem.get("name", IN_MEMORY)))
    fitted = fit_spectrum(spec, int(problem.w0.size), "k_max" in (table.get("spectrum") or {}))
    processes = {name: PROCESSES[name].build(problem, fitted, spec.options[name]) for name in spec.processes}
    return spec, problem, resolved_problem, processes


def fit_spectrum(spec: Spec, dimension: int, k_max_given: bool) -> Spec:
    """The spec the processes run: ``spectrum.k_max`` (and each ``[name.spectrum]``'s) capped at the
    parameter count n (an n x n Hessian has n eigenpairs; said in a warning when the spec set k_max). A
    ``spectrum.k`` above n is an error. The resolved spec keeps the values as written."""

    def k_max(spectrum: SpectrumSpec, where: str, given: bool) -> int:
        if spectrum.k > dimension:
            raise SpecError(
                f"`{where}.k` = {spectrum.k} exceeds the number of parameters ({dimension}) of "
                f"problem {spec.problem['name']!r}: an {dimension} x {dimension} Hessian has {dimension} "
                "eigenpairs"
            )
        if spectrum.k_max > dimension and given:
            warnings.warn(
                f"`{where}.k_max` = {spectrum.k_max} exceeds the number of parameters ({dimension}) of "
                f"problem {spec.problem['name']!r}; tracking at most {dimension} eigenpairs",
                SpecWarning,
                stacklevel=4,
            )
        return min(spectrum.k_max, dimension)

    spectrum = dataclasses.replace(spec.spectrum, k_max=k_max(spec.spectrum, "spectrum", k_max_given))
    spectra = {
        name: keys | {"k_max": k_max(spec.spectrum_of(name), f"{name}.spectrum", "k_max" in keys)}
        for name, keys in spec.spectra.items()
    }
    return dataclasses.replace(spec, spectrum=spectrum, spectra=spectra)


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
    built in memory (what :func:`eosflow.simulate` passes; a table without ``dtype`` then takes the
    problem's, :func:`with_problem_dtype`). The run holds the directory's lock
    throughout (a second writer is refused, naming this process). SIGINT and SIGTERM stop it after
    the chunk in progress is flushed and checkpointed: the summary says ``interrupted`` with the
    command that resumes, and :class:`Interrupted` (a KeyboardInterrupt) is raised. ``stop_after``
    ends the run early after that many steps (as an interruption would), which tests use to
    exercise resuming.
    """
    table = with_problem_dtype(table, problem)
    with precision(run_dtype(table)):
        return _run(
            table, out, resume=resume, overwrite=overwrite, progress=progress, stop_after=stop_after, problem=problem
        )


def with_problem_dtype(table: dict, problem: Problem | None) -> dict:
    """``table`` with its NumPy scalars made Python numbers (:func:`~eosflow.config.plain_table`) and ``dtype``
    set to that of ``problem``, a problem built in memory, when the table names none
    (:meth:`Problem.default_dtype`: float64 if every floating parameter leaf is, else float32), as
    :func:`eosflow.simulate` does."""
    table = plain_table(table)
    if problem is None or not isinstance(table, dict) or "dtype" in table:
        return table
    return {**table, "dtype": problem.default_dtype()}


def run_dtype(table: dict) -> str:
    """The spec's dtype, read before validation (an invalid one fails in parse_spec, in float32)."""
    dtype = table.get("dtype", "float32") if isinstance(table, dict) else "float32"
    return dtype if dtype in DTYPES else "float32"


def _run(
    table: dict,
    out: str | Path,
    *,
    resume: bool,
    overwrite: bool,
    progress: Progress | None,
    stop_after: int | None,
    problem: Problem | None,
) -> Outcome:
    spec, problem, resolved, processes = prepare(table, problem)
    store = RunStore(out)
    store.lock()
    try:
        with stop_requests() as stop:
            return _run_locked(
                spec, problem, resolved, processes, table, store, resume, overwrite, progress, stop_after, stop
            )
    finally:
        store.unlock()


def _run_locked(
    spec, problem, resolved, processes, table, store, resume, overwrite, progress, stop_after, stop
) -> Outcome:
    resolved_text = tomli_w.dumps(resolved)
    names = list(processes)
    reference = names[0]
    previous_summary: dict = {}
    if resume and store.exists():
        lost = not (store.root / "spec.resolved.toml").is_file()
        if lost:  # spec_differences resolves the stored table again anyway: spec.toml stands in for it
            warnings.warn(
                f"{str(store.root)!r}: spec.resolved.toml is missing; the run's spec.toml was resolved again in its "
                "place and the file written back",
                RunDirectoryWarning,
                stacklevel=3,
            )
        stored_text = (store.root / ("spec.toml" if lost else "spec.resolved.toml")).read_text()
        differences, stored_steps = differences_but_steps(stored_text, resolved)
        if differences:
            other_data = any(difference.startswith("`problem.fingerprint`") for difference in differences)
            raise StoreError(
                f"cannot resume {str(store.root)!r}: its resolved spec differs from this one "
                f"({'; '.join(differences[:5])}"
                + ("; the problem built in memory has another w0 or other data than the run's" if other_data else "")
                + "); start again with eosflow run SPEC --out DIR --overwrite (overwrite=True)"
            )
        if lost:
            store.write_file("spec.resolved.toml", tomli_w.dumps(resolved | {"steps": stored_steps}).encode())
        checkpoint = store.read_checkpoint()  # the previous one if the newest is damaged; raises if both are
        if checkpoint is not None and "fallback" in checkpoint.meta:
            warnings.warn(checkpoint.meta["fallback"], RunDirectoryWarning, stacklevel=3)
        previous_summary = store.read_summary()  # rebuilt (with a warning) if lost
        if spec.steps != stored_steps:
            _change_length(store, spec, table, resolved_text, stored_steps, checkpoint)
    else:
        store.create(tomli_w.dumps(table), resolved_text, overwrite=overwrite)
        checkpoint = None

    def initial_states():
        return {name: p.init(problem.w0) for name, p in processes.items()}

    def restored_states(checkpoint):
        written_by = checkpoint.meta.get("eosflow", "an eosflow that did not record its version")
        return {
            name: _restore(name, p.init(problem.w0), checkpoint.states[name], written_by)
            for name, p in processes.items()
            if name in checkpoint.states
        }

    if checkpoint is None:
        step, inactive, states = 0, {}, initial_states()
        store.truncate(0)
    else:
        step, inactive, states = checkpoint.step, dict(checkpoint.meta.get("inactive", {})), restored_states(checkpoint)
        store.manifest = copy.deepcopy(checkpoint.meta.get("manifest") or {})
        store.truncate(step)
    limit = divergence_limit(spec.divergence.loss_blowup, problem.initial_loss)
    advance = _Advance(processes, reference, limit, spec.record.params_every, store)
    if checkpoint is not None:
        _repair(store, advance, names, step, initial_states, restored_states)
        advance.offsets = _checkpointed_offsets(checkpoint, names)

    started = time.perf_counter()
    elapsed_before = previous_summary.get("seconds", 0.0) if previous_summary.get("steps_done", 0) else 0.0
    summary_base = _summary_base(spec, problem, names)
    summary_base["sessions"] = _sessions(store, previous_summary if step else {}, summary_base, step)
    advance.timing = _Timing(previous_summary.get("timing", {}))
    end = spec.steps if stop_after is None else min(spec.steps, stop_after)
    outcome = Outcome(store.root, "running", step)
    _finish(store, summary_base, outcome, inactive, elapsed_before, started, advance.timing.table)

    def following(at: int) -> int:  # the length of the loop's chunk from step ``at`` on (0: it stops before it)
        if at >= end or stop["signum"] is not None:
            return 0
        return min(spec.record.chunk - at % spec.record.chunk, end - at)

    advance.following = following
    try:
        while step < end and stop["signum"] is None:
            n = following(step)
            chunk, diverged = advance(states, inactive, step, n)
            if diverged is not None:
                outcome = Outcome(store.root, "diverged", *diverged)
                break
            step += n
            active = [name for name in names if name not in inactive]
            store.write_checkpoint(
                step,
                {
                    name: [np.asarray(leaf) for leaf in jax.device_get(jax.tree_util.tree_leaves(states[name]))]
                    for name in active
                }
                | {name + OFFSET: [np.asarray(advance.offsets[name])] for name in active if name in advance.offsets},
                {"inactive": inactive, "eosflow": _version()},
            )
            outcome = Outcome(store.root, "running", step)
            # the summary follows the checkpoint, so that a run killed (-9) keeps its steps' time and timings;
            # not fsync'd, as the chunk and the checkpoint are (a machine's crash can only make it rebuilt)
            _finish(store, summary_base, outcome, inactive, elapsed_before, started, advance.timing.table, False)
            if progress is not None:
                progress(step, chunk)
        if outcome.status == "running":
            outcome.status = "completed" if step >= spec.steps else "interrupted"
            if stop["signum"] is not None:
                outcome.reason = (
                    f"stopped by {signal.Signals(stop['signum']).name} after {step} of {spec.steps} "
                    f"steps; resume with: {resume_command(store.root)}"
                )
            elif step < spec.steps:
                outcome.reason = f"stopped after {step} of {spec.steps} steps"
    except KeyboardInterrupt as error:
        done = _back_to_checkpoint(store)
        how = signal.Signals(error.signum).name if isinstance(error, Interrupted) else "the user"
        outcome = Outcome(
            store.root,
            "interrupted",
            done,
            f"interrupted by {how}; {steps_on_disk(done)}; resume with: {resume_command(store.root)}",
        )
        _finish(store, summary_base, outcome, inactive, elapsed_before, started, advance.timing.table)
        raise
    except OSError as error:
        failed = f"writing to {str(store.root)!r} failed ({f'{error.filename!r}: ' if error.filename else ''}" + (
            f"{error.strerror or error})"
        )
        done = outcome.steps_done
        with contextlib.suppress(OSError):  # the summary, a few hundred bytes, may still fit
            done = _back_to_checkpoint(store)
            outcome = Outcome(store.root, "interrupted", done, f"{failed}; {steps_on_disk(done)}")
            _finish(store, summary_base, outcome, inactive, elapsed_before, started, advance.timing.table)
        raise StoreError(
            f"{failed}; {steps_on_disk(done)}; resume with: {resume_command(store.root)} (resume=True in Python)"
        ) from None
    finally:
        advance.close()
    _finish(store, summary_base, outcome, inactive, elapsed_before, started, advance.timing.table)
    if stop["signum"] is not None:
        raise Interrupted(stop["signum"], outcome.reason)
    return outcome


def _back_to_checkpoint(store: RunStore) -> int:
    """The steps of the last checkpoint, where a resume starts. A chunk flushed after it (a stop or a failed write
    can come between the two writes) would be recomputed, so it goes now, and the summary agrees with the disk."""
    checkpoint = store.read_checkpoint()
    done = 0 if checkpoint is None else checkpoint.step
    store.truncate(done)
    return done


def _change_length(store: RunStore, spec: Spec, table: dict, resolved_text: str, old: int, checkpoint) -> None:
    """Resume with another ``steps``: extend the run (or end it earlier, never below the steps
    already on disk). Nothing else may differ, and no process depends on ``steps``, so the steps
    a longer run shares with the shorter one are the same numbers (bitwise when ``old`` is a
    multiple of ``record.chunk``: otherwise ``old`` was a chunk boundary the longer run lacks)."""
    new, chunk, done = spec.steps, spec.record.chunk, 0 if checkpoint is None else checkpoint.step
    if new < done:
        raise StoreError(
            f"cannot resume {str(store.root)!r} with steps = {new}: it already holds {done} steps "
            f"(of {old}); a run is never cut short on disk (eosflow run SPEC --out DIR --overwrite starts again)"
        )
    if new > old and old % chunk and done == old:
        warnings.warn(
            f"extending {str(store.root)!r} from {old} to {new} steps: step {old} ended a chunk of this run but "
            f"is not a multiple of record.chunk = {chunk}, so the steps after it are not bitwise those of one "
            f"{new}-step run where a tracker grows (it may grow at a chunk's end)",
            RunDirectoryWarning,
            stacklevel=4,
        )
    store.write_spec(tomli_w.dumps(table), resolved_text)


class _Advance:
    """Advance every active process by one chunk, record distances, flush the chunk.

    ``__call__(states, inactive, step, n)`` updates ``states`` and ``inactive`` in place and returns
    (the chunk's rows per process, None or (steps done, reason) if the reference diverged).
    ``offsets`` holds each process's last offset from the reference (:func:`add_distances`), and is
    checkpointed with the states.
    ``write`` (process, step) -> bool chooses the files flushed (all of them, except in a repair).

    ``following(step)`` is the length of the chunk the run computes from ``step`` on (0: none; the run's loop sets
    it). When it is not 0, the next chunk is computed ahead in a thread (``ahead``) while this one's distances and
    files are made, once all it depends on is decided: the states this chunk left (trackers grown), the reference's
    divergence (none: a diverged reference ends the run) and the models dropped. The thread writes nothing and
    times each process as the loop did; only the calling thread writes, in the same order, so the files, and what
    a kill, a stop or a full disk leaves, are those of a runner without it. A chunk the loop does not go on to
    (a stop asked for meanwhile, an error) is dropped (:meth:`close`); an error computing it is raised at its turn.
    """

    def __init__(self, processes: dict[str, Process], reference: str, limit: float, params_every: int, store: RunStore):
        self.processes, self.reference, self.limit = processes, reference, limit
        self.params_every, self.store = params_every, store
        self.timing = _Timing({})
        self.offsets: dict[str, np.ndarray] = {}
        self.write: Callable[[str, int], bool] = lambda name, step: True
        self.following: Callable[[int], int] = lambda step: 0  # the length of the chunk from step on (0: none)
        self.ahead: tuple[tuple[int, int], concurrent.futures.Future] | None = None  # ((step, n), its computation)
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None

    def __call__(self, states: dict, inactive: dict, step: int, n: int):
        ahead, self.ahead = self.ahead, None
        computed = ahead[1].result() if ahead is not None and ahead[0] == (step, n) else None
        if computed is None:
            computed = self._compute(states, inactive, n)
        chunk: dict[str, dict[str, np.ndarray]] = {}
        diverged = None
        models_diverged: dict[str, tuple[int, str]] = {}  # name -> (the step it diverged at, why)
        for name, (new_state, rows, seconds) in computed.items():
            process = self.processes[name]
            self.timing.add(name, seconds, n, states[name])
            rows, bad, reason = cut_at_divergence(process, rows, step, self.limit)
            if bad is not None:
                if name == self.reference:
                    diverged = (step + bad + 1, f"{name}: {reason}")  # the run's reason names the process
                else:
                    models_diverged[name] = (step + bad, reason)
            else:
                states[name] = new_state
            chunk[name] = rows
        for name, (at, reason) in models_diverged.items():  # a model is dropped only at a step the run records
            if diverged is None or at < diverged[0]:
                inactive[name] = reason
        if diverged is not None:  # the run ends at the reference's divergence: the models' rows end there too
            chunk = {
                name: {key: value[: diverged[0] - step] for key, value in rows.items()} for name, rows in chunk.items()
            }
        elif following := self.following(step + n):
            # all the next chunk depends on is decided (the states, grown trackers, dropped models): it is computed
            # while this one is measured and written, and is used only if the loop goes on (not after a stop)
            if self.executor is None:
                self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eosflow-chunk")
            future = self.executor.submit(self._compute_in, thread_settings(), dict(states), dict(inactive), following)
            self.ahead = ((step + n, following), future)
        add_distances(chunk, self.reference, self.offsets)
        _write_chunk(
            self.store, {name: rows for name, rows in chunk.items() if self.write(name, step)}, step, self.params_every
        )
        return chunk, diverged

    def _compute(self, states: dict, inactive: dict, n: int) -> dict[str, tuple[Any, dict[str, Any], float]]:
        """Every active process's next ``n`` steps: (its state after them, its rows on the host but the d-wide ones
        on an accelerator (:func:`_stays_on_device`), the seconds they took). Reads ``states`` and ``inactive``
        only (it runs in a thread beside the writes of the chunk before)."""
        computed = {}
        for name, process in self.processes.items():
            if name not in inactive:
                tick = time.perf_counter()
                new_state, rows = process.advance(states[name], n)
                # one device_get starts every copy before it waits for the first (np.asarray waits for each in turn)
                fetched = jax.device_get(
                    {key: value for key, value in rows.items() if not _stays_on_device(key, value)}
                )
                on_host = {key: np.asarray(fetched[key]) if key in fetched else value for key, value in rows.items()}
                computed[name] = (new_state, on_host, time.perf_counter() - tick)
        return computed

    def _compute_in(self, settings: tuple[bool, Any], states: dict, inactive: dict, n: int) -> dict:
        """:meth:`_compute` in another thread, under the run's thread-local precision (``settings``: JAX keeps
        x64 per thread, and a float64 run's helper computed in float32 without it)."""
        with entered(settings):
            return self._compute(states, inactive, n)

    def close(self) -> None:
        """Forget a chunk computed ahead that the loop did not go on to (a stop, an error); its thread ends with it."""
        self.ahead = None
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None


def _repair(store: RunStore, advance: _Advance, names: list[str], step: int, initial_states, restored_states) -> None:
    """Recompute the chunks before ``step`` that are missing or damaged (the manifest says which)
    from the latest checkpoint at or before the first of them (step 0, the spec's w0, if none).

    Only the damaged files are written; the chunk boundaries are the recorded ones, so the
    recomputed chunks are bitwise those of the original run.
    """
    damage = [d for name in names for d in store.read_checked(name, store.manifest)[1] if d.first < step]
    if not damage:
        return
    first = min(d.first for d in damage)
    last = max(d.last for d in damage)
    usable = [c for c in store.read_checkpoints()[0] if c.step <= first]
    if usable:
        start, states, inactive = usable[0].step, restored_states(usable[0]), dict(usable[0].meta.get("inactive", {}))
        advance.offsets = _checkpointed_offsets(usable[0], names)
    else:
        start, states, inactive = 0, initial_states(), {}
        advance.offsets = {}
    source = "the checkpoint there" if usable else "the spec's w0"
    warnings.warn(
        f"{str(store.root)!r}: " + described(damage) + f"; recomputing them from step {start} ({source})",
        RunDirectoryWarning,
        stacklevel=4,
    )
    bounds = {start, last + 1}
    for entries in store.manifest.values():
        for a, b, *_ in entries.values():
            bounds |= {a, b + 1}
    for d in damage:
        bounds |= {d.first, d.last + 1}
    cuts = sorted(b for b in bounds if start <= b <= last + 1)
    advance.write = lambda name, at: any(d.process == name and d.first <= at <= d.last for d in damage)
    for a, b in itertools.pairwise(cuts):
        advance(states, inactive, a, b - a)
    advance.write = lambda name, at: True
    still = [d for name in names for d in store.read_checked(name, store.manifest)[1] if d.first < step]
    if still:
        raise StoreError(f"{str(store.root)!r}: could not recompute " + "; ".join(map(str, still)))
    _record_manifest(store, step)


def _record_manifest(store: RunStore, step: int) -> None:
    """After a repair, the newest checkpoint (at ``step``) lists the recomputed chunks as now written.

    They are bitwise the old ones when the same eosflow recomputes them; one that writes other rows
    (a newer version's field) writes other bytes, which the old manifest would read as corrupt. The
    checkpoint is rewritten with its own states and the current manifest when the two differ (its
    header is read first: the states only when it must be rewritten).
    """
    if store.read_manifest() == (step, store.manifest_before(step)):
        return
    newest = store.read_checkpoint()
    if newest is not None and newest.step == step:
        meta = {key: value for key, value in newest.meta.items() if key not in ("manifest", "fallback")}
        store.write_checkpoint(step, newest.states, meta)


OFFSET = ".offset"  # a checkpoint's entry "<process>.offset": that process's last offset from the reference


def _checkpointed_offsets(checkpoint: Checkpoint, names: list[str]) -> dict[str, np.ndarray]:
    """The offsets the checkpoint carries (:class:`_Advance`), by process; none from an older eosflow."""
    return {name: checkpoint.states[name + OFFSET][0] for name in names if name + OFFSET in checkpoint.states}


def _restore(name: str, template: Any, leaves: list[np.ndarray], written_by: str) -> Any:
    """Process ``name``'s state from its checkpointed arrays, refused unless there are as many as
    this eosflow's state has (their shapes may differ: the tracked eigenspace grows)."""
    treedef = jax.tree_util.tree_structure(template)
    expected = len(jax.tree_util.tree_leaves(template))  # treedef.num_leaves, which jax's stubs do not declare
    if len(leaves) != expected:
        raise StoreError(
            f"the checkpoint's state of process {name!r} does not fit this eosflow: it holds {len(leaves)} "
            f"arrays, this version's state has {expected} (the checkpoint was written by {written_by}, "
            f"this is eosflow {_version()}); start again with eosflow run SPEC --out DIR --overwrite (overwrite=True)"
        )
    return jax.tree_util.tree_unflatten(
        treedef, [_like(kept, leaf) for kept, leaf in zip(jax.tree_util.tree_leaves(template), leaves, strict=True)]
    )


def _like(template: Any, leaf: np.ndarray) -> jax.Array:
    """``leaf`` as a JAX array, weakly typed where the fresh state's scalar is (a step counter from a
    Python int): a strong one is another program type, and every scan of the process compiled again."""
    if getattr(template, "weak_type", False) and template.shape == () == np.shape(leaf):
        return jax.lax.full_like(template, leaf)
    return jnp.asarray(leaf)


def _version() -> str:
    return __version__


def cut_at_divergence(
    process: Process, rows: dict[str, np.ndarray], first_step: int, limit: float
) -> tuple[dict[str, np.ndarray], int | None, str]:
    """(``rows`` up to and including the first whose loss diverged, its index, the reason with the process's own
    hint), or (``rows``, None, "") when none did; ``first_step`` is the step of the first row."""
    bad = first_divergent(rows["loss"], limit)
    if bad is None:
        return rows, None, ""
    reason = divergence_reason(rows["loss"][bad], first_step + bad, limit)
    rows = {key: value[: bad + 1] for key, value in rows.items()}
    if hint := process.divergence_hint(rows):
        reason = f"{reason}: {hint}"
    return rows, bad, reason


def add_distances(chunk: dict[str, dict[str, np.ndarray]], reference: str, offsets: dict[str, np.ndarray]) -> None:
    """Compare every process with the reference at each step both have.

    ``distance`` = ||e_t||, e_t = reference position - position; ``centre_distance`` =
    ||e_(t-1) + e_t|| / 2, the distance at t - 1/2 between the midpoints (w_(t-1) + w_t) / 2 of
    the two trajectories (the rod centres of docs/rod_flow.md): a period-2 oscillation of constant
    amplitude cancels from it, whichever its phase. ``offsets[name]`` is e at the step before the
    chunk (read, then replaced by the chunk's last e); without it (step 0, or a checkpoint written
    before it was kept) the chunk's first centre distance is NaN. For a process that reports its
    ``top_vector`` u (a model's oscillation direction), also ``reference_offset`` = <e_t, u>, the
    reference's displacement from the model's centre along u (whose running RMS is the oscillation
    envelope the model predicts).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging process's positions: inf, said by its reason
        _add_distances(chunk, reference, offsets)


DISTANCE_BLOCK = 2**22  # float64 entries of e = reference - position made at once (32 MB): C x d at once was
# several C x d x 8-byte temporaries, superlinear in the chunk (3.8 ms a step at d = 30k, C = 1000; a probe)


DEVICE_ROWS = ("position", "top_vector")  # d wide: on an accelerator they stay there, for the distances


def _stays_on_device(key: str, value: Any) -> bool:
    """Whether a chunk's row ``key`` is left where it was computed: a d-wide row (:data:`DEVICE_ROWS`) on an
    accelerator, whose distances are then computed there (only the steps ``params_every`` saves come to the host).
    On the CPU it is brought over as every row is (a NumPy view, no copy), and the distances run in NumPy."""
    return key in DEVICE_ROWS and isinstance(value, jax.Array) and any(d.platform != "cpu" for d in value.devices())


def _add_distances(chunk: dict[str, dict[str, np.ndarray]], reference: str, offsets: dict[str, np.ndarray]) -> None:
    base = chunk[reference]["position"]
    xp: Any = np if isinstance(base, np.ndarray) else jnp  # jnp: rows left on an accelerator (_stays_on_device)
    with contextlib.nullcontext() if xp is np else jax.enable_x64(True):  # float64 there too, for this block only
        for name, rows in chunk.items():
            position = rows["position"]
            n, total = min(len(base), len(position)), len(position)
            block = max(1, DISTANCE_BLOCK // max(1, base[0].size if len(base) else 1))
            if name == reference and "top_vector" not in rows:
                rows["distance"], rows["centre_distance"] = _own_distances(xp, position, offsets, name, block)
                continue
            distance, centre_distance = np.full(total, np.nan), np.full(total, np.nan)
            top = rows.pop("top_vector", None)
            offset = None if top is None else np.full(total, np.nan)
            previous: Any = offsets.get(name)
            for first in range(0, n, block):
                last = min(n, first + block)
                if name == reference:  # e = w - w: 0 where w is finite, NaN where it is not (as the subtraction gives)
                    diff = _own_offset(xp, position[first:last])
                else:
                    diff = (base[first:last].astype(xp.float64) - position[first:last]).reshape(last - first, -1)
                distance[first:last] = np.asarray(xp.linalg.norm(diff, axis=1))
                e = diff if previous is None else xp.concatenate([previous[None], diff])  # e_(t-1) first if known
                centre_distance[last - len(e) + 1 : last] = np.asarray(xp.linalg.norm(e[:-1] + e[1:], axis=1) / 2)
                if offset is not None and top is not None:
                    offset[first:last] = np.asarray(xp.einsum("nd,nd->n", diff, top[first:last]))
                previous = diff[-1]
            if previous is not None and n:
                offsets[name] = previous
            rows["distance"], rows["centre_distance"] = distance, centre_distance
            if offset is not None:
                rows["reference_offset"] = offset


def _own_offset(xp: Any, position: Any) -> Any:
    """e = w - w of the reference's rows ``position`` (C x ...) as C x d float64: 0 where w is finite, NaN where not."""
    return xp.where(xp.isfinite(position), 0.0, xp.nan).reshape(len(position), -1)


def _own_distances(xp: Any, position: Any, offsets: dict, name: str, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's (``distance``, ``centre_distance``) to itself, bitwise :func:`_add_distances`'s formula:
    with e_t = w_t - w_t (0, or NaN where w_t is not finite) ||e_t|| is 0 for a finite row and NaN otherwise, and
    ||e_(t-1) + e_t|| / 2 is 0 when both rows are, so both are read off each row's finiteness (C booleans, in
    blocks of ``block`` rows) rather than norms of C x d float64 e (0.05-0.08 ms a step at d = 8970, C = 1000).
    Only the chunk's first centre distance, which adds the offset before the chunk, and the last e (the next
    offset, in ``offsets[name]``) are made of d-wide rows."""
    total = len(position)
    finite = np.zeros(total, bool)
    for first in range(0, total, block):
        rows = position[first : first + block]
        finite[first : first + len(rows)] = np.asarray(xp.isfinite(rows).reshape(len(rows), -1).all(axis=1))
    distance = np.where(finite, 0.0, np.nan)
    centre_distance = np.full(total, np.nan)
    centre_distance[1:] = np.where(finite[:-1] & finite[1:], 0.0, np.nan)
    previous = offsets.get(name)
    if total:
        first, offsets[name] = _own_offset(xp, position[:1]), _own_offset(xp, position[-1:])[0]
        if previous is not None:
            centre_distance[0] = np.asarray(xp.linalg.norm(previous[None] + first, axis=1) / 2)[0]
    return distance, centre_distance


def _write_chunk(store: RunStore, chunk: dict, first_step: int, params_every: int) -> None:
    for name, rows in chunk.items():
        position = rows.pop("position")
        if params_every:
            steps = first_step + np.arange(len(position))
            keep = steps % params_every == 0
            rows["params"], rows["params_step"] = np.asarray(position[np.flatnonzero(keep)]), steps[keep]
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
        # XLA's threading orders float32 reductions, so a float32 run's last digits depend on it
        # (docs/leaderboard.md, the ResNet cells): the flags of the invocation that wrote this summary
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # each process's tracker limit: `[<process>.spectrum] k_max` can set it apart from `[spectrum]`
        "spectrum_k_max": {name: spec.spectrum_of(name).k_max for name in names},
        **stopping_rules(spec, names),
    }


def stopping_rules(spec: Spec, names) -> dict[str, dict[str, list]]:
    """``spectrum_stop``: each process's eigensolver stopping rule, [tol, max_iters] (a measurement whose residual
    is above tol stopped at max_iters: :func:`eosflow.compare.not_converged`)."""
    return {"spectrum_stop": {name: [spec.spectrum_of(name).tol, spec.spectrum_of(name).max_iters] for name in names}}


ENVIRONMENT = ("eosflow", "jax", "device", "xla_flags")  # what a run's last digits depend on besides its spec


def _sessions(store: RunStore, previous: dict, now: dict, step: int) -> list[dict]:
    """Each session's environment and the step it started from (summary.json's ``sessions``): a resume under other
    versions, another device or other XLA flags adds one, with a RunDirectoryWarning (the steps before it were
    computed otherwise, and the run is bitwise an uninterrupted one only in one environment)."""
    sessions = previous.get("sessions") or (
        [{"from_step": 0, **{key: previous.get(key) for key in ENVIRONMENT}}] if previous else []
    )
    current = {key: now[key] for key in ENVIRONMENT}
    last = sessions[-1] if sessions else None
    if last is None or any(last.get(key) != value for key, value in current.items()):
        if last is not None:
            differ = ", ".join(
                f"{key} {last.get(key)!r} -> {value!r}" for key, value in current.items() if last.get(key) != value
            )
            warnings.warn(
                f"{str(store.root)!r}: steps 0..{step - 1} were computed in another environment ({differ}); a run "
                "is bitwise an uninterrupted one only in one environment (summary.json's `sessions` keeps both)",
                RunDirectoryWarning,
                stacklevel=4,
            )
        sessions = [*sessions, {"from_step": step, **current}]
    return sessions


class _Timing:
    """Wall-clock time of every chunk per process: ``{name: {"chunks": [[steps, seconds, warm], ...]}}``.

    ``warm`` is 0 for a process's first chunk of each length and state shapes in an invocation (the scan's length
    and the state's shapes are fixed when it compiles: a shorter last chunk, or a tracker grown to more pairs,
    compiles again), 1 for a chunk it has run before.
    """

    def __init__(self, previous: dict):
        self.table = {name: {"chunks": list(entry.get("chunks", []))} for name, entry in previous.items()}
        self.compiled: set[tuple] = set()  # (process, chunk length, state shapes) run in this invocation

    def add(self, name: str, seconds: float, steps: int, state: Any = None) -> None:
        key = (name, steps, tuple((np.shape(leaf), str(getattr(leaf, "dtype", ""))) for leaf in jax.tree.leaves(state)))
        warm = key in self.compiled
        self.compiled.add(key)
        self.table.setdefault(name, {"chunks": []})["chunks"].append([steps, seconds, int(warm)])


def _finish(
    store: RunStore,
    base: dict,
    outcome: Outcome,
    inactive: dict,
    elapsed_before: float,
    started: float,
    timing: dict | None = None,
    durable: bool = True,
) -> None:
    summary = {
        **base,
        "status": outcome.status,
        "reason": outcome.reason,
        "steps_done": outcome.steps_done,
        "dropped_processes": inactive,
        "seconds": elapsed_before + time.perf_counter() - started,
    }
    if timing is not None:
        summary["timing"] = timing  # per process: the wall time of every chunk
    store.write_summary(summary, durable)
