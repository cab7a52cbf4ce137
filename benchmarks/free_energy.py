"""The free-energy model against GD: envelope, loss spikes, free-energy monotonicity.

    .venv/bin/python benchmarks/free_energy.py [--skip-run] [--window 20] [specs ...]

Runs examples/free_energy_*.toml (GD and the model in lockstep) and prints, over GD's EoS phase
(lr * S >= 1.9 at GD's iterate, after it first gets there): GD's envelope (running RMS of its
displacement from the model's centre along the model's top direction) against the model's
amplitude; GD's time-averaged loss against F and L(theta); the fraction of steps on which the
smoothed F and GD's raw loss increase; the times of GD's loss spikes against the model's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tomllib

import eosflow
from eosflow.experiment import run

SPECS = ["examples/free_energy_matrix_factorization.toml", "examples/free_energy_mlp_digits.toml"]


def running(x: np.ndarray, window: int) -> np.ndarray:
    return np.convolve(x, np.ones(window) / window, mode="same")


def peaks(x: np.ndarray, prominence: float) -> np.ndarray:
    from scipy.signal import find_peaks

    return find_peaks(x, prominence=prominence)[0]


def analyze(run_dir: str, window: int) -> dict:
    ds = eosflow.load(run_dir)
    gd, model = ds.sel(process="gd"), ds.sel(process="free_energy")
    eos_start = int(np.argmax(gd.lr_sharpness.values >= 1.9))
    phase = slice(eos_start + window, len(gd.step) - window)
    envelope = np.sqrt(running(model.reference_offset.values**2, window))
    amplitude = np.sqrt(running(model.amplitude.values**2, window))
    gd_average = running(gd.loss.values, window)
    energy = running(model.free_energy.values, window)
    e, a = envelope[phase], amplitude[phase]
    out = {
        "eos_start": eos_start,
        "envelope_gd": float(np.mean(e)), "envelope_model": float(np.mean(a)),
        "envelope_ratio_error": float(abs(np.mean(a) / np.mean(e) - 1)),
        "envelope_pointwise_error": float(np.median(np.abs(a - e) / e)),
        "loss_error_F": float(np.mean(np.abs(energy[phase] - gd_average[phase]) / gd_average[phase])),
        "loss_error_L": float(np.mean(np.abs(running(model.loss.values, window)[phase] - gd_average[phase])
                                      / gd_average[phase])),
        "F_increases": float(np.mean(np.diff(energy[phase]) > 0)),
        "gd_loss_increases": float(np.mean(np.diff(gd.loss.values[phase]) > 0)),
    }
    raw = gd.loss.values[phase]
    spread = np.std(raw)
    gd_spikes = peaks(running(raw, 4), 2 * spread) + phase.start
    model_spikes = peaks(running(model.free_energy.values[phase], 4), 2 * spread) + phase.start
    lags = [int(np.min(np.abs(model_spikes - t))) for t in gd_spikes] if len(model_spikes) else []
    out.update(gd_spikes=len(gd_spikes), model_spikes=len(model_spikes),
               spike_lag_median=float(np.median(lags)) if lags else float("nan"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("specs", nargs="*", default=SPECS)
    parser.add_argument("--skip-run", action="store_true", help="analyze /tmp/eosflow_free_energy/<name> only")
    parser.add_argument("--window", type=int, default=20, help="smoothing window (steps): one cycle or more")
    args = parser.parse_args()
    for path in args.specs:
        spec = tomllib.loads(Path(path).read_text())
        run_dir = f"/tmp/eosflow_free_energy/{spec['name']}"
        if not args.skip_run:
            run(spec, run_dir, overwrite=True)
        result = analyze(run_dir, args.window)
        print(f"## {spec['name']}  (window {args.window}, EoS from step {result.pop('eos_start')})")
        for key, value in result.items():
            print(f"  {key:26s} {value:.4g}" if isinstance(value, float) else f"  {key:26s} {value}")


if __name__ == "__main__":
    main()
