"""A log of your own training loop's edge-of-stability readings on disk, read back and drawn.

    log = eosflow.edge_log.EdgeLog("runs/adam.jsonl")             # a new file (resume=True: continue); one writer
    opt = eosflow.monitor.monitored(adam, loss_fn, every=10, log=log)  # each Reading: S, threshold, S/threshold
    log.write(step, loss=float(loss))                             # any scalars, from any loop
    log.write(step, eig, loss=loss)                               # eosflow.torch's tracker result (or a Reading)
    ds = eosflow.edge_log.read("runs/adam.jsonl")                 # xarray.Dataset over step
    eosflow.edge_log.plot("runs/adam.jsonl")                      # runs/adam.png: loss; S against its threshold
    eosflow.edge_log.overlay(["runs/lr1.jsonl", "runs/lr2.jsonl"], "lrs.png")   # several runs: S / threshold

One JSON object per line, ``{"step": t, "name": value, ...}`` (strict JSON: a non-finite value is ``null``,
read back as NaN); records of one step merge, and a later value
of a name at a step replaces an earlier one (a loop resumed from a checkpoint, ``EdgeLog(path, resume=True)``,
logs its steps again: the run that went on is the one kept). A file holding records is refused without
``resume=True`` (two runs would merge into one series), and so is a name written twice at a step by one
``EdgeLog`` (two loops sharing it). Faults: every record is one ``write`` of a whole line to a file opened
for appending, so a process killed at any moment leaves at most a torn last line, which the next
``EdgeLog`` on the file cuts off (saying so) and :func:`read` skips; a write the disk has no room for is
undone to the last whole record and raised, naming the file; a second writer of the same file (another
process, or another ``EdgeLog`` here) is refused while the first holds it (an ``flock``, released by the
kernel however the holder ends); a file deleted while written (a cleanup script, ``rm``) is written back at
the path, with every record so far, at the next write.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from eosflow.store import StoreError


class EdgeLogError(StoreError):
    """The log cannot be opened, written, read or drawn: the message names the file and what is wrong."""


def _scalar(name: str, value: Any) -> float | int:
    """A finite or non-finite number as JSON can hold it (an int stays an int); anything else is refused. A torch
    tensor is read detached and on the host (a loss that requires grad, a GPU's loss)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch, without importing it
        value = value.detach().cpu()
    array = np.asarray(value)
    if array.size != 1 or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(
            f"EdgeLog records scalars: {name!r} is {type(value).__name__} of shape {array.shape} and dtype "
            f"{array.dtype} (log a number, e.g. float(loss))"
        )
    item = array.reshape(()).item()
    return item if isinstance(item, int) and not isinstance(item, bool) else float(item)


def _on_host(step: Any, record: Any, scalars: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """``step``, ``record`` and ``scalars`` with their JAX arrays brought to the host by one ``jax.device_get``,
    which starts every copy before waiting for the first: read one by one (``float``), a Reading's fields and a
    loss on a GPU were 4 transfers, each waited for, at every write. Anything else (a torch tensor, a number) is
    left as it is, and the scalars keep their order."""
    jax = sys.modules.get("jax")  # a JAX array means JAX is loaded; never imported here
    if jax is None:
        return step, record, scalars
    leaves, treedef = jax.tree_util.tree_flatten(record)
    every = [step, *leaves, *scalars.values()]
    where = [i for i, leaf in enumerate(every) if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)]
    if len(where) < 2:
        return step, record, scalars
    for i, value in zip(where, jax.device_get([every[i] for i in where]), strict=True):
        every[i] = value
    record = jax.tree_util.tree_unflatten(treedef, every[1 : 1 + len(leaves)])
    return every[0], record, dict(zip(scalars, every[1 + len(leaves) :], strict=True))


def _fields(record: Any) -> dict[str, Any]:
    """The scalars of a measurement object: an eosflow.monitor Reading (S, threshold = S / ratio, lr S, ratio,
    whether P is adaptive and whether the measurement converged), eosflow.torch's TrackedEigenpairs (S, the other
    eigenvalues, threshold, ratio, HVPs, adaptive, the largest residual and whether every one is <= its tol), an
    Eigenpairs of the JAX tracker (its values, HVPs and largest residual) or an EdgePrediction (the predicted loss,
    the loss at the centre, tr X, the critical count and lambda_1's sharpening rate)."""
    fields = getattr(type(record), "_fields", ())
    if {"sharpness", "lr_sharpness", "edge_ratio"} <= set(fields):  # eosflow.monitor.Reading
        sharpness, ratio = float(record.sharpness), float(record.edge_ratio)
        threshold = sharpness / ratio if ratio != 0 and math.isfinite(ratio) else float("nan")
        return {
            "sharpness": sharpness,
            "threshold": threshold,
            "lr_sharpness": record.lr_sharpness,
            "edge_ratio": ratio,
            **({"adaptive": int(bool(record.adaptive))} if "adaptive" in fields else {}),
            **({"converged": int(bool(record.converged))} if "converged" in fields else {}),
        }
    if {"predicted_loss", "covariance", "sharpening"} <= set(fields):  # eosflow.edge_prediction.EdgePrediction
        return {
            "predicted_loss": record.predicted_loss,
            "centre_loss": record.loss,
            "predicted_variance": float(np.trace(np.asarray(record.covariance, dtype=float))),
            "critical": int(np.asarray(record.critical)),
            "sharpening_rate": np.ravel(np.asarray(record.sharpening, dtype=float))[0],
        }
    if {"values", "hvps"} <= set(fields):  # eigenpairs: the JAX tracker's, or eosflow.torch's with a threshold
        values = np.ravel(np.asarray(record.values, dtype=float))
        out: dict[str, Any] = {"sharpness": values[0]}
        out.update({f"eigenvalue_{i + 1}": value for i, value in enumerate(values[1:], start=1)})
        if "threshold" in fields and math.isfinite(float(record.threshold)):
            out.update(threshold=record.threshold, edge_ratio=values[0] / float(record.threshold))
        if "adaptive" in fields:
            out["adaptive"] = int(bool(record.adaptive))
        out["hvps"] = int(np.asarray(record.hvps))
        if "residuals" in fields:  # the largest relative residual, and the torch reading's own verdict on it
            out["residual"] = float(np.max(np.asarray(record.residuals)))
            if "tol" in fields and math.isfinite(float(record.tol)):
                out["converged"] = int(record.converged)
        return out
    raise TypeError(
        f"EdgeLog.write takes an eosflow.monitor.Reading, a tracker's eigenpairs, an EdgePrediction or keyword "
        "scalars; got "
        f"{type(record).__name__}"
    )


class EdgeLog:
    """Appends records ``{"step": t, name: scalar, ...}`` to a JSON-lines file (see the module doc).

    Usable as ``monitored(..., log=EdgeLog(path))`` (called with each Reading, from JAX's callback thread)
    and as a context manager; ``echo=True`` also prints each record. A file that already holds records is
    another run's unless ``resume=True`` says it is this one's, continued (a step logged again replaces what it
    held): without it the file is refused, untouched, so that two runs never merge into one series. Within one
    ``EdgeLog`` a name is recorded once per step (two loops writing one log would overwrite each other).
    """

    RECENT = 64  # steps whose recorded names are remembered, to refuse a second writer's record of a step

    def __init__(self, path: str | os.PathLike, echo: bool = False, resume: bool = False):
        self.path = Path(path)
        self.echo = echo
        self._lock = threading.Lock()  # jax.debug.callback may call from another thread
        self._recorded: dict[int, set[str]] = {}  # step -> names this log recorded there (the last RECENT steps)
        self._fd: int | None = self._open(self.path, os.O_CREAT)
        held = 0 if resume else os.pread(self._fd, os.fstat(self._fd).st_size, 0).count(b"\n")
        if held:  # whole records (a torn line alone is none: cut below)
            os.close(self._fd)
            self._fd = None
            raise EdgeLogError(
                f"the edge log {str(self.path)!r} already holds {held} record{'s' * (held != 1)} of a run: "
                "EdgeLog(path, resume=True) continues that run (a step logged again replaces what it held); "
                "for another run, give it its own file. Nothing was written"
            )
        self._cut_torn_tail()

    @staticmethod
    def _open(path: Path, create: int) -> int:
        """A descriptor of ``path`` for appending, locked against other writers (``create``: ``os.O_CREAT``, or
        with ``os.O_EXCL`` to refuse a file that is there)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_APPEND | create, 0o644)
        except OSError as error:
            raise EdgeLogError(f"cannot open the edge log {str(path)!r}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # unlocked where there are none
                os.close(fd)
                raise EdgeLogError(
                    f"the edge log {str(path)!r} is being written by another process (or another EdgeLog "
                    "in this one): give each run its own file. Nothing was written"
                ) from None
        return fd

    def _restore_if_deleted(self, fd: int) -> int:
        """The descriptor to append to: ``fd``, or, if the file was deleted while open (its last link gone: every
        later record would vanish with it), a new file holding every record written so far, at the path or, if
        another file has taken the path, beside it (``<stem>.recovered-<pid><suffix>``; the log goes on there)."""
        if os.fstat(fd).st_nlink > 0:
            return fd
        kept = os.pread(fd, os.fstat(fd).st_size, 0)
        count = kept.count(b"\n")
        records = f"{count} record{'s' * (count != 1)}"
        beside = self.path.with_name(f"{self.path.stem}.recovered-{os.getpid()}{self.path.suffix}")
        for target in (self.path, beside):
            try:
                new = self._open(target, os.O_CREAT | os.O_EXCL)
            except EdgeLogError:  # taken: never mix with another file
                continue
            try:
                if os.write(new, kept) != len(kept):
                    raise OSError(errno.ENOSPC, "a partial write")
            except OSError as error:
                os.close(new)
                target.unlink(missing_ok=True)
                raise EdgeLogError(
                    f"the edge log {str(self.path)!r} was deleted while this run wrote it, and its {records} "
                    f"could not be written back to {str(target)!r} ({error.strerror}); they are kept for the next write"
                ) from None
            os.close(fd)
            where = (
                "at the path" if target == self.path else f"beside it, to {str(target)!r} (another file took the path)"
            )
            warnings.warn(
                f"{self.path} was deleted while this run wrote it: its {records} went back to a new "
                f"file {where}, and the log goes on there",
                UserWarning,
                stacklevel=4,
            )
            self.path = target
            return new
        raise EdgeLogError(
            f"the edge log {str(self.path)!r} was deleted while this run wrote it, and both it and {str(beside)!r} "
            f"are taken by other files; its {records} are kept for the next write"
        )

    def _cut_torn_tail(self) -> None:
        """A last line without its newline is a record a crash cut short: truncate it (never a whole record)."""
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        start = max(0, size - 65536)
        tail = os.pread(self._fd, size - start, start)
        cut = start + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        if cut == 0 and start > 0:  # a last line longer than 64 KiB: no record of ours is, so it is not ours
            raise EdgeLogError(f"{str(self.path)!r} does not end in an edge-log record; not appending to it")
        os.ftruncate(self._fd, cut)
        warnings.warn(
            f"{self.path}: cut off {size - cut} bytes of a record left incomplete by an interrupted write",
            UserWarning,
            stacklevel=3,
        )

    def write(self, step: int, record: Any = None, **scalars: Any) -> None:
        """Append one record at ``step``: the fields of ``record`` (a Reading or eigenpairs), then ``scalars``."""
        step, record, scalars = _on_host(step, record, scalars)
        number = _scalar("step", step) if not isinstance(step, bool) else -1
        if not isinstance(number, int) or number < 0:
            raise ValueError(f"EdgeLog step must be a non-negative integer, got {step!r}")
        step = number
        fields = {**(_fields(record) if record is not None else {}), **scalars}
        if not fields:
            raise ValueError("EdgeLog.write: nothing to record (give a reading, eigenpairs or keyword scalars)")
        if "step" in scalars:
            raise ValueError("EdgeLog.write: 'step' is the record's first argument, not a scalar of it")
        # strict JSON for any reader: a non-finite value (a diverged loss, an unmeasured step) is null, read as NaN
        values: dict[str, float | int | None] = {
            name: number if math.isfinite(number := _scalar(name, value)) else None for name, value in fields.items()
        }
        line = json.dumps({"step": step, **values}, allow_nan=False) + "\n"
        data = line.encode()
        with self._lock:
            if self._fd is None:
                raise EdgeLogError(f"the edge log {str(self.path)!r} is closed")
            self._claim(step, values)
            self._fd = self._restore_if_deleted(self._fd)
            size = os.fstat(self._fd).st_size
            try:
                written = os.write(self._fd, data)
                if written != len(data):
                    raise OSError(errno.EIO, f"wrote {written} of {len(data)} bytes")
            except OSError as error:
                os.ftruncate(self._fd, size)  # the file ends at the last whole record, as before this write
                raise EdgeLogError(
                    f"could not append to the edge log {str(self.path)!r} ({error.strerror}); the records before "
                    f"this one (step {step}) are kept"
                ) from None
        if self.echo:
            shown = (f"{k} = {v:.5g}" if v is not None else f"{k} = nan" for k, v in values.items())
            print(f"step {step:6d}  " + "  ".join(shown))

    def _claim(self, step: int, values: dict[str, Any]) -> None:
        """Remember the names recorded at ``step``; a name this log already recorded there is refused."""
        names = self._recorded.setdefault(step, set())
        again = sorted(names.intersection(values))
        if again:
            raise EdgeLogError(
                f"{', '.join(map(repr, again))} already recorded at step {step} by this EdgeLog of "
                f"{str(self.path)!r}: two loops (or two monitored optimizers) writing one log would overwrite each "
                "other; give each its own file"
            )
        names.update(values)
        while len(self._recorded) > self.RECENT:
            del self._recorded[next(iter(self._recorded))]

    def __call__(self, reading: Any) -> None:
        """``monitored``'s ``log``: record a Reading at its own step."""
        self.write(int(np.asarray(reading.step)), reading)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                self._fd = self._restore_if_deleted(self._fd)  # a log deleted since the last write: put it back
                os.fsync(self._fd)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> EdgeLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self, _close: Any = os.close) -> None:
        # os.close bound here: a log left open at the interpreter's exit may be collected after this module's globals
        # are cleared (every record is already in the file: each write is one os.write)
        if getattr(self, "_fd", None) is not None:
            _close(self._fd)


def read(path: str | os.PathLike) -> xr.Dataset:
    """The log as an xarray.Dataset over ``step`` (sorted), one variable per name, NaN where a step has none;
    a torn last line is skipped with a warning, any other line that is not a record is an error naming it."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as error:
        raise EdgeLogError(f"cannot read the edge log {str(path)!r}: {error.strerror}") from None
    lines = text.split(b"\n")
    if lines[-1]:
        warnings.warn(
            f"{path}: skipped a last record left incomplete by an interrupted write", UserWarning, stacklevel=2
        )
    rows: dict[int, dict[str, float]] = {}
    for number, line in enumerate(lines[:-1], start=1):
        try:
            record = json.loads(line)
            step = record.pop("step")
            if not isinstance(record, dict) or isinstance(step, bool) or not isinstance(step, int):
                raise ValueError
        except (ValueError, AttributeError, KeyError, TypeError):
            raise EdgeLogError(f"{str(path)!r} line {number} is not an edge-log record: {line[:80]!r}") from None
        for name, value in record.items():  # numbers, and null for a non-finite one (what write records)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise EdgeLogError(
                    f"{str(path)!r} line {number}: {name!r} is {value!r}, not a number (an edge log records scalars)"
                )
        rows.setdefault(step, {}).update(record)
    steps = np.array(sorted(rows), dtype=np.int64)
    names: list[str] = list(dict.fromkeys(name for row in rows.values() for name in row))
    data = {name: ("step", np.array([rows[s].get(name, np.nan) for s in steps], dtype=float)) for name in names}
    ds = xr.Dataset(data, coords={"step": steps}, attrs={"source": str(path)})
    for name in names:  # a null is non-finite; a step with no record of the name is only unmeasured
        last_finite = max((step for step, row in rows.items() if row.get(name, None) is not None), default=-1)
        tail = sorted(step for step, row in rows.items() if name in row and step > last_finite)
        if tail:
            ds[name].attrs["non_finite_from"] = tail[0]
    return ds


DIVERGENCE_SIGNS = ("loss", "sharpness", "batch_sharpness")  # their non-finite tail is a run that diverged


def non_finite_tails(ds: xr.Dataset) -> list[str]:
    """'loss non-finite from step N' for each of the loss and sharpness whose records are non-finite from step
    N to the end of the log (a diverged loop: every record of it from N on is null)."""
    return [
        f"{name} non-finite from step {ds[name].attrs['non_finite_from']}"
        for name in DIVERGENCE_SIGNS
        if name in ds and "non_finite_from" in ds[name].attrs
    ]


def unconverged_readings(ds: xr.Dataset) -> list[str]:
    """'N of M readings not converged ...' if the log holds readings whose residual was above the tracker's tol
    (``converged`` = 0: eosflow.torch's tracker, ``monitored``'s readings)."""
    if "converged" not in ds:
        return []
    converged = ds["converged"].values
    missed = converged == 0
    if not missed.any():
        return []
    return [
        f"{int(missed.sum())} of {int(np.isfinite(converged).sum())} readings not converged (first at step "
        f"{int(ds['step'].values[np.argmax(missed)])}; residual above tol: raise max_iters or tol)"
    ]


NO_THRESHOLD = (  # what plot-log says of a log with a sharpness and no threshold (the JAX tracker's eigenpairs)
    "no threshold or edge_ratio logged, so where the run reached its edge is not summarized: log the threshold "
    "with each reading, e.g. log.write(t, eig, threshold=float(opt.threshold_at(t)), adaptive=1) for "
    "opt = eosflow.optimizer_edges.adam(lr) (adaptive=1 for Adam and RMSProp)"
)


def summary(ds: xr.Dataset, band: float = 0.1) -> dict:
    """Where S / threshold first reaches 1 - band/2 and the longest stretch within [1 - band, 1 + band] (steps
    of the log), from ``edge_ratio`` (or sharpness / threshold). A log of an adaptive optimizer (``adaptive`` = 1
    in its records: Adam, RMSProp) is read after its start transient, the measurements before S / threshold first
    falls below 1/2, when one of them reached 1 - band/2 (P from one gradient at step 0, |g_0| + eps for Adam,
    puts the ratio far above 1 where g_0 is small); ``start_transient_until`` is the step of that fall (None: no
    transient) and ``start_transient_max_edge_ratio`` the transient's largest ratio."""
    from eosflow.report import edge_of_stability_window  # here: reading and writing a log need no JAX

    ratio = _edge_ratio(ds)
    if ratio is None:
        return {}
    adaptive = "adaptive" in ds and bool(np.nanmax(ds["adaptive"].values, initial=0.0) > 0)
    window = edge_of_stability_window(2.0 * ratio, band, ds["step"].values, start_transient=adaptive)
    found = {
        "first_step_at_edge": window["first_step_at_edge"],
        "longest_window_start": window["longest_window_start"],
        "longest_window_steps": window["longest_window_steps"],
        "max_edge_ratio": window["max_lr_sharpness"] / 2.0,
    }
    if adaptive:
        found["start_transient_until"] = window["start_transient_until"]
        found["start_transient_max_edge_ratio"] = window["start_transient_max_lr_sharpness"] / 2.0
    return found


def _edge_ratio(ds: xr.Dataset) -> np.ndarray | None:
    if "edge_ratio" in ds:
        return ds["edge_ratio"].values
    if "sharpness" in ds and "threshold" in ds:
        threshold = ds["threshold"].values
        with np.errstate(divide="ignore", invalid="ignore"):  # a threshold <= 0 has no edge: NaN
            return np.where(threshold > 0, ds["sharpness"].values / threshold, np.nan)
    return None


def plot(source: str | os.PathLike | xr.Dataset, out: str | os.PathLike | None = None) -> Path:
    """A PNG of the log: the loss (log scale) if logged, and the sharpness against its threshold (or the edge
    ratio against 1). Written next to the log as ``<name>.png`` unless ``out`` is given; returns its path."""
    ds = source if isinstance(source, xr.Dataset) else read(source)
    if out is None:
        if isinstance(source, xr.Dataset):
            raise ValueError("plot: give `out` when plotting a Dataset (there is no log file to put it beside)")
        out = Path(source).with_suffix(".png")
    return _save(figure(ds), out)


def _save(fig: Any, out: str | os.PathLike) -> Path:
    """Write ``fig`` to ``out`` in the format its suffix names; an EdgeLogError naming the path for a missing
    directory, a format matplotlib cannot write, or a failed write."""
    out = Path(out)
    formats = fig.canvas.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise EdgeLogError(
            f"cannot write the figure to {str(out)!r}: its suffix names no image format matplotlib writes "
            f"(use .png, or one of {', '.join('.' + name for name in sorted(formats))})"
        )
    if not out.parent.is_dir():
        raise EdgeLogError(f"cannot write the figure to {str(out)!r}: the directory {str(out.parent)!r} does not exist")
    try:
        fig.savefig(out)
    except OSError as error:
        raise EdgeLogError(f"cannot write the figure to {str(out)!r}: {error.strerror or error}") from None
    return out


def figure(ds: xr.Dataset) -> Any:
    """The matplotlib Figure of :func:`plot` from a log's Dataset; with ``predicted_loss`` (an EdgePrediction's)
    the loss panel draws it over the loss."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are untouched

    from eosflow.compare import line_style, log_scale_where_positive, threshold_line

    curvature = [name for name in ("sharpness", "batch_sharpness") if name in ds]
    ratio = _edge_ratio(ds)
    if "loss" not in ds and not curvature and ratio is None:
        raise EdgeLogError(
            f"nothing to plot in {ds.attrs.get('source', 'the log')}: it has {sorted(map(str, ds.data_vars))}, "
            "none of loss, sharpness, edge_ratio"
        )
    panels = ["loss"] * ("loss" in ds) + ["curvature"] * bool(curvature or ratio is not None)
    fig = Figure(figsize=(7.5, 3.0 * len(panels)), dpi=110)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        if panel == "loss":
            loss = ds["loss"].dropna("step")
            ax.plot(loss["step"], loss, **line_style(0), label="loss")
            if "predicted_loss" in ds:
                predicted = ds["predicted_loss"].dropna("step")
                ax.plot(predicted["step"], predicted, **line_style(1), label="predicted loss (central flow)")
            log_scale_where_positive(ax)
            ax.set_ylabel("loss")
        elif curvature and ("threshold" in ds or ratio is None):
            for i, name in enumerate(curvature):
                values = ds[name].dropna("step")
                ax.plot(values["step"], values, marker=".", ms=3, **line_style(i), label=name)
            if "sharpness" in curvature:
                _mark_unconverged(ax, ds, ds["sharpness"].values, line_style(0)["color"])
            if "threshold" in ds:
                threshold = ds["threshold"].dropna("step")
                # constant to float32's rounding (a reading's S / ratio jitters by an ulp or two), or moving
                if threshold.size and np.ptp(threshold.values) <= 1e-6 * abs(float(threshold[0])):
                    threshold_line(ax, float(threshold[0]), "threshold")
                elif threshold.size:  # a schedule's threshold moves with lr
                    ax.plot(threshold["step"], threshold, color="0.55", lw=3, alpha=0.45, zorder=0.5, label="threshold")
            ax.set_ylabel("(preconditioned) sharpness")
        else:
            steps, ratios = ds["step"].values, np.asarray(ratio)
            finite = np.isfinite(ratios)
            ax.plot(steps[finite], ratios[finite], marker=".", ms=3, **line_style(0), label="S / threshold")
            _mark_unconverged(ax, ds, ratios, line_style(0)["color"])
            threshold_line(ax, 1.0, "edge (1)")
            ax.set_ylabel("S / threshold")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1].set_xlabel("step")
    axes[0].set_title(
        "\n".join([str(ds.attrs.get("source", "edge log")), *non_finite_tails(ds), *unconverged_readings(ds)])
    )
    fig.tight_layout()
    return fig


def _mark_unconverged(ax: Any, ds: xr.Dataset, values: np.ndarray, color: str) -> None:
    """An x on ``values`` (step,) at the readings that did not converge (``converged`` = 0)."""
    if "converged" in ds and (missed := (ds["converged"].values == 0) & np.isfinite(values)).any():
        ax.plot(ds["step"].values[missed], values[missed], "x", color=color, ms=5, label="not converged")


def overlay(sources: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """One PNG of several logs (runs of your loop at several step sizes, seeds, optimizers): the losses, and each
    run's S / threshold (the scale every optimizer's edge shares: 1 at its edge), one colour per log, labelled by
    its file name (its path from the logs' common folder where two share a name). Returns the path written."""
    return _save(overlay_figure({label: read(source) for label, source in zip(log_labels(sources), sources)}), out)


def log_labels(sources: list[str | os.PathLike]) -> list[str]:
    """A distinct label per log: its file name without the suffix, or where two logs share one (runs/0.1/log.jsonl,
    runs/0.2/log.jsonl) its path from their common folder; a log given twice is an EdgeLogError."""
    paths = [Path(source).resolve() for source in sources]
    for i, path in enumerate(paths):
        if path in paths[:i]:
            raise EdgeLogError(f"{sources[i]}: the log is given twice")
    stems = [path.stem for path in paths]
    if len(set(stems)) == len(stems):
        return stems
    root = Path(os.path.commonpath(paths))
    return [str(path.relative_to(root).with_suffix("")) for path in paths]


def overlay_figure(runs: dict[str, xr.Dataset]) -> Any:
    """The matplotlib Figure of :func:`overlay` from datasets by label (an EdgeLogError if none has a loss or an
    edge ratio)."""
    from matplotlib.figure import Figure

    from eosflow.compare import line_style, log_scale_where_positive, threshold_line

    ratios = {label: _edge_ratio(ds) for label, ds in runs.items()}
    panels = ["loss"] * any("loss" in ds for ds in runs.values())
    panels += ["ratio"] * any(r is not None for r in ratios.values())
    if not panels:
        raise EdgeLogError(f"nothing to overlay: none of {', '.join(runs)} has a loss or an edge ratio")
    fig = Figure(figsize=(7.5, 3.0 * len(panels)), dpi=110)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for i, (label, ds) in enumerate(runs.items()):
        for ax, panel in zip(axes, panels):
            if panel == "loss" and "loss" in ds:
                loss = ds["loss"].dropna("step")
                ax.plot(loss["step"], loss, **line_style(i), label=label)
            elif panel == "ratio" and ratios[label] is not None:
                ratio = np.asarray(ratios[label])
                finite = np.isfinite(ratio)
                ax.plot(ds["step"].values[finite], ratio[finite], marker=".", ms=3, **line_style(i), label=label)
    for ax, panel in zip(axes, panels):
        if panel == "loss":
            log_scale_where_positive(ax)
            ax.set_ylabel("loss")
        else:
            threshold_line(ax, 1.0, "edge (1)")
            ax.set_ylabel("S / threshold")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    return fig
