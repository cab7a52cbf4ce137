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

Variants: the closure that was the default until issue 20 (``OLD``: rod floor, rounding 1, no
implicit term; rank = the tracked eigenpairs, k = 1 growing between chunks); ``floor = false`` (the
oscillation regrows from GD's rounding only); rank k_max from step 0; ``floor = false`` with a 25
times smaller rounding source (the onset a few steps later: how much the onset's timing decides);
the centre's implicit regularization (``implicit = true``) alone; and ``NEW``, the defaults since
issue 20 (``implicit = true``, ``floor = false`` and the measured rounding 0.25); and (only when every
variant runs) the model *re-anchored to GD's centre*: before every step theta is set to GD's
(w_{k-1} + 2 w_k + w_{k+1}) / 4 and only Sigma follows the model (the old closure, rank k_max), so
its error is the closure's alone and the difference to the free model at rank k_max is the centre's
drift. Spikes: GD's loss spikes and the free-energy peaks matched to them
(``free_energy.matched_spikes``).

``--catapult`` (after the variants, on the ``NEW`` run): the error with the model shifted in time
onto GD's first spike, outside the mistimed catapult's window, and of the model re-anchored at the
edge (started from GD's centre and oscillation at a step t0, then free): ``catapult``.
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
    SMOOTHING,
    averaged_envelope_error,
    averaged_loss_error,
    envelope_error,
    predicted_amplitude,
    relative_l1_error,
    running_rms,
    window_averaged_envelope,
)
from eosflow.experiment import prepare, run
from eosflow.leaderboard import suite_entries, with_processes
from eosflow.load import load_params
from eosflow.precision import precision
from free_energy import matched_spikes

OUT = Path("/tmp/eosflow_free_energy_networks")


def table_of(problem: str, overrides: dict) -> dict:
    """The leaderboard's spec of ``problem`` with GD and the free-energy model; ``overrides``: dotted keys."""
    entry = {e.name: e for e in suite_entries("all")}[problem]
    table = with_processes(copy.deepcopy(entry.table), ["gd", "free_energy"])
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


# the closure that was the default until issue 20 switched it (every variant spells its options out)
OLD = {"free_energy.floor": True, "free_energy.rounding": 1.0, "free_energy.implicit": False}
NEW = {"free_energy.floor": False, "free_energy.rounding": 0.25, "free_energy.implicit": True}
NEW_LABEL = "implicit, floor = false, rounding = 0.25 (the defaults)"


def variants_of(problem: str) -> dict[str, dict]:
    k_max = table_of(problem, {})["spectrum"]["k_max"]
    return {
        "old defaults (floor, rounding 1, k 1 -> k_max)": {**OLD, "record.params_every": 1},
        "floor = false": {**OLD, "free_energy.floor": False},
        f"rank {k_max} from step 0": {**OLD, "spectrum.k": k_max},
        "floor = false, rounding = 0.04 (later onset)": {
            **OLD,
            "free_energy.floor": False,
            "free_energy.rounding": 0.04,
        },
        "implicit": {**OLD, "free_energy.implicit": True},
        NEW_LABEL: {**NEW, "record.params_every": 1},
    }


def breakdown(problem: str, skip_run: bool, only: tuple[int, ...] = ()) -> None:
    k_max = table_of(problem, {})["spectrum"]["k_max"]
    variants = variants_of(problem)
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
        if label.startswith("old defaults") and not only:
            _, params = load_params(run_dir, "gd")
            centres = params.copy()
            centres[1:-1] = (params[:-2] + 2 * params[1:-1] + params[2:]) / 4
            anchored = anchored_amplitudes(table_of(problem, {**OLD, "spectrum.k": k_max}), centres)
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


def delayed(x: np.ndarray, steps: int) -> np.ndarray:
    """x shifted later in time by ``steps`` (earlier if negative), the end values held."""
    return x[np.clip(np.arange(x.size) - steps, 0, x.size - 1)]


def first_peaks(gd_loss: np.ndarray, free_energy: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """GD's loss spikes and the free-energy peaks from ``start`` on (the definitions of ``matched_spikes``)."""
    from free_energy import spikes

    two_step = np.convolve(gd_loss, [0.5, 0.5], mode="same")
    return spikes(two_step, 0.5, start), spikes(free_energy, 0.1, start)


def restarted(table: dict, params: np.ndarray, t0: int, steps: int) -> dict[str, np.ndarray]:
    """The model re-anchored at the edge: started at step ``t0`` from GD's centre
    (w_{t0-1} + 2 w_t0 + w_{t0+1}) / 4 with Sigma = GD's oscillation delta = (w_{t0+1} - 2 w_t0 + w_{t0-1}) / 4
    projected on the top k_max eigenvectors there (a_j = |u_j . delta|), then free for ``steps`` steps."""
    from eosflow.flows.free_energy import FreeEnergyPoint
    from eosflow.spectrum import hessian_eigenpairs

    table = {**copy.deepcopy(table), "processes": ["free_energy"]}
    table["spectrum"]["k"] = table["spectrum"]["k_max"]
    w = params.astype(np.float64)
    centre = (w[t0 - 1] + 2 * w[t0] + w[t0 + 1]) / 4
    delta = (w[t0 + 1] - 2 * w[t0] + w[t0 - 1]) / 4
    with precision(table["dtype"]):
        _, problem, _, built = prepare(table)
        flow = built["free_energy"]
        theta = jnp.asarray(centre, problem.w0.dtype)
        state = flow.init(theta)
        pairs = hessian_eigenpairs(problem.objective, theta, state.vectors, tol=1e-5, max_iters=300)
        vectors = pairs.vectors[:, jnp.argsort(-pairs.values)]
        amplitudes = jnp.abs(vectors.T @ jnp.asarray(delta, problem.w0.dtype))
        # step 1: past the rod seed of step 0, so Sigma starts as GD's
        state = state._replace(z=FreeEnergyPoint(theta, amplitudes), vectors=vectors, step=jnp.asarray(1))
        step = eqx.filter_jit(flow.step)
        rows: dict[str, list] = {"amplitude": [], "free_energy": [], "lr_sharpness": [], "position": []}
        for _ in range(steps):
            state, row = step(state)
            rows["amplitude"].append(float(np.sqrt(np.sum(np.asarray(row["covariance"], dtype=np.float64)))))
            rows["free_energy"].append(float(row["free_energy"]))
            rows["lr_sharpness"].append(float(row["lr_sharpness"]))
            rows["position"].append(np.asarray(row["position"], dtype=np.float64))
    return {key: np.array(value) for key, value in rows.items()}


def catapult_of(lr_sharpness: np.ndarray, amplitude: np.ndarray) -> tuple[str, str, str]:
    """The first catapult of a run (step 0 = t0): the oscillation's peak (value, step) before lr S, once
    past 2, falls below 1.9 (+10 steps), the lowest lr S in the 30 steps after it, and the first step
    after that minimum at which lr S is back at 2."""
    above = int(np.argmax(lr_sharpness >= 2.0))
    below = np.flatnonzero(lr_sharpness[above:] < 1.9)
    drop = above + int(below[0]) if below.size else lr_sharpness.size
    peak = int(np.nanargmax(amplitude[: drop + 10]))
    low = peak + int(np.nanargmin(lr_sharpness[peak : peak + 30]))
    back = np.flatnonzero(lr_sharpness[low:] >= 2.0)
    return (
        f"{amplitude[peak]:.3f}, +{peak}",
        f"{lr_sharpness[low]:.2f}",
        f"+{low + back[0]}" if back.size else "never",
    )


def catapult(problem: str) -> None:
    """What remains of the default closure's envelope error (the run of the last variant, ``NEW``):
    the error with the model shifted in time onto GD's first spike (a diagnostic), the error outside
    the window of the mistimed catapult (GD's second spike and the model's nearest burst) and the share
    of the error inside it, and the model re-anchored at the edge (:func:`restarted`) at three steps."""
    index = len(variants_of(problem)) - 1
    run_dir = OUT / f"{problem}-{index}"
    ds = eosflow.load(run_dir)
    oscillation = ds.oscillation.sel(process="gd").values.astype(np.float64)
    amplitude = predicted_amplitude(ds, "free_energy")
    gd_loss = ds.loss.sel(process="gd").values.astype(np.float64)
    free_energy = ds.free_energy.sel(process="free_energy").values.astype(np.float64)
    lr_s = {p: ds.lr_sharpness.sel(process=p).values.astype(np.float64) for p in ("gd", "free_energy")}
    start, n = eos_start(lr_s["gd"]), oscillation.size
    gd_spikes, model_peaks = first_peaks(gd_loss, free_energy, start)
    print(f"\n### {problem}: what remains ({NEW_LABEL}; EoS from step {start}; W = {AVERAGING_WINDOW})\n")
    print(f"GD's spikes {list(gd_spikes)}; the model's F peaks {list(model_peaks)}")
    gd_avg, model_avg = window_averaged_envelope(oscillation), window_averaged_envelope(amplitude)

    def both(prediction: np.ndarray, mask: np.ndarray | None = None) -> str:
        keep = np.ones(n, bool) if mask is None else mask
        averaged = relative_l1_error(window_averaged_envelope(prediction)[keep], gd_avg[keep])
        pointwise = relative_l1_error(prediction[keep], running_rms(oscillation, SMOOTHING)[keep])
        return f"{averaged:.3f} | {pointwise:.3f}"

    print("| diagnostic | envelope (avg) | envelope |")
    print("|---|---|---|")
    print(f"| the model as run | {both(amplitude)} |")
    lag = int(model_peaks[np.argmin(np.abs(model_peaks - gd_spikes[0]))] - gd_spikes[0])
    print(
        f"| shifted by {-lag:+d} steps onto GD's first spike (step {gd_spikes[0]}) | {both(delayed(amplitude, -lag))} |"
    )
    shifts = range(-80, 81)
    errors = [averaged_envelope_error(delayed(amplitude, s), oscillation) for s in shifts]
    best = shifts[int(np.argmin(errors))]
    print(f"| best single shift ({best:+d} steps) | {both(delayed(amplitude, best))} |")
    if len(gd_spikes) > 1:
        t_gd = int(gd_spikes[1])
        t_model = int(model_peaks[np.argmin(np.abs(model_peaks - t_gd))])
        later = model_peaks[model_peaks > gd_spikes[0] + lag + 10]
        if later.size:  # the model's own next burst after its first, whatever GD's is near
            t_model = int(later[0])
        low, high = max(min(t_gd, t_model) - 20, 0), min(max(t_gd, t_model) + 20, n)
        outside = np.ones(n, bool)
        outside[low:high] = False
        gap = np.abs(model_avg - gd_avg)
        share, before = gap[~outside].sum() / gap.sum(), gap[:start].sum() / gap.sum()
        print(
            f"| outside the mistimed catapult's steps {low}-{high - 1} (GD's burst at {t_gd}, the model's at "
            f"{t_model}; {share:.0%} of the averaged error's sum is inside) | {both(amplitude, outside)} |"
        )
        eos = outside & (np.arange(n) >= start)
        print(
            f"| outside it and from the EoS start on ({before:.0%} of the sum is before step {start}) "
            f"| {both(amplitude, eos)} |"
        )
    _, params = load_params(run_dir, "gd")
    table = table_of(problem, NEW)
    returns = np.flatnonzero((lr_s["gd"][1:] >= 1.9) & (lr_s["gd"][:-1] < 1.9)) + 1
    second_edge = [int(t) for t in returns if t > gd_spikes[0] + 5]
    starts = {"GD's EoS start (lr S >= 1.9)": start, "10 steps before GD's first spike": int(gd_spikes[0]) - 10}
    if second_edge:
        starts["GD back at lr S = 1.9 after the first catapult"] = second_edge[0] - 1
    print("\nRe-anchored at the edge: from step t0 on, GD's centre and oscillation, then the model alone;")
    print("scored over steps t0..end against GD, beside the free model over the same steps:\n")
    print(
        "| t0 | envelope (avg): re-anchored / free | envelope: re-anchored / free | next GD spike -> model peak "
        "| peak amplitude, step: GD / re-anchored | lowest lr S after it: GD / re-anchored "
        "| back at lr S = 2: GD / re-anchored |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, t0 in starts.items():
        out = restarted(table, params, t0, n - t0)
        tail = slice(t0, None)
        gd_tail = oscillation[tail]
        errors_avg = [averaged_envelope_error(a, gd_tail) for a in (out["amplitude"], amplitude[tail])]
        errors_pt = [envelope_error(a, gd_tail) for a in (out["amplitude"], amplitude[tail])]
        spikes_after, peaks_after = first_peaks(gd_loss[tail], out["free_energy"], 1)
        next_spike = "none"
        if spikes_after.size and peaks_after.size:
            t = spikes_after[0]
            nearest = peaks_after[np.argmin(np.abs(peaks_after - t))]
            next_spike = f"{t0 + t}: {nearest - t:+d} steps"
        dynamics = [
            catapult_of(series, amp)
            for series, amp in ((lr_s["gd"][tail], gd_tail), (out["lr_sharpness"], out["amplitude"]))
        ]
        print(
            f"| {label} ({t0}) | {errors_avg[0]:.3f} / {errors_avg[1]:.3f} | {errors_pt[0]:.3f} / {errors_pt[1]:.3f} "
            f"| {next_spike} | " + " | ".join(" / ".join(d[i] for d in dynamics) for i in range(3)) + " |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="mlp_digits,cnn_digits,mlp_moons")
    parser.add_argument("--skip-run", action="store_true", help=f"analyze the runs already in {OUT}")
    parser.add_argument("--variants", default="", help="comma-separated indices of the variants to run (default: all)")
    parser.add_argument("--rounding", action="store_true", help="also measure GD's rounding source (steps 60-199)")
    parser.add_argument(
        "--catapult", action="store_true", help="also what remains of the defaults' error (onset shift, re-anchoring)"
    )
    args = parser.parse_args()
    for problem in args.problems.split(","):
        breakdown(problem, args.skip_run, tuple(int(i) for i in args.variants.split(",") if i))
        if args.catapult:
            catapult(problem)
        if args.rounding:
            rounding_source(problem, range(60, 200))


if __name__ == "__main__":
    main()
