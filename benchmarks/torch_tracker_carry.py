"""HVPs of `eosflow.torch.SharpnessTracker` in a torch loop with each carry (the Ritz vectors or one power step of
them) or, given ``--warm-starts A B``, with each of two warm starts (``"previous"``, ``"fitted"``, ...; power carry).

A torch MLP 64-32-32-10 (tanh, d = 3466, float32, half MSE) on 500 digits trains from one initialization by

    gd    full-batch torch.optim.SGD at lr 0.4 (the sharpness reaches 2 / lr around step 200)
    sgd   torch.optim.SGD on minibatches of 50 (reshuffled each epoch) at lr 0.4, measured on the full batch
    adam  full-batch torch.optim.Adam at lr 1e-2: the top of P^-1/2 H P^-1/2 against (2 + 2 b1) / ((1 - b1) lr)
          (reached around step 270)

and eight trackers (tol 1e-3, the default, and 1e-2; k = 1 and 3; carry "ritz" and "power" from warm_start "previous",
or the two warm starts with the power carry)
update side by side after every ``--every``-th step, at the same weights. Printed per loop, tol and k: each variant's
HVPs in total and per update, the second's saving, the largest edge ratio read in the second half (k = 1, the first
variant), the largest relative difference between the two variants' top-k readings, and the updates whose top
readings are more than 2 tol apart (two values of one eigenvalue within the contract are not: one tracker converged
to another eigenvalue). At the ``--oracle``
steps (measured ones) the dense float64 Hessian of a float64 copy (preconditioned by the optimizer's P for adam)
gives the top k by eigh, and each tracker's values are checked against it: |theta_i - lambda_i| / (tol |theta_i|),
which the residual contract bounds by 1 (|theta - lambda| <= ||A u - theta u|| for a unit u; the float32 Hessian's
rounding, ~1e-6 relative, adds to it).

    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python \\
        benchmarks/torch_tracker_carry.py [--loops gd sgd adam] [--steps 400] [--every 1] [--oracle 100 250 399] \\
        [--warm-starts previous fitted] [--shuffle-seed 1]
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import get_args

import numpy as np
import torch

from eosflow.torch import SharpnessTracker, TorchObjective, optimizer_preconditioning
from eosflow.tracker import WarmStart
from torch_operators import digits_mlp  # the torch twin of the demo's MLP and its 500 digits

TOLS, KS = (1e-3, 1e-2), (1, 3)
LOOPS = {  # name: (optimizer, minibatch size or None for full batch)
    "gd": (lambda params: torch.optim.SGD(params, lr=0.4), None),
    "sgd": (lambda params: torch.optim.SGD(params, lr=0.4), 50),
    "adam": (lambda params: torch.optim.Adam(params, lr=1e-2), None),
}


def half_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


def dense_top(model: torch.nn.Module, batch, k: int, diagonal: np.ndarray | None) -> np.ndarray:
    """The top k eigenvalues of the float64 Hessian of a float64 copy (P^-1/2 H P^-1/2 given P's diagonal)."""
    oracle = copy.deepcopy(model).double()
    objective = TorchObjective(oracle, half_mse, (batch[0].double(), batch[1].double()))
    w = objective.flat_parameters()
    eye = torch.eye(w.numel(), dtype=torch.float64)
    hessian = torch.cat([objective.hvp_batch(w, block) for block in eye.split(256, dim=1)], dim=1).numpy()
    if diagonal is not None:
        scale = 1.0 / np.sqrt(diagonal)
        hessian = scale[:, None] * hessian * scale[None, :]
    return np.linalg.eigvalsh(0.5 * (hessian + hessian.T))[::-1][:k]


def run(
    loop: str, steps: int, every: int, oracle_steps: set[int], option: str, variants: tuple[str, str], seed: int
) -> None:
    """Two trackers per tol and k, ``option`` (carry or warm_start) set to each of ``variants``."""
    make, minibatch = LOOPS[loop]
    model, (x, y) = digits_mlp(32, torch.float32)
    optimizer = make(model.parameters())
    trackers = {
        (tol, k, variant): SharpnessTracker(
            model, half_mse, k=k, tol=tol, **({"warm_start": "previous"} | {option: variant})
        )
        for tol in TOLS
        for k in KS
        for variant in variants
    }
    hvps = dict.fromkeys(trackers, 0)
    readings: dict[tuple, list[np.ndarray]] = {key: [] for key in trackers}
    edge = dict.fromkeys(trackers, 0.0)
    bound: dict[tuple, float] = dict.fromkeys(trackers, 0.0)
    updates, order, started = 0, torch.Generator().manual_seed(seed), time.perf_counter()
    batches: list[torch.Tensor] = []
    for step in range(steps):  # a step of the optimizer, then (every ``every`` steps) the trackers at its result
        if minibatch is None:
            inputs, targets = x, y
        else:
            if not batches:
                batches = list(torch.randperm(len(x), generator=order).split(minibatch))
            rows = batches.pop()
            inputs, targets = x[rows], y[rows]
        optimizer.zero_grad()
        half_mse(model(inputs), targets).backward()
        optimizer.step()
        if step % every:
            continue
        updates += 1
        eigs = {key: tracker.update((x, y), optimizer) for key, tracker in trackers.items()}
        for key, eig in eigs.items():
            hvps[key] += eig.hvps
            readings[key].append(eig.values)
            if 2 * step >= steps:  # the second half (Adam's first steps read a transient edge ratio)
                edge[key] = max(edge[key], eig.edge_ratio)
        if step in oracle_steps:
            diagonal = optimizer_preconditioning(optimizer, next(iter(trackers.values())).objective).diagonal
            exact = dense_top(model, (x, y), max(KS), diagonal)
            line = []
            for key, eig in eigs.items():
                tol, k, variant = key
                ratio = float(np.max(np.abs(eig.values - exact[:k]) / (tol * np.abs(eig.values))))
                bound[key] = max(bound[key], ratio)
                line.append(f"{tol:g} k={k} {variant} {ratio:.2g}")
            print(
                f"  {loop} step {step}: dense top {np.array2string(exact, precision=4)}; "
                f"|theta - lambda| / (tol theta): {', '.join(line)}",
                flush=True,
            )
    seconds = time.perf_counter() - started
    for tol in TOLS:
        for k in KS:
            first, second = (np.array(readings[tol, k, variant]) for variant in variants)
            differs = float(np.max(np.abs(second - first) / np.abs(first)))
            # updates whose top readings differ by more than the contract allows two values of one eigenvalue: one
            # tracker's measurement converged to another eigenvalue (k = 1 at the edge: the top ones cross)
            apart = np.abs(second[:, 0] - first[:, 0]) > 2 * tol * np.abs(first[:, 0])
            higher = int(np.sum(apart & (second[:, 0] > first[:, 0])))
            spent = [hvps[tol, k, variant] for variant in variants]
            cells = " | ".join(f"{count} ({count / updates:.2f})" for count in spent)
            print(
                f"| {loop} | {every} | {tol:g} | {k} | {cells} | {100 * (1 - spent[1] / spent[0]):.1f}% | "
                f"{edge[tol, 1, variants[0]]:.2f} | {differs:.1e} | {int(apart.sum())} ({higher}) | "
                f"{bound[tol, k, variants[0]]:.2g} / {bound[tol, k, variants[1]]:.2g} |",
                flush=True,
            )
    print(f"  ({loop}: {updates} updates, {seconds:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loops", nargs="+", default=list(LOOPS), choices=list(LOOPS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--oracle", type=int, nargs="*", default=[100, 250, 399])
    parser.add_argument("--shuffle-seed", type=int, default=1, help="of sgd's minibatch order")
    parser.add_argument("--warm-starts", nargs=2, choices=get_args(WarmStart), help="compare these, not the carries")
    args = parser.parse_args()
    torch.set_num_threads(1)
    option, variants = ("warm_start", tuple(args.warm_starts)) if args.warm_starts else ("carry", ("ritz", "power"))
    a, b = variants
    print(
        f"| loop | every | tol | k | HVPs {a} (per update) | HVPs {b} (per update) | saving | "
        f"max edge ratio, 2nd half | max rel. diff. of readings | top readings > 2 tol apart ({b}'s the higher) | "
        f"max abs(theta - lambda) / (tol theta) at the oracle steps, {a} / {b} |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    for loop in args.loops:
        run(
            loop,
            args.steps,
            args.every,
            {s for s in args.oracle if s % args.every == 0},
            option,
            variants,
            args.shuffle_seed,
        )


if __name__ == "__main__":
    main()
