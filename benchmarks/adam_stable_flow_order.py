"""How far Adam's stable flow is from Adam on the digits MLP before the edge, and its order in lr.

    PYTHONPATH=src python benchmarks/adam_stable_flow_order.py [--time 0.3] [--lrs 0.01,0.005,0.0025]
        [--eps 1e-4] [--beta1 0.9] [--substeps 4]

The leaderboard's mlp_digits-adam network and hyperparameters (b1 = 0.9, b2 = 0.99, eps = 1e-4, bias
correction) in float64, no eigensolver. For each lr, both run lr t = ``--time`` (t steps); printed:
||w_adam - w_flow|| after 1, 2, 5 steps and at t/4, t/2, t, each also relative to ||w_adam - w0||.
Halving lr at fixed lr t divides the relative distance by ~2^p for a p-th order model
(docs/adaptive.md section 6).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from eosflow.experiment import prepare

MLP = {"name": "mlp", "dataset": "digits", "n_train": 300, "n_test": 0, "width": 32, "depth": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time", type=float, default=0.3)
    parser.add_argument("--lrs", default="0.01,0.005,0.0025")
    parser.add_argument("--eps", type=float, default=1e-4, help="Adam's eps (the leaderboard's 1e-4)")
    parser.add_argument("--beta1", type=float, default=0.9, help="Adam's beta1 (the leaderboard's 0.9)")
    parser.add_argument("--substeps", type=int, default=4, help="the flow's RK4 substeps per step")
    args = parser.parse_args()
    for lr in (float(x) for x in args.lrs.split(",")):
        steps = round(args.time / lr)
        table = {
            "lr": lr,
            "dtype": "float64",
            "seed": 0,
            "steps": steps,
            "processes": ["adam", "adam_stable_flow"],
            "problem": MLP,
            "spectrum": {"every": 0},
            "adam": {"beta1": args.beta1, "beta2": 0.99, "eps": args.eps},
            "adam_stable_flow": {"substeps": args.substeps},
        }
        with jax.enable_x64(True):
            _, problem, _, processes = prepare(table)
            rows = {name: p.advance(p.init(problem.w0), steps + 1)[1] for name, p in processes.items()}
        adam, flow = (np.asarray(rows[name]["position"]) for name in ("adam", "adam_stable_flow"))
        distance = np.linalg.norm(adam - flow, axis=1)
        travelled = np.linalg.norm(adam - np.asarray(problem.w0), axis=1)
        marks = [1, 2, 5, steps // 4, steps // 2, steps]
        cells = [f"t={t}: {distance[t]:.3e} ({distance[t] / travelled[t]:.2e})" for t in marks]
        print(f"lr {lr}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
