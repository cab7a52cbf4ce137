"""The report section of runs with an ``sgd`` process: anomalous diffusion and phase portraits.

Reads only the run directory: the trajectories (``step_norm_sq``, ``loss``), the parameters saved
every ``record.params_every`` steps (:func:`eosflow.load_params`), and ``spec.resolved.toml``, from
which the problem is rebuilt to measure the Hessian's top eigenpairs and the gradient noise at the
centre of the late iterates (the inputs of the Langevin model's modified loss and currents).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from eosflow.compiled import BoundedJit
from eosflow.load import load_params
from eosflow.optim.sgd import SGDOptions, step_noise
from eosflow.precision import precision
from eosflow.problems import build_problem
from eosflow.spec import resolve
from eosflow.spectrum import top_hessian_eigenpairs
from eosflow.store import RunStore, StoreError
from eosflow.theory.diffusion import (
    diffusion_curve,
    eigenplane_model,
    fit_exponent,
    global_displacement,
    predicted_local_displacement,
    segment_displacements,
)
from eosflow.theory.linear_regression import (
    current_matrix,
    discrete_stationary_covariance,
    discrete_system,
    frequency,
    stationary_covariance,
)

MIN_SEGMENT = 16  # saved positions per segment for the jackknife interval
NOISE_SAMPLES = 8  # late iterates at which the gradient noise is measured and averaged
FULL_SPECTRUM = 500  # up to this dimension the whole Hessian spectrum is used (theory curve of Delta)


def settled_step(*series: np.ndarray, tolerance: float = 0.1) -> int:
    """The first step from which every series (loss, local displacement, ...), smoothed over a
    window of 1/50 of the run, is within ``tolerance`` (relative) of its final level; capped at
    half the run so that at least half is left to measure diffusion."""
    length = len(series[0])
    settled = 0
    for values in series:
        values = np.asarray(values, float)
        finite = np.isfinite(values)
        if finite.sum() < 4:
            continue
        values = np.interp(np.arange(length), np.flatnonzero(finite), values[finite])
        width = max(1, length // 50)
        smooth = np.convolve(values, np.ones(width) / width, mode="valid")
        final = np.median(smooth[-max(1, len(smooth) // 10) :])
        below = np.flatnonzero(smooth <= final + tolerance * abs(final))
        settled = max(settled, below[0] + width - 1 if below.size else length // 2)  # that window's end
    return int(min(settled, length // 2))


LATE_PARAMS = 8  # saved parameter vectors after the checkpoint that the diffusion fit needs


def _late_params(run_dir: Path, process: str, checkpoint: int) -> tuple[np.ndarray, np.ndarray] | str:
    """(steps, params) saved at or after ``checkpoint`` on a uniform grid, or why there are none to fit."""
    try:
        steps, params = load_params(run_dir, process)
    except StoreError:
        return f"{process}'s parameters were not saved (set `record.params_every`)"
    keep = steps >= checkpoint
    steps, params = steps[keep], np.asarray(params[keep], float)
    if len(steps) < LATE_PARAMS:
        return (
            f"{len(steps)} of {process}'s saved parameter vectors fall at or after the checkpoint (step {checkpoint}), "
            f"and the fit needs {LATE_PARAMS}: lower `record.params_every` or run longer"
        )
    if np.ptp(np.diff(steps)) != 0:
        return f"{process}'s parameters after the checkpoint were saved at uneven steps"
    return steps, params


class CentreModel(NamedTuple):
    """The quadratic model of the late iterates: Hessian eigenpairs at their centre, SGD's noise."""

    centre: np.ndarray
    values: np.ndarray  # Hessian eigenvalues (all of them when d is small, else the top 2)
    directions: np.ndarray  # d x k
    noise_trace: float  # tr Xi, averaged over late iterates
    noise: np.ndarray  # U^T Xi U, averaged over late iterates
    complete: bool  # the whole spectrum (so the theory curve of Delta can be drawn)
    options: SGDOptions  # the run's `[sgd]` options


def centre_model(run_dir: Path, params: np.ndarray) -> CentreModel:
    """Rebuild the run's problem and measure the model at the centre of ``params``.

    The noise Xi = c Sigma_g + sigma^2 I / S is averaged over NOISE_SAMPLES late iterates rather
    than taken at the centre: it grows away from the centre (cf. ``residual_noise``).
    """
    spec = resolve(RunStore(run_dir).resolved_spec()[0]).spec  # spec.toml resolved again where that file is lost
    with precision(spec.dtype):
        return _centre_model(spec, params)


_compiled_noise = BoundedJit(step_noise, kept=4)  # per problem (eosflow.compiled)


def _centre_model(spec, params: np.ndarray) -> CentreModel:
    options = spec.options["sgd"]
    problem, _ = build_problem(spec.problem, spec.seed, spec.dtype)
    objective, dtype = problem.objective, problem.w0.dtype
    centre = params.mean(axis=0)
    complete = centre.size <= FULL_SPECTRUM
    values, directions = top_hessian_eigenpairs(
        FULL_SPECTRUM, objective, jnp.asarray(centre, dtype), centre.size if complete else min(2, centre.size)
    )
    u = jnp.asarray(directions, dtype)
    picks = params[np.linspace(0, len(params) - 1, NOISE_SAMPLES).astype(int)]
    measured = [_compiled_noise(objective, jnp.asarray(p, dtype), options, u) for p in picks]
    trace = float(np.mean([float(t) for t, _ in measured]))
    noise = np.mean([np.asarray(x, float) for _, x in measured], axis=0)
    return CentreModel(centre, values, directions, trace, noise, complete, options)


def _diffusion(late, ax, label: str, color: str) -> tuple[list[str], np.ndarray]:
    """Plot and fit the global displacement two ways; returns the table rows and the segments' lags.

    From the checkpoint over the whole rest of the run (one curve: the authors' protocol; its OLS
    interval ignores autocorrelation), and from the starts of consecutive segments (jackknife
    interval; it assumes the segments are statistically alike, i.e. no ageing).
    """
    steps, params = late
    spacing = int(steps[1] - steps[0])
    single = global_displacement(params)
    single_lags = np.arange(len(single)) * spacing
    segments = max(1, min(8, len(steps) // MIN_SEGMENT))
    curves = segment_displacements(params, segments)
    lags = np.arange(curves.shape[1]) * spacing
    ax.loglog(single_lags[1:], single[1:], color=color, lw=1.0, ls="-.", label=f"{label}: from the checkpoint")
    for curve in curves:
        ax.loglog(lags[1:], curve[1:], color=color, alpha=0.15, lw=0.7)
    ax.loglog(lags[1:], curves[:, 1:].mean(axis=0), color=color, lw=1.5, label=f"{label}: mean of {segments} segments")
    rows = []
    for name, fit in (
        (f"{label}, from the checkpoint", fit_exponent(single_lags[1:], single[1:])),
        (f"{label}, {segments} segments", fit_exponent(lags[1:], curves[:, 1:])),
    ):
        window = np.geomspace(*fit.window, 20)
        ax.loglog(window, fit.prefactor * window**fit.exponent, "k--", lw=1)
        rows.append(
            f"| {name} | {fit.exponent:.3f} | [{fit.low:.3f}, {fit.high:.3f}] | "
            f"{fit.window[0]:g}-{fit.window[1]:g} | {fit.method} |"
        )
    return rows, lags


def _theory_curve(ax, model: CentreModel, lags: np.ndarray, lr: float) -> None:
    """E Delta_k of SGD on the quadratic model (every mode, noise diag(U^T Xi U))."""
    curvatures = np.maximum(model.values + model.options.weight_decay, 1e-12)
    curve = diffusion_curve(curvatures, np.diag(model.noise), lr, model.options.momentum, lags[1:])
    ax.loglog(lags[1:], curve, color="k", lw=1, ls=":", label="theory: modes of H at the centre")


def draw_phase_portrait(
    ax,
    stationary,
    current,
    axes: tuple[int, int],
    labels: tuple[str, str],
    samples=None,
    arrow_time: float = 1.0,
    levels=(0.5, 2.0, 4.5),
) -> None:
    """Contours of the marginal modified loss 1/2 y^T C_yy^{-1} y on the coordinates ``axes`` of x,
    the marginal current's velocity -Q_yy C_yy^{-1} y as arrows (the displacement over
    ``arrow_time``, in data units, so panels drawn with one time compare), and ``samples`` (n, 2).

    (The Gaussian marginal of J = -Q C^{-1} x p is -Q_yy C_yy^{-1} y p(y).)
    """
    sel = np.asarray(axes)
    cov = np.asarray(stationary)[np.ix_(sel, sel)]
    velocity = -np.asarray(current)[np.ix_(sel, sel)] @ np.linalg.inv(cov)
    extent = 3.2 * np.sqrt(np.diag(cov))
    if samples is not None and len(samples):
        extent = np.maximum(extent, np.percentile(np.abs(samples), 99, axis=0) * 1.1)
    grid = [np.linspace(-e, e, 121) for e in extent]
    gx, gy = np.meshgrid(*grid)
    points = np.stack([gx, gy], axis=-1)
    psi = 0.5 * np.einsum("...i,ij,...j->...", points, np.linalg.inv(cov), points)
    if samples is not None and len(samples):
        ax.plot(samples[:, 0], samples[:, 1], ".", ms=1.5, alpha=0.35, color="tab:gray", label="iterates")
    contour = ax.contour(gx, gy, psi, levels=list(levels), colors="tab:blue", linewidths=1)
    ax.clabel(contour, fmt=lambda v: f"Psi={v:g}", fontsize=7)
    coarse = [np.linspace(-e, e, 13) for e in extent]
    qx, qy = np.meshgrid(*coarse)
    flow = np.stack([qx, qy], axis=-1) @ velocity.T
    ax.quiver(
        qx,
        qy,
        flow[..., 0],
        flow[..., 1],
        color="tab:red",
        alpha=0.6,
        width=0.003,
        angles="xy",
        scale_units="xy",
        scale=1.0 / arrow_time,
    )
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])


def _phase_portraits(report_dir: Path, late, model: CentreModel, lr: float) -> list[str]:
    """Top-2 Hessian eigenplanes at the centre of the late iterates, with the modified loss."""
    steps, params = late
    k = min(2, len(model.values))
    momentum = model.options.momentum
    curvatures = model.values[:k] + model.options.weight_decay
    noise = model.noise[:k, :k]
    drift, diffusion = eigenplane_model(curvatures, noise, lr, momentum)
    stationary = stationary_covariance(drift, diffusion)
    current = current_matrix(drift, diffusion, stationary)
    discrete = discrete_stationary_covariance(*discrete_system(np.diag(curvatures), noise, lr, momentum))
    directions = model.directions[:, :k]
    arrow_time = 0.1 / float(frequency(curvatures[0], lr, momentum))  # arrows: a 0.1 rad turn of mode 1
    positions = (params - model.centre) @ directions
    consecutive = int(steps[1] - steps[0]) == 1
    velocities = np.diff(params, axis=0) @ directions / lr if consecutive else None

    panels = [((0, 1), ("theta_1", "theta_2"), positions)] if k == 2 else []
    for i in range(k):
        samples = np.stack([positions[:-1, i], velocities[:, i]], axis=1) if velocities is not None else None
        panels.append(((i, k + i), (f"theta_{i + 1}", f"v_{i + 1} = dtheta/dt"), samples))
    fig = Figure(figsize=(4.2 * len(panels), 4), dpi=110)
    axes = fig.subplots(1, len(panels))
    for ax, (plane, labels, samples) in zip(np.atleast_1d(axes), panels):
        draw_phase_portrait(ax, stationary, current, plane, labels, samples, arrow_time)
    fig.suptitle(
        "top Hessian eigenplanes: modified loss Psi (contours); arrows: the current J/p_ss "
        "over the time mode 1 turns by 0.1 rad",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(report_dir / "sgd_phase_portraits.png")

    measured = positions.var(axis=0)
    lines = [
        "",
        "### Phase space in the top Hessian eigendirections",
        "",
        f"Quadratic model at the centre of the iterates after step {int(steps[0])} (noise averaged "
        f"over {NOISE_SAMPLES} of them): Hessian eigenvalues "
        + ", ".join(f"{v:.4g}" for v in model.values[:k])
        + " (lr*h = "
        + ", ".join(f"{lr * h:.3f}" for h in curvatures)
        + ").",
        "",
        "| direction | measured Var | Langevin model | exact discrete SGD |",
        "|---|---|---|---|",
    ]
    for i in range(k):
        lines.append(f"| u_{i + 1} | {measured[i]:.4g} | {stationary[i, i]:.4g} | {discrete[i, i]:.4g} |")
    return lines + ["", "![phase portraits](sgd_phase_portraits.png)"]


def sgd_section(ds: xr.Dataset, run_dir: Path, report_dir: Path) -> str:
    """Anomalous diffusion (exponent with its interval), local displacement and phase portraits."""
    processes = list(ds["process"].values)
    if "sgd" not in processes:
        return ""
    run_dir, report_dir = Path(run_dir), Path(report_dir)
    lr = float(ds.attrs["lr"])
    steps = ds["step"].values
    checkpoint = int(steps[0]) + settled_step(
        ds["loss"].sel(process="sgd").values, ds["step_norm_sq"].sel(process="sgd").values
    )
    late = {p: _late_params(run_dir, p, checkpoint) for p in ("sgd", "langevin") if p in processes}
    sgd_late = late["sgd"]
    model = centre_model(run_dir, sgd_late[1]) if not isinstance(sgd_late, str) else None
    lines = [
        "## SGD limiting dynamics",
        "",
        f"Checkpoint (loss and local displacement within 10% of their final levels): step "
        f"{checkpoint}. Global displacement Delta_k = ||theta_{{k0+k}} - theta_{{k0}}||^2 from the "
        "checkpoint, and from the starts of consecutive segments after it; the exponent c of "
        "Delta ~ k^c is fitted over the last 2/3 of the lags.",
        "",
    ]
    fig = Figure(figsize=(11, 3.8), dpi=110)
    left, right = fig.subplots(1, 2)
    rows = []
    for process, color in (("sgd", "tab:blue"), ("langevin", "tab:orange")):
        if process not in late:
            continue
        right.semilogy(
            steps, ds["step_norm_sq"].sel(process=process).values, lw=0.6, color=color, alpha=0.7, label=process
        )
        if not isinstance(late[process], str):
            fitted, lags = _diffusion(late[process], left, process, color)
            rows += fitted
            if process == "sgd" and model is not None and model.complete:
                _theory_curve(left, model, lags, lr)
    right.axvline(checkpoint, color="k", ls=":", lw=1)
    right.set(xlabel="step", ylabel="||theta_{k+1} - theta_k||^2", title="local displacement")
    right.legend(fontsize=8)
    left.set(xlabel="lag k (steps)", ylabel="Delta_k", title="global displacement (dashed: fit)")
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(report_dir / "sgd_diffusion.png")
    if rows:
        lines += [
            "| process, curve | exponent c | 95% interval | lag window | interval method |",
            "|---|---|---|---|---|",
        ]
        lines += rows
        lines += [
            "",
            "One run cannot separate diffusion from a slow common drift of the weights; independent "
            "replicas continued from the checkpoint can (see benchmarks/sgd_diffusion.py).",
        ]
    else:
        why = "; ".join(reason for reason in late.values() if isinstance(reason, str))
        lines.append(f"No diffusion fit ({why}), so only the local displacement is shown.")
    lines += ["", "![diffusion](sgd_diffusion.png)"]
    if model is not None:
        local = ds["step_norm_sq"].sel(process="sgd").values[checkpoint - int(steps[0]) :]
        predicted = predicted_local_displacement(model.noise_trace, lr, model.options.momentum)
        lines += [
            "",
            f"Local displacement after the checkpoint: measured mean {np.nanmean(local):.4g}; "
            f"predicted lr^2 tr(Xi) / (1 - beta^2) = {predicted:.4g} (Xi averaged over "
            f"{NOISE_SAMPLES} late iterates).",
        ]
        lines += _phase_portraits(report_dir, sgd_late, model, lr)
    lines += batch_sharpness_lines(ds, report_dir, lr)
    return "\n".join(lines)


def windowed_batch_sharpness(ds: xr.Dataset, windows: int = 20) -> tuple[np.ndarray, np.ndarray] | None:
    """(window centres, batch sharpness: the mean of batch_curvature / batch_descent over the measured steps
    of each of ``windows`` consecutive windows of SGD's steps), or None if SGD recorded no quotient."""
    if "batch_curvature" not in ds:
        return None
    sgd = ds.sel(process="sgd")
    curvature, descent, steps = sgd["batch_curvature"].values, sgd["batch_descent"].values, ds["step"].values
    measured = np.isfinite(curvature) & np.isfinite(descent)
    if not measured.any():
        return None
    edges = np.linspace(0, len(steps), min(windows, int(measured.sum())) + 1).astype(int)
    centres, values = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        inside = measured[a:b]
        if inside.any():
            centres.append(float(np.mean(steps[a:b][inside])))
            values.append(float(np.mean(curvature[a:b][inside] / descent[a:b][inside])))
    return np.asarray(centres), np.asarray(values)


def batch_sharpness_lines(ds: xr.Dataset, report_dir: Path, lr: float) -> list[str]:
    """The figure and line of SGD's batch sharpness (``sgd.batch_sharpness_every``) against its full-batch
    sharpness, both in units of 2/lr; nothing if the run recorded no batch quotient."""
    windowed = windowed_batch_sharpness(ds)
    if windowed is None:
        return []
    centres, values = windowed
    fig = Figure(figsize=(6.5, 3.6), dpi=110)
    axis = fig.subplots()
    axis.plot(centres, lr * values / 2, "o-", ms=3, color="tab:red", label="batch sharpness (window mean)")
    if "sharpness" in ds:
        full = ds["sharpness"].sel(process="sgd").values
        shown = np.isfinite(full)
        if shown.any():
            axis.plot(ds["step"].values[shown], lr * full[shown] / 2, lw=0.8, color="tab:blue", label="full-batch")
    axis.axhline(1.0, color="k", ls=":", lw=1)
    axis.set(xlabel="step", ylabel="sharpness x lr / 2", title="SGD: batch and full-batch sharpness")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(report_dir / "sgd_batch_sharpness.png")
    return [
        "",
        "### Batch sharpness",
        "",
        f"The mean of b_k^T H_B b_k / g_B^T b_k over the measured steps of {len(values)} windows, each step's own "
        "batch along its own step (docs/sgd_limiting_dynamics.md, section 1a), in units of 2/lr: "
        f"{lr * values[0] / 2:.3f} in the first window, {lr * values[-1] / 2:.3f} in the last "
        f"(max {lr * values.max() / 2:.3f}); 1 is where the steps stop lowering their own batches' losses.",
        "",
        "![batch sharpness](sgd_batch_sharpness.png)",
    ]
