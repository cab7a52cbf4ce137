"""Flatland line searches on digits: the edge of stability from the first step, the sharpness
driven towards its floor, the cost of each rule, and the flat-saddle failure fixed by the cap.

    .venv/bin/python benchmarks/flatland.py [--out DIR] [--parts mlp,cnn,saddle,trials,equality] [--small] [--steps N]
        [--refines 0,2] [--cap]

1. ``mlp`` / ``cnn``: each rule from the same w0 on the spec of examples/flatland_{mlp,cnn}_digits.toml
   (one run per rule): loss evaluations per step (the cost of the search; every rule also takes
   one gradient per step), eta_k S_k at the measured steps (its minimum, the fraction >= 1 - c,
   the fraction > 2 overall and over the first 100 steps), the sharpness at the start and the
   end in units of S_flat (= S K / 2 in the paper's units), the loss and the test accuracy.
2. ``saddle``: examples/flatland_flat_saddle.toml and its capped twin: the loss over the last 200
   steps against the random-guess level 1/2 (1 - 1/K), the sharpness in units of S_flat, the
   accuracies.
3. ``trials``: NLS from first trial steps 1e-3 ... 1 with the grid's step and the refined one
   (``--refines``: the refine values, default 0,2; ``--cap``: every run with cap = true).
4. ``equality``: NLS on a tiny CNN with refine = 2 and with refine = 8 (the step within 0.3% of the
   equality point) from six first trials: the fraction of steps with eta S > 2, and on the steps
   where eta S <= 2 the curvature the step actually crossed, the secant
   kappa = 2 (L(w - eta g) - L(w) + eta |g|^2) / (eta^2 |g|^2), and the Rayleigh quotient
   rho = g^T H g / |g|^2 at w, both in units of S(w).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)  # this script's choice: its oracles and prepare() compute in float64

import eosflow
from eosflow.experiment import prepare, run
from eosflow.optim.flatland import flat_sharpness
from eosflow.spec import load_spec_table

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RULES = [  # (label, process, options)
    ("nls (Zhang-Hager xi=0.99)", "nls", {}),
    ("nls (Zhang-Hager xi=0.85)", "nls", {"xi": 0.85}),
    ("nls (Grippo max, M=10)", "nls", {"reference": "max", "memory": 10}),
    ("ponls (Polyak start)", "ponls", {}),
    ("nls capped (eta <= 1)", "nls", {"cap": True}),
    ("armijo (monotone)", "armijo", {}),
]
CNN_RULES = [RULES[0], RULES[1], RULES[3], RULES[4], RULES[5]]


def without_processes(table: dict) -> dict:
    return {key: value for key, value in table.items() if key not in ("processes", "nls", "ponls", "armijo")}


def problem_of(table: dict):
    return prepare({**without_processes(table), "processes": ["gd"]})[1]


def run_rule(base: dict, process: str, options: dict, out: Path, steps: int | None) -> float:
    """Run one rule alone on the example's problem (same seed, so the same w0); returns the seconds."""
    table = {**without_processes(base), "processes": [process], "name": f"{base['name']}-{process}", process: options}
    if steps:
        table["steps"] = steps
    started = time.perf_counter()
    run(table, out, overwrite=True)
    return time.perf_counter() - started


def measured(ds, process: str) -> dict:
    d = ds.sel(process=process)
    mask = np.isfinite(d["sharpness"].values)
    steps = d["step"].values[mask]
    return {"steps": steps, "sharpness": d["sharpness"].values[mask], "lr_sharpness": d["lr_sharpness"].values[mask]}


def last_finite(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else float("nan")


def rules_table(example: str, rules, out: Path, steps: int | None) -> None:
    base = load_spec_table(EXAMPLES / example)
    problem = problem_of(base)
    floor = flat_sharpness(problem.objective)
    print(
        f"\n### {base['problem']['name']} on {base['problem']['dataset']}: {problem.w0.size} parameters, "
        f"K = {problem.num_classes}, S_flat = {floor:g}, spec {example} ({steps or base['steps']} steps, "
        f"first trial lr = {base['lr']}, spectrum every {base['spectrum']['every']})\n"
    )
    print(
        "| rule | loss evals / step (mean, max) | min eta*S | eta*S >= 1-c | eta*S > 2 | > 2 in steps < 100 "
        "| S/S_flat start -> end (min) | final loss | test acc | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, process, options in rules:
        seconds = run_rule(base, process, options, out, steps)
        ds = eosflow.load(out)
        d = ds.sel(process=process)
        m = measured(ds, process)
        c = 1e-4
        early = m["steps"] < 100
        evals = d["loss_evals"].values
        s = m["sharpness"] / floor
        print(
            f"| {label} | {np.mean(evals):.2f}, {int(np.max(evals))} | {m['lr_sharpness'].min():.3f} | "
            f"{np.mean(m['lr_sharpness'] >= 1 - c):.2f} | {np.mean(m['lr_sharpness'] > 2):.2f} | "
            f"{np.mean(m['lr_sharpness'][early] > 2):.2f} | {s[0]:.2f} -> {np.mean(s[-5:]):.2f} ({s.min():.2f}) | "
            f"{np.mean(d['loss'].values[-50:]):.4f} | {last_finite(d['test_accuracy'].values):.3f} | {seconds:.0f} |",
            flush=True,
        )


def saddle_table(out: Path, steps: int | None) -> None:
    print("\n### the flat-saddle failure and the cap (examples/flatland_flat_saddle*.toml)\n")
    print(
        "| run | eta over the last 200 steps (median) | loss, last 200 steps (mean, min) | random-guess loss "
        "| S/S_flat end (min) | train acc | test acc | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for example in ("flatland_flat_saddle.toml", "flatland_flat_saddle_capped.toml"):
        table = load_spec_table(EXAMPLES / example)
        if steps:
            table["steps"] = steps
        started = time.perf_counter()
        run(table, out, overwrite=True)
        seconds = time.perf_counter() - started
        problem = problem_of(table)
        floor, classes = flat_sharpness(problem.objective), problem.num_classes
        ds = eosflow.load(out)
        d = ds.sel(process="nls")
        m = measured(ds, "nls")
        s = m["sharpness"] / floor
        loss = d["loss"].values[-200:]
        print(
            f"| {example} | {np.median(d['lr'].values[-200:]):.3f} | {loss.mean():.4f}, {loss.min():.4f} | "
            f"{0.5 * (1 - 1 / classes):.3f} | {np.mean(s[-5:]):.2f} ({s.min():.2f}) | "
            f"{last_finite(d['train_accuracy'].values):.3f} | {last_finite(d['test_accuracy'].values):.3f} | "
            f"{seconds:.0f} |",
            flush=True,
        )


SMALL_MLP = {
    "name": "mlp",
    "dataset": "digits",
    "n_train": 100,
    "n_test": 30,
    "width": 16,
    "depth": 2,
    "activation": "tanh",
    "loss": "mse",
}  # the second network of tests/test_flatland.py (float64 there)


def trials_table(out: Path, steps: int | None, small: bool, refines=(0, 2), cap: bool = False) -> None:
    """NLS from first trial steps 1e-3 ... 1, with the grid's step (refine = 0) and the refined one (default)."""
    base = load_spec_table(EXAMPLES / "flatland_mlp_digits.toml")
    if small:
        base = {**base, "problem": SMALL_MLP, "spectrum": {**base["spectrum"], "every": 1}}
    name = "tanh MLP 16-16 on 100 digits, float32, sharpness every step" if small else "flatland_mlp_digits.toml"
    print(
        f"\n### first trial step and refinement ({name}, nls, {steps or base['steps']} steps; "
        f"eta*S at the measured steps after step 20{'; cap = true' if cap else ''})\n"
    )
    print(
        "| first trial | refine | loss evals / step (mean, max) | eta*S > 2 after step 20 | min eta*S | median eta "
        "| final loss |"
    )
    print("|---|---|---|---|---|---|---|")
    for trial in (1e-3, 1e-2, 0.05, 0.3, 1.0):
        for refine in refines:
            run_rule({**base, "lr": trial}, "nls", {"refine": refine, **({"cap": True} if cap else {})}, out, steps)
            ds = eosflow.load(out)
            d, m = ds.sel(process="nls"), measured(ds, "nls")
            late = m["steps"] > 20
            evals = d["loss_evals"].values
            print(
                f"| {trial:g} | {refine} | {np.mean(evals):.2f}, {int(np.max(evals))} | "
                f"{np.mean(m['lr_sharpness'][late] > 2):.2f} | {m['lr_sharpness'][late].min():.3f} | "
                f"{np.median(d['lr'].values[20:]):.3f} | {np.mean(d['loss'].values[-50:]):.4f} |",
                flush=True,
            )


TINY_CNN = {"name": "cnn", "dataset": "digits", "n_train": 40, "n_test": 10, "channels": [4]}  # 690 parameters


def equality_table(steps: int | None) -> None:
    """Whether the equality point itself keeps eta S > 2 on a tiny CNN (float64, S at every step)."""
    steps = steps or 400
    print(f"\n### equality point on a tiny CNN (conv 4, 690 parameters, 40 digits, float64, nls, {steps} steps)\n")
    print(
        "| refine | first trial | loss evals / step | eta*S > 2 after step 20 | min eta*S | final loss "
        "| steps eta*S <= 2: median kappa/S, rho/S, eta*kappa |"
    )
    print("|---|---|---|---|---|---|---|")
    for refine in (2, 8):
        table = {
            "steps": steps,
            "lr": 0.05,
            "dtype": "float64",
            "processes": ["nls"],
            "problem": TINY_CNN,
            "spectrum": {"every": 1, "k": 1, "k_max": 1, "tol": 1e-6, "max_iters": 100},
            "nls": {"refine": refine},
        }
        _, problem, _, built = prepare(table)
        process, objective = built["nls"], problem.objective

        @jax.jit
        def curvatures(w, eta, objective=objective):
            loss, g = objective.value_and_grad(w)
            g_sq = g @ g
            secant = 2 * (objective.value(w - eta * g) - loss + eta * g_sq) / (eta**2 * g_sq)
            return secant, g @ objective.hvp(w, g) / g_sq

        for trial in (1e-3, 1e-2, 0.05, 0.1, 0.3, 1.0):
            state = process.init(problem.w0)._replace(lr=jax.numpy.asarray(trial, problem.w0.dtype))
            r = {key: np.asarray(value) for key, value in process.advance(state, steps)[1].items()}
            late = r["lr_sharpness"][20:]
            below = 20 + np.flatnonzero(late <= 2)
            kappa, rho = (np.asarray(x) for x in jax.vmap(curvatures)(r["position"][below], r["lr"][below]))
            s = r["sharpness"][below]
            print(
                f"| {refine} | {trial:g} | {np.mean(r['loss_evals']):.2f} | {np.mean(late > 2):.2f} | "
                f"{late.min():.3f} | "
                f"{np.mean(r['loss'][-50:]):.4f} | {np.median(kappa / s):.2f}, {np.median(rho / s):.2f}, "
                f"{np.median(r['lr'][below] * kappa):.2f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="scratch run directory (default: a temporary one)")
    parser.add_argument(
        "--parts", default="mlp,cnn,saddle,trials", help="comma-separated: mlp, cnn, saddle, trials, equality"
    )
    parser.add_argument("--steps", type=int, default=None, help="override the examples' step counts")
    parser.add_argument(
        "--small", action="store_true", help="trials: the small tanh MLP 16-16 instead of the example's"
    )
    parser.add_argument("--refines", default="0,2", help="trials: comma-separated refine values")
    parser.add_argument("--cap", action="store_true", help="trials: every run with cap = true")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="flatland-")) / "run"
    parts = args.parts.split(",")
    if "mlp" in parts:
        rules_table("flatland_mlp_digits.toml", RULES, out, args.steps)
    if "cnn" in parts:
        rules_table("flatland_cnn_digits.toml", CNN_RULES, out, args.steps)
    if "saddle" in parts:
        saddle_table(out, args.steps)
    if "trials" in parts:
        refines = tuple(int(value) for value in args.refines.split(","))
        trials_table(out, args.steps, args.small, refines, args.cap)
    if "equality" in parts:
        equality_table(args.steps)


if __name__ == "__main__":
    main()
