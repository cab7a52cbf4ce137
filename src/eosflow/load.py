"""Read a run directory into an ``xarray.Dataset`` (one line for the user: ``eosflow.load(dir)``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from eosflow.store import (
    RunDirectoryWarning,
    RunStore,
    StoreError,
    described,
    not_a_run_directory,
    resume_command,
)

if TYPE_CHECKING:
    import xarray as xr


# {process: reason}, {process: wall times of its chunks}, {process: its tracker's k_max}, [each session's versions],
# {process: [its eigensolver's tol, max_iters]}
SUMMARY_TABLES = ("dropped_processes", "timing", "spectrum_k_max", "sessions", "spectrum_stop")


def summary_of(ds: xr.Dataset) -> dict:
    """The run summary that :func:`load` put in ``ds.attrs``, its JSON tables parsed back."""
    summary = dict(ds.attrs)
    for key in SUMMARY_TABLES:
        if isinstance(summary.get(key), str):
            summary[key] = json.loads(summary[key])
    return summary


def load(run_dir: str | Path) -> xr.Dataset:
    """Trajectories of every process on one ``step`` grid, with coordinate ``process``.

    Variables have dims (process, step), or (process, step, eig) for ``eigenvalues``; a value a
    process did not record at a step (a measurement skipped, a process dropped) is NaN. The
    run's summary is in ``attrs`` (its tables ``dropped_processes`` and ``timing`` as JSON text;
    :func:`summary_of` parses them back); ``status`` is ``running`` while a process writes the run (every
    flushed step is returned). Chunks are checked against the manifest of the last checkpoint; a
    missing or damaged chunk leaves its steps NaN on the step grid, is named in
    ``attrs["missing_steps"]`` and in a :class:`RunDirectoryWarning` with the command that
    recomputes it. Saved parameters are read by :func:`load_params`.
    """
    store = RunStore(run_dir)
    if not store.exists():
        raise not_a_run_directory(run_dir)
    summary = store.read_summary()
    checkpointed = store.read_manifest()
    manifest = checkpointed[1] if checkpointed else {}
    names = _ordered_processes(store, summary, manifest)
    per_process, damage = {}, []
    for name in names:
        per_process[name], lost = store.read_checked(name, manifest)
        damage += lost
    steps = np.unique(np.concatenate([d["step"] for d in per_process.values()] + [np.zeros(0, int)]))
    if damage:
        steps = np.arange(max([int(steps[-1]) + 1 if steps.size else 0] + [d.last + 1 for d in damage]))
        warnings.warn(
            f"{str(run_dir)!r}: " + described(damage) + f"; they read as NaN. "
            f"`{resume_command(Path(run_dir))}` recomputes them",
            RunDirectoryWarning,
            stacklevel=2,
        )
    attrs = summary_attrs(summary)
    if summary.get("status") == "running" and store.writer() is None:
        attrs["status"] = "interrupted"  # its writer died without a word (kill -9, power loss)
    if damage:
        attrs["missing_steps"] = described(damage)
    return rows_dataset(per_process, steps, attrs)


def summary_attrs(summary: dict) -> dict:
    """A run summary as Dataset ``attrs``: its scalars, and its nested tables as JSON text (which netCDF
    can store; :func:`summary_of` parses them back)."""
    attrs = {k: v for k, v in summary.items() if isinstance(v, (str, int, float))}
    for key in SUMMARY_TABLES:
        if key in summary:
            attrs[key] = json.dumps(summary[key])
    return attrs


def rows_dataset(per_process: dict[str, dict[str, np.ndarray]], steps: np.ndarray, attrs: dict) -> xr.Dataset:
    """The Dataset of :func:`load` from each process's rows (``per_process[name]["step"]`` says which steps
    of ``steps`` each row is): dims (process, step) and a trailing one per array column (``eig`` for
    ``eigenvalues``), NaN where a process has no row; ``params*`` columns are left out."""
    import xarray as xr

    names = list(per_process)
    variables: dict[str, np.ndarray] = {}
    trailing: dict[str, tuple] = {}
    for data in per_process.values():
        for key, value in data.items():
            if key == "step" or key.startswith("params"):
                continue
            trailing.setdefault(key, value.shape[1:])
            if value.shape[1:] != trailing[key]:
                trailing[key] = tuple(max(a, b) for a, b in zip(trailing[key], value.shape[1:]))
    for key, shape in trailing.items():
        variables[key] = np.full((len(names), len(steps), *shape), np.nan)
    for i, name in enumerate(names):
        data = per_process[name]
        where = np.searchsorted(steps, data["step"])
        for key in trailing:
            if key in data:
                value = data[key]
                index = (i, where) + tuple(slice(0, s) for s in value.shape[1:])
                variables[key][index] = value
    data_vars = {}
    for key, value in variables.items():
        dims = ("process", "step") + tuple(f"{key}_dim{j}" for j in range(value.ndim - 2))
        if key == "eigenvalues":
            dims = ("process", "step", "eig")
        data_vars[key] = (dims, value)
    return xr.Dataset(data_vars, coords={"process": names, "step": steps}, attrs=attrs)


def load_params(run_dir: str | Path, process: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, parameters) saved every ``record.params_every`` steps for one process."""
    store = RunStore(run_dir)
    if not store.exists():
        raise not_a_run_directory(run_dir)
    if process not in (present := store.processes()):
        raise StoreError(f"run {str(run_dir)!r} has no process {process!r}; its processes: {', '.join(present)}")
    data = store.read_process(process)
    if "params" not in data:
        raise StoreError(f"run {str(run_dir)!r} saved no parameters for {process!r} (record.params_every = 0)")
    return data["params_step"], data["params"]


def _ordered_processes(store: RunStore, summary: dict, manifest: dict) -> list[str]:
    listed = summary.get("processes") or []
    present = store.processes() + [p for p in manifest if p not in store.processes()]
    return [p for p in listed if p in present] + [p for p in present if p not in listed]
