"""Does the central flow's prediction depend on its substep count? (docs/central_flow.md, "Which X the row reports")

    PYTHONPATH=src python benchmarks/central_substeps.py [--lrs 0.5,0.7] [--courants 0.5,0.25,0.125] [--steps 300]

GD and the central flow on a small digits MLP (float64, n_train 100, width 16, depth 2); per lr and
courant (0.5 is the default; halving it about doubles the substeps): the first step with a critical
direction, the mean predicted excess over the centre's loss after it (tr Sigma / lr), the relative L1
error of the predicted loss against GD's Gaussian-smoothed loss, and GD's own floor (its loss against
its smoothed loss). Run it at two commits to compare how the row reports X.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from eosflow.compare import gaussian_smooth, relative_l1_error
from eosflow.experiment import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", default="0.5,0.7")
    parser.add_argument("--courants", default="0.5,0.25,0.125")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)  # a benchmark script, not the library
    print("| lr | courant | onset | excess | loss error | GD floor |\n|---|---|---|---|---|---|")
    for lr in map(float, args.lrs.split(",")):
        for courant in map(float, args.courants.split(",")):
            table = {
                "lr": lr,
                "dtype": "float64",
                "processes": ["gd", "central_flow"],
                "problem": {"name": "mlp", "dataset": "digits", "n_train": 100, "n_test": 0, "width": 16, "depth": 2},
                "spectrum": {"every": 1, "k": 1, "k_max": 3},
                "central_flow": {"courant": courant},
            }
            _, problem, _, processes = prepare(table)
            rows = {name: p.advance(p.init(problem.w0), args.steps)[1] for name, p in processes.items()}
            flow, loss = rows["central_flow"], np.asarray(rows["gd"]["loss"])
            critical = np.flatnonzero(np.asarray(flow["critical"]) > 0)
            if critical.size == 0:
                print(f"| {lr} | {courant} | none | - | - | - |")
                continue
            edge = slice(int(critical[0]), None)
            predicted, smooth = np.asarray(flow["predicted_loss"]), gaussian_smooth(loss)
            excess = np.mean(predicted[edge] - np.asarray(flow["loss"])[edge])
            error = relative_l1_error(predicted[edge], smooth[edge])
            floor = relative_l1_error(loss[edge], smooth[edge])
            print(f"| {lr} | {courant} | {critical[0]} | {excess:.4g} | {error:.3f} | {floor:.3f} |", flush=True)


if __name__ == "__main__":
    main()
