"""The free-energy model against GD: oscillation envelope, loss spikes, free-energy monotonicity.

    .venv/bin/python benchmarks/free_energy.py [--skip-run] [--window 20] [--eigenspace K] [specs ...]

Runs examples/free_energy_*.toml (GD and the model in lockstep from the same w0) and prints, over
GD's EoS phase (from ``window`` steps after lr * S first reaches 1.9; GD's spikes from that step on):

* envelope (also scored over the whole run by compare's pointwise and W-step averaged errors):
  GD's oscillation measured on GD alone (GD records it as ``oscillation``),
  |w_{k+1} - 2 w_k + w_{k-1}| / 4 = |delta_k| for w_k = c_k + (-1)^k delta_k with a linearly
  drifting centre, against the model's sqrt(tr Sigma), both as running RMS over ``window``
  steps: ratio of the means and the median pointwise error;
* loss: GD's running-average loss against F(theta, Sigma) and L(theta);
* spikes: GD's loss spikes (peaks of its two-step average loss of prominence >= 1/2 of the local
  median) and, for each, the nearest peak of F (prominence >= 1/10 of its local median): lag and height of the excess;
* monotonicity on the slow time scale: after smoothing over w steps, the fraction of steps on
  which a curve rises and rises / falls (sum of increases over sum of decreases; 0 = monotone).
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import jax
import numpy as np
from scipy.signal import find_peaks

jax.config.update("jax_enable_x64", True)  # this script's choice: its oracles and prepare() compute in float64

import eosflow
from eosflow.compare import AVERAGING_WINDOW, averaged_envelope_error, envelope_error, predicted_amplitude
from eosflow.experiment import run

SPECS = ["examples/free_energy_matrix_factorization.toml", "examples/free_energy_mlp_digits.toml"]


def box_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Mean over a centred box of ``window`` steps (compare.py smooths with a Gaussian instead)."""
    return np.convolve(x, np.ones(window) / window, mode="same")


def box_rms(x: np.ndarray, window: int) -> np.ndarray:
    """sqrt of the box mean of x^2: the oscillation envelope over ``window`` steps."""
    return np.sqrt(box_mean(x**2, window))


def block_rms_error(prediction: np.ndarray, target: np.ndarray, block: int) -> float:
    """Window-averaged envelope error: over consecutive non-overlapping blocks of ``block`` steps,
    |RMS(prediction) - RMS(target)| / RMS(target) per block, averaged over the blocks (a burst that the
    model puts a few steps off inside a block costs nothing; one it misses or invents still does)."""
    n = (min(prediction.size, target.size) // block) * block
    model = np.sqrt(np.mean(prediction[:n].reshape(-1, block) ** 2, axis=1))
    gd = np.sqrt(np.mean(target[:n].reshape(-1, block) ** 2, axis=1))
    return float(np.mean(np.abs(model - gd) / gd))


def local_median(x: np.ndarray, half_width: int = 25) -> np.ndarray:
    return np.array([np.median(x[max(0, k - half_width) : k + half_width]) for k in range(len(x))])


def spikes(x: np.ndarray, relative_prominence: float, start: int) -> np.ndarray:
    found = find_peaks(x, prominence=relative_prominence * local_median(x))[0]
    return found[found >= start]


def matched_spikes(
    gd_loss: np.ndarray, free_energy: np.ndarray, start: int, lag: int = 5, height: float = 0.3
) -> tuple[list[str], int]:
    """GD's loss spikes from step ``start`` on, each with the nearest peak of F, and how many are matched.

    A GD spike is a peak of its two-step average loss (a period-2 orbit is not a spike) whose
    prominence is >= 1/2 of the local median (51 steps); its height is the excess over that median,
    x / median - 1. A peak of F is one of prominence >= 1/10 of F's local median. A spike is matched
    when the nearest F peak is within ``lag`` steps and its height within ``height`` (relative) of GD's.
    """
    two_step = np.convolve(gd_loss, [0.5, 0.5], mode="same")
    gd_spikes, model_peaks = spikes(two_step, 0.5, start), spikes(free_energy, 0.1, start)
    baseline_gd, baseline_model = local_median(two_step), local_median(free_energy)
    found, matched = [], 0
    for t in gd_spikes:
        if len(model_peaks) == 0:
            found.append(f"{t}: none")
            continue
        nearest = model_peaks[np.argmin(np.abs(model_peaks - t))]
        ratio = (free_energy[nearest] / baseline_model[nearest] - 1) / (two_step[t] / baseline_gd[t] - 1)
        matched += int(abs(nearest - t) <= lag and abs(ratio - 1) <= height)
        found.append(f"{t}: {nearest - t:+d} steps, height {ratio:.2f}")
    return found, matched


def monotonicity(x: np.ndarray, window: int) -> tuple[float, float]:
    """(fraction of steps on which the ``window``-step running mean rises, rises / falls)."""
    steps = np.diff(np.convolve(x, np.ones(window) / window, mode="valid"))
    return float(np.mean(steps > 0)), float(steps[steps > 0].sum() / max(-steps[steps < 0].sum(), 1e-300))


def eos_start(gd) -> int:
    """The first step at which GD's lr * S reaches 1.9."""
    return int(np.argmax(gd.lr_sharpness.values >= 1.9))


def eigenspace_shares(run_dir: str, k: int, window: int, start: int) -> tuple[float, float]:
    """How much of GD's oscillation lies along its own top eigenvector and in its top-k eigenspace:
    <running RMS of |U^T delta_k|> / <running RMS of |delta_k|> over the EoS phase, U from LOBPCG
    at GD's centre (w_{k-1} + 2 w_k + w_{k+1}) / 4 (needs GD's saved iterates; ``start``: GD's EoS start)."""
    import jax
    import jax.numpy as jnp

    from eosflow.experiment import prepare
    from eosflow.load import load_params
    from eosflow.spectrum import hessian_eigenpairs

    _, problem, _, _ = prepare(tomllib.loads(Path(run_dir, "spec.toml").read_text()))
    _, params = load_params(run_dir, "gd")
    delta = (params[2:] - 2 * params[1:-1] + params[:-2]) / 4
    centres = (params[2:] + 2 * params[1:-1] + params[:-2]) / 4
    measure = jax.jit(lambda w, v: hessian_eigenpairs(problem.objective, w, v, tol=1e-4, max_iters=100))
    vectors = jax.random.normal(jax.random.PRNGKey(0), (params.shape[1], k), dtype=params.dtype)
    top, within = [], []
    for centre, d in zip(centres, delta):
        pairs = measure(jnp.asarray(centre), vectors)
        vectors = pairs.vectors
        projection = np.asarray(vectors)[:, np.argsort(-np.asarray(pairs.values))].T @ d
        top.append(abs(projection[0]))
        within.append(np.linalg.norm(projection))
    phase = slice(start + window - 1, len(delta) - window)  # delta[i] is step i + 1
    total = np.mean(box_rms(np.linalg.norm(delta, axis=1), window)[phase])
    return (
        float(np.mean(box_rms(np.array(top), window)[phase]) / total),
        float(np.mean(box_rms(np.array(within), window)[phase]) / total),
    )


def analyze(run_dir: str, window: int) -> dict:
    ds = eosflow.load(run_dir)
    gd, model = ds.sel(process="gd"), ds.sel(process="free_energy")
    start = eos_start(gd)
    end = len(gd.step) - window
    phase = slice(start + window, end)
    oscillation, amplitude = gd.oscillation.values.astype(np.float64), predicted_amplitude(ds, "free_energy")
    envelope = box_rms(np.nan_to_num(gd.oscillation.values), window)[phase]
    predicted = box_rms(predicted_amplitude(ds, "free_energy"), window)[phase]
    gd_average = box_mean(gd.loss.values, window)[phase]
    free_energy, centre_loss = model.free_energy.values, model.loss.values
    out = {
        "eos_start": start,
        "envelope_gd": float(np.mean(envelope)),
        "envelope_model": float(np.mean(predicted)),
        "envelope_ratio_error": float(np.mean(predicted) / np.mean(envelope) - 1),
        "envelope_pointwise_error": float(np.median(np.abs(predicted - envelope) / envelope)),
        **{
            f"envelope_block{b}_error": block_rms_error(
                np.nan_to_num(predicted_amplitude(ds, "free_energy"))[phase],
                np.nan_to_num(gd.oscillation.values)[phase],
                b,
            )
            for b in (20, 50, 100, 200)
        },
        "envelope_compare_pointwise": envelope_error(amplitude, oscillation),
        f"envelope_compare_averaged_W{AVERAGING_WINDOW}": averaged_envelope_error(amplitude, oscillation),
        "loss_error_F": float(np.mean(np.abs(box_mean(free_energy, window)[phase] / gd_average - 1))),
        "loss_error_L": float(np.mean(np.abs(box_mean(centre_loss, window)[phase] / gd_average - 1))),
    }
    for w in (window, 2 * window, 3 * window):
        for name, curve in (("F", free_energy), ("gd_loss", gd.loss.values)):
            fraction, ratio = monotonicity(curve[phase], w)
            out[f"{name}_smoothed{w}_rises"] = f"{fraction:.3f} of steps, rises/falls {ratio:.3f}"
    fraction, ratio = monotonicity(gd.loss.values[phase], 1)
    out["gd_loss_raw_rises"] = f"{fraction:.3f} of steps, rises/falls {ratio:.3f}"

    found, matched = matched_spikes(gd.loss.values, free_energy, start)
    out["gd_spikes -> nearest F peak"] = "; ".join(found) or "none"
    out["spikes matched (5 steps, 30%)"] = f"{matched} of {len(found)}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("specs", nargs="*", default=SPECS)
    parser.add_argument("--skip-run", action="store_true", help="analyze /tmp/eosflow_free_energy/<name> only")
    parser.add_argument("--window", type=int, default=20, help="smoothing window (steps)")
    parser.add_argument(
        "--eigenspace",
        type=int,
        default=0,
        metavar="K",
        help="also measure GD's oscillation share on its top eigenvector and top-K eigenspace",
    )
    args = parser.parse_args()
    for path in args.specs:
        spec = tomllib.loads(Path(path).read_text())
        if args.eigenspace:
            spec.setdefault("record", {})["params_every"] = 1
        run_dir = f"/tmp/eosflow_free_energy/{spec['name']}"
        if not args.skip_run:
            run(spec, run_dir, overwrite=True)
        result = analyze(run_dir, args.window)
        if args.eigenspace:
            shares = eigenspace_shares(run_dir, args.eigenspace, args.window, result["eos_start"])
            result["gd_oscillation_share_top1"], result[f"gd_oscillation_share_top{args.eigenspace}"] = shares
        print(f"## {spec['name']}  (window {args.window}, EoS from step {result.pop('eos_start')})")
        for key, value in result.items():
            print(f"  {key:30s} {value:.4g}" if isinstance(value, float) else f"  {key:30s} {value}")


if __name__ == "__main__":
    main()
