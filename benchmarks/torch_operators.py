"""ms per product of eosflow.torch's Hessian and Gauss-Newton operators: one graph shared by every product (the
operators' default) against the forward recomputed per call (``TorchObjective.hvp_batch`` /
``gauss_newton_batch``, what ``microbatch`` does per chunk), one column at a time (as eigsh and Lanczos call
them) and in blocks of 8; then the seconds of ``eigsh(G, k=3)`` each way.

    PYTHONPATH=src .venv/bin/python benchmarks/torch_operators.py [--width 32] [--dtype float32] [--repeats 30]

The model is the torch twin of the demo's MLP (64-w-w-10, tanh, 500 digits, MSE), at its initialization.
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import scipy.sparse.linalg
import torch
from sklearn.datasets import load_digits

from eosflow.torch import TorchObjective
from torch_per_example import median_ms


def digits_mlp(width: int, dtype: torch.dtype) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    x, y = load_digits(return_X_y=True)
    x = (x[:500] - x[:500].mean(0)) / (x[:500].std(0) + 1e-8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, 10),
    ).to(dtype)
    targets = torch.nn.functional.one_hot(torch.from_numpy(y[:500]), 10).to(dtype)
    return model, (torch.from_numpy(x).to(dtype), targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, batch = digits_mlp(args.width, getattr(torch, args.dtype))
    objective = TorchObjective(model, torch.nn.functional.mse_loss, batch)
    w = objective.flat_parameters()
    d = w.numel()
    rng = np.random.default_rng(0)
    one = torch.as_tensor(rng.standard_normal((d, 1)), dtype=w.dtype)
    block = torch.as_tensor(rng.standard_normal((d, 8)), dtype=w.dtype)
    shared = {"H": objective.linearized(w), "G": objective.linearized_gauss_newton(w)}
    fresh = {"H": objective.hvp_batch, "G": objective.gauss_newton_batch}
    print(f"torch digits MLP, width {args.width}, {args.dtype}: d = {d}, 500 examples, 1 thread")
    print("| product | columns per call | shared graph, ms per column | recomputed, ms per column | speed-up |")
    print("|---|---|---|---|---|")
    for name in ("H", "G"):
        for columns in (one, block):
            k = columns.shape[1]
            kept = median_ms(functools.partial(shared[name], columns), args.repeats) / k
            again = median_ms(functools.partial(fresh[name], w, columns), args.repeats) / k
            print(f"| {name} | {k} | {kept:.3f} | {again:.3f} | {again / kept:.2f}x |")
    error = float((shared["G"](block) - fresh["G"](w, block)).abs().max() / fresh["G"](w, block).abs().max())
    print(f"\nshared against recomputed G V: max difference {error:.1e} of max |G V|")

    def eigsh_seconds(multiply) -> tuple[float, np.ndarray]:
        operator = scipy.sparse.linalg.LinearOperator(
            (d, d),
            matvec=lambda v: multiply(torch.as_tensor(np.reshape(v, (-1, 1)), dtype=w.dtype)).numpy()[:, 0],
            dtype=np.float64 if args.dtype == "float64" else np.float32,
        )
        started = time.perf_counter()
        values = scipy.sparse.linalg.eigsh(operator, k=3, which="LA", tol=1e-6, v0=np.ones(d))[0]
        return time.perf_counter() - started, np.sort(values)[::-1]

    kept_s, kept_values = eigsh_seconds(shared["G"])
    again_s, again_values = eigsh_seconds(lambda v: fresh["G"](w, v))
    print(
        f"eigsh(G, k=3, tol=1e-6): shared graph {kept_s:.2f} s, recomputed {again_s:.2f} s "
        f"({again_s / kept_s:.2f}x); top 3 {', '.join(f'{v:.6g}' for v in kept_values)} "
        f"(recomputed: {', '.join(f'{v:.6g}' for v in again_values)})"
    )


if __name__ == "__main__":
    main()
