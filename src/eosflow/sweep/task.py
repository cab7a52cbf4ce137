"""One point on a worker: run or resume it under the point's lock, idempotently.

A second attempt at a point (a retry racing a lost-but-alive worker) waits for the lock, then
finds the point finished and does nothing, or resumes from the checkpoint the first one left.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
from pathlib import Path

from distributed import get_worker

from eosflow.config import SpecError
from eosflow.experiment import Progress, run
from eosflow.store import StoreError
from eosflow.sweep.points import FINISHED, point_state


def run_point(table: dict, run_dir: str, resolved: str, lock: str, events: str | None = None) -> dict:
    """Run or resume one point (the task a worker executes); idempotent and safe to race.

    Attempts at one point take its lock in turn; each looks at the run directory first and does
    nothing if the point is finished. Spec errors are returned (retrying cannot fix them);
    anything else raises, and the scheduler retries the task. With ``events`` (a dask event
    topic), the steps done are published after every chunk as ``{"point": name, "step": step}``.
    """
    path = Path(run_dir)
    with exclusive_lock(Path(lock)):
        state = point_state(path, resolved)
        if state in FINISHED:
            return {"status": state, "ran": False}
        if state == "mismatch":
            return {
                "status": "failed",
                "ran": False,
                "reason": f"{run_dir!r} holds a run of another spec (compare spec.resolved.toml)",
            }
        try:
            outcome = run(
                table, path, resume=state != "new", overwrite=state == "new", progress=_publisher(events, path.name)
            )
        except (SpecError, StoreError) as error:
            return {"status": "failed", "ran": True, "reason": str(error)}
    return {"status": outcome.status, "ran": True, "reason": outcome.reason}


def _publisher(topic: str | None, point: str) -> Progress | None:
    """``progress(step, chunk)`` that logs the step as a dask event (None off a dask worker)."""
    if topic is None:
        return None
    try:
        worker = get_worker()
    except ValueError:  # called directly, not as a task: nobody listens
        return None
    return lambda step, chunk: worker.log_event(topic, {"point": point, "step": step})


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """An exclusive ``flock`` on ``path`` (released by the kernel if the holder dies).

    File systems without locks (some network mounts) fall back to no lock: the scheduler still
    runs one attempt of a task at a time, the lock only guards against lost-but-alive workers.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        yield
