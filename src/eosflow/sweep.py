"""Sweeps: the product of grids over spec values, run on a ``dask.distributed`` cluster.

    eosflow sweep SPEC.toml --grid lr=0.05,0.1 --grid seed=0,1 [--scheduler ADDRESS] [--out DIR]

    sweep_dir/
      sweep.json                the base spec, the grids, every point and how the last run went
      points/<key=value,...>/   one ordinary run directory per grid point (``eosflow.load`` it)
      locks/<point>.lock        one lock per point: two attempts at a point never run together
      jax-cache/                the local workers' persistent compilation cache
      sweep.parquet             one row per (point, process): grid values and summary numbers
      sweep.png                 final lr*S and the distance to the reference against the swept value

Every point is run by :func:`eosflow.experiment.run` with ``resume=True``, so a point that
finished (``completed`` or ``diverged``) is skipped, an unfinished one resumes from its last
checkpoint, and a task lost with a dying worker is rescheduled by the scheduler and resumes
where the dead worker's last checkpoint left it. :func:`load_sweep` reads the aggregate as an
``xarray.Dataset`` over the grid dimensions and ``process``.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import io
import itertools
import json
import os
import re
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tomli_w
import xarray as xr

from eosflow.config import SpecError
from eosflow.store import RunStore, StoreError, atomic_write, write_json

FINISHED = ("completed", "diverged")  # a run that ends this way is final: re-running repeats it
RETRIES = 2  # re-attempts of a point whose task raised (a lost worker is handled by the scheduler)
SUMMARY_NUMBERS = ("final_loss", "final_sharpness", "final_lr_sharpness", "mean_distance", "final_distance")


class SweepError(StoreError):
    """Some points of a sweep failed; the others are on disk and aggregated."""


# ---- the grid ------------------------------------------------------------------------------------
def parse_grid(text: str) -> tuple[str, list]:
    """``"lr=0.1,0.2"`` -> ``("lr", [0.1, 0.2])``: values are TOML (bare words are strings).

    A list value is written as a TOML array: ``problem.eigenvalues=[20.0, 1.0],[30.0, 1.0]``.
    """
    if "=" not in text:
        raise SpecError(f"--grid expects dotted.key=v1,v2,..., got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key or not all(part.strip() for part in key.split(".")):
        raise SpecError(f"--grid {text!r}: the key must be a dotted spec key such as `lr` or `problem.width`")
    try:
        values = tomllib.loads(f"v = [{raw}]")["v"]
    except tomllib.TOMLDecodeError:
        values = [_scalar(word.strip(), key) for word in raw.split(",")]
    if not values:
        raise SpecError(f"--grid {key}: no values given (write {key}=v1,v2,...)")
    for i, value in enumerate(values):
        if isinstance(value, dict):
            raise SpecError(f"--grid {key}: a table value is not allowed; grid over its keys ({key}.name=...)")
        if any(value == other and type(value) is type(other) for other in values[:i]):
            raise SpecError(f"--grid {key}: the value {_literal(value)} is listed twice")
    return key, values


def _scalar(word: str, key: str):
    if not word:
        raise SpecError(f"--grid {key}: an empty value in the list (write {key}=v1,v2,...)")
    try:
        return tomllib.loads(f"v = {word}")["v"]
    except tomllib.TOMLDecodeError:
        return word


def _literal(value) -> str:
    """The one-line TOML text of a value (what ``--set key=<text>`` parses back to ``value``)."""
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return tomli_w.dumps({"v": value})[len("v = "):].strip()


def _label(value) -> str:
    """A value as it appears in a point's directory name (strings unquoted, no spaces or slashes)."""
    if isinstance(value, list):
        return "[" + ",".join(_label(v) for v in value) + "]"
    text = value if isinstance(value, str) else _literal(value)
    return re.sub(r"[\s/\\]+", "", text) or "_"


@dataclass(frozen=True)
class Point:
    """One grid point: its directory name, its grid values and its validated spec table."""

    name: str
    values: dict  # dotted key -> value
    table: dict
    resolved: str  # the TOML text experiment.run writes as spec.resolved.toml


def grid_points(table: dict, grids: list[tuple[str, list]]) -> list[Point]:
    """Every point of the product of ``grids``, each validated (a bad value fails here, fast)."""
    from eosflow.spec import set_dotted

    keys = [key for key, _ in grids]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise SpecError(f"--grid {key} is given twice; list all its values in one --grid")
    points, names = [], {}
    for combination in itertools.product(*(values for _, values in grids)):
        values = dict(zip(keys, combination))
        name = ",".join(f"{key}={_label(value)}" for key, value in values.items())
        if name in names:
            raise SpecError(f"grid points {names[name]} and {values} share the directory name {name!r}; "
                            "use values that differ as text")
        names[name] = values
        point = copy.deepcopy(table)
        for key, value in values.items():
            set_dotted(point, f"{key}={_literal(value)}")
        try:
            resolved = _resolved_text(point)
        except SpecError as error:
            raise SpecError(f"grid point {name}: {error}") from None
        points.append(Point(name, values, point, resolved))
    return points


def _resolved_text(table: dict) -> str:
    """Validate a spec table as :func:`eosflow.experiment.run` will, without building the problem."""
    from eosflow.problems import problem_params
    from eosflow.spec import parse_spec, resolved_table

    spec = parse_spec(table)
    _, params = problem_params(spec.problem)  # a registered problem's parameters, or an import path's keys
    return tomli_w.dumps(resolved_table(spec, params))


# ---- one point, on a worker ----------------------------------------------------------------------
def point_state(run_dir: Path, resolved: str) -> str:
    """``new``, ``mismatch`` (another spec lives there), or the stored status (``started`` if none)."""
    from eosflow.experiment import spec_differences

    store = RunStore(run_dir)
    resolved_path = store.root / "spec.resolved.toml"
    if not store.exists() or not resolved_path.exists():
        return "new"
    if spec_differences(resolved_path.read_text(), tomllib.loads(resolved)):
        return "mismatch"
    return store.read_summary().get("status", "started")


def run_point(table: dict, run_dir: str, resolved: str, lock: str) -> dict:
    """Run or resume one point (the task a worker executes); idempotent and safe to race.

    Attempts at one point take its lock in turn; each looks at the run directory first and does
    nothing if the point is finished. Spec errors are returned (retrying cannot fix them);
    anything else raises, and the scheduler retries the task.
    """
    from eosflow.experiment import run

    run_dir = Path(run_dir)
    with _locked(Path(lock)):
        state = point_state(run_dir, resolved)
        if state in FINISHED:
            return {"status": state, "ran": False}
        if state == "mismatch":
            return {"status": "failed", "ran": False,
                    "reason": f"{str(run_dir)!r} holds a run of another spec (compare spec.resolved.toml)"}
        _remove_temporaries(run_dir)
        try:
            outcome = run(table, run_dir, resume=state != "new", overwrite=state == "new")
        except (SpecError, StoreError) as error:
            return {"status": "failed", "ran": True, "reason": str(error)}
    return {"status": outcome.status, "ran": True, "reason": outcome.reason}


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive ``flock`` on ``path`` (released by the kernel if the holder dies).

    File systems without locks (some network mounts) fall back to no lock: the scheduler still
    runs one attempt of a task at a time, the lock only guards against lost-but-alive workers.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        yield


def _remove_temporaries(run_dir: Path) -> None:
    """Delete half-written ``.*.tmp`` files a killed attempt left (under the point's lock)."""
    if run_dir.is_dir():
        for leftover in run_dir.rglob(".*.tmp"):
            leftover.unlink(missing_ok=True)


# ---- the cluster ---------------------------------------------------------------------------------
def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_environment(threads: int, cache_dir: Path | None = None) -> dict[str, str]:
    """Environment of a worker process: ``threads`` threads for XLA and BLAS, no GPU preallocation,
    and a persistent JAX compilation cache in ``cache_dir`` (unless one is set already), so a
    restarted worker or a resumed sweep does not compile again."""
    xla = os.environ.get("XLA_FLAGS", "")
    xla = re.sub(r"--xla_cpu_multi_thread_eigen=\S+|intra_op_parallelism_threads=\S+", "", xla).split()
    if threads == 1:
        xla.append("--xla_cpu_multi_thread_eigen=false")
    xla.append(f"intra_op_parallelism_threads={threads}")
    count = str(threads)
    env = {"XLA_FLAGS": " ".join(xla), "OMP_NUM_THREADS": count, "OPENBLAS_NUM_THREADS": count,
           "MKL_NUM_THREADS": count, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if cache_dir is not None and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    return env


def local_cluster(workers: int | None = None, cache_dir: Path | None = None):
    """A ``LocalCluster`` of single-threaded worker processes (one per core by default).

    Processes, not threads: every worker has its own JAX runtime, and a nanny restarts a
    worker that dies. ``cache_dir``: see :func:`worker_environment`.
    """
    import importlib.util

    from dask.distributed import LocalCluster

    cores = available_cores()
    workers = cores if workers is None else workers
    if workers < 1:
        raise SpecError(f"--workers = {workers} must be at least 1")
    return LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True,
        env=worker_environment(max(1, cores // workers), cache_dir),
        dashboard_address=":0" if importlib.util.find_spec("bokeh") else None,
    )


# ---- the sweep -----------------------------------------------------------------------------------
def run_sweep(
    table: dict,
    grids: list[str],
    out: Path,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Run every point of the product of ``grids`` (``"key=v1,v2"`` strings) into ``out``.

    Uses the dask scheduler at ``scheduler``, or a :func:`local_cluster` of ``workers`` processes.
    Finished points are skipped, unfinished ones resumed. Writes ``sweep.parquet`` and
    ``sweep.png`` and returns ``out``; raises :class:`SweepError` (after aggregating) if points failed.
    """
    out = Path(out)
    parsed = [parse_grid(text) for text in grids]
    if not parsed:
        raise SpecError("a sweep needs at least one --grid dotted.key=v1,v2,...")
    points = grid_points(table, parsed)
    states = {p.name: point_state(out / "points" / p.name, p.resolved) for p in points}
    clashes = [name for name, state in states.items() if state == "mismatch"]
    if clashes:
        raise StoreError(
            f"{len(clashes)} point(s) in {str(out)!r} hold runs of a different spec (e.g. {clashes[0]}; "
            "compare its spec.resolved.toml): choose another --out, or delete those points to rerun them"
        )
    todo = [p for p in points if states[p.name] not in FINISHED]
    meta = {"spec": table, "grid": [[key, values] for key, values in parsed], "points": {p.name: p.values for p in points}}
    write_json(out / "sweep.json", meta)

    results = _run_points(todo, out, scheduler, workers, progress, len(points)) if todo else {}
    if progress and not todo:
        print(f"all {len(points)} points of {out} are finished; nothing to run")
    failed = {name: r.get("reason", "") for name, r in results.items() if r["status"] == "failed"}
    meta["last_run"] = {"points": len(points), "skipped": len(points) - len(todo),
                        "ran": sum(r.get("ran", False) for r in results.values()), "failed": failed}
    write_json(out / "sweep.json", meta)
    frame = aggregate(out, failed)
    summary_figure(frame, [key for key, _ in parsed], out / "sweep.png")
    if failed:
        listing = "; ".join(f"{name}: {reason}" for name, reason in list(failed.items())[:5])
        raise SweepError(f"{len(failed)} of {len(points)} points failed ({listing}); the others are in "
                         f"{str(out / 'sweep.parquet')!r} and rerunning the sweep retries only the failed ones")
    return out


def _run_points(todo: list[Point], out: Path, scheduler, workers, progress: bool, total: int) -> dict:
    from dask.distributed import Client, as_completed

    out = out.absolute()  # the path every worker writes to (remote workers have their own cwd)
    cluster = None if scheduler else local_cluster(workers, out / "jax-cache")
    client = Client(scheduler or cluster)
    tag = uuid.uuid4().hex[:8]
    results: dict[str, dict] = {}
    futures: dict = {}
    try:
        futures = {
            client.submit(run_point, p.table, str(out / "points" / p.name), p.resolved,
                          str(out / "locks" / f"{p.name}.lock"), key=f"eosflow-point-{tag}-{p.name}",
                          retries=RETRIES, pure=False): p.name
            for p in todo
        }
        with _progress_bar(progress, total, total - len(todo)) as advance:
            for future in as_completed(futures):
                name = futures[future]
                if future.status == "finished":
                    results[name] = future.result()
                else:  # raised on every attempt, or a worker died on it too often (KilledWorker)
                    error = future.exception() if future.status == "error" else f"task {future.status}"
                    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
                    results[name] = {"status": "failed", "ran": True, "reason": reason}
                advance(name, results[name]["status"])
    except KeyboardInterrupt:
        client.cancel(list(futures))
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return results


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, done: int):
    """Yields ``advance(point, status)``: a rich bar over points, with counts by status."""
    counts: dict[str, int] = {"skipped": done} if done else {}
    if not enabled:
        yield lambda name, status: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[status]}"))
    task = bar.add_task("sweep", total=total, completed=done, status=_counts(counts))

    def advance(name: str, status: str) -> None:
        counts[status] = counts.get(status, 0) + 1
        bar.update(task, advance=1, status=f"{_counts(counts)}  last: {name}")

    with bar:
        yield advance


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts.items())


# ---- aggregation ---------------------------------------------------------------------------------
def point_rows(run_dir: Path) -> list[dict]:
    """Summary numbers of every process of one run directory (read with ``eosflow.load``).

    ``final_*`` is the value at the last step where it is finite (sharpness is measured every
    ``spectrum.every`` steps); ``mean_distance`` is the time average of ||w - w_reference||.
    """
    from eosflow.load import load

    summary = RunStore(run_dir).read_summary()
    ds = load(run_dir)
    reference = summary.get("processes", list(ds.process.values))[0]
    dropped = summary.get("dropped_processes", {})
    rows = []
    for process in ds.process.values:
        one = ds.sel(process=process)
        row = {"process": str(process), "reference": process == reference, "dropped": dropped.get(process, "")}
        for variable, column in (("loss", "final_loss"), ("sharpness", "final_sharpness"),
                                 ("lr_sharpness", "final_lr_sharpness"), ("distance", "final_distance")):
            row[column] = _last_finite(one[variable].values) if variable in one else np.nan
        distance = one["distance"].values if "distance" in one else np.array([np.nan])
        row["mean_distance"] = float(np.nanmean(distance)) if np.isfinite(distance).any() else np.nan
        rows.append(row)
    return rows


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
        point = {**values, "point": name, "status": summary.get("status", "missing"),
                 "reason": summary.get("reason", ""), "steps_done": summary.get("steps_done", 0),
                 "seconds": summary.get("seconds", np.nan)}
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
    for column in SUMMARY_NUMBERS:
        frame[column] = frame.get(column, np.nan)
    for key, values in meta["grid"]:
        frame[key] = _column(frame[key].tolist(), values)
    atomic_write(sweep_dir / "sweep.parquet", lambda f: frame.to_parquet(f, index=False))
    return frame


def _column(column: list, values: list) -> list:
    """Grid values as one parquet type: numbers as floats if mixed, anything else mixed as TOML text."""
    kinds = {type(v) for v in values}
    if kinds == {int, float}:
        return [float(v) for v in column]
    if len(kinds) == 1 and kinds <= {int, float, str, bool}:
        return column
    return [_literal(v) for v in column]


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
    order = {key: list(dict.fromkeys(_column(values, values))) for key, values in meta["grid"]}
    per_point = ["point", "status", "reason", "steps_done", "seconds"]
    points = frame.drop_duplicates("point").set_index(keys)[per_point].to_xarray()
    processes = frame[frame.process != ""].set_index([*keys, "process"])
    processes = processes.drop(columns=per_point).to_xarray()
    ds = xr.merge([points, processes], compat="override", join="outer").reindex(order)
    ds.attrs = {"sweep_dir": str(sweep_dir), "grid": json.dumps(meta["grid"]),
                "spec": tomli_w.dumps(meta["spec"])}
    return ds


# ---- the summary figure --------------------------------------------------------------------------
def summary_figure(frame: pd.DataFrame, keys: list[str], path: Path, max_lines: int = 6) -> Path:
    """Final lr*S, and time-averaged distance to the reference per model, against the swept value.

    The x axis is ``lr`` if it is swept, else the first grid key; every other combination of grid
    values is a line (their median over points if there are more than ``max_lines``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = "lr" if "lr" in keys else keys[0]
    others = [key for key in keys if key != x_key]
    frame = frame[frame.process != ""].copy()
    numeric = pd.api.types.is_numeric_dtype(frame[x_key]) and not pd.api.types.is_bool_dtype(frame[x_key])
    if not numeric:
        ticks = list(dict.fromkeys(frame[x_key].astype(str)))
        frame[x_key] = frame[x_key].astype(str).map(ticks.index)
    combos = frame.groupby(others, sort=False).ngroups if others else 1
    pool = not others or combos > max_lines
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = [(axes[0], "final_lr_sharpness", frame, "final lr * S"),
              (axes[1], "mean_distance", frame[~frame.reference], "time-averaged distance to the reference")]
    for ax, column, data, label in panels:
        groups = ["process"] + ([] if pool else others)
        for group, part in data.groupby(groups, sort=False):
            curve = part.groupby(x_key)[column].median().sort_index()
            if np.isfinite(curve.values).any():
                group = group if isinstance(group, tuple) else (group,)
                name = ", ".join(f"{k}={v}" for k, v in zip(groups, group) if k != "process")
                ax.plot(curve.index, curve.values, "o-", label=f"{part.process.iloc[0]} {name}".strip())
        ax.set_xlabel(x_key)
        ax.set_ylabel(label + (" (median over other grid values)" if others and pool else ""))
        if not numeric:
            ax.set_xticks(range(len(ticks)), ticks)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].axhline(2.0, color="gray", ls="--", lw=1)
    if axes[1].lines and all((line.get_ydata() > 0).all() for line in axes[1].lines):
        axes[1].set_yscale("log")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path
