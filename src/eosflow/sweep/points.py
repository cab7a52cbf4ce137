"""The points of a sweep: every combination of grid values applied to the base spec and resolved
(a bad value fails here, before any worker starts), and what a point's run directory holds."""

from __future__ import annotations

import copy
import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path

from eosflow.config import SpecError
from eosflow.spec import differences_but_steps, resolve, set_dotted
from eosflow.store import RunStore
from eosflow.sweep.grid import label, literal

FINISHED = ("completed", "diverged")  # a run that ends this way is final: re-running repeats it


@dataclass(frozen=True)
class Point:
    """One grid point: its directory name, its grid values and its validated spec table."""

    name: str
    values: dict  # dotted key -> value
    table: dict
    resolved: str  # the TOML text experiment.run writes as spec.resolved.toml
    steps: int  # the spec's steps


def grid_points(table: dict, grids: list[tuple[str, list]]) -> list[Point]:
    """Every point of the product of ``grids``, each resolved by :func:`eosflow.spec.resolve`."""
    keys = [key for key, _ in grids]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise SpecError(f"--grid {key} is given twice; list all its values in one --grid")
    points: list[Point] = []
    names: dict[str, dict] = {}
    for combination in itertools.product(*(values for _, values in grids)):
        values = dict(zip(keys, combination))
        name = ",".join(f"{key}={label(value)}" for key, value in values.items())
        if name in names:
            raise SpecError(
                f"grid points {names[name]} and {values} share the directory name {name!r}; "
                "use values that differ as text"
            )
        names[name] = values
        point = copy.deepcopy(table)
        for key, value in values.items():
            set_dotted(point, f"{key}={literal(value)}", "--grid")
        try:
            resolved = resolve(point)
        except SpecError as error:
            raise SpecError(f"grid point {name}: {error}") from None
        points.append(Point(name, values, point, resolved.text, resolved.spec.steps))
    return points


def point_state(run_dir: Path, resolved: str) -> str:
    """``new``, ``mismatch`` (another spec lives there, or a longer run of it), ``shorter`` (a run of
    this spec with fewer ``steps`` that did not diverge: resuming extends it), or the stored status
    (``started`` if none)."""
    store = RunStore(run_dir)
    resolved_path = store.root / "spec.resolved.toml"
    if not resolved_path.exists():  # lost: spec.toml resolved again stands in for it, as for a resume
        resolved_path = store.root / "spec.toml"
    if not store.exists() or not resolved_path.exists():
        return "new"
    wanted = tomllib.loads(resolved)
    differences, stored_steps = differences_but_steps(resolved_path.read_text(), wanted)
    if differences or stored_steps > wanted["steps"]:
        return "mismatch"
    status = store.read_summary().get("status", "started")
    return "shorter" if stored_steps < wanted["steps"] and status != "diverged" else status
