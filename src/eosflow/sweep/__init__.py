"""Sweeps: the product of grids over spec values, run on a ``dask.distributed`` cluster.

    eosflow sweep SPEC.toml --grid lr=0.05,0.1 --grid seed=0,1 [--scheduler ADDRESS] [--out DIR]

    sweep_dir/
      sweep.json                the base spec, the grids, every point and how the last run went
      points/<key=value,...>/   one ordinary run directory per grid point (``eosflow.load`` it)
      locks/<point>.lock        one lock per point: two attempts at a point never run together
      jax-cache/                the local workers' persistent compilation cache
      sweep.parquet             one row per (point, process): grid values and summary numbers
      sweep.png                 final lr*S and the distance to the reference against the swept value
      sweep.md                  the grid, how every point ended, and the table's numbers

Every point is run by :func:`eosflow.experiment.run` with ``resume=True``, so a point that
finished (``completed`` or ``diverged``) is skipped, an unfinished one resumes from its last
checkpoint, and a task lost with a dying worker is rescheduled by the scheduler and resumes
where the dead worker's last checkpoint left it. :func:`load_sweep` reads the aggregate as an
``xarray.Dataset`` over the grid dimensions and ``process``.

One module per job: :mod:`~eosflow.sweep.grid` (``--grid`` texts), :mod:`~eosflow.sweep.points`
(the resolved points and their run directories' state), :mod:`~eosflow.sweep.task` (one point on a
worker, under its lock), :mod:`~eosflow.sweep.cluster` (the dask cluster and the task loop),
:mod:`~eosflow.sweep.progress`, :mod:`~eosflow.sweep.aggregate` (parquet / xarray),
:mod:`~eosflow.sweep.figure`, :mod:`~eosflow.sweep.summary` (Markdown), :mod:`~eosflow.sweep.run`.
"""

from eosflow.spec import resolve
from eosflow.sweep.aggregate import aggregate, load_sweep, point_rows
from eosflow.sweep.cluster import available_cores, local_cluster, worker_environment
from eosflow.sweep.figure import summary_figure
from eosflow.sweep.grid import parse_grid
from eosflow.sweep.points import FINISHED, Point, grid_points, point_state
from eosflow.sweep.run import SweepError, run_sweep
from eosflow.sweep.summary import markdown_summary
from eosflow.sweep.task import run_point

__all__ = [
    "FINISHED",
    "Point",
    "SweepError",
    "aggregate",
    "available_cores",
    "grid_points",
    "load_sweep",
    "local_cluster",
    "markdown_summary",
    "parse_grid",
    "point_rows",
    "point_state",
    "run_point",
    "run_sweep",
    "summary_figure",
    "worker_environment",
]


def _resolved_text(table: dict) -> str:
    """The resolved TOML text of a spec table (:func:`eosflow.spec.resolve`; the name older callers use)."""
    return resolve(table).text
