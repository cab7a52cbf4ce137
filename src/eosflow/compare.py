"""How well each model tracks the reference run (GD): metrics, a comparison table and a report.

Everything is computed from the run directory (``eosflow.load``), on the shared time grid:

    distance            d_m(t) = ||w_GD(t) - w_m(t)||                  (recorded by the experiment)
    relative distance   <d_m> / <d_GF>: time averages, gradient flow as the yardstick (for another
                        optimizer ``opt``, its stable flow ``opt_stable_flow``)
    smoothed loss       Lbar(t) = sum_s K(t - s) L_GD(s) / sum_s K(t - s),  K Gaussian of std ``width``
    loss error          sum_t |Lhat_m(t) - Lbar(t)| / sum_t |Lbar(t)|   (Lhat: the model's predicted loss)
    envelope            e(t) = sqrt(smoothed oscillation^2): running RMS of GD's oscillation read off
                        GD alone, |delta_k| = |w_{k+1} - 2 w_k + w_{k-1}| / 4 (recorded by ``gd``)
    predicted envelope  a_m(t) = sqrt(tr Sigma_m) for a model with a covariance, else its amplitude
    envelope error      sum_t |a_m(t) - e(t)| / sum_t e(t)
    cost                gradient-equivalents per unit time, sum_c weight_c * count_c (an HVP = 2
                        gradients), and wall-clock milliseconds per unit time

Averages run over the steps where both operands are finite (a measurement skipped, or a process
dropped after diverging, is NaN); a dropped process is flagged in ``status``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import xarray as xr  # noqa: E402

from eosflow.load import load  # noqa: E402
from eosflow.store import RunStore  # noqa: E402

SMOOTHING = 20.0  # std (in steps) of the Gaussian window for GD's loss and the envelope
TRUNCATE = 4.0  # the window is cut at TRUNCATE standard deviations
COST_WEIGHTS = {"grads": 1.0, "hvps": 2.0, "third_derivatives": 4.0}  # gradient-equivalents per evaluation
BASELINE = "gradient_flow"
COLUMNS = ("mean_distance", "relative_distance", "loss_error", "envelope_error",
           "gradient_equivalents", "ms_per_step")


# ---- metrics: pure functions on arrays -----------------------------------------------------------
def gaussian_smooth(values: np.ndarray, width: float = SMOOTHING) -> np.ndarray:
    """Normalized Gaussian filter: sum_s K(t-s) x_s / sum_s K(t-s) over finite x_s, K = exp(-(t-s)^2 / 2 width^2).

    Cut at ``TRUNCATE * width`` (rounded); near the ends and around NaNs only the available steps are
    averaged (no padding). Steps with no finite value in their window are NaN; width 0 is the identity.
    """
    values = np.asarray(values, dtype=np.float64)
    if width <= 0:
        return values.copy()
    radius = int(TRUNCATE * width + 0.5)  # as scipy.ndimage.gaussian_filter1d
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / width) ** 2)
    finite = np.isfinite(values)
    window = slice(radius, radius + values.size)  # the centred part of the full convolution
    total = np.convolve(np.where(finite, values, 0.0), kernel)[window]
    weight = np.convolve(finite.astype(np.float64), kernel)[window]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / weight, np.nan)


def running_rms(values: np.ndarray, width: float = SMOOTHING) -> np.ndarray:
    """sqrt of the Gaussian-smoothed square: the oscillation envelope of a signed displacement."""
    return np.sqrt(gaussian_smooth(np.square(np.asarray(values, dtype=np.float64)), width))


def _both_finite(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    return a[ok], b[ok]


def relative_l1_error(prediction: np.ndarray, target: np.ndarray) -> float:
    """sum_t |p_t - y_t| / sum_t |y_t| over steps where both are finite (NaN if none, or y = 0)."""
    p, y = _both_finite(prediction, target)
    scale = np.sum(np.abs(y))
    return float(np.sum(np.abs(p - y)) / scale) if p.size and scale > 0 else float("nan")


def mean_distance(distance: np.ndarray) -> float:
    """The time average of ||w_GD(t) - w_m(t)|| over the finite steps."""
    distance = np.asarray(distance, dtype=np.float64)
    finite = distance[np.isfinite(distance)]
    return float(np.mean(finite)) if finite.size else float("nan")


def relative_distance(distance: np.ndarray, baseline_distance: np.ndarray) -> float:
    """<d_m> / <d_GF>, both averaged over the steps where both are finite (1 for gradient flow itself)."""
    d, base = _both_finite(distance, baseline_distance)
    scale = np.mean(base) if base.size else 0.0
    return float(np.mean(d) / scale) if scale > 0 else float("nan")


def loss_prediction_error(predicted_loss: np.ndarray, loss: np.ndarray, width: float = SMOOTHING) -> float:
    """Relative L1 error of a model's predicted loss against GD's Gaussian-smoothed loss."""
    return relative_l1_error(predicted_loss, gaussian_smooth(loss, width))


def envelope_error(amplitude: np.ndarray, oscillation: np.ndarray, width: float = SMOOTHING) -> float:
    """Relative L1 error of the predicted amplitude against the running RMS of GD's oscillation."""
    return relative_l1_error(amplitude, running_rms(oscillation, width))


def gradient_equivalents(counts: dict[str, np.ndarray]) -> float:
    """Mean per unit time of sum_c COST_WEIGHTS[c] * counts[c] (steps where every count is finite)."""
    if not counts:
        return float("nan")
    stacked = np.stack([np.asarray(counts[c], dtype=np.float64) * COST_WEIGHTS[c] for c in counts])
    ok = np.all(np.isfinite(stacked), axis=0)
    return float(np.mean(np.sum(stacked[:, ok], axis=0))) if ok.any() else float("nan")


def milliseconds_per_step(timing: dict | None) -> float:
    """Wall-clock ms per unit time: the median over chunks of 1000 seconds / steps.

    ``timing["chunks"]`` lists ``[steps, seconds, warm]`` per chunk; the chunks that compiled
    (warm = 0, the first of every invocation) are left out when others were timed, and the median
    discards the occasional recompilation (when the tracked eigenspace grows).
    """
    chunks = np.asarray((timing or {}).get("chunks", []), dtype=np.float64).reshape(-1, 3)
    chunks = chunks[chunks[:, 0] > 0]
    warm = chunks[chunks[:, 2] > 0]
    chunks = warm if warm.size else chunks
    return float(np.median(1e3 * chunks[:, 1] / chunks[:, 0])) if chunks.size else float("nan")


# ---- one run -------------------------------------------------------------------------------------
def _series(ds: xr.Dataset, variable: str, process: str) -> np.ndarray | None:
    """A process's values of a variable, or None when it never recorded a finite one."""
    if variable not in ds:
        return None
    values = ds[variable].sel(process=process).values.astype(np.float64)
    return values if np.isfinite(values).any() else None


def predicted_amplitude(ds: xr.Dataset, process: str) -> np.ndarray | None:
    """A model's RMS oscillation: sqrt(tr Sigma) when it reports a covariance, else ``amplitude``."""
    covariance = _series(ds, "covariance", process)
    if covariance is not None:
        return np.sqrt(np.nansum(covariance, axis=-1))
    return _series(ds, "amplitude", process)


def predicted_loss(ds: xr.Dataset, process: str) -> np.ndarray:
    """A model's prediction of GD's time-averaged loss: ``predicted_loss``, else its own loss."""
    predicted = _series(ds, "predicted_loss", process)
    return predicted if predicted is not None else ds["loss"].sel(process=process).values.astype(np.float64)


def baseline_of(reference: str) -> str:
    """The yardstick of the relative distance: gradient flow for GD, ``<opt>_stable_flow`` for an optimizer opt."""
    return BASELINE if reference == "gd" else f"{reference}_stable_flow"


def compare_dataset(ds: xr.Dataset, summary: dict, width: float = SMOOTHING) -> pd.DataFrame:
    """One row per process (the reference first) with the metrics of the module docstring."""
    processes = [str(p) for p in ds["process"].values]
    reference = processes[0]
    reference_loss = ds["loss"].sel(process=reference).values
    yardstick = baseline_of(reference)
    baseline = _series(ds, "distance", yardstick) if yardstick in processes else None
    oscillation = _series(ds, "oscillation", reference)
    dropped = summary.get("dropped_processes", {})
    timing = summary.get("timing", {})
    rows = []
    for p in processes:
        distance = _series(ds, "distance", p)
        amplitude = predicted_amplitude(ds, p)
        counts = {c: v for c in COST_WEIGHTS if (v := _series(ds, c, p)) is not None}
        loss = ds["loss"].sel(process=p).values
        is_reference = p == reference
        rows.append({
            "process": p,
            "mean_distance": np.nan if is_reference or distance is None else mean_distance(distance),
            "relative_distance": (np.nan if is_reference or distance is None or baseline is None
                                  else relative_distance(distance, baseline)),
            "loss_error": np.nan if is_reference else loss_prediction_error(predicted_loss(ds, p), reference_loss, width),
            "envelope_error": (np.nan if is_reference or amplitude is None or oscillation is None
                               else envelope_error(amplitude, oscillation, width)),
            "gradient_equivalents": gradient_equivalents(counts),
            "ms_per_step": milliseconds_per_step(timing.get(p)),
            "steps": int(np.sum(np.isfinite(loss))),
            "status": f"dropped: {dropped[p]}" if p in dropped else "ok",
        })
    return pd.DataFrame(rows).set_index("process")


def compare_run(run_dir: str | Path, width: float = SMOOTHING) -> pd.DataFrame:
    """The comparison table of a run directory (reads only the directory, via ``eosflow.load``)."""
    return compare_dataset(load(run_dir), RunStore(run_dir).read_summary(), width)


# ---- the report ----------------------------------------------------------------------------------
def format_number(value: float) -> str:
    """How numbers appear in the Markdown tables (6 significant digits; NaN as a dash)."""
    return "-" if not np.isfinite(value) else f"{value:.6g}"


def markdown_table(table: pd.DataFrame, columns: tuple[str, ...] = COLUMNS) -> list[str]:
    lines = ["| process | " + " | ".join(columns) + " | steps | status |",
             "|---" * (len(columns) + 3) + "|"]
    for name, row in table.iterrows():
        cells = [format_number(float(row[c])) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {int(row['steps'])} | {row['status']} |")
    return lines


def _figure(path: Path, panels: int, draw, title: str, logy: tuple[bool, ...] = ()) -> None:
    fig, axes = plt.subplots(panels, 1, figsize=(7.5, 3.2 * panels), dpi=110, sharex=True, squeeze=False)
    draw(*axes[:, 0])
    for i, ax in enumerate(axes[:, 0]):
        if i < len(logy) and logy[i]:
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(run_dir: str | Path, width: float = SMOOTHING) -> Path:
    """Write ``report/compare.md``, ``report/compare.csv`` and ``report/compare_*.png``; returns the page."""
    run_dir = Path(run_dir)
    ds = load(run_dir)
    summary = RunStore(run_dir).read_summary()
    table = compare_dataset(ds, summary, width)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    table.to_csv(out / "compare.csv")
    steps = ds["step"].values
    processes = [str(p) for p in ds["process"].values]
    reference, models = processes[0], processes[1:]
    lr = float(ds.attrs["lr"])
    reference_loss = ds["loss"].sel(process=reference).values
    figures = []

    def draw_loss(ax):
        ax.plot(steps, reference_loss, lw=0.6, color="0.6", label=f"{reference}: loss")
        ax.plot(steps, gaussian_smooth(reference_loss, width), lw=1.5, color="k",
                label=f"{reference}: loss smoothed (std {width:g} steps)")
        for p in models:
            ax.plot(steps, predicted_loss(ds, p), lw=1, ls="--", label=f"{p}: predicted")
        ax.set_ylabel("loss")

    _figure(out / "compare_loss.png", 1, draw_loss, "training loss and each model's predicted time-averaged loss", (True,))
    figures.append(("Loss", "compare_loss.png"))

    # GD: the sharpness against 2/lr; another optimizer: its edge ratio (preconditioned sharpness / threshold)
    variable, level, level_label = ("sharpness", 2.0 / lr, "2 / lr") if reference == "gd" else ("edge_ratio", 1.0, "edge")
    if _series(ds, variable, reference) is not None:

        def draw_sharpness(ax):
            for p in processes:
                s = _series(ds, variable, p)
                if s is not None:
                    ok = np.isfinite(s)
                    ax.plot(steps[ok], s[ok], lw=1, label=p)
            ax.axhline(level, color="k", ls="--", lw=1, label=level_label)
            ax.set_ylabel(variable.replace("_", " "))

        _figure(out / "compare_sharpness.png", 1, draw_sharpness, f"{variable.replace('_', ' ')} and the stability "
                "threshold")
        figures.append(("Sharpness", "compare_sharpness.png"))

    if models:
        yardstick = baseline_of(reference)
        baseline = _series(ds, "distance", yardstick) if yardstick in processes else None

        def draw_distance(ax_abs, ax_rel):
            for p in models:
                d = ds["distance"].sel(process=p).values
                ax_abs.plot(steps, d, lw=1, label=p)
                if baseline is not None:
                    with np.errstate(invalid="ignore", divide="ignore"):
                        ax_rel.plot(steps, d / baseline, lw=1, label=p)
            ax_abs.set_ylabel(f"||w_{reference} - w||")
            ax_rel.set_ylabel(f"distance / {yardstick}'s")

        _figure(out / "compare_distance.png", 2, draw_distance, f"distance to {reference}", (True, True))
        figures.append(("Distance to the reference", "compare_distance.png"))

    enveloped = {p: a for p in models if (a := predicted_amplitude(ds, p)) is not None}
    oscillation = _series(ds, "oscillation", reference)
    if enveloped and oscillation is not None:

        def draw_envelope(ax):
            ax.plot(steps, running_rms(oscillation, width), color="k", lw=2, label=f"{reference} envelope")
            for i, (p, amplitude) in enumerate(enveloped.items()):
                ax.plot(steps, amplitude, color=f"C{i}", lw=1, ls="--", label=f"{p}: predicted")
            ax.set_ylabel("RMS oscillation |delta|")

        _figure(out / "compare_envelope.png", 1, draw_envelope, "oscillation envelope vs predicted amplitude")
        figures.append(("Oscillation envelope", "compare_envelope.png"))

    def draw_cost(ax_grad, ax_ms):
        x = np.arange(len(processes))
        ax_grad.bar(x, table["gradient_equivalents"].to_numpy(), color="C0")
        ax_grad.set_ylabel("gradient-equivalents / step")
        ax_ms.bar(x, table["ms_per_step"].to_numpy(), color="C1")
        ax_ms.set_ylabel("ms / step")
        ax_ms.set_xticks(x, processes, rotation=20, fontsize=8)

    fig_cost = out / "compare_cost.png"
    _figure(fig_cost, 2, draw_cost, "cost per unit time")
    plt.close("all")
    figures.append(("Cost", "compare_cost.png"))

    lines = [f"# Comparison: {ds.attrs.get('name', run_dir.name)}", "",
             f"Reference `{reference}`, lr = {lr:g}, {summary.get('steps_done')} steps "
             f"({summary.get('status', '?')}), problem `{summary.get('problem', {}).get('name')}`, "
             f"{summary.get('dimension')} parameters. Loss and envelope smoothing: Gaussian of std "
             f"{width:g} steps. Definitions: `docs/compare.md`.", ""]
    lines += markdown_table(table)
    lines += ["", "Columns: mean_distance = time-averaged ||w_ref - w||; relative_distance = the same "
              f"divided by {baseline_of(reference)}'s; loss_error and envelope_error = relative L1 errors against "
              "the reference's smoothed loss and running-RMS envelope; gradient_equivalents and "
              "ms_per_step per unit time (an HVP counts as 2 gradients).", "", "## Figures", ""]
    lines += [f"![{title}]({name})" for title, name in figures]
    path = out / "compare.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def compare(table: dict, out: Path, overwrite: bool = False, progress: bool = True) -> Path:
    """Run the experiment of ``table`` into ``out``, then write its comparison report; returns the page.

    An existing run directory ``out`` is an error unless ``overwrite`` (nothing is lost silently).
    """
    from eosflow.experiment import run
    from eosflow.spec import parse_spec

    spec = parse_spec(table)
    if progress:
        from eosflow.progress import training_bar

        bar, update = training_bar(spec.steps, spec.processes[0], spec.lr)
        with bar:
            run(table, out, overwrite=overwrite, progress=update)
    else:
        run(table, out, overwrite=overwrite)
    return write_report(out)
