"""Where the points run: a ``dask.distributed`` scheduler given by address, or a local cluster of
single-threaded worker processes; the points are submitted as tasks and collected as they end."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import jax
from distributed import Client, Future, LocalCluster, Worker, as_completed

from eosflow.config import SpecError
from eosflow.store import StoreError
from eosflow.sweep.points import Point
from eosflow.sweep.progress import SweepProgress
from eosflow.sweep.task import run_point

RETRIES = 2  # re-attempts of a point whose task raised (a lost worker is handled by the scheduler)
WORKER_EXIT_SECONDS = 60.0  # how long a worker process may take to exit (see stop_workers)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_environment(threads: int, cache_dir: Path | None = None) -> dict[str, str]:
    """Environment of a worker process: ``threads`` threads for BLAS/OpenMP (and XLA's Eigen ops
    serial at one thread, unless the sweep's own ``XLA_FLAGS`` chose), no GPU preallocation,
    and a persistent JAX compilation cache of every program (JAX keeps only those that compiled for over
    1 s by default) in ``JAX_COMPILATION_CACHE_DIR`` if you set it, else the directory of ``eosflow
    --compile-cache``, else ``cache_dir``, so a restarted worker or a resumed sweep does not compile again
    (:mod:`eosflow.compile_cache`)."""
    inherited = os.environ.get("XLA_FLAGS", "")
    # XLA has no thread-count flag (a bare "intra_op_parallelism_threads=N" is read as a flag *file*
    # when it comes first, and the worker dies); at one thread its Eigen ops are kept serial. A
    # --xla_cpu_multi_thread_eigen the user set is kept: it decides float32's last digits (docs/sweep.md)
    xla = re.sub(r"(--)?intra_op_parallelism_threads=\S+", "", inherited).split()
    if threads == 1 and not any(flag.startswith("--xla_cpu_multi_thread_eigen=") for flag in xla):
        xla.append("--xla_cpu_multi_thread_eigen=false")
    count = str(threads)
    env = {
        "XLA_FLAGS": " ".join(xla),
        "OMP_NUM_THREADS": count,
        "OPENBLAS_NUM_THREADS": count,
        "MKL_NUM_THREADS": count,
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    }
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # yours is inherited; else ``eosflow --compile-cache``'s
        directory = jax.config.values["jax_compilation_cache_dir"] or cache_dir
        if directory is not None:
            env["JAX_COMPILATION_CACHE_DIR"] = str(directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # every program, not only those over 1 s (JAX's)
    return env


def local_cluster(workers: int | None = None, cache_dir: Path | None = None) -> LocalCluster:
    """A ``LocalCluster`` of single-threaded worker processes (one per core by default).

    Processes, not threads: every worker has its own JAX runtime, and a nanny restarts a
    worker that dies. ``cache_dir``: see :func:`worker_environment`.
    """
    cores = available_cores()
    workers = cores if workers is None else workers
    if workers < 1:
        raise SpecError(f"--workers = {workers} must be at least 1")
    with environment_restored():
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            env=worker_environment(max(1, cores // workers), cache_dir),
            dashboard_address=":0" if importlib.util.find_spec("bokeh") else None,
        )


@contextlib.contextmanager
def environment_restored() -> Iterator[None]:
    """``os.environ`` as it was, after the block: a dask nanny writes its workers' variables into its own
    process's environment as it starts them (``OMP_NUM_THREADS=1``, ``PYTHONHASHSEED``, ``__DASK_PARENT_PID``
    ...), which a sweep run from the user's own Python would otherwise leave behind."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for name in set(os.environ) - set(before):
            del os.environ[name]
        os.environ.update(before)


@contextlib.contextmanager
def connect(scheduler: str | None, workers: int | None, cache_dir: Path) -> Iterator[Client]:
    """A client of the scheduler at ``scheduler``, or of a local cluster started (and stopped) here.

    After an interruption (Ctrl-C) the local workers are busy with points: the cluster kills them
    after dask's 4 s instead of waiting for :func:`stop_workers` (their points resume later).
    """
    if scheduler:
        try:
            client = Client(scheduler)
        except OSError as error:  # distributed's timeout to connect is an OSError
            raise StoreError(f"cannot reach the dask scheduler at {scheduler}: {error}") from None
        with client:
            yield client
        return
    with environment_restored(), local_cluster(workers, cache_dir) as cluster:  # (restarted workers write it too)
        with Client(cluster) as client:
            yield client
            client.run(_stop_heartbeat)
        stop_workers(cluster)


def _stop_heartbeat(dask_worker: Worker) -> None:
    """Run on each worker before it is closed: a heartbeat still in flight when a worker closes
    its connections fails with a logged traceback (dask stops the heartbeat only as it closes)."""
    dask_worker.periodic_callbacks["heartbeat"].stop()


def stop_workers(cluster: LocalCluster, timeout: float = WORKER_EXIT_SECONDS) -> None:
    """Close every worker process of ``cluster``, waiting up to ``timeout`` s for each to exit.

    A worker that has imported JAX takes seconds to tear its interpreter down (2.5 s on a quiet
    2-core machine, more under load); ``LocalCluster.close`` waits 4 s, then kills it with the
    warning "Worker process still alive after 4.0 seconds, killing".
    """

    async def close_all() -> None:
        await asyncio.gather(*(worker.close(timeout=timeout) for worker in list(cluster.workers.values())))

    cluster.sync(close_all)


def run_points(
    todo: list[Point], out: Path, scheduler: str | None, workers: int | None, display: SweepProgress
) -> dict[str, dict]:
    """Run every point of ``todo`` into ``out/points``; returns ``{point: run_point's result}``
    (``status`` "failed" with the error if a task raised on every attempt)."""
    out = out.absolute()  # the path every worker writes to (remote workers have their own cwd)
    tag = uuid.uuid4().hex[:8]
    topic = f"eosflow-sweep-{tag}"
    with connect(scheduler, workers, out / "jax-cache") as client:
        client.subscribe_topic(topic, lambda event: display.step(event[1]["point"], event[1]["step"]))
        futures = {
            client.submit(
                run_point,
                p.table,
                str(out / "points" / p.name),
                p.resolved,
                str(out / "locks" / f"{p.name}.lock"),
                topic,
                key=f"eosflow-point-{tag}-{p.name}",
                retries=RETRIES,
                pure=False,
            ): p.name
            for p in todo
        }
        try:
            results = _collect(futures, display)
        except KeyboardInterrupt:
            client.cancel(list(futures))
            raise
        finally:
            client.unsubscribe_topic(topic)
            futures.clear()  # release the results on the workers: none is lost when they stop
    return results


def _collect(futures: dict[Future, str], display: SweepProgress) -> dict[str, dict]:
    """Each point's result as its task ends (no reference to a future is left when this returns)."""
    results: dict[str, dict] = {}
    for future in as_completed(futures):
        name = futures[future]
        if future.status == "finished":
            results[name] = future.result()
        else:  # raised on every attempt, or a worker died on it too often (KilledWorker)
            error = future.exception() if future.status == "error" else f"task {future.status}"
            reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            results[name] = {"status": "failed", "ran": True, "reason": reason}
        display.done(name, results[name]["status"])
    return results
