"""The stable flow of an optimizer with an uncorrected second moment nu, started linearly or matched.

    PYTHONPATH=src python benchmarks/uncorrected_start.py [--time 0.3] [--lr 0.01]

On the depth-3 matrix factorization of tests/test_adaptive_flows.py (float64, RK4, 4 substeps, no
eigensolver), each optimizer and its stable flow run to lr t = ``--time`` at lr, lr/2 and lr/4; printed:
||w_opt - w_flow|| at that time and the ratios of successive distances (~4 for a second-order model), for
the flow's ``start = "lag"`` (nu(0) = (1 - L2 c2) s, the linear start) and ``"extrapolated"`` (the default:
an uncorrected nu starts where its transient moves w as far as the optimizer's, docs/adaptive.md section 3,
"The start of an uncorrected nu").
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from eosflow.experiment import prepare

SMOOTH = {"name": "matrix_factorization", "dim": 3, "depth": 3, "rank": 2}
CASES = {
    "rmsprop, b2 = 0.8, eps = 0.1": ("rmsprop", {"beta2": 0.8, "eps": 0.1}),
    "scalar rmsprop, b2 = 0.8, eps = 0.1": ("rmsprop", {"beta2": 0.8, "eps": 0.1, "second_moment": "scalar"}),
    "rmsprop, b2 = 0.95, eps = 0.03": ("rmsprop", {"beta2": 0.95, "eps": 0.03}),
    "adam, b1 = 0.6, b2 = 0.8, eps = 0.1, uncorrected": (
        "adam",
        {"beta1": 0.6, "beta2": 0.8, "eps": 0.1, "bias_correction": False},
    ),
}


def distance(name: str, hyper: dict, lr: float, time: float, start: str) -> float:
    table = {
        "lr": lr,
        "dtype": "float64",
        "processes": [name, f"{name}_stable_flow"],
        "problem": SMOOTH,
        "spectrum": {"every": 0},
        name: hyper,
        f"{name}_stable_flow": {"substeps": 4, "start": start},
    }
    _, problem, _, processes = prepare(table)
    steps = round(time / lr)
    ends = [np.asarray(p.advance(p.init(problem.w0), steps + 1)[1]["position"][-1]) for p in processes.values()]
    return float(np.linalg.norm(ends[0] - ends[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)  # this script's choice: float64 runs
    lrs = [args.lr / 2**i for i in range(3)]
    print(f"| case | start | distance at lr t = {args.time}, lr = {' / '.join(f'{lr:g}' for lr in lrs)} | ratios |")
    print("|---|---|---|---|")
    for case, (name, hyper) in CASES.items():
        for start in ("lag", "extrapolated"):
            d = [distance(name, hyper, lr, args.time, start) for lr in lrs]
            print(
                f"| {case} | {start} | {' / '.join(f'{x:.3e}' for x in d)} | "
                f"{', '.join(f'{d[i] / d[i + 1]:.2f}' for i in range(2))} |"
            )


if __name__ == "__main__":
    main()
