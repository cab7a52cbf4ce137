"""The free-energy model on real networks: how much of its envelope error is the metric, the closure
and the centre's drift.

    .venv/bin/python benchmarks/free_energy_networks.py [--problems mlp_digits,cnn_digits,mlp_moons] [--skip-run]

For each leaderboard problem (its spec table from ``eosflow.leaderboard``, run with GD and the
free-energy model only) one row per variant, all scored like ``eosflow compare`` / the leaderboard:

* ``envelope`` pointwise: ``compare.envelope_error`` (Gaussian running RMS of GD's oscillation, std
  20 steps, against the model's sqrt(tr Sigma));
* ``envelope (avg)``: ``compare.averaged_envelope_error``, both sides RMS-averaged over a centred box
  of ``compare.AVERAGING_WINDOW`` = 101 steps; ``(avg, EoS)`` the same sums restricted to the steps
  from GD's first lr S >= 1.9 (the averaging itself still uses the whole run); ``RMS ratio (EoS)``:
  the model's RMS amplitude over the EoS phase divided by GD's RMS oscillation there;
* ``loss (avg)``: ``compare.averaged_loss_error``; ``distance``: the mean ||theta - w_GD||.

Variants: the leaderboard's closure (rod floor, rank = the tracked eigenpairs, k = 1 growing between
chunks); ``floor = false`` (the oscillation regrows from GD's rounding only); rank k_max from step 0;
``floor = false`` with a 25 times smaller rounding source (the onset a few steps later: how much
the onset's timing decides); the centre's implicit regularization (``implicit = true``), alone and
with ``floor = false`` and the measured rounding 0.25; and (only when every variant runs) the model
*re-anchored to GD's centre*: before every step theta is set to GD's
(w_{k-1} + 2 w_k + w_{k+1}) / 4 and only Sigma follows the model (same closure, rank k_max), so its
error is the closure's alone and the difference to the free model at rank k_max is the centre's
drift. Spikes (MLP problems): GD's loss spikes and the free-energy peaks matched to them
(``free_energy.matched_spikes``).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np

import eosflow
from eosflow.compare import (
    AVERAGING_WINDOW,
    averaged_envelope_error,
    averaged_loss_error,
    envelope_error,
    predicted_amplitude,
    relative_l1_error,
    window_averaged_envelope,
)
from eosflow.experiment import prepare, run
from eosflow.leaderboard import suite_entries
from eosflow.load import load_params
from eosflow.precision import precision
from free_energy import matched_spikes

OUT = Path("/tmp/eosflow_free_energy_networks")


def table_of(problem: str, overrides: dict) -> dict:
    """The leaderboard's spec of ``problem`` with GD and the free-energy model; ``overrides``: dotted keys."""
    entry = {e.name: e for e in suite_entries("all")}[problem]
    table = copy.deepcopy(entry.table)
    table["processes"] = ["gd", "free_energy"]
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        node = table
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return table


def eos_start(lr_sharpness: np.ndarray) -> int:
    return int(np.argmax(lr_sharpness >= 1.9))


def anchored_amplitudes(table: dict, centres: np.ndarray) -> np.ndarray:
    """sqrt(tr Sigma) of the free-energy model with theta reset to GD's centre before every step."""
    table = {**copy.deepcopy(table), "processes": ["free_energy"]}
    with precision(table["dtype"]):
        _, problem, _, built = prepare(table)
        flow = built["free_energy"]
        state = flow.init(problem.w0)
        step = eqx.filter_jit(lambda s, c: flow.step(s._replace(z=s.z._replace(centre=c))))
        amplitudes = []
        for centre in centres:
            state, row = step(state, jnp.asarray(centre, problem.w0.dtype))
            amplitudes.append(float(np.sqrt(np.sum(np.asarray(row["covariance"], dtype=np.float64)))))
    return np.array(amplitudes)


def scores(amplitude: np.ndarray, oscillation: np.ndarray, start: int) -> dict[str, float]:
    eos = slice(start, None)
    return {
        "envelope": envelope_error(amplitude, oscillation),
        "envelope (avg)": averaged_envelope_error(amplitude, oscillation),
        "envelope (avg, EoS)": relative_l1_error(
            window_averaged_envelope(amplitude)[eos], window_averaged_envelope(oscillation)[eos]
        ),
        "RMS ratio (EoS)": float(np.sqrt(np.nanmean(amplitude[eos] ** 2) / np.nanmean(oscillation[eos] ** 2))),
    }


def breakdown(problem: str, skip_run: bool, only: tuple[int, ...] = ()) -> None:
    k_max = table_of(problem, {})["spectrum"]["k_max"]
    variants = {
        "leaderboard closure (floor, k 1 -> k_max)": {"record.params_every": 1},
        "floor = false": {"free_energy.floor": False},
        f"rank {k_max} from step 0": {"spectrum.k": k_max},
        "floor = false, rounding = 0.04 (later onset)": {"free_energy.floor": False, "free_energy.rounding": 0.04},
        "implicit": {"free_energy.implicit": True},
        "implicit, floor = false, rounding = 0.25 (measured)": {
            "free_energy.implicit": True,
            "free_energy.floor": False,
            "free_energy.rounding": 0.25,
        },
    }
    rows, spike_lines = {}, []
    for index, (label, overrides) in enumerate(variants.items()):
        if only and index not in only:
            continue
        run_dir = OUT / f"{problem}-{index}"
        if not skip_run:
            run(table_of(problem, overrides), run_dir, overwrite=True)
        ds = eosflow.load(run_dir)
        oscillation = ds.oscillation.sel(process="gd").values.astype(np.float64)
        start = eos_start(ds.lr_sharpness.sel(process="gd").values)
        amplitude = predicted_amplitude(ds, "free_energy")
        gd_loss = ds.loss.sel(process="gd").values.astype(np.float64)
        free_energy = ds.free_energy.sel(process="free_energy").values.astype(np.float64)
        rows[label] = {
            **scores(amplitude, oscillation, start),
            "loss (avg)": averaged_loss_error(free_energy, gd_loss),
            "distance": float(np.nanmean(ds.distance.sel(process="free_energy").values)),
        }
        sharpness = {p: ds.lr_sharpness.sel(process=p).values for p in ("gd", "free_energy")}
        gap = sharpness["free_energy"][20:start] - sharpness["gd"][20:start]
        spike_lines.append(
            f"  {label}: lr S over the EoS phase, GD {np.nanmean(sharpness['gd'][start:]):.3f} "
            f"(sd {np.nanstd(sharpness['gd'][start:]):.3f}), model {np.nanmean(sharpness['free_energy'][start:]):.3f} "
            f"(sd {np.nanstd(sharpness['free_energy'][start:]):.3f}); model - GD before the edge (steps 20-{start}): "
            f"mean {np.nanmean(gap):+.4f}"
        )
        found, matched = matched_spikes(gd_loss, free_energy, start)
        spike_lines.append(f"  {label}: {matched} of {len(found)} matched; {'; '.join(found) or 'no GD spikes'}")
        if label.startswith("leaderboard") and not only:
            _, params = load_params(run_dir, "gd")
            centres = params.copy()
            centres[1:-1] = (params[:-2] + 2 * params[1:-1] + params[2:]) / 4
            anchored = anchored_amplitudes(table_of(problem, {"spectrum.k": k_max}), centres)
            anchored_scores = scores(anchored, oscillation, start)
    if not only:
        rows[f"re-anchored to GD's centre (rank {k_max})"] = {**anchored_scores, "loss (avg)": np.nan, "distance": 0.0}
    columns = list(next(iter(rows.values())))
    print(f"\n### {problem} (EoS from step {start}; W = {AVERAGING_WINDOW})\n")
    print("| variant | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    print("\nlr S, and GD's loss spikes -> nearest free-energy peak (lag, height ratio):")
    print("\n".join(spike_lines), flush=True)


def rounding_source(problem: str, steps: range) -> None:
    """GD's per-step rounding e_k = w_{k+1} - (w_k - lr g(w_k)) (float64 arithmetic on GD's float32
    iterates and float32 gradients), in units of eps rms(w): per coordinate, projected on the tracked
    eigenvectors at w_k, and its alternating part (e_k - e_{k-1}) / 2; the model's source is
    ``rounding`` eps rms(theta) per step (needs the leaderboard-closure run, which saves GD's iterates)."""
    from eosflow.spectrum import hessian_eigenpairs

    table = table_of(problem, {})
    _, params = load_params(OUT / f"{problem}-0", "gd")
    lr = float(table["lr"])
    with precision(table["dtype"]):
        _, built_problem, _, _ = prepare({**table, "processes": ["gd"]})
        objective = built_problem.objective
        grad = eqx.filter_jit(lambda w: objective.grad(w))
        measure = eqx.filter_jit(lambda w, v: hessian_eigenpairs(objective, w, v, tol=1e-4, max_iters=100))
        vectors = jnp.asarray(np.random.default_rng(0).standard_normal((params.shape[1], 3)), params.dtype)
        coordinate, projected, scale = [], [], []
        for k in steps:
            w = params[k].astype(np.float64)
            g = np.asarray(grad(jnp.asarray(params[k])), dtype=np.float64)
            e = params[k + 1].astype(np.float64) - (w - lr * g)
            vectors = measure(jnp.asarray(params[k]), vectors).vectors
            coordinate.append(np.sqrt(np.mean(e**2)))
            projected.append(np.asarray(vectors, np.float64).T @ e)
            scale.append(np.finfo(params.dtype).eps * np.sqrt(np.mean(w**2)))
    projected, unit = np.array(projected), np.mean(scale)
    alternating = (projected[1:] - projected[:-1]) / 2
    print(f"\nGD's rounding on {problem}, steps {steps.start}-{steps.stop - 1}, in units of eps rms(w):")
    print(f"  per coordinate (RMS): {np.mean(coordinate) / unit:.3f}")
    print(f"  projected on the 3 tracked eigenvectors (RMS): {np.sqrt(np.mean(projected**2, axis=0)) / unit}")
    print(f"  alternating part (e_k - e_(k-1))/2 on them: {np.sqrt(np.mean(alternating**2, axis=0)) / unit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="mlp_digits,cnn_digits,mlp_moons")
    parser.add_argument("--skip-run", action="store_true", help=f"analyze the runs already in {OUT}")
    parser.add_argument("--variants", default="", help="comma-separated indices of the variants to run (default: all)")
    parser.add_argument("--rounding", action="store_true", help="also measure GD's rounding source (steps 60-199)")
    args = parser.parse_args()
    for problem in args.problems.split(","):
        breakdown(problem, args.skip_run, tuple(int(i) for i in args.variants.split(",") if i))
        if args.rounding:
            rounding_source(problem, range(60, 200))


if __name__ == "__main__":
    main()
