"""The Process protocol: anything that moves through time from w0 (an optimizer or a flow).

    state = process.init(w0)
    state, observations = process.advance(state, n_steps)

Time is measured in optimizer steps. ``advance`` returns one row per unit of time, describing
the state at the *start* of each step (times t, t+1, ..., t+n-1). Every process observes at
least ``position`` (the iterate, or a flow's centre; n x d) and ``loss`` (n,); flows add their
predictions (``predicted_loss``, ``amplitude``, ...). States are pytrees of arrays (NamedTuples)
so that the experiment can checkpoint them without knowing what they hold.

Processes register a factory and an options dataclass under a name; a spec lists processes by
name and configures each one in a table of that name.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from eosflow.compiled import BoundedJit
from eosflow.config import Entry, SpecError, parse, suggest
from eosflow.seeds import seed_key
from eosflow.spectrum import grow_tracked, last_measured, random_vectors
from eosflow.tracker import grown_history

if TYPE_CHECKING:  # eosflow.spec imports this module to validate the process options
    from typing import Self

    from eosflow.spec import SpectrumSpec

State = TypeVar("State")  # a process's state: a pytree of arrays (a NamedTuple)


class Process(Protocol[State]):
    """What the experiment calls: ``init``, ``advance``, and ``divergence_hint`` when the loss blows up."""

    name: str

    def init(self, w0: Array) -> State: ...

    def advance(self, state: State, n_steps: int) -> tuple[State, dict[str, Array]]: ...

    def divergence_hint(self, rows: dict[str, np.ndarray]) -> str: ...


@dataclasses.dataclass(frozen=True)
class ProcessEntry(Entry):
    """A registered process: ``build(problem, spec, options) -> Process``."""

    discrete: bool  # an optimizer (a real run) rather than a model of one
    problems: tuple[str, ...] | None = None  # the problems it models (None: any)
    optimizer: str | None = None  # the optimizer it models, whose table holds the shared hyperparameters (None: GD)

    def models(self, problem: str) -> bool:
        return self.problems is None or problem in self.problems

    def check_problem(self, problem: str) -> None:
        if not self.models(problem):
            raise SpecError(
                f"process {self.name!r} models the problem {' or '.join(map(repr, self.problems or ()))}; "
                f"this spec's `problem.name` is {problem!r}"
            )


PROCESSES: dict[str, ProcessEntry] = {}


def register_process(
    name: str,
    options: type,
    summary: str,
    discrete: bool = False,
    problems: tuple[str, ...] | None = None,
    optimizer: str | None = None,
):
    """Decorator: ``build(problem, spec, options) -> Process`` becomes available as ``name``
    (for every problem, or only for those named in ``problems``). A model of an optimizer other
    than GD names it in ``optimizer``: the spec's table of that optimizer (``[adam]``) holds the
    hyperparameters it shares with the optimizer, read by ``build`` from ``spec.options[optimizer]``."""

    def decorate(build):
        PROCESSES[name] = ProcessEntry(name, options, build, summary, discrete, problems, optimizer)
        return build

    return decorate


def process_entry(name: str, where: str = "processes") -> ProcessEntry:
    if name not in PROCESSES:
        raise SpecError(f"unknown process {name!r} in `{where}`{suggest(name, PROCESSES)}")
    return PROCESSES[name]


def parse_options(name: str, table: Any) -> Any:
    return parse(process_entry(name).options, table, name)


def process_key(seed: int, name: str) -> Array:
    """A PRNG key for one process, stable across runs and resumes (independent of list order)."""
    return jax.random.fold_in(seed_key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def scanned_fields(name: str, spec: Any, objective: Any, spectrum: Any = None) -> dict[str, Any]:
    """The fields every :class:`ScannedProcess` is built with: its ``name``, the spec's ``lr``, its
    tracker (``spec.spectrum_of(name)``, or ``spectrum``), a PRNG ``key`` of its own
    (:func:`process_key`), the ``objective``."""
    return {
        "name": name,
        "lr": spec.lr,
        "spectrum": spec.spectrum_of(name) if spectrum is None else spectrum,
        "key": process_key(spec.seed, name),
        "objective": objective,
    }


class TrackedState(Protocol):
    """What :class:`ScannedProcess` reads of its state (a NamedTuple with at least these fields)."""

    @property
    def step(self) -> Array: ...  # () integer time of this state

    @property
    def vectors(self) -> Array: ...  # d x k tracked Hessian eigenvectors (warm start of the next measurement)

    def _replace(self, **fields: Any) -> Self: ...


Tracked = TypeVar("Tracked", bound=TrackedState)


class ScannedProcess(eqx.Module, Generic[Tracked]):
    """Base for processes that advance by a pure one-step map and track Hessian eigenvectors.

    Subclasses implement ``init(w0)`` and ``step(state) -> (state, row)``; ``advance`` runs
    ``lax.scan`` of ``step`` under one jit (recompiled only when k or n_steps changes), then
    grows the tracked eigenspace on the host when every tracked eigenvalue is above
    ``spectrum.threshold / lr`` (see :func:`eosflow.spectrum.grow_tracked`). With
    ``spectrum.grow_every`` = m > 0 the scan runs in blocks of m steps while the eigenspace can
    still grow, and growth is considered after each block.
    """

    name: str = eqx.field(static=True)
    lr: float = eqx.field(static=True)
    spectrum: SpectrumSpec = eqx.field(static=True)
    key: Array

    def init(self, w0: Array) -> Tracked:
        raise NotImplementedError

    def step(self, state: Tracked) -> tuple[Tracked, dict[str, Array]]:
        raise NotImplementedError

    def advance(self, state: Tracked, n_steps: int) -> tuple[Tracked, dict[str, Array]]:
        blocks, done = [], 0
        while done < n_steps:
            n = n_steps - done
            can_grow = state.vectors.shape[1] < min(self.spectrum.k_max, state.vectors.shape[0])
            if self.spectrum.grow_every and can_grow:
                n = min(n, self.spectrum.grow_every)
            state, rows = _scan(self, state, n)
            state = self._grow(state, rows)
            blocks.append(rows)
            done += n
        if len(blocks) == 1:
            return state, blocks[0]
        return state, jax.tree_util.tree_map(lambda *parts: jnp.concatenate(parts), *blocks)

    def _grow(self, state: Tracked, rows: dict[str, Array]) -> Tracked:
        k = state.vectors.shape[1]
        if k >= min(self.spectrum.k_max, state.vectors.shape[0]):  # full: nothing to read from the device
            return state
        latest = last_measured(np.asarray(rows["eigenvalues"])) if "eigenvalues" in rows else None
        if latest is None:
            return state
        key = jax.random.fold_in(self.key, state.step)  # (on the device: int() would fetch it, fold_in send it back)
        grown = grow_tracked(state.vectors, latest[:k], self.growth_threshold(), self.spectrum.k_max, key)
        if grown.shape[1] > k and hasattr(state, "older"):  # a warm start's history: the new direction joins it
            return state._replace(vectors=grown, older=grown_history(state.older, grown))
        return state._replace(vectors=grown)

    def constant_rows(self) -> tuple[str, ...]:
        """The rows that ``step`` gives the same value at every step, whatever the state (none here): the scan
        makes them once and broadcasts them to the chunk's rows (:func:`_scan_steps`)."""
        return ()

    def growth_threshold(self) -> float:
        """One more eigenpair is tracked once every tracked eigenvalue exceeds this (``spectrum.threshold / lr``)."""
        return self.spectrum.threshold / self.lr

    def divergence_hint(self, rows: dict[str, np.ndarray]) -> str:
        """Why this process may have diverged, read from its rows up to the divergent one ('' if unknown):
        an edge ratio (preconditioned sharpness / threshold, lr S / 2 for GD) far above 1 means a step size
        the curvature does not allow, not an edge-of-stability oscillation (which hovers at 1)."""
        measured = np.asarray(rows.get("edge_ratio", []), dtype=np.float64)
        measured = measured[np.isfinite(measured)]
        if measured.size == 0 or measured.max() <= 1.5:
            return ""
        return (
            f"its edge ratio (sharpness / stability threshold) reached {measured.max():.4g}, far past 1, "
            "where no iteration of this step size is stable: lower lr"
        )

    def initial_vectors(self, w0: Array) -> Array:
        return random_vectors(jax.random.fold_in(self.key, -1 & 0x7FFFFFFF), w0.size, self.spectrum.k, w0.dtype)


def _scan_steps(process: ScannedProcess[Tracked], state: Tracked, n_steps: int) -> tuple[Tracked, dict[str, Array]]:
    """``n_steps`` steps of ``process`` in one ``lax.scan``: (the state after them, rows n_steps x ...). The rows it
    names in ``constant_rows()`` are not written at every step (a dynamic update of each, ~6% of a GD step on the
    digits MLP with ``spectrum.every = 0``): they are read off one step taken outside the scan, whose other
    outputs XLA removes as dead code, and broadcast to n_steps rows."""
    constant = process.constant_rows()

    def body(state: Tracked, _: Any) -> tuple[Tracked, dict[str, Array]]:
        state, row = process.step(state)
        return state, {key: value for key, value in row.items() if key not in constant}

    once = process.step(state)[1] if constant else {}
    state, rows = jax.lax.scan(body, state, None, length=n_steps)
    return state, rows | {key: jnp.broadcast_to(once[key], (n_steps, *jnp.shape(once[key]))) for key in constant}


# ``n_steps`` steps of a process in one compiled ``lax.scan``, compiled per configuration of the process
# (its non-array fields: the model, lr, options, the problem's functions), shape of its state (k
# tracked pairs) and length; the 32 most recently used programs are kept, more than a run uses
# between two growths of k (its processes x the chunk's lengths; tests/test_experiment.py::
# test_compiled_scans_are_bounded): at most 32 executables alive (~390 memory maps each on the digits MLP)
_scan = BoundedJit(_scan_steps, kept=32, static_argnums=(2,))


from eosflow import flows, optim  # noqa: E402,F401  (last: they register every process and import this module)
