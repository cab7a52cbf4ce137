"""Rod flow and edge flow against GD, next to gradient, projected and central flows.

One experiment per problem (every process from the same w0, in lockstep, chunks of 100 steps,
no spectrum measurement except the central/projected flows' own), then a second, timed pass of
each process alone (compiled by the first pass, so the milliseconds exclude compilation).

Columns (means over the run unless said otherwise; GD is the reference):
  dist      ||w_GD(t) - x(t)||, the model's centre against GD's iterate (conventions.md)
  /GF       dist relative to gradient flow's
  cdist     ||c_GD(t) - x(t)|| against GD's local centre c_t = (w_{t-1} + 2 w_t + w_{t+1}) / 4
  loss2     |predicted_loss - GD's loss averaged as c_t| / that average (the period-2 average)
  loss20    the same against GD's loss under a Gaussian filter of width 20 steps
  amp2      |amplitude - RMS of GD's offset along the model's direction| / RMS, over GD's EoS
            phase (t >= GD's onset); RMS over the period-2 window (weights 1/4, 1/2, 1/4)
  amp20     the same with the RMS under a Gaussian filter of width 20 steps
  onset     first step the oscillation exceeds a quarter of GD's typical EoS amplitude (GD:
            |w_{t+1} - 2 w_t + w_{t-1}| / 4; models: their amplitude) after 5 steps below it
            (so that the initial transient does not count)
  grads, hvps, d3   evaluations per unit time (gradients, HVPs, third-derivative gradients)
  ms        milliseconds per unit time (one GD step), timed pass

With --windows START:END,... (END may be left empty: to the end) a second table per case gives, for
each model and window, loss20 over the window's steps, amp2 and amp20 over its steps in GD's EoS
phase, the model's amplitude (min-max, mean) and GD's RMS2 (min-max) and RMS20 (min-max, mean)
along the model's direction. --no-timing skips the timed pass (ms column nan).

    python benchmarks/rod_edge.py [--only quartic,mlp] [--steps-scale 0.5] [--keep runs/rod_edge]
        [--windows 400:900,900:] [--no-timing]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tomllib
from pathlib import Path

import jax
import numpy as np
from scipy.ndimage import gaussian_filter1d

jax.config.update("jax_enable_x64", True)  # this script's choice: its oracles and prepare() compute in float64

import eosflow
from eosflow.experiment import prepare, run
from eosflow.load import load_params
from eosflow.problems import PROBLEMS
from eosflow.process import PROCESSES

MODELS = ["gradient_flow", "projected_flow", "central_flow", "rod_flow", "edge_flow"]
DEMO = Path(eosflow.__file__).parent / "specs" / "demo.toml"
WIDTH = 20  # the long averaging window (Gaussian sigma, steps)


def cases() -> dict[str, dict]:
    """Spec tables: a quartic, a sharp valley, a matrix factorization and the demo MLP."""
    toy = {"dtype": "float64", "divergence": {"loss_blowup": 1e9}}
    mlp = {"steps": 600, "lr": 0.5, "dtype": "float32", "problem": {"name": "mlp"}, "spectrum": {"k_max": 6}}
    if DEMO.exists():
        demo = tomllib.loads(DEMO.read_text())
        mlp = {key: demo[key] for key in ("steps", "lr", "dtype", "problem", "spectrum", "seed") if key in demo}
    return {
        "quartic": {
            **toy,
            "steps": 300,
            "lr": 0.08,
            "spectrum": {"k_max": 1},
            "problem": {"name": "quartic", "sharpness": 30.0, "quartic": 1.0, "init": 0.01},
        },
        # the pull towards x = 2 keeps the loss positive (relative loss errors mean something)
        "sharp_valley": {
            **toy,
            "steps": 1500,
            "lr": 0.1,
            "spectrum": {"k_max": 2},
            "problem": {
                "name": "sharp_valley",
                "profile": "exp",
                "sharpness": 5.0,
                "rate": 1.0,
                "bend": 1.0,
                "drift": "quadratic",
                "target": 2.0,
                "eps": 0.02,
                "y0": 0.1,
            },
        },
        "matrix_factorization": {
            **toy,
            "steps": 1500,
            "lr": 0.077,
            "spectrum": {"k": 2, "k_max": 4},
            "problem": {"name": "matrix_factorization", "dim": 2, "depth": 3, "rank": 1, "target_scale": 5.5},
        },
        "mlp": mlp,
    }


def local_average(values: np.ndarray) -> np.ndarray:
    """(v_{t-1} + 2 v_t + v_{t+1}) / 4 along axis 0 (ends repeated): removes a period-2 oscillation."""
    padded = np.concatenate([values[:1], values, values[-1:]])
    return 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]


def gd_oscillation(iterates: np.ndarray) -> np.ndarray:
    """|w_{t+1} - 2 w_t + w_{t-1}| / 4: GD's period-2 half-amplitude (ends repeated)."""
    second = iterates[2:] - 2 * iterates[1:-1] + iterates[:-2]
    amplitude = np.linalg.norm(second.reshape(len(second), -1), axis=1) / 4
    return np.concatenate([amplitude[:1], amplitude, amplitude[-1:]])


def onset(amplitude: np.ndarray, threshold: float, quiet: int = 5) -> float:
    """First step above ``threshold`` after ``quiet`` steps in a row below it (NaN if never):
    the initial transient, where GD's first steps overshoot, is not the onset of EoS."""
    below = np.convolve(amplitude < threshold, np.ones(quiet), mode="valid") == quiet
    if not below.any():
        return np.nan
    start = int(np.argmax(below)) + quiet
    above = np.flatnonzero(amplitude[start:] > threshold)
    return float(start + above[0]) if above.size else np.nan


def relative_error(prediction: np.ndarray, reference: np.ndarray, where: np.ndarray) -> float:
    prediction, reference = prediction[where], reference[where]
    keep = np.isfinite(prediction) & np.isfinite(reference)
    if not keep.any():
        return np.nan
    return float(np.sum(np.abs(prediction[keep] - reference[keep])) / np.sum(np.abs(reference[keep])))


def measure(name: str, table: dict, workdir: Path) -> tuple[list[dict], dict]:
    models = [m for m in MODELS if m in PROCESSES]
    table = {
        **table,
        "name": name,
        "processes": ["gd", *models],
        "spectrum": {**table.get("spectrum", {}), "every": 0},
        "record": {"chunk": 100, "params_every": 1},
    }
    outcome = run(table, workdir / name, overwrite=True)
    ds = eosflow.load(workdir / name)
    steps = len(ds.step)
    gd_w = load_params(workdir / name, "gd")[1].astype(np.float64)
    gd_loss = ds.loss.sel(process="gd").values
    oscillation = gd_oscillation(gd_w)
    threshold = 0.25 * np.median(oscillation[steps // 2 :])
    gd_onset = onset(oscillation, threshold)
    eos = np.arange(steps) >= (gd_onset if np.isfinite(gd_onset) else steps)
    everywhere = np.ones(steps, bool)
    loss2, loss20 = local_average(gd_loss), gaussian_filter1d(gd_loss, WIDTH, mode="nearest")
    centre = local_average(gd_w)
    dropped = json.loads((workdir / name / "summary.json").read_text())["dropped_processes"]
    results = []
    for model in models:
        if model not in ds.process.values:
            results.append({"model": model, "note": "no rows"})
            continue
        d = ds.sel(process=model)
        w = load_params(workdir / name, model)[1].astype(np.float64)
        n = min(len(w), steps)
        cdist = np.linalg.norm((centre[:n] - w[:n]).reshape(n, -1), axis=1)
        offset = d.reference_offset.values if "reference_offset" in d else np.full(steps, np.nan)
        amplitude = d.amplitude.values if "amplitude" in d else np.zeros(steps)
        rms2 = np.sqrt(local_average(offset**2))
        rms20 = np.sqrt(gaussian_filter1d(np.nan_to_num(offset**2), WIDTH, mode="nearest"))
        results.append(
            {
                "model": model,
                "series": {
                    "predicted_loss": d.predicted_loss.values,
                    "amplitude": amplitude,
                    "rms2": rms2,
                    "rms20": rms20,
                },
                "dist": float(np.nanmean(d.distance.values)),
                "cdist": float(np.mean(cdist)),
                "loss2": relative_error(d.predicted_loss.values, loss2, everywhere),
                "loss20": relative_error(d.predicted_loss.values, loss20, everywhere),
                "amp2": relative_error(amplitude, rms2, eos),
                "amp20": relative_error(amplitude, rms20, eos),
                "onset": onset(np.nan_to_num(amplitude), threshold),
                "dropped": dropped.get(model, ""),
                **{
                    key: float(np.nanmean(np.nan_to_num(d[key].values))) if key in d else 0.0
                    for key in ("grads", "hvps", "third_derivatives")
                },
            }
        )
    info = {
        "steps": steps,
        "status": outcome.status,
        "gd_onset": gd_onset,
        "gd_amplitude": 4 * threshold,
        "dimension": int(gd_w.shape[1]),
        "loss20": loss20,
        "eos": eos,
    }
    return results, info


def time_models(table: dict, models: list[str], chunk: int = 100) -> dict[str, float]:
    """Milliseconds per unit time of each process alone, in chunks as in an experiment (second pass)."""
    table = {**table, "processes": models, "spectrum": {**table.get("spectrum", {}), "every": 0}}
    _, problem, _, processes = prepare(table)
    timings = {}
    for name, process in processes.items():
        for _attempt in range(2):  # the first pass compiles every chunk shape the run meets
            state, start = process.init(problem.w0), time.perf_counter()
            for first in range(0, table["steps"], chunk):
                state, rows = process.advance(state, min(chunk, table["steps"] - first))
                jax.block_until_ready(rows)
                if not np.all(np.isfinite(np.asarray(rows["loss"]))):
                    break
            timings[name] = 1e3 * (time.perf_counter() - start) / table["steps"]
    return timings


def print_table(name: str, results: list[dict], info: dict, timings: dict) -> None:
    print(
        f"\n## {name}  (d = {info['dimension']}, {info['steps']} steps, GD EoS onset at step "
        f"{info['gd_onset']:.0f}, GD's typical EoS half-amplitude {info['gd_amplitude']:.3g})"
    )
    gf = next((r["dist"] for r in results if r["model"] == "gradient_flow" and "dist" in r), np.nan)
    header = ("model", "dist", "/GF", "cdist", "loss2", "loss20", "amp2", "amp20", "onset", "grads", "hvps", "d3", "ms")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        if "dist" not in r or r.get("dropped"):
            print(f"| {r['model']} | {r.get('note') or 'diverged: ' + r['dropped']} |")
            continue
        cells = [
            r["model"],
            f"{r['dist']:.3g}",
            f"{r['dist'] / gf:.2f}",
            f"{r['cdist']:.3g}",
            f"{r['loss2']:.1%}",
            f"{r['loss20']:.1%}",
            f"{r['amp2']:.1%}",
            f"{r['amp20']:.1%}",
            "never" if np.isnan(r["onset"]) else f"{r['onset']:.0f}",
            f"{r['grads']:.1f}",
            f"{r['hvps']:.1f}",
            f"{r['third_derivatives']:.1f}",
            f"{timings.get(r['model'], np.nan):.2f}",
        ]
        print("| " + " | ".join(cells) + " |")


def window_table(results: list[dict], info: dict, windows: list[tuple[int, int | None]]) -> None:
    """Per model and step window: the loss20 / amp2 / amp20 errors restricted to the window (amp: its
    steps in GD's EoS phase), the model's amplitude and GD's RMS2 and RMS20 along the model's direction
    (min-max, and the mean in parentheses)."""
    header = ("model", "steps", "loss20", "amp2", "amp20", "amplitude (mean)", "GD RMS2", "GD RMS20 (mean)")
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    steps = np.arange(info["steps"])
    for r in results:
        if "series" not in r or r.get("dropped"):
            continue
        series = r["series"]
        for start, end in windows:
            inside = (steps >= start) & (steps < (info["steps"] if end is None else end))
            if not inside.any():
                continue
            eos = inside & info["eos"]
            cells = [
                f"{relative_error(series['predicted_loss'], info['loss20'], inside):.1%}",
                f"{relative_error(series['amplitude'], series['rms2'], eos):.1%}",
                f"{relative_error(series['amplitude'], series['rms20'], eos):.1%}",
                spread(series["amplitude"][inside], mean=True),
                spread(series["rms2"][inside]),
                spread(series["rms20"][inside], mean=True),
            ]
            print(f"| {r['model']} | {start}-{'end' if end is None else end} | " + " | ".join(cells) + " |")


def spread(values: np.ndarray, mean: bool = False) -> str:
    """``min-max`` (and ``(mean)``) of the finite values, 3 significant digits."""
    text = f"{np.nanmin(values):.3g}-{np.nanmax(values):.3g}"
    return text + f" ({np.nanmean(values):.3g})" if mean else text


def parse_windows(text: str) -> list[tuple[int, int | None]]:
    """``400:900,900:`` -> [(400, 900), (900, None)]."""
    windows = []
    for item in filter(None, text.split(",")):
        start, end = item.split(":")
        windows.append((int(start), int(end) if end else None))
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale every case's steps")
    parser.add_argument("--keep", default="", help="keep the run directories under this folder")
    parser.add_argument("--windows", default="", help="step windows START:END, comma-separated (END empty: to the end)")
    parser.add_argument("--no-timing", action="store_true", help="skip the timed pass (ms column nan)")
    args = parser.parse_args()
    windows = parse_windows(args.windows)
    selected = [c for c in args.only.split(",") if c]
    print("processes registered:", ", ".join(sorted(PROCESSES)))
    print("problems registered:", ", ".join(sorted(PROBLEMS)))
    print("demo spec:", DEMO if DEMO.exists() else "missing; the MLP case is digits, width 64, lr 0.5")
    missing = [m for m in MODELS if m not in PROCESSES]
    if missing:
        print("not registered (left out):", ", ".join(missing))
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.keep or scratch
        for name, table in cases().items():
            if selected and name not in selected:
                continue
            if table["problem"]["name"] not in PROBLEMS:
                print(f"\n## {name}: problem {table['problem']['name']!r} is not registered; skipped")
                continue
            table = {**table, "steps": max(10, int(table["steps"] * args.steps_scale))}
            results, info = measure(name, table, Path(workdir))
            timings = {} if args.no_timing else time_models(table, ["gd", *[r["model"] for r in results]])
            print_table(name, results, info, timings)
            if timings:
                print(f"GD: {timings['gd']:.2f} ms per step (no eigenpairs)")
            if windows:
                window_table(results, info, windows)


if __name__ == "__main__":
    main()
