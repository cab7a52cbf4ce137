"""The progress bar of a running experiment: step, loss, sharpness S and lr * S of its reference process."""

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
        rows = chunk.get(reference, {})
        loss = rows.get("loss", np.array([np.nan]))[-1]
        sharp = rows.get("sharpness", np.array([np.nan]))
        sharp = sharp[np.isfinite(sharp)][-1] if np.isfinite(sharp).any() else float("nan")
        bar.update(task, completed=step, status=f"loss {loss:.4g}  S {sharp:.4g}  lr*S {lr * sharp:.3f}")

    return bar, update
