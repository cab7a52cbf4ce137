"""Mean-field two-layer network at the edge of stability: GD against the particle model.

    .venv/bin/python benchmarks/meanfield.py [--widths 64 256 1024 4096] [--eta 4] [--steps 1000]

The default set is pure-noise targets (n = 512, D = 8): memorizing them keeps GD at the edge of
stability for the whole run (the teacher set is fitted within ~100 steps; docs/meanfield.md).
Prints, for each width N: GD (lr = N eta) against the particle model (envelope = RMS per-particle
oscillation, two-step-averaged loss); then the convergence of the particle model's and of GD's
macroscopic curves to the largest N (error and fitted rate in N); then the monotonicity of the
macroscopic free energy along the particle flow. Writes the joint-distribution figure to
docs/images/meanfield_joint.png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np
from matplotlib.figure import Figure

jax.config.update("jax_enable_x64", True)

from eosflow import meanfield as mf  # noqa: E402
from eosflow.problems.registry import build_problem  # noqa: E402


def joint_distribution_figure(snapshots: mf.Particles, steps: np.ndarray, path, coordinate: int = 0):
    """Scatter of (p_i, delta_i) along one coordinate (0: the output weight a_i) at a few times."""
    centres, oscillation = (np.asarray(x) for x in snapshots)
    picks = np.unique(np.linspace(0, len(centres) - 1, 4).astype(int))
    fig = Figure(figsize=(3.2 * len(picks), 3.0))
    axes = fig.subplots(1, len(picks), sharey=True)
    for ax, index in zip(np.atleast_1d(axes), picks):
        ax.scatter(centres[index][:, coordinate], oscillation[index][:, coordinate], s=4, alpha=0.6)
        ax.set_title(f"t = {int(steps[index])}")
        ax.set_xlabel("a_i" if coordinate == 0 else f"w_i[{coordinate - 1}]")
    np.atleast_1d(axes)[0].set_ylabel("delta_i (oscillation share)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def smooth(x: np.ndarray, width: int) -> np.ndarray:
    kernel = np.ones(width) / width
    return np.convolve(x, kernel, mode="valid")


def relative_error(model: np.ndarray, gd: np.ndarray, mask: np.ndarray) -> float:
    """mean |model - gd| / mean gd over the steps in ``mask``."""
    return float(np.mean(np.abs(model - gd)[mask]) / np.mean(gd[mask]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--eta", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--dataset", default="gaussian", help="gaussian: pure-noise targets; teacher: a tanh teacher")
    parser.add_argument("--input-dim", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--noise", type=float, default=0.0, help="label noise of the teacher set")
    parser.add_argument("--substeps", type=int, default=4, help="Euler substeps per unit time of the particle model")
    parser.add_argument("--skip", type=int, default=30, help="steps of initial transient left out")
    parser.add_argument("--profile", action="store_true", help="print GD and model curves every steps/20")
    parser.add_argument(
        "--spectrum",
        action="store_true",
        help="print eta N lambda_1..6 of the dense Hessian at GD's two-step centre at 4 times",
    )
    parser.add_argument("--figure", default="docs/images/meanfield_joint.png")
    args = parser.parse_args()
    eta, steps = args.eta, args.steps
    curves = {}
    print(f"eta = {eta} (GD lr = N eta), {steps} steps, {args.dataset} set n = {args.n_train}, D = {args.input_dim}")
    print(
        "relative errors: mean |model - GD| / mean GD over GD's EoS phase (envelope both smoothed over 4 steps);"
        " 'late': the same over t >= steps/2"
    )
    print(
        "| N | time s | GD envelope | model envelope | env. err | env. err late | GD 2-step loss | model F"
        " | loss err | loss err late |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for width in args.widths:
        problem, _ = build_problem(
            {
                "name": "two_layer_meanfield",
                "width": width,
                "n_train": args.n_train,
                "dataset": args.dataset,
                "input_dim": args.input_dim,
                "noise": args.noise,
            },
            0,
            "float64",
        )
        start = time.time()
        iterates, losses = mf.particle_gd(problem.objective, problem.w0, width, eta, steps + 1)
        _, observed, snapshots = mf.particle_model(
            problem.objective, problem.w0, width, eta, steps, substeps=args.substeps, record_every=max(1, steps // 6)
        )
        elapsed = time.time() - start
        observed = mf.macroscopic(observed)
        _, delta = mf.gd_oscillation(np.asarray(iterates))  # k = 1 .. steps
        gd_env = np.sqrt(np.mean(np.sum(delta**2, axis=2), axis=1))[: steps - 1]
        gd_loss = np.asarray(losses)
        gd_avg = 0.5 * (gd_loss[1:steps] + gd_loss[2 : steps + 1])  # two-step average, k = 1 .. steps-1
        model_env, model_loss = observed["amplitude"][1:steps], observed["averaged_risk"][1:steps]
        time_index = np.arange(len(gd_env))
        after_catapult = time_index >= args.skip
        eos = after_catapult & (gd_env > 0.1 * gd_env[after_catapult].max())
        late = eos & (time_index >= steps // 2)
        env_gd, env_model = smooth(gd_env, 4), smooth(model_env, 4)
        env_err, env_late = (relative_error(env_model, env_gd, mask[3:]) for mask in (eos, late))
        loss_err, loss_late = (relative_error(model_loss, gd_avg, mask) for mask in (eos, late))
        print(
            f"| {width} | {elapsed:.0f} | {np.mean(gd_env[eos]):.4g} | {np.mean(model_env[eos]):.4g} | "
            f"{env_err:.3f} | {env_late:.3f} | {np.mean(gd_avg[eos]):.3g} | {np.mean(model_loss[eos]):.3g} | "
            f"{loss_err:.3f} | {loss_late:.3f} |"
        )
        curves[width] = (observed, snapshots, {"averaged_risk": gd_avg, "amplitude": gd_env})
        if args.spectrum:
            for t in (steps // 10, 3 * steps // 10, 6 * steps // 10, 9 * steps // 10):
                centre = mf.to_flat(0.5 * (iterates[t] + iterates[t + 1]))
                top = np.linalg.eigvalsh(np.asarray(problem.objective.hessian(centre)))[::-1][:6]
                print(f"   t={t} eta N lambda_1..6 at GD's two-step centre: {np.round(eta * width * top, 3)}")
        if args.profile:
            for t in range(0, steps - 1, max(1, steps // 20)):
                print(
                    f"   t={t + 1} GD env {gd_env[t]:.3g} model env {model_env[t]:.3g} "
                    f"GD loss {gd_avg[t]:.3g} model F {model_loss[t]:.3g}"
                )

    reference = max(curves)
    print(f"\nconvergence in N (reference N = {reference}); error = RMS over t of the curve minus the reference's")
    print("| N | model loss | model envelope | model free energy | GD loss | GD envelope |")
    print("|---|---|---|---|---|---|")
    columns = [
        (0, "averaged_risk", "model loss"),
        (0, "amplitude", "model envelope"),
        (0, "free_energy", "model free energy"),
        (2, "averaged_risk", "GD loss"),
        (2, "amplitude", "GD envelope"),
    ]
    errors = {label: [] for _, _, label in columns}
    smaller = [width for width in sorted(curves) if width != reference]
    for width in smaller:
        row = []
        for which, key, label in columns:
            ours, ref = curves[width][which][key], curves[reference][which][key]
            n = min(len(ours), len(ref))
            errors[label].append(np.sqrt(np.mean((ours[:n] - ref[:n]) ** 2)))
            row.append(errors[label][-1])
        print("| " + " | ".join([str(width)] + [f"{value:.3g}" for value in row]) + " |")
    if len(smaller) >= 2:
        for label, values in errors.items():
            slope = np.polyfit(np.log(smaller), np.log(values), 1)[0]
            print(f"fitted rate ({label}): error ~ N^{slope:.2f}")

    observed, snapshots, _ = curves[reference]
    energy = observed["free_energy"]
    for window in (1, 2, 10):
        smoothed = smooth(energy[10:], window)
        rises = np.diff(smoothed)
        scale = np.max(np.abs(energy[10:] - energy[-1])) + 1e-300
        print(
            f"macroscopic free energy (N = {reference}, t >= 10, window {window}): "
            f"{np.mean(rises > 0):.3f} of steps increase, largest rise {rises.max() / scale:.2e} of its range"
        )
    raw = np.diff(observed["risk"][10:])
    print(f"risk at the centres: {np.mean(raw > 0):.3f} of steps increase")
    record = np.arange(0, steps, max(1, steps // 6))
    figure = Path(args.figure)
    figure.parent.mkdir(parents=True, exist_ok=True)
    joint_distribution_figure(snapshots, record, figure)
    print(f"figure: {figure}")


if __name__ == "__main__":
    main()
