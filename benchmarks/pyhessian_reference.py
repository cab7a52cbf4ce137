"""eosflow.torch's curvature against PyHessian's, side by side, on a torch MLP before and at the edge of stability.

    pip install ".[bench]"     # PyHessian (GPL-3), for the benchmarks only
    PYTHONPATH=src .venv/bin/python benchmarks/pyhessian_reference.py [--steps 600] [--seed 0]

(benchmarks/torch_bridge.py compares the warm tracker along a whole run; this is one cold call each, and the trace.)

A torch tanh MLP 64-32-32-10 on 500 digits (MSE: 1/2 |f - onehot(y)|^2 averaged over examples, float32) trained
by full-batch SGD at lr 0.4; at an early step and at the last one (at the edge) each tool computes, on copies
of the same weights:
- the top 3 eigenvalues: PyHessian's ``eigenvalues(top_n=3)`` (power iteration with deflation, its defaults:
  at most 100 iterations, stopping when the Rayleigh quotient changes by less than 1e-3 relative) against
  ``eosflow.torch.SharpnessTracker(k=3, tol=1e-3)`` from a cold start (LOBPCG; every reported relative residual
  <= tol); the relative error of each against the dense float64 Hessian (torch.autograd.functional.hessian);
- the trace: PyHessian's ``trace()`` (Hutchinson, its defaults: stops when the running mean changes by less
  than 1e-3) against ``eosflow.spectral_density.hutchinson_trace`` (100 probes, with its standard error);
- HVPs spent (PyHessian's counted by wrapping its ``hessian_vector_product``) and seconds (eosflow's of a second
  call from the same cold start, the first call's compilation excluded).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import eosflow.torch
from eosflow.spectral_density import hutchinson_trace

LR = 0.4


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


def dense_hessian(model: torch.nn.Module, batch) -> np.ndarray:
    """The float64 Hessian of the loss over the model's parameters, by torch.autograd.functional.hessian."""
    oracle = copy.deepcopy(model).double()
    shapes = {name: p.shape for name, p in oracle.named_parameters()}
    w = torch.cat([p.detach().reshape(-1) for p in oracle.parameters()])

    def loss(flat):
        pieces = torch.split(flat, [s.numel() for s in shapes.values()])
        shaped = {name: piece.view(shape) for (name, shape), piece in zip(shapes.items(), pieces)}
        return mse(torch.func.functional_call(oracle, shaped, (batch[0].double(),)), batch[1].double())

    return torch.autograd.functional.hessian(loss, w, vectorize=True).numpy()


def counted_pyhessian(model: torch.nn.Module, batch) -> tuple[object, list[int]]:
    """PyHessian's hessian object on a copy of the model, and a one-element list counting its HVPs."""
    count = [0]
    pyhessian_module = importlib.import_module("pyhessian.hessian")  # the module (the package exports the class)
    original = getattr(pyhessian_module, "_eosflow_original_hvp", pyhessian_module.hessian_vector_product)
    pyhessian_module._eosflow_original_hvp = original

    def counting(gradsH, params, v):
        count[0] += 1
        return original(gradsH, params, v)

    pyhessian_module.hessian_vector_product = counting
    return pyhessian_module.hessian(copy.deepcopy(model), mse, data=batch, cuda=False), count


def compare(model: torch.nn.Module, batch, step: int) -> None:
    dense = dense_hessian(model, batch)
    exact = np.sort(np.linalg.eigvalsh(0.5 * (dense + dense.T)))[::-1][:3]
    print(
        f"\nstep {step}: lr S / 2 = {LR * exact[0] / 2:.4f}; dense float64 top 3 {np.array2string(exact, precision=5)}"
    )
    print("| tool | top 3 | max rel. error | HVPs | seconds |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    started = time.perf_counter()
    reference, count = counted_pyhessian(model, batch)
    values, _ = reference.eigenvalues(top_n=3)
    seconds = time.perf_counter() - started
    error = np.max(np.abs(np.asarray(values) - exact) / exact)
    print(
        f"| PyHessian eigenvalues(top_n=3) | {np.array2string(np.asarray(values), precision=5)} | {error:.1e} | "
        f"{count[0]} | {seconds:.2f} |"
    )
    tracker = eosflow.torch.SharpnessTracker(copy.deepcopy(model), mse, k=3, tol=1e-3)
    cold = tracker.vectors  # the random initial block
    calls = []
    for _ in range(2):  # the second from the same cold start: without the first's compilation, if it compiled
        tracker.vectors = cold
        started = time.perf_counter()
        eig = tracker.update(batch)
        calls.append(time.perf_counter() - started)
    error = np.max(np.abs(eig.values - exact) / exact)
    print(
        f"| eosflow SharpnessTracker(k=3, tol=1e-3), cold | {np.array2string(eig.values, precision=5)} | "
        f"{error:.1e} | {eig.hvps} | {calls[1]:.2f} (first call {calls[0]:.2f}; max residual "
        f"{eig.residuals.max():.1e}) |"
    )
    trace = float(np.trace(dense))
    started = time.perf_counter()
    reference, count = counted_pyhessian(model, batch)
    samples = reference.trace()
    seconds = time.perf_counter() - started
    print(
        f"trace: dense {trace:.2f}; PyHessian trace() {np.mean(samples):.2f} from {len(samples)} probes "
        f"({count[0]} HVPs, {seconds:.2f} s; rel. error {abs(np.mean(samples) - trace) / trace:.1e})",
        end="; ",
    )
    operator = eosflow.torch.hessian_operator(copy.deepcopy(model), mse, batch)
    started = time.perf_counter()
    estimate, error = hutchinson_trace(operator, probes=100)
    seconds = time.perf_counter() - started
    print(
        f"eosflow hutchinson_trace {estimate:.2f} +- {error:.2f} (100 HVPs, {seconds:.2f} s; rel. error "
        f"{abs(estimate - trace) / trace:.1e})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--early", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    images, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(images[:500] / 16, dtype=torch.float32)
    targets = F.one_hot(torch.tensor(labels[:500]), 10).float()
    batch = (inputs, targets)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    )
    d = sum(p.numel() for p in model.parameters())
    print(f"torch tanh MLP 64-32-32-10, d = {d}, 500 digits, MSE, full-batch SGD at lr {LR} (2/lr = {2 / LR:g})")
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(args.steps):
        if step in (args.early, args.steps - 1):
            compare(model, batch, step)
        optimizer.zero_grad()
        mse(model(inputs), targets).backward()
        optimizer.step()


if __name__ == "__main__":
    main()
