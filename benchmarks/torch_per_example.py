"""Per-example gradients of a torch model through the bridge (one ``torch.func.vmap`` over the
examples, what the Langevin model and SGD's noise report use, or a loop over them for a model vmap
cannot batch) against a loop of ``torch.autograd.grad`` over the examples: tanh MLPs on random data
(float64, MSE), and with ``--lstm N`` a sequence-first ``nn.LSTM(1, 16)`` + linear head (inputs
(10, N, 1), labels (N,), cross-entropy, ``example_axis=(1, 0)``) in float32 and float64.

    python benchmarks/torch_per_example.py [--sizes 40:6-8-3 512:64-22-10] [--lstm 256] [--repeats 20] [--threads 1]

Prints, per model, N, d, the median wall time of each, their largest difference, and whether the
bridge mapped with vmap or looped.
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


class LSTMClassifier(torch.nn.Module):
    """nn.LSTM(1, 16) at its default batch_first=False and a linear head on the last step."""

    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.LSTM(1, 16)
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][-1])


def measure(name: str, model: torch.nn.Module, loss_fn, batch: tuple, axes: tuple, repeats: int) -> str:
    """The table row of one model: N, d, both median times, their largest difference, the bridge's path.
    ``axes``: the example axis of inputs and targets (a single example keeps it, with size 1)."""
    objective = TorchObjective(model, loss_fn, batch, axes)
    bridged, w0 = eosflow.torch.to_jax(objective)
    per_example = eqx.filter_jit(lambda o, w: o.per_example_grads(w))
    params = [p for p in model.parameters() if p.requires_grad]
    n = objective.num_examples
    assert n is not None

    def bridge() -> np.ndarray:
        return np.asarray(per_example(bridged, w0))

    def loop() -> np.ndarray:
        rows = []
        for i in range(n):
            example = [t.narrow(axis, i, 1) for t, axis in zip(batch, axes)]
            loss = loss_fn(model(example[0]), example[1])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        return torch.stack(rows).numpy()

    difference = float(np.max(np.abs(bridge() - loop())))
    path = "vmap" if objective.vmap_error is None else "loop"
    return (
        f"| {name} | {n} | {objective.dim} | {median_ms(bridge, repeats):.1f} ({path}) | "
        f"{median_ms(loop, repeats):.1f} | {difference:.1e} |"
    )


def measure_mlp(n: int, widths: list[int], repeats: int) -> str:
    torch.manual_seed(0)
    batch = (torch.randn(n, widths[0], dtype=torch.float64), torch.randn(n, widths[-1], dtype=torch.float64))
    return measure(f"MLP {'-'.join(map(str, widths))} float64", mlp(widths), F.mse_loss, batch, (0, 0), repeats)


def measure_lstm(n: int, dtype: torch.dtype, repeats: int) -> str:
    torch.manual_seed(0)
    x = torch.randn(10, n, 1, dtype=dtype)
    batch = (x, (x.sum(dim=(0, 2)) > 0).long())
    name = f"LSTM(1, 16) T=10 {str(dtype).removeprefix('torch.')}"
    return measure(name, LSTMClassifier().to(dtype), F.cross_entropy, batch, (1, 0), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["40:6-8-3", "512:64-22-10"], help="N:widths")
    parser.add_argument("--lstm", nargs="*", type=int, default=[], help="N of the sequence-first LSTM rows")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    print("| model | N | d | through the bridge (ms) | loop of torch.autograd.grad (ms) | largest difference |")
    print("|---|---|---|---|---|---|")
    with jax.enable_x64(True):
        for size in args.sizes:
            n_text, widths_text = size.split(":")
            print(measure_mlp(int(n_text), [int(w) for w in widths_text.split("-")], args.repeats))
        for n in args.lstm:
            print(measure_lstm(n, torch.float64, args.repeats))
    for n in args.lstm:
        print(measure_lstm(n, torch.float32, args.repeats))


if __name__ == "__main__":
    main()
