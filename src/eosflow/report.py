"""A run's report: PNG figures and a Markdown page with the numbers, read from the run directory.

The report never looks at live objects: everything comes from ``eosflow.load(run_dir)``, so a
report can be made again at any time (``eosflow report RUN_DIR``). Capabilities add their own
sections with :func:`register_section` (e.g. SGD's diffusion plots).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are untouched

from eosflow.compare import line_style, log_scale_where_positive, not_converged, threshold_line, without_blow_up
from eosflow.load import load, summary_of
from eosflow.store import RunStore, StoreError, report_command, resume_command, writable_folder

Section = Callable[[xr.Dataset, Path, Path], str]
SECTIONS: list[Section] = []  # sections registered with register_section (SGD's below)


def register_section(section: Section) -> Section:
    """Add ``section(ds, run_dir, report_dir) -> markdown`` to every report (empty string: skip)."""
    SECTIONS.append(section)
    return section


def edge_of_stability_window(
    lr_sharpness: np.ndarray, band: float = 0.1, steps: np.ndarray | None = None, start_transient: bool = False
) -> dict:
    """Where eta*S first reaches 2(1 - band/2), and the longest run of steps with eta*S in [2(1-band), 2(1+band)].

    ``steps`` are the step numbers of the values (default 0, 1, ...); every answer is a step
    number, never a position. Unmeasured steps (NaN) neither break nor extend a window.

    ``start_transient`` (an adaptive optimizer's P, estimated from the first gradients: Adam's P = |g_0| + eps at
    step 0): the measurements before eta*S first falls below 1 (half the edge) are the start transient when one
    of them reached 2(1 - band/2); every answer is then taken after it, and the transient is reported apart:
    ``start_transient_until``, the step of that first measurement below half (None: no transient), and the
    transient's ``start_transient_max_lr_sharpness``.
    """
    steps = np.arange(len(lr_sharpness)) if steps is None else np.asarray(steps)
    finite = np.flatnonzero(np.isfinite(lr_sharpness))
    measured = steps[finite]
    values = lr_sharpness[finite]
    edge = 2.0 * (1 - band / 2)
    transient: dict = {}
    if start_transient:
        below_half = np.flatnonzero(values < 1.0)
        cut = int(below_half[0]) if below_half.size else 0
        opened_at_edge = bool(np.any(values[:cut] >= edge))
        transient = {
            "start_transient_until": int(measured[cut]) if opened_at_edge else None,
            "start_transient_max_lr_sharpness": float(np.max(values[:cut])) if opened_at_edge else float("nan"),
        }
        if opened_at_edge:
            measured, values = measured[cut:], values[cut:]
    reach = np.flatnonzero(values >= edge)
    inside = (values >= 2.0 * (1 - band)) & (values <= 2.0 * (1 + band))
    best, best_start, start = 0, None, None
    for i, ok in enumerate(inside):
        if ok and start is None:
            start = i
        if start is not None and (not ok or i == len(inside) - 1):
            stop = i if ok else i - 1
            length = measured[stop] - measured[start] + 1
            if length > best:
                best, best_start = int(length), int(measured[start])
            start = None
    return {
        "first_step_at_edge": int(measured[reach[0]]) if reach.size else None,
        "longest_window_steps": best,
        "longest_window_start": best_start,
        "max_lr_sharpness": float(np.max(values)) if values.size else float("nan"),
        **transient,
    }


def save_figure(path: Path, title: str, ylabel: str, draw, logy: bool = False) -> None:
    fig = Figure(figsize=(7, 3.6), dpi=110)
    ax = fig.subplots()
    draw(ax)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logy:
        log_scale_where_positive(ax)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def _step_sizes(ds: xr.Dataset, process: str) -> np.ndarray:
    """The step size per step: recorded ``lr`` if the process has one, else the spec's lr."""
    if "lr" in ds and np.isfinite(ds["lr"].sel(process=process)).any():
        return ds["lr"].sel(process=process).values
    return np.full(ds.sizes["step"], float(ds.attrs["lr"]))


def make_report(run_dir: str | Path, ds: xr.Dataset | None = None) -> Path:
    """Write ``report/`` (figures and ``report.md``) for a run directory; returns the Markdown path.
    ``ds`` is the directory's :func:`eosflow.load`, when the caller has read it already."""
    run_dir = Path(run_dir)
    ds = load(run_dir) if ds is None else ds
    if not ds.sizes.get("process", 0) or not ds.sizes.get("step", 0):
        raise StoreError(
            f"{str(run_dir)!r} holds no step yet (a run stopped before its first chunk was flushed), so there is "
            f"nothing to report; continue it with: {resume_command(run_dir)}"
        )
    out = writable_folder(run_dir / "report")
    try:
        return _write_report(run_dir, ds, out)
    except OSError as error:  # a full disk, a file-size limit: the run is whole, its report is not
        where = error.filename or out
        raise StoreError(
            f"cannot write the report of {str(run_dir)!r} ({str(where)!r}: {error.strerror or error}); the run itself "
            f"is on disk: write the report again with: {report_command(run_dir)}"
        ) from None


def _write_report(run_dir: Path, ds: xr.Dataset, out: Path) -> Path:
    """:func:`make_report`'s figures and Markdown, in ``out``."""
    steps = ds["step"].values
    processes = list(ds["process"].values)
    reference = processes[0]
    figures = []
    flagged = unconverged(ds)

    def draw_loss(ax):
        for i, p in enumerate(processes):
            full = full_batch_loss(ds, p)
            sparse = np.isfinite(full).sum() < 0.9 * np.isfinite(ds["loss"].sel(process=p).values).sum()
            loss = without_blow_up(ds, p, full)
            ok = np.isfinite(loss)
            label = f"{p}: loss" + (" (full batch, where measured)" if sparse else "")
            ax.plot(steps[ok], loss[ok], **line_style(i), label=label)
            if "predicted_loss" in ds and np.isfinite(ds["predicted_loss"].sel(process=p)).any():
                predicted = {**line_style(i), "ls": (0, (1, 3)), "lw": 2.0}  # (":" is also a model's own dash)
                values = without_blow_up(ds, p, ds["predicted_loss"].sel(process=p).values)
                ax.plot(steps, values, **predicted, label=f"{p}: predicted")

    save_figure(out / "loss.png", "training loss", "loss", draw_loss, logy=True)
    figures.append(("Training loss", "loss.png"))

    if "sharpness" in ds and np.isfinite(ds["sharpness"]).any():

        def draw_sharpness(ax):
            _measured_lines(ax, ds, "sharpness", processes, flagged, label="{}: sharpness")
            ax.plot(steps, 2.0 / _step_sizes(ds, reference), color="0.55", lw=3, alpha=0.45, zorder=0.5, label="2 / lr")

        save_figure(out / "sharpness.png", "sharpness (top Hessian eigenvalue)", "S", draw_sharpness)
        figures.append(("Sharpness and the stability threshold 2/lr", "sharpness.png"))

        def draw_lr_sharpness(ax):
            _measured_lines(ax, ds, "lr_sharpness", processes, flagged)
            threshold_line(ax, 2.0, "2")

        save_figure(out / "lr_sharpness.png", "lr x sharpness", "lr * S", draw_lr_sharpness)
        figures.append(("lr x sharpness (2 is the edge of stability)", "lr_sharpness.png"))
    elif "edge_ratio" in ds and np.isfinite(ds["edge_ratio"].sel(process=reference)).any():
        # Adam, RMSProp, momentum: their `sharpness` is not their own, and the page drew none (a probe)

        def draw_edge_ratio(ax):
            _measured_lines(ax, ds, "edge_ratio", processes, flagged)
            threshold_line(ax, 1.0, "1 (the optimizer's edge)")

        save_figure(out / "edge_ratio.png", "preconditioned sharpness / threshold", "S_P / threshold", draw_edge_ratio)
        figures.append(("Edge ratio: preconditioned sharpness over the optimizer's threshold", "edge_ratio.png"))

    if len(processes) > 1:

        def draw_distance(ax):
            for i, p in enumerate(processes[1:], start=1):
                ax.plot(steps, ds["distance"].sel(process=p), **line_style(i), label=p)

        save_figure(out / "distance.png", f"distance to {reference}", "||w - w_ref||", draw_distance)
        figures.append((f"Distance to {reference}", "distance.png"))

    lines = [f"# Report: {ds.attrs.get('name', run_dir.name)}", ""]
    # the curvature columns, (variable, heading) twice: an adaptive run records its preconditioned sharpness, not S
    curvature = ("sharpness", "sharpness", "lr_sharpness", "lr*S")
    if "sharpness" not in ds and "preconditioned_sharpness" in ds:
        curvature = ("preconditioned_sharpness", "preconditioned sharpness", "edge_ratio", "S/threshold")
    summary = RunStore(run_dir).read_summary()
    lines += _summary_table(ds, summary)
    dropped = summary.get("dropped_processes") or {}
    lines += [
        "",
        "## Processes",
        "",
        "Final: the last step each process recorded (for a dropped process, the step at which it blew up; for the "
        "loss, the last full-batch one).",
        "",
        f"| process | final loss | final {curvature[1]} | final {curvature[3]} | final distance | status |",
        "|---|---|---|---|---|---|",
    ]
    diverged = ds.attrs.get("status", summary.get("status")) == "diverged"

    def status(p: str) -> str:
        if p in dropped:
            return f"dropped: {dropped[p]}"
        if diverged:
            return "diverged (the reason above)" if p == reference else f"stopped with {reference}"
        return "ok"

    for p in processes:
        lines.append(
            f"| {p} | {_last(ds, 'loss', p):.6g} | {_last(ds, curvature[0], p):.6g} | "
            f"{_last(ds, curvature[2], p):.6g} | {_last(ds, 'distance', p):.6g} | {status(p)} |"
        )
    if "lr_sharpness" in ds or "edge_ratio" in ds:
        lines += ["", "## Edge of stability", ""] + _edge_lines(ds, reference, steps)
    if flagged:
        lines += ["", "## Measurements not converged", ""] + unconverged_lines(ds, flagged)
    if len(processes) > 1:
        from eosflow.compare import write_report

        write_report(run_dir)
        lines += [
            "",
            f"## {reference} vs the models",
            "",
            "How well each model tracks the reference ([compare.md](compare.md), definitions in docs/compare.md):",
            "",
            "![loss](compare_loss.png)",
            "![distance](compare_distance.png)",
        ]
        lines += [
            f'- from step {k}: the models restarted on {reference}\'s state there (compare.md, "From step {k}")'
            for k, _ in RunStore(run_dir).anchored_files()
        ]
    lines += ["", "## Figures", ""]
    lines += [f"![{title}]({name})" for title, name in figures]
    for section in SECTIONS:
        text = section(ds, run_dir, out)
        if text:
            lines += ["", text]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _measured_lines(
    ax, ds: xr.Dataset, variable: str, processes: list[str], flagged: dict[str, np.ndarray], label: str = "{}"
) -> None:
    """Each process's ``variable`` at the steps it was measured (a measurement every n steps is one line),
    labelled ``label.format(process)``, with an x at the steps ``flagged`` for it (:func:`unconverged`)."""
    steps = ds["step"].values
    for i, p in enumerate(processes):
        values = without_blow_up(ds, p, ds[variable].sel(process=p).values)
        ok = np.isfinite(values)
        ax.plot(steps[ok], values[ok], **line_style(i), label=label.format(p))
        marked = ok & flagged.get(p, np.zeros_like(ok))
        if marked.any():
            ax.plot(steps[marked], values[marked], "x", color=line_style(i)["color"], ms=5, label=f"{p}: not converged")


def full_batch_loss(ds: xr.Dataset, process: str) -> np.ndarray:
    """A process's full-batch loss, NaN where it recorded another: SGD with ``loss_every`` > 1 records its
    minibatch loss in between (its ``grad_norm`` is NaN there), which the page set beside full-batch losses."""
    loss = ds["loss"].sel(process=process).values.astype(np.float64)
    if "batch_loss" in ds and "grad_norm" in ds and np.isfinite(ds["batch_loss"].sel(process=process)).any():
        loss = np.where(np.isfinite(ds["grad_norm"].sel(process=process).values), loss, np.nan)
    return loss


def _last(ds: xr.Dataset, variable: str, process: str) -> float:
    if variable not in ds:
        return float("nan")
    values = full_batch_loss(ds, process) if variable == "loss" else ds[variable].sel(process=process).values
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else float("nan")


ADAPTIVE = ("rmsprop", "adam")  # the processes whose P is estimated from the gradients: a start transient


def _edge_lines(ds: xr.Dataset, reference: str, steps: np.ndarray) -> list[str]:
    """Where the reference reached its edge: lr*S against 2 for GD; for an optimizer whose ``sharpness`` is not
    its own (Adam, RMSProp, momentum), its edge ratio S_P / threshold against 1, in the same window. For Adam and
    RMSProp, after their start transient (:func:`edge_of_stability_window`), which is reported apart."""
    unit, scale, series = "lr*S", 1.0, np.full(steps.shape, np.nan)
    if "lr_sharpness" in ds:
        series = ds["lr_sharpness"].sel(process=reference).values
    if not np.isfinite(series).any() and "edge_ratio" in ds:
        unit, scale, series = "S/threshold", 2.0, 2.0 * ds["edge_ratio"].sel(process=reference).values
    if not np.isfinite(series).any():
        return [f"- {reference}'s sharpness was not measured in this run (`spectrum.every` = 0)"]
    window = edge_of_stability_window(series, steps=steps, start_transient=reference in ADAPTIVE)
    lines = []
    if window.get("start_transient_until") is not None:
        lines.append(
            f"- start transient (P estimated from the first gradients): {unit} up to "
            f"{window['start_transient_max_lr_sharpness'] / scale:.4f} before step {window['start_transient_until']}, "
            f"where it fell below {1.0 / scale:g}; the lines below are from that step on"
        )
    peak = window["max_lr_sharpness"] / scale
    if window["first_step_at_edge"] is None:
        return lines + [
            f"- {unit} never reached {1.9 / scale:g} (largest measured: {peak:.4f}): no edge of stability in this run"
        ]
    start = window["longest_window_start"]
    return lines + [
        f"- first step with {unit} >= {1.9 / scale:g}: {window['first_step_at_edge']}",
        f"- longest window with {unit} in [{1.8 / scale:g}, {2.2 / scale:g}]: {window['longest_window_steps']} steps"
        + (f" (from step {start})" if start is not None else ""),
        f"- largest {unit} measured: {peak:.4f}",
    ]


def unconverged(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """Per process, the mask (step,) of its measurements that did not converge (:func:`eosflow.compare.not_converged`);
    processes with none are left out."""
    summary = summary_of(ds)
    masks = {str(p): not_converged(ds, str(p), summary) for p in ds["process"].values}
    return {p: mask for p, mask in masks.items() if mask is not None and mask.any()}


def unconverged_lines(ds: xr.Dataset, masks: dict[str, np.ndarray]) -> list[str]:
    """One line per process of :func:`unconverged` ``masks``: how many of its measurements, the largest residual,
    the first step, and what that means for the eigenvalues recorded there."""
    lines, rules = [], summary_of(ds)["spectrum_stop"]
    for process, above in masks.items():
        tol, max_iters = rules[process]
        residual = ds["residual"].sel(process=process).values
        lines.append(
            f"- {process}: {int(above.sum())} of {int(np.isfinite(residual).sum())} measurements stopped at "
            f"`max_iters` = {max_iters} with a relative residual above tol = {tol:g} (largest "
            f"{np.max(residual[above]):.3g}, first at step {int(ds['step'].values[np.argmax(above)])}); their "
            "eigenvalues are Ritz values, lower bounds of the top eigenvalues, possibly off by more than tol "
            "(marked x in the figures; raise `max_iters` or tol, docs/sharpness.md)"
        )
    return lines


def _summary_table(ds: xr.Dataset, summary: dict) -> list[str]:
    """The run's status and size; steps are counted on disk (a lost chunk is named, not counted)."""
    steps = ds["step"].values
    on_disk = int(np.isfinite(ds["loss"].isel(process=0).values).sum()) if "loss" in ds else 0
    rows = [
        ("status", ds.attrs.get("status", summary.get("status"))),
        ("reason", summary.get("reason")),
        ("steps on disk", f"{on_disk} (steps {steps[0]}..{steps[-1]})" if steps.size else "0"),
        ("steps in the spec", summary.get("steps")),
        ("missing steps", ds.attrs.get("missing_steps")),
        ("learning rate", summary.get("lr")),
        ("parameters", summary.get("dimension")),
        ("problem", (summary.get("problem") or {}).get("name")),
        ("wall time (s)", f"{summary['seconds']:.1f}" if "seconds" in summary else None),
        ("note", summary.get("rebuilt")),
    ]
    return ["| | |", "|---|---|"] + [
        f"| {k} | {'-' if v in (None, '') else v} |" for k, v in rows if k not in ("missing steps", "note") or v
    ]


@register_section
def _sgd_section(ds: xr.Dataset, run_dir: Path, report_dir: Path) -> str:
    """SGD's limiting dynamics (:mod:`eosflow.report_sgd`), imported only for a run with SGD (it needs JAX)."""
    if "sgd" not in [str(p) for p in ds["process"].values]:
        return ""
    from eosflow.report_sgd import sgd_section

    return sgd_section(ds, run_dir, report_dir)


@register_section
def _step_size_section(ds: xr.Dataset, run_dir: Path, report_dir: Path) -> str:
    """Step sizes searched at every step (:mod:`eosflow.report_step_size`): eta_k, eta_k S_k against 2, accuracy."""
    from eosflow.report_step_size import step_size_section

    return step_size_section(ds, run_dir, report_dir)
