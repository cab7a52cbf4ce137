"""SIGINT and SIGTERM during a run: stop at the next chunk boundary, flushed, with a conventional exit status."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``exit_code`` is the shell's convention, 128 + the signal number."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


_pending: list[int] = []  # a stop asked for before a run began (record_stop), which the next run honours


def record_stop(signum: int, frame=None) -> None:
    """A signal handler for a process that runs experiments one after another (a leaderboard worker): a stop
    asked for while no run was going on (setting one up) makes the next run stop before its first chunk
    (its summary says so), instead of being lost."""
    _pending.append(signum)


@contextlib.contextmanager
def stop_requests() -> Iterator[dict[str, int | None]]:
    """While running, SIGINT and SIGTERM ask the run to stop at the next chunk boundary.

    The handler only records the signal (``request["signum"]``): raising inside a JAX computation
    can leave XLA's runtime half-torn-down, and the interpreter then crashed at exit (exit 139).
    A second signal stops at once. Installed only on the main thread (elsewhere, e.g. in a Dask
    worker thread, signals are the host's business) and not over a signal the caller ignores.
    A stop :func:`record_stop` recorded before the run began is the run's request from its start.
    """
    request: dict[str, int | None] = {"signum": _pending.pop() if _pending else None}
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request["signum"] is not None:
            raise Interrupted(signum)
        request["signum"] = signum
        print(
            f"eosflow: {signal.Signals(signum).name}: stopping after the chunk in progress is flushed "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield request
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
