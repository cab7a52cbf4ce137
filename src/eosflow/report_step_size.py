"""The report section of runs whose step size is chosen at every step (Flatland's line searches).

For w_{k+1} = w_k - eta_k g_k the edge of stability is read per step: eta_k S_k against 2, where GD's
page reads lr S. The section draws eta_k and, where recorded, the train and test accuracy, and tabulates
per process what docs/flatland.md measures: how often eta_k S_k > 2, its smallest and median value,
the loss evaluations a step cost and the steps whose search ran out of them. Reads only the Dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from eosflow.compare import line_style
from eosflow.report import save_figure


def chosen_step_sizes(ds: xr.Dataset) -> list[str]:
    """The processes whose recorded step size ``lr`` is not one constant (their step is searched)."""
    if "lr" not in ds:
        return []
    chosen = []
    for p in ds["process"].values:
        eta = ds["lr"].sel(process=p).values
        eta = eta[np.isfinite(eta)]
        if eta.size and np.ptp(eta) > 0:
            chosen.append(str(p))
    return chosen


def step_size_rows(ds: xr.Dataset, processes: list[str]) -> list[dict]:
    """Per process: median eta_k; over the steps where S was measured, the share with eta_k S_k > 2, the
    smallest and the median eta_k S_k; mean loss evaluations per step; steps whose search was not accepted."""
    rows = []
    for p in processes:
        eta = ds["lr"].sel(process=p).values
        row = {"process": p, "median_lr": float(np.nanmedian(eta))}
        if "lr_sharpness" in ds:
            measured = ds["lr_sharpness"].sel(process=p).values
            measured = measured[np.isfinite(measured)]
            if measured.size:
                row.update(
                    measured_steps=int(measured.size),
                    share_above_2=float(np.mean(measured > 2.0)),
                    min_lr_sharpness=float(measured.min()),
                    median_lr_sharpness=float(np.median(measured)),
                )
        if "loss_evals" in ds:
            row["loss_evals"] = float(np.nanmean(ds["loss_evals"].sel(process=p).values))
        if "accepted" in ds:
            accepted = ds["accepted"].sel(process=p).values
            row["not_accepted"] = int(np.sum(np.isfinite(accepted) & (accepted == 0)))
        rows.append(row)
    return rows


def _cell(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "-"


def step_size_section(ds: xr.Dataset, run_dir: Path, report_dir: Path) -> str:
    """Markdown and figures for the processes of :func:`chosen_step_sizes` ('' if there are none)."""
    processes = chosen_step_sizes(ds)
    if not processes:
        return ""
    steps = ds["step"].values
    lines = [
        "## Step sizes chosen at every step",
        "",
        "eta_k is the step taken at step k; the edge of stability is eta_k S_k = 2 (S_k measured every "
        "`spectrum.every` steps; the shares are over those steps).",
        "",
        "| process | median eta_k | eta_k S_k > 2 | min eta_k S_k | median eta_k S_k | loss evals / step | "
        "searches not accepted |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in step_size_rows(ds, processes):
        lines.append(
            f"| {row['process']} | {row['median_lr']:.4g} | {_cell(row, 'share_above_2', '.0%')} | "
            f"{_cell(row, 'min_lr_sharpness', '.4g')} | {_cell(row, 'median_lr_sharpness', '.4g')} | "
            f"{_cell(row, 'loss_evals', '.2f')} | {row.get('not_accepted', '-')} |"
        )
    lines += ["", "![Step size eta_k](step_size.png)"]

    def draw_step_sizes(ax):
        for i, p in enumerate(processes):
            eta = ds["lr"].sel(process=p).values
            ok = np.isfinite(eta)
            ax.plot(steps[ok], eta[ok], **line_style(i), label=p)

    save_figure(report_dir / "step_size.png", "step size chosen at every step", "eta_k", draw_step_sizes, logy=True)
    recorded = [n for n in ("train_accuracy", "test_accuracy") if n in ds]
    if any(np.isfinite(ds[n].sel(process=p)).any() for n in recorded for p in processes):

        def draw_accuracy(ax):
            for i, p in enumerate(processes):
                for name in recorded:
                    values = ds[name].sel(process=p).values
                    ok = np.isfinite(values)
                    faint = {"alpha": 0.45} if name == "train_accuracy" else {}
                    ax.plot(steps[ok], values[ok], **line_style(i), **faint, label=f"{p}: {name.split('_')[0]}")

        save_figure(report_dir / "accuracy.png", "accuracy (faint: train)", "accuracy", draw_accuracy)
        lines += ["![Train and test accuracy](accuracy.png)"]
    return "\n".join(lines)
