"""Mean-field two-layer network at the edge of stability: GD against the particle model.

    .venv/bin/python benchmarks/meanfield.py [--widths 64 256 1024 4096] [--eta 2.3] [--steps 300]

Prints, for each width N: GD (lr = N eta) against the particle model (envelope = RMS per-particle
oscillation, two-step-averaged loss, time of the largest loss spike); then the convergence of the
particle model's macroscopic curves to the largest N (error and fitted rate in N); then the
monotonicity of the macroscopic free energy along the particle flow. Writes the joint-distribution
figure to docs/images/meanfield_joint.png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

from eosflow import meanfield as mf  # noqa: E402
from eosflow.problems.registry import build_problem  # noqa: E402


def smooth(x: np.ndarray, width: int) -> np.ndarray:
    kernel = np.ones(width) / width
    return np.convolve(x, kernel, mode="valid")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--eta", type=float, default=2.3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--skip", type=int, default=30, help="steps of initial transient left out")
    parser.add_argument("--profile", action="store_true", help="print GD and model curves every steps/20")
    parser.add_argument("--figure", default="docs/images/meanfield_joint.png")
    args = parser.parse_args()
    eta, steps = args.eta, args.steps
    curves = {}
    print(f"eta = {eta} (GD lr = N eta), {steps} steps, teacher set n = {args.n_train}")
    print("| N | time s | GD envelope | model envelope | env. rel. err | GD 2-step loss | model F | loss rel. err"
          " | GD spike t | model spike t |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for width in args.widths:
        problem, _ = build_problem({"name": "two_layer_meanfield", "width": width, "n_train": args.n_train,
                                    "noise": args.noise}, 0, "float64")
        start = time.time()
        iterates, losses = mf.particle_gd(problem.objective, problem.w0, width, eta, steps + 1)
        _, observed, snapshots = mf.particle_model(problem.objective, problem.w0, width, eta, steps,
                                                   record_every=max(1, steps // 6))
        elapsed = time.time() - start
        observed = mf.macroscopic(observed)
        _, delta = mf.gd_oscillation(np.asarray(iterates))  # k = 1 .. steps
        gd_env = np.sqrt(np.mean(np.sum(delta**2, axis=2), axis=1))[: steps - 1]
        gd_loss = np.asarray(losses)
        gd_avg = 0.5 * (gd_loss[1:steps] + gd_loss[2:steps + 1])  # two-step average, k = 1 .. steps-1
        model_env, model_loss = observed["amplitude"][1:steps], observed["averaged_risk"][1:steps]
        late = np.arange(len(gd_env)) >= args.skip  # after the initial catapult
        eos = late & (gd_env > 0.1 * gd_env[late].max())
        env_err = np.mean(np.abs(smooth(model_env, 4) - smooth(gd_env, 4))[eos[3:]]) / np.mean(gd_env[eos])
        loss_err = np.mean(np.abs(model_loss - gd_avg)[eos]) / np.mean(gd_avg[eos])
        spike_gd, spike_model = 1 + int(np.argmax(gd_avg[10:])) + 10, 1 + int(np.argmax(model_loss[10:])) + 10
        print(f"| {width} | {elapsed:.0f} | {np.mean(gd_env[eos]):.4g} | {np.mean(model_env[eos]):.4g} | "
              f"{env_err:.3f} | {np.mean(gd_avg[eos]):.3g} | {np.mean(model_loss[eos]):.3g} | {loss_err:.3f} | "
              f"{spike_gd} | {spike_model} |")
        curves[width] = (observed, snapshots)
        if args.profile:
            for t in range(0, steps - 1, max(1, steps // 20)):
                print(f"   t={t + 1} GD env {gd_env[t]:.3g} model env {model_env[t]:.3g} "
                      f"GD loss {gd_avg[t]:.3g} model F {model_loss[t]:.3g}")

    reference = max(curves)
    print(f"\nconvergence in N of the particle model (reference N = {reference}); error = RMS over t")
    print("| N | loss curve error | envelope error | free-energy error |")
    print("|---|---|---|---|")
    errors = []
    for width in sorted(curves):
        if width == reference:
            continue
        observed, ref = curves[width][0], curves[reference][0]
        row = [np.sqrt(np.mean((observed[k] - ref[k]) ** 2)) for k in ("averaged_risk", "amplitude", "free_energy")]
        errors.append((width, row))
        print(f"| {width} | {row[0]:.3g} | {row[1]:.3g} | {row[2]:.3g} |")
    if len(errors) >= 2:
        widths = np.log([w for w, _ in errors])
        for index, label in enumerate(("loss", "envelope", "free energy")):
            slope = np.polyfit(widths, np.log([r[index] for _, r in errors]), 1)[0]
            print(f"fitted rate ({label}): error ~ N^{slope:.2f}")

    observed, snapshots = curves[reference]
    energy = observed["free_energy"]
    for window in (1, 2, 10):
        smoothed = smooth(energy[10:], window)
        rises = np.diff(smoothed)
        scale = np.max(np.abs(energy[10:] - energy[-1])) + 1e-300
        print(f"macroscopic free energy (N = {reference}, t >= 10, window {window}): "
              f"{np.mean(rises > 0):.3f} of steps increase, largest rise {rises.max() / scale:.2e} of its range")
    raw = np.diff(observed["risk"][10:])
    print(f"risk at the centres: {np.mean(raw > 0):.3f} of steps increase")
    record = np.arange(0, steps, max(1, steps // 6))
    figure = Path(args.figure)
    figure.parent.mkdir(parents=True, exist_ok=True)
    mf.joint_distribution_figure(snapshots, record, figure)
    print(f"figure: {figure}")


if __name__ == "__main__":
    main()
