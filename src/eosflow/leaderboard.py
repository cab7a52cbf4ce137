"""The flow leaderboard: every model of GD on a built-in suite of problems, in one table.

    eosflow leaderboard [--quick] [--suite gd|adaptive|all] [--out DIR] [--problems A,B] [--models M,N]

    out/
      runs/<problem>/            one ordinary run directory per problem: gd, gradient_flow and every
                                 model in lockstep from the same w0 (``eosflow.load`` it)
      runs/<problem>-<model>/    only when the shared run raised: that model alone with gd and
                                 gradient_flow, so one broken model does not sink the others
      leaderboard.csv            one row per (problem, process): the columns of ``eosflow.compare``
      leaderboard.md             the same as a Markdown table, with the machine and the command

The models are every registered continuous-time process (``PROCESSES`` entries that are not
discrete) except the models registered for another optimizer (the Langevin model of SGD, the flows
of the adaptive optimizers); a model registered for some problems only (the mean-field particle model)
runs on those. The ``adaptive`` suite (``ADAPTIVE_SUITE``) does the same for RMSProp and Adam: the
optimizer is the reference, its stable flow the yardstick, and every model of it runs beside them.
``--problems`` and ``--models`` rerun some rows only (the reference and its baseline always run:
the baseline is the distance's yardstick).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import platform
import signal
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import pandas as pd

from eosflow.anchored import NUDGED, ONSET, anchored, floor_from_w0
from eosflow.compare import ACCURACY, AVERAGING_WINDOW, compare_dataset, compare_run, format_number
from eosflow.compile_cache import cache_settings, take_cache_settings
from eosflow.config import SpecError
from eosflow.experiment import run
from eosflow.load import load, rows_dataset
from eosflow.optim.adaptive import OPTIMIZERS
from eosflow.process import PROCESSES
from eosflow.progress import training_bar
from eosflow.signals import Interrupted, record_stop

if TYPE_CHECKING:
    import xarray as xr

REFERENCE, BASELINE = "gd", "gradient_flow"
# processes whose steps never read the eigenpairs they measure (their iterates are the same with
# `spectrum.every = 0`, tests/test_leaderboard.py): their own cost leaves the eigensolver out
MEASURE_ONLY = ("gd", "rod_flow", "edge_flow", *OPTIMIZERS)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One problem of the suite: a spec table without ``processes``; ``quick_steps`` None: not in --quick."""

    name: str
    table: dict
    quick_steps: int | None = None
    optimizer: str = "gd"  # the reference; its hyperparameters are in table[optimizer]


def _entry(
    name: str,
    steps: int,
    lr: float,
    problem: dict,
    dtype: str = "float64",
    k_max: int = 2,
    k: int = 1,
    grow_every: int = 0,
    quick_steps: int | None = None,
    optimizer: str = "gd",
    hyperparameters: dict | None = None,
    spectra: dict[str, dict] | None = None,
) -> Entry:
    table: dict[str, Any] = {
        "name": name,
        "seed": 0,
        "steps": steps,
        "lr": lr,
        "dtype": dtype,
        "problem": problem,
        "spectrum": {"k": k, "k_max": k_max} | ({"grow_every": grow_every} if grow_every else {}),
        "record": {"chunk": 100},
    }
    if hyperparameters is not None:
        table[optimizer] = hyperparameters
    for process, keys in (spectra or {}).items():  # a model's own tracker: [process.spectrum]
        table[process] = {**table.get(process, {}), "spectrum": keys}  # beside the optimizer's hyperparameters
    return Entry(name, table, quick_steps, optimizer)


SUITE: tuple[Entry, ...] = (
    # 1-D (in n-D the potential is radial and the Hessian at the orbit's centre isotropic, so a
    # model's direction there is arbitrary): period-2 orbit +-a with a^2 = (S - 2/lr)/Q, lr S = 2.4
    _entry(
        "quartic", 400, 0.08, {"name": "quartic", "sharpness": 30.0, "quartic": 1.0, "dim": 1}, k_max=1, quick_steps=200
    ),
    # self-stabilization in an exponentially sharpening valley (EoS from step ~530 at lr = 0.1)
    _entry("sharp_valley", 1500, 0.1, {"name": "sharp_valley"}, quick_steps=700),
    # a valley whose sharpness s(x) = S(1 + x^2) is pulled past 2/lr by a quadratic drift to x = 2
    _entry(
        "sharp_valley_quadratic",
        1000,
        0.1,
        {"name": "sharp_valley", "profile": "quadratic", "drift": "quadratic", "target": 2.0},
    ),
    # deep factorization d = 2, L = 3: the flattest minima have S = 29.1 > 2/lr = 26 (period-2 GD)
    _entry(
        "matrix_factorization",
        1500,
        0.077,
        {"name": "matrix_factorization", "dim": 2, "depth": 3, "rank": 1, "target_scale": 5.5},
        k_max=3,
    ),
    # tanh MLP on 300 digits: progressive sharpening to 2/lr = 5, then EoS
    _entry(
        "mlp_digits",
        500,
        0.4,
        {"name": "mlp", "dataset": "digits", "n_train": 300, "n_test": 0, "width": 32, "depth": 2},
        dtype="float32",
        k_max=3,
    ),
    # small CNN on 100 digits (conv 8-16, 2x2 average pooling): lr S first reaches 1.9 at step 84.
    # Convolutions' HVPs are slow on a CPU: 200 digits and 400 steps took 16 of the suite's 20 minutes
    _entry(
        "cnn_digits",
        300,
        0.4,
        {"name": "cnn", "dataset": "digits", "n_train": 100, "n_test": 0},
        dtype="float32",
        k_max=3,
    ),
    # mean-field two-layer network (1/N readout) memorizing 512 pure-noise targets: lr = N eta with
    # eta = 4, at the edge of stability throughout (docs/meanfield.md). Its critical set outgrows 3
    # tracked pairs from the start, so the models that read the eigenvectors track 6, grown every 10
    # steps; GD and the models that read at most the top eigenvalue keep 3 (docs/leaderboard.md)
    _entry(
        "two_layer_meanfield",
        500,
        512.0,
        {"name": "two_layer_meanfield", "width": 128, "n_train": 512, "dataset": "gaussian", "input_dim": 8},
        dtype="float32",
        k_max=3,
        spectra={name: {"k_max": 6, "grow_every": 10} for name in ("central_flow", "projected_flow", "free_energy")},
    ),
)

DIGITS = {"name": "mlp", "dataset": "digits", "n_train": 300, "n_test": 0, "width": 32, "depth": 2}
FACTORIZATION = {"name": "matrix_factorization", "dim": 2, "depth": 3, "rank": 1, "target_scale": 5.5}
ADAPTIVE_SUITE: tuple[Entry, ...] = (
    # tanh MLP on 300 digits: RMSProp's preconditioned sharpness rises to 2/lr by step ~80 and hovers there.
    # Its central flow tracks up to 6 pairs, grown every 10 steps: with 3 its critical set was not shown
    # complete on 89% of its steps, and its eigensolver cost 4x more (docs/adaptive.md section 4)
    _entry(
        "mlp_digits-rmsprop",
        300,
        0.004,
        DIGITS,
        dtype="float32",
        k_max=3,
        optimizer="rmsprop",
        hyperparameters={"beta2": 0.99, "eps": 0.003, "bias_correction": True},
        spectra={"rmsprop_central_flow": {"k_max": 6, "grow_every": 10}},
    ),
    # the same network under Adam: preconditioned sharpness at 38/lr from step ~120 (benchmarks/adaptive_thresholds.py)
    _entry(
        "mlp_digits-adam",
        400,
        0.01,
        DIGITS,
        dtype="float32",
        k_max=3,
        optimizer="adam",
        hyperparameters={"beta1": 0.9, "beta2": 0.99, "eps": 1e-4},
    ),
    # the same network under Adam inside its models' regime: lr lambda_P = 0.79 at w0 (0.13 of the edge
    # (2 + 2 b1)/((1 - b1) lr) = 6/lr at b1 = 0.5), at the edge from step 267 on (docs/adaptive.md section 6)
    _entry(
        "mlp_digits-adam-eps",
        1000,
        0.003,
        DIGITS,
        dtype="float32",
        k_max=3,
        optimizer="adam",
        hyperparameters={"beta1": 0.5, "beta2": 0.99, "eps": 3e-3},
    ),
    # deep matrix factorization (the GD suite's): RMSProp reaches 2/lr at step ~400 and hovers within 8%
    _entry(
        "matrix_factorization-rmsprop",
        800,
        0.01,
        FACTORIZATION,
        k_max=3,
        optimizer="rmsprop",
        hyperparameters={"beta2": 0.99, "eps": 1e-3, "bias_correction": True},
    ),
    # the same under Adam: its preconditioned sharpness reaches 38/lr at step 770 as nu decays in the valley
    # (1600 steps: half the run past the onset; docs/adaptive.md section 6)
    _entry(
        "matrix_factorization-adam",
        1600,
        0.03,
        FACTORIZATION,
        k_max=3,
        optimizer="adam",
        hyperparameters={"beta1": 0.9, "beta2": 0.99, "eps": 1e-4},
    ),
)


# ---- the architectures suite (`--suite architectures`, docs/leaderboard.md "Architectures") -------
ARCHITECTURES: tuple[Entry, ...] = (
    # pre-activation ResNet (stages 8-16, LayerNorm-style GroupNorm(1), ReLU) on 16 digits (on 32: lr S =
    # 0.73 at w0, at the edge from step 41, 178 of 300 GD steps with lr S in [1.8, 2.2],
    # benchmarks/architectures.py); every entry is shortened and sized for the 20-minute budget
    _entry(
        "resnet_digits",
        150,
        0.02,
        {"name": "resnet", "dataset": "digits", "n_train": 16, "n_test": 0},
        dtype="float32",
        k=2,
        k_max=2,
    ),
    # transformer encoder (D = 16, 2 blocks, 2 heads, GELU) sorting 5 tokens of 6 values, 64 sequences:
    # lr S = 2.46 at w0, at the edge throughout (at lr = 0.035 and 128 sequences the sharpness only falls)
    _entry(
        "transformer_sorting",
        200,
        0.06,
        {"name": "transformer", "task": "sorting", "n_train": 64},
        dtype="float32",
        k=2,
        k_max=2,
    ),
    # one-layer LSTM (hidden 32) copying 5 tokens of 6 values after 5 recall tokens, 64 sequences:
    # lr S = 1.44 at w0, at the edge from step 111
    _entry("lstm_copying", 200, 0.1, {"name": "lstm", "task": "copying", "n_train": 64}, dtype="float32", k=2, k_max=2),
    # tanh MLP width 32, depth 2, on 128 moons: lr S = 1.5 at w0, at the edge from step ~60
    _entry(
        "mlp_moons",
        400,
        0.4,
        {"name": "mlp", "dataset": "moons", "classes": 2, "n_train": 128, "n_test": 0, "width": 32, "depth": 2},
        dtype="float32",
        k=2,
        k_max=2,
    ),
)
# (every entry tracks its k_max = 2 eigenpairs from the start: a process compiles its step once per k,
# and compiling, not stepping, was most of this suite's time)
SUITES: dict[str, tuple[Entry, ...]] = {
    "default": SUITE,
    "architectures": ARCHITECTURES,
    "adaptive": ADAPTIVE_SUITE,
    "all": SUITE + ADAPTIVE_SUITE + ARCHITECTURES,
}


def suite_entries(name: str) -> tuple[Entry, ...]:
    """The entries of the suite ``name`` (default, architectures, adaptive or all), or a SpecError listing them."""
    if name not in SUITES:
        raise SpecError(f"unknown leaderboard suite {name!r}; choose one of {', '.join(SUITES)}")
    return SUITES[name]


def gd_models() -> list[str]:
    """Every registered model of GD: the non-discrete processes but other optimizers' models."""
    from eosflow.process import PROCESSES

    return [
        name for name, entry in PROCESSES.items() if not entry.discrete and entry.optimizer is None and name != BASELINE
    ]


def baseline_of(optimizer: str) -> str:
    """The yardstick of an entry's optimizer (GD and every optimizer of the suites have one)."""
    from eosflow.compare import baseline_of as yardstick

    found = yardstick(optimizer)
    assert found is not None, optimizer
    return found


def models_of(optimizer: str) -> list[str]:
    """Every registered model of ``optimizer`` but its baseline (GD: :func:`gd_models`)."""
    from eosflow.process import PROCESSES

    if optimizer == REFERENCE:
        return gd_models()
    return [
        name for name, entry in PROCESSES.items() if entry.optimizer == optimizer and name != baseline_of(optimizer)
    ]


def applicable(models: list[str], problem: str) -> list[str]:
    """The models that model ``problem`` (some, like the mean-field particle model, model one problem)."""
    return [name for name in models if PROCESSES[name].models(problem)]


def suite_tables(
    quick: bool = False, models: list[str] | None = None, suite: tuple[Entry, ...] = SUITE
) -> dict[str, dict]:
    """The spec table of every problem of the (quick) suite: the optimizer (gd), its baseline
    (gradient_flow) and the models (by default every model of the entry's optimizer; with ``models``,
    those of them that model it, and an entry none of them models is left out)."""
    tables = {}
    for entry in suite:
        if quick and entry.quick_steps is None:
            continue
        table = copy.deepcopy(entry.table)
        chosen = models_of(entry.optimizer)
        if models is not None:
            chosen = [name for name in models if name in chosen]
        chosen = applicable(chosen, table["problem"]["name"])
        if models is not None and not chosen:  # none of the requested models models this entry
            continue
        table = with_processes(table, [entry.optimizer, baseline_of(entry.optimizer), *chosen])
        if quick and entry.quick_steps is not None:  # (quick entries without quick_steps were skipped)
            table["steps"] = entry.quick_steps
            table["record"]["chunk"] = max(1, entry.quick_steps // 4)
        tables[entry.name] = table
    return tables


def with_processes(table: dict, processes: list[str]) -> dict:
    """``table`` running ``processes``, without the option tables of the processes it no longer runs (a spec
    refuses a table for a process it does not list)."""
    kept = {key: value for key, value in table.items() if key not in PROCESSES or key in processes}
    return {**kept, "processes": list(processes)}


def _runner(progress: bool):
    """``run_one(label, table, out)``: the experiment (overwriting ``out``), with a progress bar or none."""
    if not progress:
        return lambda label, table, out: run(table, out, overwrite=True)

    def run_one(label, table, out):
        bar, update = training_bar(table["steps"], table["processes"][0], table["lr"], label=label)
        with bar:
            return run(table, out, overwrite=True, progress=update)

    return run_one


def run_suite(
    tables: dict[str, dict],
    out: Path,
    progress: bool = True,
    onset: bool = True,
    names: dict[str, str] | None = None,
    finished: dict[str, pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """Run every table into ``out/runs/<name>`` (``names[problem]``, by default the problem) and gather the
    comparison rows (problem, process, metrics); with ``onset``, also the metrics of the models started at the
    optimizer's edge onset (:func:`from_onset`), and the floor of the from-w0 columns on the optimizer's own
    row (:func:`floor_columns`). Each entry's rows go into ``finished[problem]`` as soon as they are known,
    so that an interrupted suite keeps those of the entries it finished."""
    out = Path(out)
    run_one = _runner(progress)
    finished = {} if finished is None else finished
    for problem, table in tables.items():
        run_dir = out / "runs" / (names or {}).get(problem, problem)
        try:
            run_one(problem, table, run_dir)
            rows = _rows(problem, compare_run(run_dir))
            if onset:
                if floor := floor_columns(table, run_dir):
                    rows.loc[rows["process"] == table["processes"][0], list(floor)] = list(floor.values())
                rows = rows.merge(from_onset(table), on="process", how="left")
            finished[problem] = rows
        except Exception as shared_error:  # one broken model must not sink the suite
            finished[problem] = _separately(problem, table, out, run_one, shared_error)
    return pd.concat([finished[problem] for problem in tables], ignore_index=True)


def floor_columns(table: dict, run_dir: Path) -> dict[str, float]:
    """The floor of the from-w0 columns (:data:`FLOOR_COLUMNS`): the metrics of the optimizer restarted from
    w0 moved by its rounding (:func:`eosflow.anchored.floor_from_w0`) against the run's optimizer, relative
    distances over the run's own yardstick; empty when the optimizer has none (said in a warning)."""
    try:
        copy = floor_from_w0(table)
    except SpecError as error:
        warnings.warn(f"{table.get('name', '')}: no floor from w0: {error}", stacklevel=2)
        return {}
    run_ds = load(run_dir)
    optimizer = table["processes"][0]
    kept = [optimizer, baseline_of(optimizer)]
    per_process = {
        **{p: _rows_of(run_ds, p) for p in kept if p in run_ds["process"].values},
        optimizer + NUDGED: _rows_of(copy, optimizer + NUDGED),
    }
    attrs = {**run_ds.attrs, "dropped_processes": copy.attrs["dropped_processes"]}
    ds = rows_dataset(per_process, run_ds["step"].values, attrs)
    metrics = compare_dataset(ds).loc[optimizer + NUDGED]
    if metrics["status"] != "ok":  # the copy diverged: its metrics would cover its short life only
        return dict.fromkeys(FLOOR_COLUMNS, float("nan"))
    return {column: float(metrics[column]) for column in FLOOR_COLUMNS}


def _rows_of(ds: xr.Dataset, process: str) -> dict[str, np.ndarray]:
    """One process's rows of a Dataset of :func:`eosflow.load` (the steps where it has a loss)."""
    one = ds.sel(process=process)
    where = np.isfinite(one["loss"].values)
    rows = {str(key): np.asarray(value.values)[where] for key, value in one.data_vars.items() if "step" in value.dims}
    return {**rows, "step": ds["step"].values[where]}


def from_onset(table: dict) -> pd.DataFrame:
    """The models of the optimizer started on its state at its edge onset
    (:func:`eosflow.anchored.anchored`): ``onset`` and the ``FROM_ONSET`` metrics over the steps after it,
    per process; only ``process`` when the optimizer never reached its edge (said in a warning)."""
    try:
        ds = anchored(table, "onset")
    except SpecError as error:
        warnings.warn(f"{table.get('name', '')}: no columns from the onset: {error}", stacklevel=2)
        return pd.DataFrame({"process": table["processes"]})
    metrics = [column.removesuffix(SUFFIX) for column, _ in FROM_ONSET[1:]]
    table_from_onset = compare_dataset(ds)
    # a model that diverged after the onset has no metrics from it (they would cover its short life only)
    table_from_onset.loc[table_from_onset["status"] != "ok", metrics] = float("nan")
    # the optimizer's own row holds its nudged copy's metrics: the floor of every column from the onset
    optimizer = table["processes"][0]
    table_from_onset = table_from_onset.drop(index=optimizer).rename(index={optimizer + NUDGED: optimizer})
    table_from_onset = table_from_onset.reindex(table["processes"])
    compared = table_from_onset[metrics].rename(columns=lambda c: c + SUFFIX).reset_index()
    compared.insert(1, "onset", int(ds.attrs["anchored_at"]))
    return compared


def _rows(problem: str, table: pd.DataFrame) -> pd.DataFrame:
    table = table.reset_index()
    table.insert(0, "problem", problem)
    table["own_equivalents"] = [
        own_cost(row.process, row.gradient_equivalents, row.measurement_equivalents) for row in table.itertuples()
    ]
    return table


def own_cost(process: str, total: float, measurement: float) -> float:
    """A process's own gradient-equivalents per step: without the eigensolver's when it never reads
    the eigenpairs (``MEASURE_ONLY``), everything it spent otherwise (a model that needs them)."""
    return total - measurement if process in MEASURE_ONLY else total


def _separately(problem, table, out, run_one, shared_error) -> pd.DataFrame:
    """Each model alone with the reference and the baseline; a model that raises gets an error row."""
    frames, base_done = [], False
    reference, baseline = table["processes"][:2]
    for model in table["processes"][2:]:
        alone = with_processes(table, [reference, baseline, model])
        run_dir = out / "runs" / f"{problem}-{model}"
        try:
            run_one(f"{problem} ({model})", alone, run_dir)
        except Exception as error:
            frames.append(
                pd.DataFrame(
                    [{"problem": problem, "process": model, "status": f"error: {type(error).__name__}: {error}"[:200]}]
                )
            )
            continue
        rows = _rows(problem, compare_run(run_dir))
        frames.append(rows if not base_done else rows[rows["process"] == model])
        base_done = True
    if not frames:
        frames.append(
            pd.DataFrame(
                [
                    {
                        "problem": problem,
                        "process": reference,
                        "status": f"error: {type(shared_error).__name__}: {shared_error}"[:200],
                    }
                ]
            )
        )
    return pd.concat(frames, ignore_index=True)


# the time-averaged errors beside the pointwise ones (box of compare.AVERAGING_WINDOW steps)
AVERAGED_COLUMNS = (("loss_error_averaged", "loss error (avg)"), ("envelope_error_averaged", "envelope error (avg)"))
COLUMNS = (
    ("relative_distance", "rel. distance"),
    ("relative_centre_distance", "rel. centre distance"),
    ("loss_error", "loss error"),
    ("envelope_error", "envelope error"),
    *AVERAGED_COLUMNS,
    ("ms_per_step", "ms / step"),
    ("own_equivalents", "own grad-equiv. / step"),
    ("measurement_equivalents", "eigensolver grad-equiv. / step"),
)

# the models started on the optimizer's state at its edge onset (from_onset)
SUFFIX = "_from_onset"
FROM_ONSET = (
    ("onset", "onset step"),
    ("relative_distance" + SUFFIX, "rel. distance from onset"),
    ("relative_centre_distance" + SUFFIX, "rel. centre distance from onset"),
    ("loss_error" + SUFFIX, "loss error from onset"),
    ("loss_error_averaged" + SUFFIX, "loss error (avg) from onset"),
)

FLOOR_COLUMNS = ACCURACY  # the from-w0 columns that the optimizer's own row holds for its floor

HIDDEN_WHEN_DROPPED = (
    "relative_distance",
    "relative_centre_distance",
    "loss_error",
    "envelope_error",
    *(c for c, _ in AVERAGED_COLUMNS),
    "ms_per_step",
    *(c for c, _ in FROM_ONSET[1:]),
)


def columns_of(rows: pd.DataFrame) -> tuple[tuple[str, str], ...]:
    """The page's columns: ``COLUMNS``, and ``FROM_ONSET`` when the rows have them."""
    return COLUMNS + (FROM_ONSET if "onset" in rows.columns else ())


def markdown(rows: pd.DataFrame) -> list[str]:
    """The leaderboard as one Markdown table (numbers as in the comparison report).

    A process dropped after diverging shows neither accuracy numbers (they would cover only its
    short life) nor wall time (only its compiling chunk was timed); ``leaderboard.csv`` keeps them.
    """
    columns = columns_of(rows)
    lines = [
        "| problem | process | " + " | ".join(title for _, title in columns) + " | status |",
        "|---" * (len(columns) + 3) + "|",
    ]
    for _, row in rows.iterrows():
        status = str(row["status"])
        cells = [
            format_number(float(row.get(column, float("nan"))))
            if status == "ok" or column not in HIDDEN_WHEN_DROPPED
            else "-"
            for column, _ in columns
        ]
        lines.append(f"| {row['problem']} | {row['process']} | " + " | ".join(cells) + f" | {status} |")
    return lines


def unconverged_measurements(rows: pd.DataFrame) -> list[str]:
    """A line under the table for the rows some of whose eigensolver measurements stopped at ``max_iters`` with a
    residual above tol (``not_converged`` of :func:`eosflow.compare.compare_dataset`, their share)."""
    return _flagged_rows(
        rows,
        "not_converged",
        "{:.1%}",
        "Measurements not converged (stopped at `max_iters` with a residual above tol: their eigenvalues are lower "
        "bounds, possibly off by more than tol; the share of each process's, docs/sharpness.md)",
    )


def incomplete_critical_sets(rows: pd.DataFrame) -> list[str]:
    """A line under the table for the rows whose critical set was not shown complete at some step
    (``critical_incomplete`` of :func:`eosflow.compare.compare_dataset`; docs/central_flow.md)."""
    return _flagged_rows(
        rows,
        "critical_incomplete",
        "{:.0%}",
        "Critical sets not shown complete (every tracked pair critical, or `max_critical` reached; the "
        "share of the flow's steps, docs/central_flow.md)",
    )


def _flagged_rows(rows: pd.DataFrame, column: str, share: str, heading: str) -> list[str]:
    """``heading: <problem> <process> <share>, ...`` for the rows whose ``column`` is above 0 (none: no line)."""
    if column not in rows:
        return []
    flagged = rows[rows[column].fillna(0) > 0]
    if flagged.empty:
        return []
    shares = ", ".join(f"{r.problem} {r.process} {share.format(r[column])}" for _, r in flagged.iterrows())
    return ["", f"{heading}: {shares}."]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"jax {jax.__version__} ({jax.devices()[0].platform})"
        + (f", XLA_FLAGS={flags!r}" if (flags := os.environ.get("XLA_FLAGS", "")) else "")
        + f", load average at the end {load:.1f}"
    )


def selected(suite: str, problems: list[str] | None = None, models: list[str] | None = None) -> tuple[Entry, ...]:
    """The entries of ``suite`` named in ``problems`` (None: all); a SpecError names an unknown problem
    or a model that models none of them."""
    entries = suite_entries(suite)
    names = [entry.name for entry in entries]
    for name in problems or []:
        if name not in names:
            raise SpecError(f"--problems: {name!r} is not in the {suite} suite; choose from {', '.join(names)}")
    entries = tuple(entry for entry in entries if problems is None or entry.name in problems)
    known = {name for entry in entries for name in models_of(entry.optimizer)}
    for name in models or []:
        if name not in known:
            raise SpecError(
                f"--models: {name!r} models none of the chosen problems; choose from {', '.join(sorted(known))}"
            )
    return entries


def leaderboard(
    out: Path,
    quick: bool = False,
    progress: bool = True,
    suite: str = "default",
    jobs: int = 1,
    problems: list[str] | None = None,
    models: list[str] | None = None,
) -> Path:
    """Run the suite (``--quick``: its quick entries, shortened) into ``out``; returns ``out/leaderboard.md``.

    A full run adds the models started at the optimizer's edge onset (:func:`from_onset`; not ``--quick``).
    ``jobs`` > 1 runs that many problems at once in worker processes (without progress bars);
    ``problems`` / ``models`` (None: all) rerun those rows only, beside the reference and its baseline."""
    out = Path(out)
    started = time.perf_counter()
    entries = selected(suite, problems, models)
    tables = suite_tables(quick, models, suite=entries)
    if not tables:
        raise SpecError(
            f"{_selection(suite, quick, problems, models)} selects no entry: {_why_none(entries, quick, models)}"
        )
    earlier = _earlier_rows(out, suite, quick) if problems or models else None  # checked before anything runs
    full = suite_tables(quick, None, suite=entries)
    names = {  # a run of some of an entry's models goes beside the entry's run, which it would delete
        problem: problem
        if table["processes"] == full[problem]["processes"]
        else "-".join([problem, *table["processes"][2:]])
        for problem, table in tables.items()
    }
    finished: dict[str, pd.DataFrame] = {}  # each entry's rows, as it finishes
    try:
        if jobs > 1:
            _in_workers(tables, out, not quick, names, jobs, finished)
        else:
            run_suite(tables, out, progress, onset=not quick, names=names, finished=finished)
    except KeyboardInterrupt as error:
        rest = [problem for problem in tables if problem not in finished]
        again = f"{command(suite, quick, _filters(rest, models))} --out {out}"
        if not finished:
            raise SuiteInterrupted(None, rest, again, error) from error
        if earlier is None:  # a whole suite rerun: its finished rows go into the table it would have replaced
            with contextlib.suppress(SpecError):
                earlier = _earlier_rows(out, suite, quick)
        note = (
            f"**Interrupted** before it finished {', '.join(rest)}: "
            + ("their rows, if any, are from earlier runs" if earlier is not None else "their rows are missing")
            + f". `{again}` runs them into this table."
        )
        page = _write_table(finished, tables, names, earlier, out, quick, suite, problems, models, started, note)
        raise SuiteInterrupted(page, rest, again, error) from error
    return _write_table(finished, tables, names, earlier, out, quick, suite, problems, models, started)


class SuiteInterrupted(KeyboardInterrupt):
    """A leaderboard stopped before its end by ``error``: ``page`` holds the rows of the entries it finished (None:
    it finished none, and wrote nothing), ``rest`` names those it did not finish, and ``command`` runs them into
    the same table."""

    def __init__(self, page: Path | None, rest: list[str], command: str, error: KeyboardInterrupt):
        super().__init__(str(error))
        self.page, self.rest, self.command = page, rest, command
        self.exit_code = getattr(error, "exit_code", 130)


def command(suite: str, quick: bool, filters: str = "") -> str:
    """The ``eosflow leaderboard`` command line of a suite, a mode and filters (:func:`_filters`), without --out."""
    return (
        "eosflow leaderboard"
        + (f" --suite {suite}" if suite != "default" else "")
        + (" --quick" if quick else "")
        + filters
    )


def _filters(problems: list[str] | None, models: list[str] | None) -> str:
    """The command-line flags that select these problems and models (None: all)."""
    return "".join(
        f" --{flag} {','.join(names)}" for flag, names in (("problems", problems), ("models", models)) if names
    )


def _write_table(
    finished: dict[str, pd.DataFrame],
    tables: dict[str, dict],
    names: dict[str, str],
    earlier: pd.DataFrame | None,
    out: Path,
    quick: bool,
    suite: str,
    problems: list[str] | None,
    models: list[str] | None,
    started: float,
    note: str = "",
) -> Path:
    """``leaderboard.csv`` and the page (with ``note``) of the finished entries' rows, merged into the ``earlier``
    rows if any."""
    rows = pd.concat([finished[problem] for problem in tables if problem in finished], ignore_index=True)
    if earlier is not None:
        keep = {(p, process) for p, name in names.items() if name != p for process in tables[p]["processes"][:2]}
        everything = suite_tables(quick, None, suite_entries(suite))
        rows = merged(earlier, rows, keep, [(p, process) for p, t in everything.items() for process in t["processes"]])
    out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out / "leaderboard.csv", index=False)
    minutes = (time.perf_counter() - started) / 60
    return write_page(rows, out, quick, minutes, suite, _filters(problems, models), earlier is not None, note)


def _quiet_worker(cache: tuple[str | None, float]) -> None:
    """A worker of ``--jobs``, with the parent's compile cache (``eosflow --compile-cache``, whatever the start
    method): Ctrl-C is the parent's to handle (it stops the workers), and the parent's SIGTERM
    stops a worker's run at its next chunk boundary, flushed (:func:`eosflow.signals.stop_requests`, installed over
    this handler while the run goes on); outside a run it is recorded, and a run being set up stops before its
    first chunk (:func:`eosflow.signals.record_stop`). A worker that died of it instead would
    break the pool, whose shutdown then sends every worker another SIGTERM: the second stops a run at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, record_stop)  # outside a run: the next run (if any) stops at once
    take_cache_settings(cache)


def _entry_in_worker(problem: str, table: dict, out: Path, onset: bool, names: dict[str, str]) -> pd.DataFrame | int:
    """One entry of ``--jobs`` in a worker; if a signal stopped its run (flushed at a chunk boundary), its number."""
    try:
        return run_suite({problem: table}, out, False, onset, names)
    except KeyboardInterrupt as error:
        return getattr(error, "signum", signal.SIGINT)


def _in_workers(
    tables: dict[str, dict], out: Path, onset: bool, names: dict[str, str], jobs: int, finished: dict[str, pd.DataFrame]
) -> None:
    """Every entry in one of ``jobs`` worker processes, its rows into ``finished[problem]`` as it finishes;
    interrupted, the parent asks its workers to stop (SIGTERM), cancels the entries not started, and waits for the
    running ones to flush before it stops too. An entry whose worker was stopped alone stops the suite too."""
    pool = ProcessPoolExecutor(jobs, initializer=_quiet_worker, initargs=(cache_settings(),))
    futures = {pool.submit(_entry_in_worker, p, t, out, onset, names): p for p, t in tables.items()}
    try:
        for future in as_completed(futures):
            if isinstance(rows := future.result(), int):
                raise Interrupted(rows, f"the worker running {futures[future]} was stopped")
            finished[futures[future]] = rows
    except BaseException:
        for worker in list(getattr(pool, "_processes", {}).values()):  # the executor keeps no public handle
            worker.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        for future, problem in futures.items():  # those that finished while the others stopped
            if future.done() and not future.cancelled() and future.exception() is None:
                if isinstance(rows := future.result(), pd.DataFrame):
                    finished[problem] = rows
        raise
    pool.shutdown()


def _title(suite: str, quick: bool) -> str:
    return "# Flow leaderboard" + (f": {suite}" if suite != "default" else "") + (" (quick)" if quick else "")


def _earlier_rows(out: Path, suite: str, quick: bool) -> pd.DataFrame | None:
    """The rows of the leaderboard ``out`` holds, into which a rerun of some rows is merged; None if it holds none.
    A leaderboard of another suite or mode (``--quick`` or not) is refused: its rows do not compare."""
    if not (out / "leaderboard.csv").is_file():
        return None
    page = out / "leaderboard.md"
    found = page.read_text(errors="replace").split("\n", 1)[0] if page.is_file() else "(no leaderboard.md)"
    if found != _title(suite, quick):
        raise SpecError(
            f"{str(out)!r} holds a leaderboard that is not the {suite} suite"
            + (" with --quick" if quick else " without --quick")
            + f" ({page.name}: {found!r}), into which these rows would be merged; rerun them with its --suite and "
            "--quick, or choose another --out"
        )
    return pd.read_csv(out / "leaderboard.csv")


def merged(
    earlier: pd.DataFrame, rows: pd.DataFrame, keep: set[tuple[str, str]], order: list[tuple[str, str]]
) -> pd.DataFrame:
    """``rows`` in place of the earlier rows of the same (problem, process), except the ``keep`` ones the earlier
    table has (an optimizer's and its baseline's rows, rerun beside some of the entry's models only: they belong
    with the earlier run of its other models), in ``order`` (unlisted rows last)."""
    known = set(zip(earlier["problem"], earlier["process"]))
    fresh = rows[[key not in keep or key not in known for key in zip(rows["problem"], rows["process"])]]
    replaced = set(zip(fresh["problem"], fresh["process"]))
    both = pd.concat(
        [earlier[[key not in replaced for key in zip(earlier["problem"], earlier["process"])]], fresh],
        ignore_index=True,
    )
    rank = {key: i for i, key in enumerate(order)}
    position = [rank.get(key, len(rank)) for key in zip(both["problem"], both["process"])]
    return both.iloc[np.argsort(position, kind="stable")].reset_index(drop=True)


def _selection(suite: str, quick: bool, problems: list[str] | None, models: list[str] | None) -> str:
    filters = _filters(problems, models)
    return f"the {suite} suite" + (" with --quick" if quick else "") + (f" and{filters}" if filters else "")


def _why_none(entries: tuple[Entry, ...], quick: bool, models: list[str] | None) -> str:
    """Why no entry of ``entries`` runs: those the chosen models model have no quick run, or there are none."""
    full = suite_tables(False, models, suite=entries)
    if quick and full:
        return f"no --quick run is defined for {', '.join(full)} (drop --quick)"
    return "none of the chosen models models any chosen problem (eosflow processes lists what each models)"


def write_page(
    rows: pd.DataFrame,
    out: Path,
    quick: bool,
    minutes: float,
    suite: str = "default",
    filters: str = "",
    merged: bool = False,
    note: str = "",
) -> Path:
    """``out/leaderboard.md``: the command, the machine, the ``note`` (if any) and the table."""
    problems = rows["problem"].nunique()
    lines = [
        _title(suite, quick),
        "",
        f"`{command(suite, quick, filters)} --out {out}`: {problems} problems in {minutes:.1f} minutes on {machine()}."
        + (
            " Its rows were merged into the table this directory held; the others are from earlier runs."
            if merged
            else ""
        ),
        "",
        *([note, ""] if note else []),
        "rel. distance = <||w_GD - w||> / gradient flow's (for another optimizer: <||w_opt - w||> / its "
        "stable flow's); rel. centre distance = the same between the midpoints (w_(t-1) + w_t) / 2 of "
        "consecutive steps, where a period-2 oscillation cancels whatever its phase; loss error and "
        "envelope error = relative L1 errors against the optimizer's smoothed loss and oscillation "
        "envelope; (avg): the same with both sides "
        f"averaged over a centred box of {AVERAGING_WINDOW} steps; own cost per unit time "
        "(an HVP = 2 gradients): what the process needs to advance, without the eigensolver for "
        f"{', '.join(MEASURE_ONLY)} (whose steps never read the eigenpairs); the eigensolver's part is "
        "shown apart. Wall times include the eigensolver. Definitions: docs/compare.md.",
        "",
    ]
    if "onset" in rows.columns:
        lines += [
            "From onset: the optimizer's models restarted on its state at its onset step (its first step with "
            f"edge ratio >= {ONSET}: the centre of its iterates, its period-2 part for the models that carry "
            "one, its centred moments for an adaptive optimizer's) and scored over the steps after it, the "
            "yardstick (gradient flow for GD, else the stable flow) restarted there too (docs/adaptive.md, "
            "\"Starting on the optimizer's state\"). On the optimizer's own row: the optimizer itself restarted "
            "there, and in the columns from w0 restarted from w0, with w moved by its rounding (eps ||w||): the "
            "floor, what a model that were the optimizer itself would score from a state known to the last bit "
            '(docs/compare.md, "The floor").',
            "",
        ]
    lines += markdown(rows)
    lines += incomplete_critical_sets(rows)
    lines += unconverged_measurements(rows)
    path = Path(out) / "leaderboard.md"
    path.write_text("\n".join(lines) + "\n")
    return path
