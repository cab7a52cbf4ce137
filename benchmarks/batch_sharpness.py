"""Batch sharpness against the full-batch sharpness along minibatch SGD on the demo's digits MLP.

    PYTHONPATH=src .venv/bin/python benchmarks/batch_sharpness.py [--lr 0.4] [--batch-sizes 8,32,128]
        [--steps 4000] [--window 500] [--seed 0]

For each batch size S, one SGD run (`sgd.batch_sharpness_every = 1`, the full-batch top eigenvalue every 50
steps) and, per window of steps, printed in units of 2/lr (1 = the edge):
- lr S_full / 2: the median full-batch sharpness (the tracker's top eigenvalue) in the window;
- lr BS / 2: batch sharpness along the run, the mean over the window's steps of each step's own quotient
  g_B^T H_B g_B / |g_B|^2 (its batch along its gradient; Andreyev & Beneventano, arXiv:2412.20553), and the
  ratio of sums sum(g_B^T H_B g_B) / sum(|g_B|^2), the other estimate their code offers;
- the fraction of the window's steps whose own quotient exceeds 2/lr ("lr q_B > 2": steps that raised their
  batch's loss to second order);
and GD's lr S / 2 at the same lr, for reference.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import eosflow
from eosflow.cli import demo_table
from eosflow.problems.registry import build_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--batch-sizes", default="8,32,128")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    problem, _ = build_problem(demo_table()["problem"], args.seed, "float32")
    print(f"problem: the demo's digits MLP, d = {np.asarray(problem.w0).size}; lr = {args.lr}; seed {args.seed}")
    windows = range(0, args.steps, args.window)
    spectrum = {"k_max": 1, "every": 50}
    start = time.perf_counter()
    gd = eosflow.simulate(problem, lr=args.lr, steps=args.steps, processes=["gd"], spectrum=spectrum, seed=args.seed)
    edge = args.lr / 2
    gd_sharpness = gd.sharpness.sel(process="gd").values
    print(f"GD ({time.perf_counter() - start:.0f} s): lr S / 2 per window:", end="")
    print(" ".join(f"{edge * np.nanmedian(gd_sharpness[a : a + args.window]):.3f}" for a in windows))
    for size in (int(s) for s in args.batch_sizes.split(",")):
        start = time.perf_counter()
        ds = eosflow.simulate(
            problem,
            lr=args.lr,
            steps=args.steps,
            processes=["sgd"],
            spectrum=spectrum,
            options={"sgd": {"batch_size": size, "batch_sharpness_every": 1, "sampling": "without_replacement"}},
            seed=args.seed,
        )
        run = ds.sel(process="sgd")
        curvature, descent = run.batch_curvature.values, run.batch_descent.values
        sharpness, loss = run.sharpness.values, run.loss.values
        print(f"\nS = {size} ({time.perf_counter() - start:.0f} s)")
        print("| steps | loss (window mean) | lr S_full / 2 | lr BS / 2 | lr BS / 2, ratio of sums | lr q_B > 2 |")
        print("|---|---|---|---|---|---|")
        for a in windows:
            cut = slice(a, a + args.window)
            quotient = curvature[cut] / descent[cut]
            ratio_of_sums = edge * np.sum(curvature[cut]) / np.sum(descent[cut])
            above = np.mean(args.lr * quotient > 2)
            print(
                f"| {a}-{min(a + args.window, args.steps) - 1} | {np.mean(loss[cut]):.4f} | "
                f"{edge * np.nanmedian(sharpness[cut]):.3f} | {edge * np.mean(quotient):.3f} | {ratio_of_sums:.3f} | "
                f"{above:.0%} |"
            )


if __name__ == "__main__":
    main()
