"""Cost and accuracy of the central flow against GD with eigenpairs, on the reference problem.

Swish MLP 8-16-16-4 with biases (484 parameters), 128 standard-normal inputs and 4-dim targets,
loss = mean over examples of the summed squared error, GD with eta = 0.1, 5 tracked eigenvectors,
Euler substeps (4 per step at S = 2/eta), 600 steps.

Timing: every process runs its steps once to compile, then ``--repeats`` more times from the same
initialization, in this process; the table reports the best and median ms per step, and the
central flow is also timed over the last third of the run alone (where two or three eigenvalues
are critical). The reference implementations measured 40-46 ms per central-flow step and
4.7-5.1 ms per GD-with-eigenpairs step on this machine class (ratio 8.4-8.9).

Accuracy (``--accuracy``): one lockstep experiment of the four processes; prints each flow's
distance to GD relative to gradient flow's, its predicted time-averaged loss against GD's
Gaussian-smoothed loss over the EoS phase, and its sharpness while Sigma != 0.

    python benchmarks/central_flow.py [--steps 600] [--repeats 3] [--dtype float32] [--accuracy]

Per phase on the digits MLP (``--digits``): the central flow (lr = 0.4, tanh MLP 64-w-w-10 on 500
digits, float32) with k = 1 and k = 3 tracked pairs at widths 32 (d = 3466) and 140 (d = 30250) (``--widths``);
per phase (before the edge: no critical direction; edge: m >= 1 critical) HVPs per step (all, and
the eigensolver's alone), gradient-equivalents per step (gradient 1, HVP 2, third derivative 4) and
the median relative error of the top k eigenvalues the flow measured at its centre against ARPACK
at tol 0 (float64) every ``--every`` steps. ``--quick``: width 32 only.

    python benchmarks/central_flow.py --digits [--quick] [--digits-steps 500] [--every 50]
        [--tol 1e-3] [--guard 1] [--cluster 0] [--max-iters 30] [--set remeasure=false]
        [--save ref.npz | --against ref.npz [--against-k K]]

The eigensolver's settings are the run's ``[spectrum]`` (``--cluster``: lobpcg's cluster contract);
``--save`` keeps the checkpointed centres and ``--against`` prints, per run, the largest
||w_t - w_t(ref)|| / ||w_t(ref) - w_0|| over them (how far a setting moves the trajectory), against
the saved run of the same k or of ``--against-k``. "critical m" is the flow's critical count at the
edge; "every tracked pair critical" the share of those steps with m = k, where no tracked eigenvalue
below the critical threshold shows that the critical set is complete.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tomllib

import jax
import numpy as np
from scipy.ndimage import gaussian_filter1d

jax.config.update("jax_enable_x64", True)  # this script's choice: its oracles and prepare() compute in float64

import eosflow
from eosflow.experiment import prepare, run

PROCESSES = ["gd", "gradient_flow", "projected_flow", "central_flow"]


def reference_spec(args) -> dict:
    return {
        "steps": args.steps,
        "lr": args.lr,
        "dtype": args.dtype,
        "processes": PROCESSES,
        "problem": {"name": "mlp_regression"},  # its defaults are the reference problem
        "spectrum": {"k": 5, "k_max": 5},
        **{name: {"substeps": 4} for name in PROCESSES[1:]},
        "record": {"chunk": args.steps},
    }


def timed(process, state, steps: int) -> tuple[float, dict]:
    """ms per step of one ``advance`` (already compiled), and its rows."""
    start = time.perf_counter()
    _, rows = process.advance(state, steps)
    jax.block_until_ready(rows)
    return 1e3 * (time.perf_counter() - start) / steps, rows


def timing(args) -> None:
    _, problem, _, processes = prepare(reference_spec(args))
    central = processes["central_flow"]
    tail = args.steps // 3
    # (label, process, start state, steps): the last third of the central flow is its EoS phase
    jobs = [(name, p, p.init(problem.w0), args.steps) for name, p in processes.items()]
    late, _ = central.advance(central.init(problem.w0), args.steps - tail)
    jobs.append(("central_flow (last 1/3)", central, late, tail))
    rows = {label: {k: np.asarray(v) for k, v in p.advance(s, n)[1].items()} for label, p, s, n in jobs}  # compile
    print(
        f"reference problem: {problem.w0.size} parameters, {args.dtype}, lr {args.lr}, {args.steps} steps; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    per_step = {label: [] for label, *_ in jobs}
    for _ in range(args.repeats):  # round robin, so that a change of load hits every process alike
        for label, process, state, steps in jobs:
            per_step[label].append(timed(process, state, steps)[0])
    print(f"{'process':<24}{'best ms/step':>13}{'median':>9}{'grads':>7}{'hvps':>7}{'D3':>6}{'max m':>7}")
    for label, times in per_step.items():
        r = rows[label]
        print(
            f"{label:<24}{min(times):>13.2f}{np.median(times):>9.2f}{r.get('grads', np.ones(1)).mean():>7.1f}"
            f"{r['hvps'].mean():>7.1f}{r.get('third_derivatives', np.zeros(1)).mean():>6.1f}"
            f"{int(r.get('critical', np.zeros(1)).max()):>7d}"
        )
    gd = min(per_step["gd"])
    print(
        f"central flow / GD-with-eigenpairs: {min(per_step['central_flow']) / gd:.2f} over the whole run, "
        f"{min(per_step['central_flow (last 1/3)']) / gd:.2f} over its last third (best of {args.repeats}); "
        f"load average {os.getloadavg()[0]:.2f}"
    )


def accuracy(args) -> None:
    with tempfile.TemporaryDirectory() as out:
        run({**reference_spec(args), "record": {"chunk": 100}}, out)
        ds = eosflow.load(out)
    gd, gf = ds.sel(process="gd"), ds.sel(process="gradient_flow")
    smooth = gaussian_filter1d(gd.loss.values.astype(np.float64), args.width, mode="nearest")
    edge = 2 / args.lr
    print(
        f"\naccuracy ({args.dtype}): GD's loss smoothed by a Gaussian of width {args.width} steps; EoS phase = "
        f"steps where the flow's Sigma != 0, less {3 * args.width} steps at each end"
    )
    print(
        f"{'process':<16}{'EoS from':>9}{'d/d_GF end':>11}{'d/d_GF last100':>15}{'loss err max':>13}"
        f"{'mean':>7}{'|S eta/2 - 1| max':>19}{'max m':>7}"
    )
    for name in ("projected_flow", "central_flow"):
        flow = ds.sel(process=name)
        active = flow.amplitude.values > 0
        eos = int(np.argmax(active)) if active.any() else args.steps
        phase = slice(eos + 3 * args.width, args.steps - 3 * args.width)
        error = np.abs(flow.predicted_loss.values[phase] - smooth[phase]) / smooth[phase]
        ratio_end = float(flow.distance[-1] / gf.distance[-1])
        ratio_tail = float(flow.distance[-100:].mean() / gf.distance[-100:].mean())
        pinned = np.abs(flow.sharpness.values[active] / edge - 1).max() if active.any() else np.nan
        print(
            f"{name:<16}{eos:>9d}{ratio_end:>11.3f}{ratio_tail:>15.3f}{error.max():>13.3%}{error.mean():>7.2%}"
            f"{pinned:>19.2e}{int(np.nanmax(flow.critical.values)):>7d}"
        )
    reached = np.nanmax(gd.eigenvalues.values, axis=0) / edge
    print("GD's tracked eigenvalues reach (max over the run) / (2/eta):", np.round(reached, 3))


def split(item: str) -> tuple[str, str]:
    key, _, value = item.partition("=")
    return key, value


def digits(args) -> None:
    from eosflow.cli import demo_table
    from eosflow.spectrum import lanczos

    print(
        "| d | k | phase | steps | HVPs / step | of which eigensolver | grad-equiv. / step | "
        "median rel. error (top k) | max rel. error | steps with a residual > tol | critical m (median, max) | "
        "steps with every tracked pair critical | distance to --against |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    saved, against = {}, dict(np.load(args.against)) if args.against else {}
    for width in [32] if args.quick else args.widths:
        for k in args.ks:
            table = demo_table()
            table.update(
                steps=args.digits_steps,
                processes=["central_flow"],
                spectrum={
                    "k": k,
                    "k_max": k,
                    "tol": args.tol,
                    "guard": args.guard,
                    "cluster": args.cluster,
                    "max_iters": args.max_iters,
                },
                record={"chunk": 100, "params_every": args.every},
            )
            table["problem"]["width"] = width
            table["central_flow"] = {key: tomllib.loads(f"v = {value}")["v"] for key, value in map(split, args.set)}
            with tempfile.TemporaryDirectory() as out:
                run(table, out)
                ds = eosflow.load(out).sel(process="central_flow")
                checks, params = eosflow.load_params(out, "central_flow")
            objective64 = prepare({**table, "dtype": "float64"})[1].objective
            oracle = np.array(
                [lanczos(objective64, jax.numpy.asarray(w, "float64"), k=k, tol=0.0).values for w in params]
            )
            measured = ds.eigenvalues.values[np.asarray(checks), :k]
            errors = np.max(np.abs(measured - oracle) / oracle, axis=1)
            key = f"d{params.shape[1]}_k{k}"
            saved[key] = params
            against_key = f"d{params.shape[1]}_k{args.against_k or k}"
            distance = relative_distance(params, against[against_key]) if against_key in against else np.nan
            critical = ds.critical.values
            cost = ds.grads.values + 2 * ds.hvps.values + 4 * ds.third_derivatives.values
            for phase, mask in (("before the edge", critical == 0), ("edge (m >= 1)", critical > 0)):
                at = mask[np.asarray(checks)]
                print(
                    f"| {params.shape[1]} | {k} | {phase} | {mask.sum()} | {ds.hvps.values[mask].mean():.1f} | "
                    f"{ds.measurement_hvps.values[mask].mean():.1f} | {cost[mask].mean():.1f} | "
                    f"{np.median(errors[at]) if at.any() else np.nan:.1e} | "
                    f"{errors[at].max() if at.any() else np.nan:.1e} | "
                    f"{np.mean(ds.residual.values[mask] > args.tol):.0%} | "
                    f"{np.median(critical[mask]) if mask.any() else np.nan:.0f}, "
                    f"{critical[mask].max(initial=0):.0f} | "
                    f"{np.mean(critical[mask] >= k) if mask.any() else np.nan:.0%} | "
                    f"{distance:.1e} |".replace("nan", "-"),
                    flush=True,
                )
    if args.save:
        np.savez(args.save, **saved)


def relative_distance(params: np.ndarray, reference: np.ndarray) -> float:
    """max over the saved steps of ||w_t - w_t^ref|| / ||w_t^ref - w_0||: how far a setting's trajectory
    moves from the reference's, relative to how far the reference has travelled."""
    travelled = np.linalg.norm(reference - reference[:1], axis=1)
    return float(np.max(np.linalg.norm(params - reference, axis=1)[1:] / travelled[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--width", type=int, default=20, help="Gaussian smoothing width of GD's loss (steps)")
    parser.add_argument("--accuracy", action="store_true", help="also run the lockstep accuracy comparison")
    parser.add_argument("--no-timing", dest="timing", action="store_false")
    parser.add_argument("--digits", action="store_true", help="per-phase cost and accuracy on the digits MLP")
    parser.add_argument("--quick", action="store_true", help="--digits at width 32 only")
    parser.add_argument("--digits-steps", type=int, default=500)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 140], help="--digits: hidden widths")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3], help="--digits: tracked pairs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="--digits: central_flow.KEY")
    parser.add_argument("--guard", type=int, default=1, help="--digits: the eigensolver's guard vectors")
    parser.add_argument("--every", type=int, default=50, help="--digits: ARPACK oracle every n steps")
    parser.add_argument("--tol", type=float, default=1e-3, help="--digits: the eigensolver's tol")
    parser.add_argument("--cluster", type=float, default=0.0, help="--digits: the eigensolver's cluster gap")
    parser.add_argument("--max-iters", type=int, default=30, help="--digits: the eigensolver's max_iters")
    parser.add_argument("--save", help="--digits: save the checkpointed centres to this .npz")
    parser.add_argument("--against", help="--digits: distance of the centres to those of a --save file")
    parser.add_argument("--against-k", type=int, help="--digits: compare with the --save run of this k (default: k)")
    args = parser.parse_args()
    if args.digits:
        digits(args)
        return
    if args.timing:
        timing(args)
    if args.accuracy:
        accuracy(args)


if __name__ == "__main__":
    main()
