"""``run_sweep``: resolve every point, run those not finished, then aggregate, draw and summarize."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eosflow.config import SpecError
from eosflow.store import StoreError, write_json
from eosflow.sweep.aggregate import aggregate
from eosflow.sweep.cluster import run_points
from eosflow.sweep.figure import summary_figure
from eosflow.sweep.grid import parse_grid, same_value
from eosflow.sweep.points import FINISHED, grid_points, point_state
from eosflow.sweep.progress import SweepProgress
from eosflow.sweep.summary import markdown_summary
from eosflow.sweep.task import exclusive_lock


class SweepError(StoreError):
    """Some points of a sweep failed; the others are on disk and aggregated."""


def run_sweep(
    table: dict,
    grids: list[str],
    out: Path,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Run every point of the product of ``grids`` (``"key=v1,v2"`` strings) into ``out``.

    Uses the dask scheduler at ``scheduler``, or a local cluster of ``workers`` processes.
    Finished points are skipped, unfinished ones resumed. Writes ``sweep.parquet``, ``sweep.png``
    and ``sweep.md`` and returns ``out``; raises :class:`SweepError` (after aggregating) if points failed.
    """
    out = Path(out)
    parsed = [parse_grid(text) for text in grids]
    if not parsed:
        raise SpecError("a sweep needs at least one --grid dotted.key=v1,v2,...")
    if workers is not None and workers < 1:
        raise SpecError(f"--workers = {workers} must be at least 1")
    points = grid_points(table, parsed)
    if out.exists() and not out.is_dir():
        raise StoreError(f"output path {str(out)!r} exists and is not a directory")
    try:
        (out / "locks").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StoreError(f"cannot create the sweep directory {str(out)!r}: {error.strerror or error}") from None
    states = {p.name: point_state(out / "points" / p.name, p.resolved) for p in points}
    clashes = [name for name, state in states.items() if state == "mismatch"]
    if clashes:
        raise StoreError(
            f"{len(clashes)} point(s) in {str(out)!r} hold runs of a different spec (e.g. {clashes[0]}; "
            "compare its spec.resolved.toml): choose another --out, or delete those points to rerun them"
        )
    todo = [p for p in points if states[p.name] not in FINISHED]
    with exclusive_lock(out / "locks" / "sweep.json.lock"):
        write_json(out / "sweep.json", merged_meta(out, table, parsed, points))

    results: dict[str, dict] = {}
    if todo:
        display = SweepProgress({p.name: p.steps for p in todo}, len(points), len(points) - len(todo), progress)
        with display:
            results = run_points(todo, out, scheduler, workers, display)
    elif progress:
        print(f"all {len(points)} points of {out} are finished; nothing to run")
    failed = {name: r.get("reason", "") for name, r in results.items() if r["status"] == "failed"}
    with exclusive_lock(out / "locks" / "sweep.json.lock"):  # another sweep into `out` may have added points meanwhile
        meta = merged_meta(out, table, parsed, points)
        meta["last_run"] = {
            "points": len(points),
            "skipped": len(points) - len(todo),
            "ran": sum(r.get("ran", False) for r in results.values()),
            "failed": failed,
        }
        write_json(out / "sweep.json", meta)
    frame = aggregate(out, failed)
    summary_figure(frame, [key for key, _ in parsed], out / "sweep.png")
    markdown_summary(frame, meta, out / "sweep.md")
    if failed:
        listing = "; ".join(f"{name}: {reason}" for name, reason in list(failed.items())[:5])
        raise SweepError(
            f"{len(failed)} of {len(points)} points failed ({listing}); the others are in "
            f"{str(out / 'sweep.parquet')!r} and rerunning the sweep retries only the failed ones"
        )
    return out


def merged_meta(out: Path, table: dict, parsed: list[tuple[str, list]], points: list) -> dict:
    """``sweep.json`` of ``out`` with this sweep's grid and points added to those of the sweeps run into it before
    (another grid over the same keys, in the same order, of the same base spec up to ``steps``); a sweep over
    other keys or of another base spec is refused, since one table cannot hold both."""
    grid: list[list[Any]] = [[key, list(values)] for key, values in parsed]
    meta: dict[str, Any] = {"spec": table, "grid": grid, "points": {p.name: p.values for p in points}}
    if not (out / "sweep.json").is_file():
        return meta
    earlier = json.loads((out / "sweep.json").read_text())
    keys, earlier_keys = [key for key, _ in grid], [key for key, _ in earlier["grid"]]
    if keys != earlier_keys:
        raise StoreError(
            f"{str(out)!r} holds a sweep over {', '.join(earlier_keys)}, and this one is over {', '.join(keys)}: "
            "choose another --out, or give the same keys in the same order (new values are added to it)"
        )
    if {**earlier["spec"], "steps": None} != {**table, "steps": None}:
        raise StoreError(
            f"{str(out)!r} holds a sweep of another base spec (its sweep.json's spec differs beyond steps): "
            "choose another --out"
        )
    for (_, values), (_, before) in zip(grid, earlier["grid"]):
        values[:] = [*before, *(v for v in values if not any(same_value(v, b) for b in before))]
    meta["points"] = {**earlier["points"], **meta["points"]}
    return meta
