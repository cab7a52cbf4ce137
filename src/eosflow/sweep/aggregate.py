"""A sweep's results in one table: ``sweep.parquet``, one row per (point, process) with the grid
values and summary numbers read from the run directories, and the same as an ``xarray.Dataset``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import tomli_w
import xarray as xr

from eosflow.load import load
from eosflow.store import RunStore, StoreError, atomic_write
from eosflow.sweep.grid import column

SUMMARY_NUMBERS = (
    "final_loss",
    "final_sharpness",
    "final_lr_sharpness",
    "mean_distance",
    "final_distance",
    "tail_loss",
    "tail_lr_sharpness",
)
TAIL = 0.1  # the share of the recorded values that tail_* averages
PER_POINT = ("point", "status", "reason", "steps_done", "seconds")


def point_rows(run_dir: Path) -> list[dict]:
    """Summary numbers of every process of one run directory (read with ``eosflow.load``).

    ``final_*`` is the value at the last step where it is finite (sharpness is measured every
    ``spectrum.every`` steps); ``tail_*`` the mean of the last ``TAIL`` of those values (:func:`tail_mean`),
    which does not depend on where a period-2 orbit ends; ``mean_distance`` is the time average of
    ||w - w_reference||.
    """
    summary = RunStore(run_dir).read_summary()
    ds = load(run_dir)
    reference = summary.get("processes", list(ds.process.values))[0]
    dropped = summary.get("dropped_processes", {})
    rows = []
    for process in ds.process.values:
        one = ds.sel(process=process)
        row = {"process": str(process), "reference": process == reference, "dropped": dropped.get(process, "")}
        for variable, name in (
            ("loss", "final_loss"),
            ("sharpness", "final_sharpness"),
            ("lr_sharpness", "final_lr_sharpness"),
            ("distance", "final_distance"),
        ):
            row[name] = _last_finite(one[variable].values) if variable in one else np.nan
        for variable in ("loss", "lr_sharpness"):
            row[f"tail_{variable}"] = tail_mean(one[variable].values) if variable in one else np.nan
        distance = one["distance"].values if "distance" in one else np.array([np.nan])
        row["mean_distance"] = float(np.nanmean(distance)) if np.isfinite(distance).any() else np.nan
        rows.append(row)
    return rows


def tail_mean(values: np.ndarray, share: float = TAIL) -> float:
    """The mean of the last ``share`` of the finite values, an even number of them (at least 2): a period-2 orbit's
    mean whichever phase it ends on, where the last value read one side of it (lr*S 3.21 at seed 0 and 1.01 at
    seed 1 on one orbit, in a probe's sweep figure)."""
    finite = values[np.isfinite(values)]
    count = max(2, 2 * round(share * finite.size / 2))
    return float(finite[-count:].mean()) if finite.size >= 2 else _last_finite(values)


def _last_finite(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else np.nan


def aggregate(sweep_dir: str | Path, failed: dict[str, str] | None = None) -> pd.DataFrame:
    """Write ``sweep.parquet``: one row per (point, process) with grid values and summary numbers."""
    sweep_dir = Path(sweep_dir)
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    failed = failed if failed is not None else meta.get("last_run", {}).get("failed", {})
    rows = []
    for name, values in meta["points"].items():
        run_dir = sweep_dir / "points" / name
        summary = RunStore(run_dir).read_summary()
        point = {
            **values,
            "point": name,
            "status": summary.get("status", "missing"),
            "reason": summary.get("reason", ""),
            "steps_done": summary.get("steps_done", 0),
            "seconds": summary.get("seconds", np.nan),
        }
        if name in failed:
            point.update(status="failed", reason=failed[name])
        try:
            per_process = point_rows(run_dir) if RunStore(run_dir).exists() else []
        except StoreError as error:
            point.update(status="failed", reason=str(error))
            per_process = []
        for row in per_process or [{"process": "", "reference": False, "dropped": ""}]:
            rows.append({**point, **row})
    frame = pd.DataFrame(rows)
    for number in SUMMARY_NUMBERS:
        frame[number] = frame.get(number, np.nan)
    for key, values in meta["grid"]:
        frame[key] = column(frame[key].tolist(), values)
    atomic_write(sweep_dir / "sweep.parquet", lambda f: frame.to_parquet(f, index=False))
    return frame


def load_sweep(sweep_dir: str | Path) -> xr.Dataset:
    """The aggregate as an ``xarray.Dataset`` with dims (<grid keys in order>..., process).

    Per-point variables (``status``, ``reason``, ``steps_done``, ``seconds``, ``point``: the run
    directory's name under ``points/``) have the grid dims only. Written by a sweep; rebuilt
    from the run directories if ``sweep.parquet`` is missing.
    """
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "sweep.json").exists():
        raise StoreError(f"{str(sweep_dir)!r} is not a sweep directory (it has no sweep.json)")
    path = sweep_dir / "sweep.parquet"
    frame = pd.read_parquet(path) if path.exists() else aggregate(sweep_dir)
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    keys = [key for key, _ in meta["grid"]]
    order = {key: list(dict.fromkeys(column(values, values))) for key, values in meta["grid"]}
    per_point = list(PER_POINT)
    points = frame.drop_duplicates("point").set_index(keys)[per_point].to_xarray()
    processes = frame[frame.process != ""].set_index([*keys, "process"])
    processes = processes.drop(columns=per_point).to_xarray()
    ds = xr.merge([points, processes], compat="override", join="outer").reindex(order)
    ds.attrs = {"sweep_dir": str(sweep_dir), "grid": json.dumps(meta["grid"]), "spec": tomli_w.dumps(meta["spec"])}
    return ds
