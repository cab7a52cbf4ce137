"""Per-example gradients of a torch model through the bridge (one ``torch.func.vmap`` over the
examples, what the Langevin model and SGD's noise report use) against a loop of
``torch.autograd.grad`` over the examples, for tanh MLPs on random data (float64, MSE).

    python benchmarks/torch_per_example.py [--sizes 40:6-8-3 512:64-22-10] [--repeats 20] [--threads 1]

Prints, per size, N, d, the median wall time of each and their largest difference.
"""

from __future__ import annotations

import argparse
import os
import time

import equinox as eqx
import jax
import numpy as np
import torch
import torch.nn.functional as F

import eosflow.torch
from eosflow.torch import TorchObjective


def mlp(widths: list[int]) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1]).double()


def median_ms(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def measure(n: int, widths: list[int], repeats: int) -> str:
    """The table row of one size: N, d, both median times and their largest difference."""
    torch.manual_seed(0)
    model = mlp(widths)
    batch = (torch.randn(n, widths[0], dtype=torch.float64), torch.randn(n, widths[-1], dtype=torch.float64))
    objective = TorchObjective(model, F.mse_loss, batch)
    bridged, w0 = eosflow.torch.to_jax(objective)
    per_example = eqx.filter_jit(lambda o, w: o.per_example_grads(w))
    params = [p for p in model.parameters() if p.requires_grad]

    def vmapped() -> np.ndarray:
        return np.asarray(per_example(bridged, w0))

    def loop() -> np.ndarray:
        rows = []
        for i in range(n):
            loss = F.mse_loss(model(batch[0][i : i + 1]), batch[1][i : i + 1])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        return torch.stack(rows).numpy()

    difference = float(np.max(np.abs(vmapped() - loop())))
    return (
        f"| {n} | {objective.dim} | {median_ms(vmapped, repeats):.1f} | {median_ms(loop, repeats):.1f} | "
        f"{difference:.1e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["40:6-8-3", "512:64-22-10"], help="N:widths")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    print("| N | d | vmap through the bridge (ms) | loop of torch.autograd.grad (ms) | largest difference |")
    print("|---|---|---|---|---|")
    with jax.enable_x64(True):
        for size in args.sizes:
            n_text, widths_text = size.split(":")
            print(measure(int(n_text), [int(w) for w in widths_text.split("-")], args.repeats))


if __name__ == "__main__":
    main()
