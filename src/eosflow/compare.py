"""How well each model tracks the reference run (GD): metrics, a comparison table and a report.

Everything is computed from the run directory (``eosflow.load``), on the shared time grid:

    distance            d_m(t) = ||w_GD(t) - w_m(t)||                  (recorded by the experiment)
    relative distance   <d_m> / <d_GF>: time averages, gradient flow as the yardstick (for another
                        optimizer ``opt``, its stable flow ``opt_stable_flow``)
    rel. centre dist.   <c_m> / <c_GF>, c_m(t) = ||e_(t-1) + e_t|| / 2 with e = w_GD - w_m: the same between the
                        midpoints of consecutive steps (recorded as ``centre_distance``), where GD's period-2
                        oscillation cancels, so a centre model is not charged with GD's oscillation
    smoothed loss       Lbar(t) = sum_s K(t - s) L_GD(s) / sum_s K(t - s),  K Gaussian of std ``width``
    loss error          sum_t |Lhat_m(t) - Lbar(t)| / sum_t |Lbar(t)|   (Lhat: the model's predicted loss)
    loss error floor    the same for Lhat = L_GD, GD's own loss: what a model predicting GD's loss step by step
                        scores (the oscillation and the smoothing's bias where the loss bends), in every row
    envelope            e(t) = sqrt(smoothed oscillation^2): running RMS of GD's oscillation read off
                        GD alone, |delta_k| = |w_{k+1} - 2 w_k + w_{k-1}| / 4 (recorded by ``gd``)
    predicted envelope  a_m(t) = sqrt(tr Sigma_m) for a model with a covariance, else its amplitude
    envelope error      sum_t |a_m(t) - e(t)| / sum_t e(t)
    window averages     <x>_W(t) = mean of the finite x_s over the centred box |s - t| <= W // 2
                        (W = ``AVERAGING_WINDOW`` steps, one-sided at the ends); the averaged loss error compares
                        <Lhat_m>_W with <L_GD>_W, the
                        averaged envelope error sqrt(<a_m^2>_W) with GD's window-averaged envelope sqrt(<osc^2>_W)
    cost                gradient-equivalents per unit time, sum_c weight_c * count_c (an HVP = 2
                        gradients), and wall-clock milliseconds per unit time
    measurement cost    the part of the cost spent by the eigensolver, 2 * measurement_hvps

The optimizer's copy ``<optimizer>_nudged`` (:mod:`eosflow.anchored`, the floor) is scored as the optimizer
itself would be as a model: its own smoothed loss Lbar and envelope e are its predictions, and its own loss and
oscillation inside the window averages.

Averages run over the steps where both operands are finite (a measurement skipped, or a process
dropped after diverging, is NaN); a dropped process is flagged in ``status``, as is a diverged reference.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are untouched

from eosflow.anchored import NUDGED, ONSET, NoAnchorStep, check_anchorable, onset_step, write_anchored
from eosflow.config import SpecError
from eosflow.experiment import run
from eosflow.load import load, summary_of
from eosflow.process import PROCESSES
from eosflow.progress import training_bar
from eosflow.spec import resolve
from eosflow.store import RunStore, writable_folder

SMOOTHING = 20.0  # std (in steps) of the Gaussian window for GD's loss and the envelope
TRUNCATE = 4.0  # the window is cut at TRUNCATE standard deviations
COST_WEIGHTS = {"grads": 1.0, "hvps": 2.0, "third_derivatives": 4.0}  # gradient-equivalents per evaluation
AVERAGING_WINDOW = 101  # steps (odd: t - 50 .. t + 50) of the box over which the averaged errors compare
BASELINE = "gradient_flow"
ACCURACY = (  # the columns that score a model (relative: dimensionless, lower is better)
    "relative_distance",
    "relative_centre_distance",
    "loss_error",
    "envelope_error",
    "loss_error_averaged",
    "envelope_error_averaged",
)
COLUMNS = (
    "mean_distance",
    *ACCURACY,
    "gradient_equivalents",
    "measurement_equivalents",
    "ms_per_step",
)


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


def window_mean(values: np.ndarray, window: int = AVERAGING_WINDOW) -> np.ndarray:
    """Centred box average: <x>_W(t) = mean of the finite x_s with |s - t| <= W // 2 (W odd).

    Near the ends and around NaNs only the available steps are averaged (no padding); steps with
    no finite value in their box are NaN; W = 1 is the identity.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"the averaging window must be an odd number of steps >= 1, got {window}")
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    box, centred = np.ones(window), slice(window // 2, window // 2 + values.size)  # the centred part of the full sum
    total = np.convolve(np.where(finite, values, 0.0), box)[centred]
    count = np.convolve(finite.astype(np.float64), box)[centred]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1.0), np.nan)


def window_averaged_envelope(oscillation: np.ndarray, window: int = AVERAGING_WINDOW) -> np.ndarray:
    """sqrt(<x^2>_W): the RMS of a signed displacement (or of a predicted RMS) over a centred box of W steps."""
    return np.sqrt(window_mean(np.square(np.asarray(oscillation, dtype=np.float64)), window))


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


def averaged_loss_error(predicted_loss: np.ndarray, loss: np.ndarray, window: int = AVERAGING_WINDOW) -> float:
    """Relative L1 error of <Lhat_m>_W against <L_GD>_W (both box-averaged over ``window`` steps)."""
    return relative_l1_error(window_mean(predicted_loss, window), window_mean(loss, window))


def averaged_envelope_error(amplitude: np.ndarray, oscillation: np.ndarray, window: int = AVERAGING_WINDOW) -> float:
    """Relative L1 error of sqrt(<a_m^2>_W) against GD's window-averaged envelope sqrt(<osc^2>_W)."""
    return relative_l1_error(window_averaged_envelope(amplitude, window), window_averaged_envelope(oscillation, window))


def gradient_equivalents(counts: dict[str, np.ndarray]) -> float:
    """Mean per unit time of sum_c COST_WEIGHTS[c] * counts[c] (steps where every count is finite)."""
    if not counts:
        return float("nan")
    stacked = np.stack([np.asarray(counts[c], dtype=np.float64) * COST_WEIGHTS[c] for c in counts])
    ok = np.all(np.isfinite(stacked), axis=0)
    return float(np.mean(np.sum(stacked[:, ok], axis=0))) if ok.any() else float("nan")


def measurement_equivalents(measurement_hvps: np.ndarray | None) -> float:
    """Mean per unit time of the eigensolver's gradient-equivalents, 2 * HVPs (0 when it never ran)."""
    if measurement_hvps is None:
        return 0.0
    values = np.asarray(measurement_hvps, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(COST_WEIGHTS["hvps"] * np.mean(values)) if values.size else 0.0


def timed_chunks(timing: dict | None) -> np.ndarray:
    """``timing["chunks"]`` as an (n, 3) array of [steps, seconds, warm]."""
    return np.asarray((timing or {}).get("chunks", []), dtype=np.float64).reshape(-1, 3)


def milliseconds_per_step(timing: dict | None) -> float:
    """Wall-clock ms per unit time: the median over chunks of 1000 seconds / steps.

    ``timing["chunks"]`` lists ``[steps, seconds, warm]`` per chunk; the chunks that compiled
    (warm = 0: a process's first chunk of each length and state shapes in an invocation, so also the chunk after
    its tracker grew) are left out when others were timed (a run of one chunk is timed with its compilation).
    """
    chunks = timed_chunks(timing)
    chunks = chunks[chunks[:, 0] > 0]
    warm = chunks[chunks[:, 2] > 0]
    chunks = warm if warm.size else chunks
    return float(np.median(1e3 * chunks[:, 1] / chunks[:, 0])) if chunks.size else float("nan")


def timed_with_compilation(timing: dict | None) -> bool:
    """Whether :func:`milliseconds_per_step` had to time compiling chunks: no chunk of the process ran warm."""
    chunks = timed_chunks(timing)
    return bool(chunks.size) and not np.any((chunks[:, 0] > 0) & (chunks[:, 2] > 0))


def compilation_note(summary: dict, processes: list[str]) -> str:
    """The line under the table naming the processes whose ``ms_per_step`` includes their compilation ('' if none)."""
    timing = summary.get("timing", {})
    compiled = [p for p in processes if timed_with_compilation(timing.get(p))]
    if not compiled:
        return ""
    which = "it" if len(compiled) == 1 else "them"
    why = "a first chunk, a chunk of a new length, one after the tracked block grew"
    remedy = "a longer run, or `spectrum.k` = `k_max` from step 0, times the steps alone"
    return (
        f"ms_per_step of {', '.join(compiled)} includes compilation: every chunk of {which} compiled ({why}), so "
        f"none was timed warm; {remedy} (docs/compare.md, ms_per_step)."
    )


# ---- one run -------------------------------------------------------------------------------------
def _series(ds: xr.Dataset, variable: str, process: str) -> np.ndarray | None:
    """A process's values of a variable, or None when it never recorded a finite one."""
    if variable not in ds:
        return None
    values = ds[variable].sel(process=process).values.astype(np.float64)
    return values if np.isfinite(values).any() else None


def without_blow_up(ds: xr.Dataset, process: str, values: np.ndarray) -> np.ndarray:
    """``values`` (a series of ``process``) as a figure draws them: for a dropped process, without the row that broke
    the blow-up limit (its last recorded one), whose -1.4e15 set the axis and flattened every other curve (a
    probe)."""
    values = np.array(values, dtype=np.float64)
    if process in json.loads(ds.attrs.get("dropped_processes") or "{}"):
        recorded = np.flatnonzero(~np.isnan(ds["loss"].sel(process=process).values))
        if recorded.size:
            values[recorded[-1]] = np.nan
    return values


def predicted_amplitude(ds: xr.Dataset, process: str) -> np.ndarray | None:
    """A model's RMS oscillation: sqrt(tr Sigma) when it reports a covariance, else ``amplitude``; NaN at a step
    it did not record (after it was dropped: a sum over no entries read 0, a predicted collapse)."""
    covariance = _series(ds, "covariance", process)
    if covariance is not None:
        recorded = ~np.isnan(covariance).all(axis=-1)
        return np.where(recorded, np.sqrt(np.nansum(covariance, axis=-1)), np.nan)
    return _series(ds, "amplitude", process)


def predicted_loss(ds: xr.Dataset, process: str) -> np.ndarray:
    """A model's prediction of GD's time-averaged loss: ``predicted_loss``, else its own loss."""
    predicted = _series(ds, "predicted_loss", process)
    return predicted if predicted is not None else ds["loss"].sel(process=process).values.astype(np.float64)


class CriticalSetWarning(UserWarning):
    """A central flow's critical set may have been incomplete (:func:`critical_set_note`)."""


def incomplete_critical_steps(ds: xr.Dataset, process: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(every tracked pair critical, ``max_critical`` cut the set): boolean masks over the steps at which
    a central flow's critical set was not shown complete (its ``critical_complete`` is 0); None for a
    process that does not record it. Where m < the tracked count, a tracked eigenvalue above the
    threshold was left out by ``max_critical``; where m = the tracked count, the next eigenvalue was
    not measured (``spectrum.k_max``)."""
    complete = _series(ds, "critical_complete", process)
    if complete is None:
        return None
    gaps = np.isfinite(complete) & (complete == 0)
    tracked = np.isfinite(ds["eigenvalues"].sel(process=process).values).sum(axis=-1)
    cut = gaps & (ds["critical"].sel(process=process).values < tracked)
    return gaps & ~cut, cut


def critical_set_note(ds: xr.Dataset, process: str) -> str:
    """'' unless a central flow's critical set may have been incomplete at some step; then one line that
    says at how many steps, from which, and which setting to raise."""
    masks = incomplete_critical_steps(ds, process)
    if masks is None:
        return ""
    full, cut = masks
    if process.endswith("projected_flow"):  # one direction by definition: say only where a tracked second was critical
        full = np.zeros_like(full)
    steps = ds["step"].values
    recorded = int(np.isfinite(_series(ds, "critical_complete", process)).sum())  # type: ignore[arg-type]
    parts = []
    if not (full.any() or cut.any()):
        return ""
    if full.any():
        eigenvalues = ds["eigenvalues"].sel(process=process).values
        tracked = np.isfinite(eigenvalues[full]).sum(axis=-1)
        # the process's own limit (runs before it was recorded: the record's width, padded to the largest)
        k_max = int(summary_of(ds).get("spectrum_k_max", {}).get(process, eigenvalues.shape[-1]))
        setting = f"`spectrum.k_max` ({k_max}; `[{process}.spectrum] k_max` for this process alone)"
        remedy = (
            f"raise {setting}"
            if (tracked == k_max).all()
            else f"raise {setting} or, where fewer were tracked, set `spectrum.grow_every` (the "
            "tracker grows only between chunks of `record.chunk` steps)"
        )
        parts.append(
            f"at {full.sum()} of {recorded} steps (the first: step {steps[full][0]}) every tracked eigenpair was "
            f"critical ({tracked.min()}-{tracked.max()} tracked), so the critical set may hold fewer directions "
            f"than the spectrum has: {remedy}"
        )
    if cut.any():
        held = int(ds["critical"].sel(process=process).values[cut].max())
        parts.append(
            f"at {cut.sum()} of {recorded} steps (the first: step {steps[cut][0]}) more eigenvalues were critical "
            f"than the {held} direction{'s' if held > 1 else ''} it holds "
            + (
                "(by definition, for the projected flow)"
                if process.endswith("projected_flow")
                else "(its `max_critical`)"
            )
        )
    return f"{process}: " + "; ".join(parts)


def warn_incomplete_critical_sets(ds: xr.Dataset) -> None:
    """A :class:`CriticalSetWarning` per process whose critical set may have been incomplete."""
    for process in ds["process"].values:
        if note := critical_set_note(ds, str(process)):
            warnings.warn(note, CriticalSetWarning, stacklevel=3)


def baseline_of(reference: str) -> str | None:
    """The yardstick of the relative distance: gradient flow for GD, ``<opt>_stable_flow`` for an optimizer opt
    that has one (momentum, Nesterov, RMSProp, Adam); None for a reference without one (SGD, a line search, a
    model run first)."""
    if reference == "gd":
        return BASELINE
    stable = f"{reference}_stable_flow"
    return stable if stable in PROCESSES else None


def yardstick_distances(
    ds: xr.Dataset, processes: list[str]
) -> tuple[str | None, np.ndarray | None, np.ndarray | None]:
    """(the yardstick of the reference ``processes[0]``, its distance and centre distance to the reference per
    step), the series None where the yardstick was not run or does not exist."""
    yardstick = baseline_of(processes[0])
    if yardstick is None or yardstick not in processes:
        return yardstick, None, None
    return yardstick, _series(ds, "distance", yardstick), _series(ds, "centre_distance", yardstick)


def compare_dataset(ds: xr.Dataset, summary: dict | None = None, width: float = SMOOTHING) -> pd.DataFrame:
    """One row per process (the reference first) with the metrics of the module docstring.

    ``summary`` (dropped processes and their reasons, wall times) defaults to the one that
    :func:`eosflow.load` and :func:`eosflow.simulate` keep in ``ds.attrs``.
    """
    summary = summary_of(ds) if summary is None else summary
    ds = without_divergent_steps(ds, summary)
    processes = [str(p) for p in ds["process"].values]
    reference = processes[0]
    reference_loss = ds["loss"].sel(process=reference).values
    yardstick, baseline, centre_baseline = yardstick_distances(ds, processes)
    models = [p for p in processes[1:] if (entry := PROCESSES.get(p)) is not None and not entry.discrete]
    if yardstick is None and models:
        warnings.warn(
            f"relative_distance and relative_centre_distance are NaN: {reference} has no yardstick to divide the "
            "distances by (gradient_flow for gd, <optimizer>_stable_flow for momentum, nesterov, rmsprop and adam)",
            UserWarning,
            stacklevel=2,
        )
    elif yardstick not in processes and models:  # a run of optimizers alone has no model to measure by it
        warnings.warn(
            f"relative_distance and relative_centre_distance are NaN: they divide by {yardstick}'s distance to "
            f"{reference} (the yardstick), and {yardstick} is not among the processes; add it to compare by them",
            UserWarning,
            stacklevel=2,
        )
    oscillation = _series(ds, "oscillation", reference)
    floor = loss_prediction_error(reference_loss, reference_loss, width)
    timing = summary.get("timing", {})
    rows = []
    for p in processes:
        distance = _series(ds, "distance", p)
        amplitude = predicted_amplitude(ds, p)
        predicted = predicted_loss(ds, p)
        smooth_loss, smooth_amplitude = predicted, amplitude
        if p == reference + NUDGED:  # the optimizer's copy (the floor): its own smoothed loss and envelope
            amplitude = _series(ds, "oscillation", p)
            smooth_loss = gaussian_smooth(predicted, width)
            smooth_amplitude = None if amplitude is None else running_rms(amplitude, width)
        counts = {c: v for c in COST_WEIGHTS if (v := _series(ds, c, p)) is not None}
        loss = ds["loss"].sel(process=p).values
        is_reference = p == reference
        rows.append(
            {
                "process": p,
                "mean_distance": np.nan if is_reference or distance is None else mean_distance(distance),
                "relative_distance": (
                    np.nan
                    if is_reference or distance is None or baseline is None
                    else relative_distance(distance, baseline)
                ),
                "relative_centre_distance": (
                    np.nan
                    if is_reference or (centre := _series(ds, "centre_distance", p)) is None or centre_baseline is None
                    else relative_distance(centre, centre_baseline)
                ),
                "loss_error": (np.nan if is_reference else loss_prediction_error(smooth_loss, reference_loss, width)),
                "loss_error_floor": floor,
                "envelope_error": (
                    np.nan
                    if is_reference or smooth_amplitude is None or oscillation is None
                    else envelope_error(smooth_amplitude, oscillation, width)
                ),
                **averaged_errors(predicted, reference_loss, amplitude, oscillation, is_reference),
                "gradient_equivalents": gradient_equivalents(counts),
                "measurement_equivalents": measurement_equivalents(_series(ds, "measurement_hvps", p)),
                "ms_per_step": milliseconds_per_step(timing.get(p)),
                "critical_incomplete": _incomplete_share(ds, p),
                "not_converged": _not_converged_share(ds, p, summary),
                "steps": int(np.sum(np.isfinite(loss))),
                "status": _status(p, is_reference, summary),
            }
        )
    return pd.DataFrame(rows).set_index("process")


def without_divergent_steps(ds: xr.Dataset, summary: dict) -> xr.Dataset:
    """``ds`` with the last recorded step of each dropped model made NaN: the step at which it diverged, kept on
    disk for its reason, whose blown-up values (an amplitude of 1e254 beside a NaN loss) are no prediction to
    score; later steps are NaN already."""
    dropped = [p for p in summary.get("dropped_processes", {}) if p in ds["process"].values]
    if not dropped:
        return ds
    ds = ds.copy(deep=True)
    stepped = [name for name, v in ds.data_vars.items() if v.dims[:2] == ("process", "step")]
    for p in dropped:
        finite = np.zeros(ds.sizes["step"], dtype=bool)
        for name in stepped:
            values = ds[name].sel(process=p).values
            finite |= np.isfinite(values).reshape(len(finite), -1).any(axis=1)
        if finite.any():
            last = int(np.flatnonzero(finite)[-1])
            for name in stepped:
                if np.issubdtype(ds[name].dtype, np.floating):
                    ds[name].loc[{"process": p, "step": ds["step"].values[last]}] = np.nan
    return ds


def not_converged(ds: xr.Dataset, process: str, summary: dict | None = None) -> np.ndarray | None:
    """The mask (step,) of ``process``'s measurements that stopped at ``max_iters`` with a relative residual
    ||H x - theta x|| / |theta| above its tracker's tol (``spectrum_stop`` of the run's summary, compared in the
    run's dtype as the solver does); None where the run did not record them (no ``residual``, or written before
    the summary held the rule)."""
    rule = (summary_of(ds) if summary is None else summary).get("spectrum_stop", {}).get(process)
    if rule is None or "residual" not in ds:
        return None
    residual = ds["residual"].sel(process=process).values  # in the run's dtype, not _series's float64
    return np.isfinite(residual) & (residual > np.asarray(rule[0], residual.dtype))


def _not_converged_share(ds: xr.Dataset, process: str, summary: dict) -> float:
    """The share of ``process``'s measurements that did not converge (:func:`not_converged`; NaN: none measured)."""
    mask, residual = not_converged(ds, process, summary), _series(ds, "residual", process)
    measured = 0 if residual is None else int(np.isfinite(residual).sum())
    return np.nan if mask is None or measured == 0 else float(mask.sum() / measured)


def _incomplete_share(ds: xr.Dataset, process: str) -> float:
    """The share of a central flow's recorded steps whose critical set was not shown complete (NaN for others)."""
    masks = incomplete_critical_steps(ds, process)
    if masks is None:
        return np.nan
    return float((masks[0] | masks[1]).sum() / np.isfinite(_series(ds, "critical_complete", process)).sum())  # type: ignore[arg-type]


def _status(process: str, is_reference: bool, summary: dict) -> str:
    """``ok``, ``dropped: <reason>`` (a model that diverged), or ``diverged: <reason>`` (the reference,
    whose divergence ends the run)."""
    if process in summary.get("dropped_processes", {}):
        return f"dropped: {summary['dropped_processes'][process]}"
    if is_reference and summary.get("status") == "diverged":
        return f"diverged: {summary.get('reason', '')}"
    return "ok"


def averaged_errors(
    predicted: np.ndarray,
    reference_loss: np.ndarray,
    amplitude: np.ndarray | None,
    oscillation: np.ndarray | None,
    is_reference: bool,
    window: int = AVERAGING_WINDOW,
) -> dict[str, float]:
    """The time-averaged columns: ``loss_error_averaged`` and ``envelope_error_averaged`` (NaN for the reference)."""
    return {
        "loss_error_averaged": np.nan if is_reference else averaged_loss_error(predicted, reference_loss, window),
        "envelope_error_averaged": (
            np.nan
            if is_reference or amplitude is None or oscillation is None
            else averaged_envelope_error(amplitude, oscillation, window)
        ),
    }


def compare_run(run_dir: str | Path, width: float = SMOOTHING) -> pd.DataFrame:
    """The comparison table of a run directory (reads only the directory, via ``eosflow.load``)."""
    return compare_dataset(load(run_dir), RunStore(run_dir).read_summary(), width)


# ---- the report ----------------------------------------------------------------------------------
def format_number(value: float) -> str:
    """How numbers appear in the Markdown tables (6 significant digits; NaN as a dash)."""
    return "-" if not np.isfinite(value) else f"{value:.6g}"


def markdown_table(table: pd.DataFrame, columns: tuple[str, ...] = COLUMNS) -> list[str]:
    lines = ["| process | " + " | ".join(columns) + " | steps | status |", "|---" * (len(columns) + 3) + "|"]
    for name, row in table.iterrows():
        cells = [format_number(float(row[c])) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {int(row['steps'])} | {row['status']} |")
    return lines


def loss_error_floor_line(table: pd.DataFrame, reference: str) -> str:
    """The line under a table: the loss error that the reference's own loss scores (the column's floor)."""
    return (
        f"loss_error floor: {format_number(float(table['loss_error_floor'].iloc[0]))}, what {reference}'s own loss "
        "scores against its smoothed loss (its oscillation, and the smoothing's bias where the loss bends): a "
        "model's loss_error near it is as good as predicting the loss step by step."
    )


LINE_STYLES = ("-", "--", (0, (1, 1.5)), "-.", (0, (5, 1, 1, 1, 1, 1)))


def line_style(i: int) -> dict:
    """Colour and dash of the i-th curve of a figure: colours and dashes cycle together, so two
    models whose curves overlap stay visible as two (a solid and a dashed line)."""
    return {"color": f"C{i % 10}", "ls": LINE_STYLES[i % len(LINE_STYLES)], "lw": 1.2}


def log_scale_where_positive(ax) -> None:
    """The one y-scale policy of every figure: log if the panel's lines hold positive finite values spanning a
    factor of 10 or more and no negative one, else linear. Zeros (a distance at w0) are left off a log axis; a
    negative value (a loss below 0) would be, so it keeps the axis linear; a panel with nothing positive (a run of
    one step, every distance 0 or infinite) has nothing a log scale can show (matplotlib raised on it); a narrow
    range (a loss from 0.56 to 0.50) reads better in plain ticks than as 5.1 x 10^-1."""
    finite = [v[np.isfinite(v)] for v in (np.asarray(line.get_ydata(), dtype=np.float64) for line in ax.lines)]
    positive = np.concatenate([v[v > 0] for v in finite]) if finite else np.array([])
    if positive.size and positive.max() >= 10 * positive.min() and not any(np.any(v < 0) for v in finite):
        ax.set_yscale("log")


def threshold_line(ax, value: float, label: str) -> None:
    """A horizontal threshold (2/lr) drawn wide, pale and under the curves, which stay visible on it."""
    ax.axhline(value, color="0.55", lw=3, alpha=0.45, zorder=0.5, label=label)


def _figure(path: Path, panels: int, draw, title: str, logy: tuple[bool, ...] = (), xlabel: str = "step") -> None:
    fig = Figure(figsize=(7.5, 3.2 * panels), dpi=110)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)
    draw(*axes[:, 0])
    for i, ax in enumerate(axes[:, 0]):
        if i < len(logy) and logy[i]:
            log_scale_where_positive(ax)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path)


def write_report(run_dir: str | Path, width: float = SMOOTHING) -> Path:
    """Write ``report/compare.md``, ``report/compare.csv`` and ``report/compare_*.png``; returns the page."""
    run_dir = Path(run_dir)
    ds = load(run_dir)
    summary = RunStore(run_dir).read_summary()
    table = compare_dataset(ds, summary, width)
    out = writable_folder(run_dir / "report")
    table.to_csv(out / "compare.csv")
    steps = ds["step"].values
    processes = [str(p) for p in ds["process"].values]
    reference, models = processes[0], processes[1:]
    lr = float(ds.attrs["lr"])
    figures = []
    _figure(
        out / "compare_loss.png",
        1,
        lambda ax: draw_loss(ax, ds, width),
        "training loss and each model's predicted time-averaged loss",
        (True,),
    )
    figures.append(("Loss", "compare_loss.png"))

    # GD: the sharpness against 2/lr; another optimizer: its edge ratio (preconditioned sharpness / threshold)
    variable, level, level_label = (
        ("sharpness", 2.0 / lr, "2 / lr") if reference == "gd" else ("edge_ratio", 1.0, "edge")
    )
    if _series(ds, variable, reference) is not None:

        def draw_sharpness(ax):
            for i, p in enumerate(processes):
                if (s := _series(ds, variable, p)) is not None:
                    s = without_blow_up(ds, p, s)
                    ok = np.isfinite(s)
                    ax.plot(steps[ok], s[ok], **line_style(i), label=p)
            threshold_line(ax, level, level_label)
            ax.set_ylabel(variable.replace("_", " "))

        _figure(
            out / "compare_sharpness.png",
            1,
            draw_sharpness,
            f"{variable.replace('_', ' ')} and the stability threshold",
        )
        figures.append(("Sharpness", "compare_sharpness.png"))

    if models:
        panels, draw_distance = distance_panels(ds)
        _figure(out / "compare_distance.png", panels, draw_distance, f"distance to {reference}", (True,) * panels)
        figures.append(("Distance to the reference", "compare_distance.png"))

    enveloped = {p: a for p in models if (a := predicted_amplitude(ds, p)) is not None}
    oscillation = _series(ds, "oscillation", reference)
    if enveloped and oscillation is not None:

        def draw_envelope(ax):
            ax.plot(steps, running_rms(oscillation, width), color="k", lw=2, label=f"{reference} envelope")
            for p, amplitude in enveloped.items():
                ax.plot(steps, amplitude, **line_style(processes.index(p)), label=f"{p}: predicted")
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
    _figure(fig_cost, 2, draw_cost, "cost per unit time", xlabel="process")
    figures.append(("Cost", "compare_cost.png"))

    lines = [
        f"# Comparison: {ds.attrs.get('name', run_dir.name)}",
        "",
        f"Reference `{reference}`, lr = {lr:g}, {summary.get('steps_done')} steps "
        f"({summary.get('status', '?')}), problem `{summary.get('problem', {}).get('name')}`, "
        f"{summary.get('dimension')} parameters. Loss and envelope smoothing: Gaussian of std "
        f"{width:g} steps. Definitions: `docs/compare.md`.",
        "",
    ]
    lines += markdown_table(table)
    lines += [
        "",
        loss_error_floor_line(table, reference),
        "",
        *([note, ""] if (note := compilation_note(summary, processes)) else []),
        "Columns: mean_distance = time-averaged ||w_ref - w||; relative_distance = the same "
        + (
            f"divided by {yardstick}'s"
            if (yardstick := baseline_of(reference))
            else f"divided by a yardstick's (NaN: {reference} has none)"
        )
        + "; relative_centre_distance = the same ratio between the "
        "midpoints of consecutive steps (blind to a period-2 oscillation's phase); loss_error and "
        "envelope_error = relative L1 errors against the reference's smoothed loss and running-RMS "
        "envelope; the *_averaged columns compare both sides averaged over a centred box of "
        f"{AVERAGING_WINDOW} steps; gradient_equivalents and "
        "ms_per_step per unit time (an HVP counts as 2 gradients).",
        "",
    ]
    notes = [note for p in processes if (note := critical_set_note(ds, p))]
    if notes:
        lines += ['**Critical sets that may be incomplete** (docs/central_flow.md, "The critical set"):', ""]
        lines += [f"- {note}" for note in notes] + [""]
    lines += [
        "## Figures",
        "",
    ]
    lines += [f"![{title}]({name})" for title, name in figures]
    for k, saved in RunStore(run_dir).anchored_files():
        lines += ["", *anchored_section(ds, summary, saved, k, out, width)]
    if (missing := Path(run_dir) / RunStore.ANCHOR_MISSING).is_file():
        reason = missing.read_text().strip()
        lines += ["", "## No comparison from a later step", "", f"Asked for, and not made: {reason}."]
    path = report_page(run_dir)
    path.write_text("\n".join(lines) + "\n")
    return path


def report_page(run_dir: str | Path) -> Path:
    """The comparison page of a run directory (written by :func:`write_report`)."""
    return Path(run_dir) / "report" / "compare.md"


def draw_loss(ax, ds: xr.Dataset, width: float = SMOOTHING) -> None:
    """The reference's loss, raw and Gaussian-smoothed, and each model's predicted loss, over ``ds``'s steps."""
    steps = ds["step"].values
    reference, *models = [str(p) for p in ds["process"].values]
    reference_loss = ds["loss"].sel(process=reference).values
    ax.plot(steps, reference_loss, lw=0.6, color="0.6", label=f"{reference}: loss")
    ax.plot(
        steps,
        gaussian_smooth(reference_loss, width),
        lw=1.5,
        color="k",
        label=f"{reference}: loss smoothed (std {width:g} steps)",
    )
    for i, p in enumerate(models, start=1):
        ax.plot(steps, without_blow_up(ds, p, predicted_loss(ds, p)), **line_style(i), label=f"{p}: predicted")
    ax.set_ylabel("loss")


def distance_panels(ds: xr.Dataset):
    """(panels, draw): each model's distance to the reference and, with a yardstick among the processes, its ratio
    to the yardstick's and, when recorded, the same ratio of the centre distances (``draw(ax_abs, *ax_ratios)``).
    Without a yardstick the ratio panels were drawn empty, one labelled "distance / None's"."""
    steps = ds["step"].values
    reference, *models = processes = [str(p) for p in ds["process"].values]
    yardstick, baseline, centre_baseline = yardstick_distances(ds, processes)

    def draw(ax_abs, *ax_ratios):
        for i, p in enumerate(models, start=1):
            d = ds["distance"].sel(process=p).values
            ax_abs.plot(steps, d, **line_style(i), label=p)
            with np.errstate(invalid="ignore", divide="ignore"):
                if ax_ratios:
                    ax_ratios[0].plot(steps, d / baseline, **line_style(i), label=p)
                if ax_ratios[1:] and (centre := _series(ds, "centre_distance", p)) is not None:
                    ax_ratios[1].plot(steps, centre / centre_baseline, **line_style(i), label=p)
        ax_abs.set_ylabel(f"||w_{reference} - w||")
        for ax, what in zip(ax_ratios, ("distance", "centre distance")):
            ax.set_ylabel(f"{what} / {yardstick}'s")

    # a run from before centre_distance has two panels
    return (1 if baseline is None else 2 if centre_baseline is None else 3), draw


def anchored_section(run: xr.Dataset, summary: dict, saved: Path, k: int, out: Path, width: float) -> list[str]:
    """The page's section on ``saved``, the models restarted on the reference's state at step k
    (:func:`eosflow.anchored.write_anchored`): its table (also ``compare_from_step_<k>.csv``; no wall times) and one
    figure of the loss and the distances from k on. Read from the file alone; ``run`` (the run from w0)
    only says whether k is the reference's edge onset."""
    with xr.open_dataset(saved, engine="scipy") as file:
        ds = file.load()
    table = compare_dataset(ds, width=width)
    name = f"compare_from_step_{k}"
    table.drop(columns="ms_per_step").to_csv(out / f"{name}.csv")  # a single run from k: compilation included
    reference = str(ds["process"].values[0])
    last = int(ds["step"].values[-1])
    edge = _series(run, "edge_ratio", reference)
    onset = None if edge is None else onset_step(edge)
    if onset is not None and max(onset, 2) == k:
        title = f"From step {k} (the optimizer's edge onset)"
    elif onset is not None:
        title = f"From step {k} (the optimizer's edge onset is step {onset})"
    else:
        title = f"From step {k}" + ("" if edge is None else f" ({reference} never reached edge ratio {ONSET})")
    panels, draw_distance = distance_panels(ds)

    def draw(ax_loss, *ax_distance):
        draw_loss(ax_loss, ds, width)
        draw_distance(*ax_distance)

    _figure(
        out / f"{name}.png",
        1 + panels,
        draw,
        f"from step {k}: loss and distance to {reference}",
        (True,) * (1 + panels),
    )
    yardstick = baseline_of(reference)
    restarted = f" (the yardstick {yardstick} too)" if yardstick in ds["process"].values else ""
    floor = (
        f" `{reference}{NUDGED}` is {reference} itself restarted at k with w moved by its rounding (eps ||w||): "
        f"the floor of every column, what a model that were {reference} would score from a state known to the "
        'last bit (docs/compare.md, "The floor").'
        if reference + NUDGED in ds["process"].values
        else ""
    )
    lines = [
        f"## {title}",
        "",
        f"The models restarted on {reference}'s states at steps {k - 2}..{k + 2}{restarted} and run to step "
        f"{last}; every column over steps {k}..{last} "
        f'(docs/compare.md, "From a later step").{floor} Data: `{saved.name}` in the run directory. Wall times '
        "are in the table above (a model's single run from k would count its compilation).",
        "",
    ]
    if ds.attrs.get("steps") != summary.get("steps"):
        lines += [
            f"(Computed for a run of {ds.attrs.get('steps')} steps; this run has {summary.get('steps')}: "
            f"`eosflow compare RUN_DIR --from {k}` updates it.)",
            "",
        ]
    columns = tuple(column for column in COLUMNS if column != "ms_per_step")
    return [
        *lines,
        *markdown_table(table, columns),
        "",
        loss_error_floor_line(table, reference),
        "",
        f"![From step {k}]({name}.png)",
    ]


def check_comparable(processes: Sequence[str]) -> None:
    """A SpecError unless ``processes`` starts with an optimizer (the reference every model is measured
    against) and lists something to compare with it."""
    if not PROCESSES[processes[0]].discrete:
        optimizers = [name for name in processes if PROCESSES[name].discrete]
        raise SpecError(
            f"compare measures every process against the optimizer listed first in `processes`, and "
            f"{processes[0]!r} is a model of one: list "
            + (f"{optimizers[0]!r} first" if optimizers else "the optimizer it models (e.g. 'gd') first")
        )
    if len(processes) == 1:
        raise SpecError(
            f"compare needs models to compare with {processes[0]!r} (e.g. processes = [{processes[0]!r}, "
            "'gradient_flow', 'central_flow']); `eosflow run` runs it alone"
        )


def compare(
    table: dict,
    out: Path,
    overwrite: bool = False,
    progress: bool = True,
    at: int | str | None = None,
    where: str = "`at`",
) -> Path:
    """Run the experiment of ``table`` into ``out``, then write its comparison report; returns the page.

    An existing run directory ``out`` is an error unless ``overwrite`` (nothing is lost silently). With
    ``at`` (a step, or "onset"), the models are also restarted on the reference's state there
    (:func:`eosflow.anchored.write_anchored`: ``out/from_step_<k>.nc``, a section of the page). What cannot
    be anchored is refused before the run (:func:`eosflow.anchored.check_anchorable`; ``where`` names
    ``at`` in the message); a reference that never reaches its onset, or diverges, raises
    :class:`eosflow.anchored.NoAnchorStep` once the run and its report are written.
    """
    if at is not None:
        check_anchorable(table, at, where=where)
    spec = resolve(table).spec
    check_comparable(spec.processes)
    if progress:
        bar, update = training_bar(spec.steps, spec.processes[0], spec.lr)
        with bar:
            run(table, out, overwrite=overwrite, progress=update)
    else:
        run(table, out, overwrite=overwrite)
    if at is None:
        return write_report(out)
    if progress:
        print(f"from {at}: {spec.processes[0]} again from w0 in memory, then its models", file=sys.stderr)
    return compare_from(out, at)


def compare_from(run_dir: str | Path, at: int | str) -> Path:
    """Add the models restarted on the reference's state at step ``at`` (or its onset) to a run directory
    (:func:`eosflow.anchored.write_anchored`) and write its report; returns the page. A reference that
    never reaches its onset, or diverges, raises :class:`eosflow.anchored.NoAnchorStep` once the report
    (without that section) is written."""
    try:
        write_anchored(run_dir, at)
    except NoAnchorStep:
        write_report(run_dir)  # the run from w0 and its report are kept
        raise
    return write_report(run_dir)
