"""The progress bar of a running experiment: step, loss, sharpness S and lr * S of its reference process (and its
edge ratio, for an optimizer whose edge is not lr S = 2)."""

from __future__ import annotations

import numpy as np


def training_bar(total: int, reference: str, lr: float, label: str | None = None):
    """A rich bar and its ``update(step, chunk)`` callback for ``experiment.run(progress=...)``.

    ``chunk`` maps each process to its recorded columns; the bar shows the reference's last loss and
    last measured sharpness. ``label`` names the bar (default: the reference process).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    class Bar(Progress):
        def __exit__(self, kind, error, trace):
            """A run that fails before its first chunk (a bad [problem] value) leaves no bar at 0 behind its
            error (docs/reliability.md: one paragraph)."""
            if kind is not None and not any(t.completed for t in self.tasks):
                self.live.transient = True
                self.live.stop()  # without Progress.stop's blank line on a console that is not a terminal
                return None
            return super().__exit__(kind, error, trace)

    bar = Bar(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        transient=False,
    )
    task = bar.add_task(label or reference, total=total, status="")

    def update(step, chunk):
        bar.update(task, completed=step, status=status_line(chunk.get(reference, {}), lr))

    return bar, update


def status_line(rows: dict, lr: float) -> str:
    """The reference's last loss, last measured S and lr * S as it recorded it (eta_k S_k for a step size searched
    at every step; lr S if it recorded none), and its edge ratio S_P / threshold where that is not lr S / 2
    (Adam, RMSProp, momentum: their own sharpness is the preconditioned one)."""

    def last(name: str) -> float:
        values = np.asarray(rows.get(name, [np.nan]), dtype=np.float64)
        finite = values[np.isfinite(values)]
        return float(finite[-1]) if finite.size else float("nan")

    loss, sharp = last("loss"), last("sharpness")
    lr_sharp = last("lr_sharpness") if "lr_sharpness" in rows else lr * sharp
    line = f"loss {loss:.4g}  S {sharp:.4g}  lr*S {lr_sharp:.3f}"
    ratio = last("edge_ratio")
    if np.isfinite(ratio) and not np.isclose(ratio, 0.5 * lr_sharp, rtol=1e-6):
        line += f"  edge ratio {ratio:.3f}"
    return line
