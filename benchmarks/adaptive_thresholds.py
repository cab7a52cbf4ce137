"""Each optimizer's preconditioned sharpness reaches its own edge-of-stability threshold on the digits MLP.

    PYTHONPATH=src python benchmarks/adaptive_thresholds.py [--steps 1000] [--only rmsprop,adam]

For RMSProp (2/lr), heavy ball (2(1 + b)/lr, classical form) and Adam ((2 + 2 b1)/((1 - b1) lr)), runs the
optimizer in float64 on a tanh MLP (300 digits, width 32, depth 2) with the preconditioned top eigenvalue
measured every ``--every`` steps, and prints the first step where edge_ratio = lambda_max(P^-1 H) / threshold
reaches 0.95 and the longest run of consecutive measurements inside [0.9, 1.1] (in steps).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from eosflow.experiment import prepare

DIGITS = {"name": "mlp", "dataset": "digits", "n_train": 300, "n_test": 0, "width": 32, "depth": 2}
SETTINGS = {  # optimizer: (lr, hyperparameters)
    "rmsprop": (0.004, {"beta2": 0.99, "eps": 0.003, "bias_correction": True}),
    "momentum": (0.5, {"beta": 0.9, "form": "classical"}),
    "adam": (0.01, {"beta1": 0.9, "beta2": 0.99, "eps": 1e-4}),
}


def longest_stretch(ratio: np.ndarray, every: int, low: float = 0.9, high: float = 1.1) -> tuple[int, int]:
    """(length in steps, first step) of the longest run of consecutive measurements inside [low, high]."""
    inside = (ratio >= low) & (ratio <= high)
    best, start, run_start = 0, -1, None
    for i, ok in enumerate(np.append(inside, False)):
        if ok and run_start is None:
            run_start = i
        elif not ok and run_start is not None:
            if i - run_start > best:
                best, start = i - run_start, run_start
            run_start = None
    return best * every, start * every


def measure(optimizer: str, steps: int, every: int) -> dict:
    lr, hyper = SETTINGS[optimizer]
    table = {
        "lr": lr,
        "dtype": "float64",
        "processes": [optimizer],
        "problem": DIGITS,
        "spectrum": {"every": every, "k": 1, "k_max": 2, "tol": 1e-4, "max_iters": 50},
        optimizer: hyper,
    }
    _, problem, _, processes = prepare(table)
    process = processes[optimizer]
    _, rows = process.advance(process.init(problem.w0), steps)
    ratio = np.asarray(rows["edge_ratio"])[::every]
    reached = np.flatnonzero(ratio >= 0.95)
    length, start = longest_stretch(ratio, every)
    return {
        "optimizer": optimizer,
        "lr": lr,
        **hyper,
        "threshold": process.rule.threshold(lr),
        "first_step_at_0.95": int(reached[0] * every) if reached.size else None,
        "longest_in_[0.9,1.1]_steps": length,
        "from_step": start,
        "ratio_after_it": [round(float(r), 3) for r in ratio[start : start + length // every : max(1, 50 // every)]],
        "max_ratio_after_onset": float(np.max(ratio[reached[0] :])) if reached.size else None,
        "final_loss": float(np.asarray(rows["loss"])[-1]),
    }


def main() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--only", default=",".join(SETTINGS))
    args = parser.parse_args()
    for optimizer in args.only.split(","):
        print(json.dumps(measure(optimizer, args.steps, args.every)), flush=True)


if __name__ == "__main__":
    main()
