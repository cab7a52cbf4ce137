"""Experiments on a problem built in memory: the spec's runner, given a :class:`Problem` object.

    problem = eosflow.Problem.from_model(apply_fn, params, inputs, targets, loss="mse")
    ds = eosflow.simulate(problem, lr=0.4, steps=1000, processes=["gd", "central_flow"])

``simulate`` writes the keyword arguments as a spec table and calls :func:`eosflow.experiment.run`
with the problem object in place of the spec's ``[problem]`` table, so every process, the
divergence rules, the chunked records and checkpoints are the spec runner's. The result is what
:func:`eosflow.load` reads from the run directory (a temporary one when ``out`` is None).
"""

from __future__ import annotations

import inspect
import shutil
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path

import xarray as xr

from eosflow.config import SpecError, suggest
from eosflow.experiment import Progress, run
from eosflow.load import load
from eosflow.problems import IN_MEMORY, Problem
from eosflow.signals import Interrupted
from eosflow.store import RunStore


def simulate(
    problem: Problem,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    **settings,
) -> xr.Dataset:
    """Run processes from ``problem.w0`` and return their trajectories (as :func:`eosflow.load`).

    Args:
        problem: from ``Problem.from_model``, ``Problem.from_function`` or a factory.
        out: also keep the run directory there (resumable with ``resume=True``, also with a larger
            ``steps`` to extend a finished run; a problem from an import-path factory is recorded by
            its path, so ``eosflow run --resume`` works too). Without it the run goes to a temporary
            directory, removed on return; an interrupted run (Ctrl-C) keeps it, and the
            :class:`eosflow.signals.Interrupted` raised names it.
        settings: the spec, as :func:`simulation_table` takes it: ``lr`` and ``steps`` (required),
            ``processes`` (default ``["gd"]``; the first is the reference), ``spectrum``,
            ``record``, ``divergence`` (the spec's tables, e.g. ``{"k_max": 2}``), ``options``
            (each process's table, ``{"central_flow": {"substeps": 4}}``), ``seed``, ``dtype``
            (default float64 if every floating parameter is float64, else float32), ``microbatch``
            (full-batch losses in chunks of that many examples; 0: all at once), ``name``.

    Returns:
        The run's ``xarray.Dataset`` (dims process x step), loaded into memory; its ``attrs``
        hold the summary (``status``, ``reason`` when the reference diverged, ...). A
        :class:`eosflow.compare.CriticalSetWarning` says when a central flow's critical set may
        have been incomplete (every tracked eigenpair critical: raise ``spectrum["k_max"]``).
    """
    from eosflow.compare import warn_incomplete_critical_sets

    check_settings(settings)
    table = simulation_table(problem, **settings)
    if out is None:
        scratch = tempfile.mkdtemp(prefix="eosflow-simulate-")
        try:
            run(table, scratch, problem=problem, progress=progress)
            ds = load(scratch).load()
        except Interrupted as error:  # the steps done are kept, not lost with the scratch directory
            done = RunStore(scratch).read_summary().get("steps_done", 0)
            raise Interrupted(
                error.signum,
                f"eosflow.simulate stopped by {signal.Signals(error.signum).name} after {done} of "
                f"{table['steps']} steps; they are kept in {scratch!r}: eosflow.load({scratch!r}) reads them, "
                f"and eosflow.simulate(..., out={scratch!r}, resume=True) with the same problem and settings "
                "continues the run",
            ) from None
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        run(table, out, resume=resume, overwrite=overwrite, problem=problem, progress=progress)
        ds = load(out).load()
    warn_incomplete_critical_sets(ds)
    return ds


def check_settings(settings: dict) -> None:
    """The keyword arguments :func:`simulation_table` takes, with ``lr`` and ``steps`` (a SpecError
    naming a misspelled or missing one)."""
    accepted = [name for name in inspect.signature(simulation_table).parameters if name != "problem"]
    for key in settings:
        if key not in accepted:
            raise SpecError(f"eosflow.simulate: unknown setting `{key}`{suggest(key, accepted)}")
    missing = [key for key in ("lr", "steps") if key not in settings]
    if missing:
        raise SpecError(f"eosflow.simulate needs `lr` and `steps` (missing: {', '.join(missing)})")


def simulation_table(
    problem: Problem,
    *,
    lr: float,
    steps: int,
    processes: Sequence[str] = ("gd",),
    spectrum: dict | None = None,
    options: dict[str, dict] | None = None,
    seed: int = 0,
    dtype: str | None = None,
    microbatch: int = 0,
    record: dict | None = None,
    divergence: dict | None = None,
    name: str = "simulate",
) -> dict:
    """The spec table :func:`simulate` runs (its ``[problem]`` is the problem's source, if any).

    A problem built in memory is recorded as ``problem.name = "in_memory"``; dtype defaults to
    float64 if every floating parameter leaf is float64, else float32 (a leaf of another dtype
    is then refused by name).
    """
    if not isinstance(problem, Problem):
        shown = repr(problem) if len(repr(problem)) <= 60 else repr(problem)[:57] + "..."
        raise TypeError(
            "eosflow.simulate takes a Problem (eosflow.Problem.from_model, .from_function or .from_equinox, "
            f"eosflow.torch.problem, or a factory's), got {type(problem).__name__} {shown}. A built-in problem runs "
            "from a spec: eosflow.experiment.run({'problem': {'name': ...}, 'lr': ..., 'steps': ...}, out) and then "
            "eosflow.load(out), or `eosflow run SPEC`"
        )
    if isinstance(processes, str):
        processes = [processes]
    table = {
        "name": name,
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "dtype": dtype or problem.default_dtype(),
        "microbatch": microbatch,
        "processes": list(processes),
        "problem": dict(problem.source or {"name": IN_MEMORY}),
    }
    for key, value in (("spectrum", spectrum), ("record", record), ("divergence", divergence)):
        if value is not None:
            table[key] = dict(value)
    for process, process_options in (options or {}).items():
        if process in table:
            raise SpecError(f"options[{process!r}]: {process!r} is not a process")
        table[process] = dict(process_options)
    return table
