"""The sweep's Markdown page, ``sweep.md``: the grid, how the points ended, and one row per
(point, process) with the numbers of ``sweep.parquet`` (a process dropped before the end marked, with its
reason)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from eosflow.compare import format_number
from eosflow.store import atomic_write
from eosflow.sweep.grid import literal

NUMBERS = (
    ("final_loss", "final loss"),
    ("final_lr_sharpness", "final lr*S"),
    ("mean_distance", "mean distance"),
    ("final_distance", "final distance"),
)


def markdown_summary(frame: pd.DataFrame, meta: dict, path: Path, figure: str = "sweep.png") -> Path:
    """Write the page for the aggregate ``frame`` and the sweep's ``meta`` (sweep.json) to ``path``."""
    points = frame.drop_duplicates("point")
    counts = points.status.value_counts()
    last = meta.get("last_run", {})
    lines = [f"# Sweep: {meta['spec'].get('name', 'run')}", ""]
    lines += [f"- `{key}` = {', '.join(literal(v) for v in values)}" for key, values in meta["grid"]]
    lines += [
        "",
        f"{len(points)} points: "
        + ", ".join(f"{n} {status}" for status, n in counts.items())
        + (f" (last run: {last['ran']} ran, {last['skipped']} skipped)" if last else ""),
        "",
    ]
    lines += [
        "| point | status | steps done | process | " + " | ".join(title for _, title in NUMBERS) + " |",
        "|---" * (4 + len(NUMBERS)) + "|",
    ]
    dropped = frame["dropped"].fillna("").astype(str) if "dropped" in frame else pd.Series("", index=frame.index)
    for index, row in frame.iterrows():
        cells = [format_number(float(row[number])) for number, _ in NUMBERS]
        process = row.process + (" (reference)" if row.reference else "") if row.process else "-"
        process += " (dropped: its last values)" if dropped[index] else ""
        lines.append(f"| {row.point} | {row.status} | {int(row.steps_done)} | {process} | " + " | ".join(cells) + " |")
    problems = points[points.reason.astype(str) != ""]
    if len(problems):
        lines += ["", "## Points that did not complete", ""]
        lines += [f"- {row.point}: {row.status}, {row.reason}" for _, row in problems.iterrows()]
    if (dropped != "").any():
        lines += ["", "## Processes dropped before the end", ""]
        lines += [
            f"- {row.point}, {row.process}: {dropped[index]}" for index, row in frame.iterrows() if dropped[index]
        ]
    lines += ["", f"![final lr*S and distance to the reference]({figure})", ""]
    text = "\n".join(lines)
    atomic_write(path, lambda f: f.write(text.encode()))
    return path
