"""What a sweep shows while it runs: one bar over the points (with counts by status) and one bar
per running point over its steps, fed by the workers' per-chunk events."""

from __future__ import annotations

import threading
from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class SweepProgress:
    """``step(point, step)`` after each chunk of a point, ``done(point, status)`` when it ends.

    Silent unless ``enabled``; the counts are kept either way (``counts``: status -> points).
    """

    def __init__(self, steps: dict[str, int], total: int, skipped: int, enabled: bool = True):
        self.steps = steps  # point -> its spec's steps
        self.counts: dict[str, int] = {"skipped": skipped} if skipped else {}
        self.latest: dict[str, int] = {}  # point -> last step reported
        self._lock = threading.Lock()  # steps arrive on the client's event-loop thread
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            disable=not enabled,
        )
        self._sweep = self._bar.add_task("sweep", total=total, completed=skipped, status=self._status())
        self._points: dict[str, TaskID] = {}

    def __enter__(self) -> SweepProgress:
        self._bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._bar.stop()

    def step(self, point: str, step: int) -> None:
        with self._lock:
            if point not in self.steps:
                return
            self.latest[point] = step
            if point not in self._points:
                self._points[point] = self._bar.add_task(f"  {point}", total=self.steps[point], status="")
            self._bar.update(self._points[point], completed=step)

    def done(self, point: str, status: str) -> None:
        with self._lock:
            self.counts[status] = self.counts.get(status, 0) + 1
            if point in self._points:
                self._bar.remove_task(self._points.pop(point))
            self._bar.update(self._sweep, advance=1, status=f"{self._status()}  last: {point}")

    def _status(self) -> str:
        return ", ".join(f"{n} {status}" for status, n in self.counts.items())
