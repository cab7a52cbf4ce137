"""The sweep's figure: final lr*S and the distance to the reference against the swept value."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from eosflow.compare import LINE_STYLES, log_scale_where_positive
from eosflow.store import atomic_write
from eosflow.sweep.aggregate import TAIL

MARKERS = ("o", "s", "^", "D", "v", "x")  # one per combination of the other grid values, up to max_lines


def summary_figure(frame: pd.DataFrame, keys: list[str], path: Path, max_lines: int = 6) -> Path:
    """Write :func:`draw_summary` of the aggregate ``frame`` to ``path`` (PNG)."""
    fig = draw_summary(frame, keys, max_lines)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def draw_summary(frame: pd.DataFrame, keys: list[str], max_lines: int = 6) -> Figure:
    """Final lr*S, and time-averaged distance to the reference per model, against the swept value.

    The x axis is ``lr`` if it is swept, else the first grid key; every other combination of grid
    values is a line (their median over points if there are more than ``max_lines``). The distance
    panel is drawn only when a process other than the reference ran. Each process has one colour in
    every panel, each combination of other grid values one dash and marker.
    """
    x_key = "lr" if "lr" in keys else keys[0]
    others = [key for key in keys if key != x_key]
    frame = frame[frame.process != ""].copy()
    numeric = pd.api.types.is_numeric_dtype(frame[x_key]) and not pd.api.types.is_bool_dtype(frame[x_key])
    ticks = list(dict.fromkeys(frame[x_key].astype(str)))
    if not numeric:
        frame[x_key] = frame[x_key].astype(str).map(ticks.index)
    combos = list(dict.fromkeys(frame[others].itertuples(index=False, name=None)))
    pool = not others or len(combos) > max_lines
    processes = list(dict.fromkeys(frame.process))
    panels = [("tail_lr_sharpness", frame, f"lr * S, mean of the last {TAIL:.0%} of measurements")]
    models = frame[~frame.reference.astype(bool)]
    if np.isfinite(models["mean_distance"].to_numpy(float)).any():
        panels.append(("mean_distance", models, "time-averaged distance to the reference"))
    fig = Figure(figsize=(5.5 * len(panels), 4))  # no pyplot: the caller's backend and figures are untouched
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (number, data, label) in zip(axes[0], panels):
        groups = ["process"] + ([] if pool else others)
        for group, part in data.groupby(groups, sort=False):
            curve = part.groupby(x_key)[number].median().sort_index()
            if np.isfinite(curve.values).any():
                group = group if isinstance(group, tuple) else (group,)
                name = ", ".join(f"{k}={v}" for k, v in zip(groups, group) if k != "process")
                dash = 0 if pool else combos.index(group[1:])
                ax.plot(
                    curve.index,
                    curve.values,
                    color=f"C{processes.index(group[0]) % 10}",
                    ls=LINE_STYLES[dash % len(LINE_STYLES)],
                    marker=MARKERS[dash % len(MARKERS)],
                    label=f"{group[0]} {name}".strip(),
                )
        ax.set_xlabel(x_key)
        ax.set_ylabel(label + (" (median over other grid values)" if others and pool else ""))
        if not numeric:
            ax.set_xticks(range(len(ticks)), ticks)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0][0].axhline(2.0, color="gray", ls="--", lw=1)
    if len(panels) > 1:
        log_scale_where_positive(axes[0][1])
    fig.tight_layout()
    return fig
