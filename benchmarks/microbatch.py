"""Memory and time of full-batch derivatives evaluated in chunks (``microbatch``) against all at once.

For a tanh MLP on N random examples, XLA's own accounting of the compiled programs' scratch memory
(``memory_analysis().temp_size_in_bytes``) and the wall time per call, for the gradient, one HVP and
one third derivative D^3 L[u, v], at each microbatch size (0: the whole batch in one pass), and the
largest difference from the unchunked result (float32).

    PYTHONPATH=src .venv/bin/python benchmarks/microbatch.py [--examples 8192] [--width 512] [--sizes 0 2048 512 128]
"""

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import eosflow


def build(examples: int, width: int) -> eosflow.Problem:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(examples, 64)).astype("float32")
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, examples)]
    sizes = [64, width, width, 10]
    params = [(rng.normal(size=(a, b)) / np.sqrt(a)).astype("float32") for a, b in zip(sizes[:-1], sizes[1:])]

    def apply(p, x):
        h = x
        for layer in p[:-1]:
            h = jnp.tanh(h @ layer)
        return h @ p[-1]

    return eosflow.Problem.from_model(apply, params, x, y, "mse")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=8192)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 2048, 512, 128])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = build(args.examples, args.width)
    w = jnp.asarray(base.w0)
    rng = np.random.default_rng(1)
    u, v = (jnp.asarray(rng.normal(size=w.shape).astype("float32")) for _ in range(2))
    print(f"N = {args.examples}, d = {w.size}, {platform.processor() or platform.machine()}, jax {jax.__version__}")
    print("| microbatch | derivative | XLA temp memory (MB) | ms / call | max rel. difference from microbatch 0 |")
    print("|---|---|---|---|---|")
    reference = {}
    for size in args.sizes:
        objective = base.objective if size == 0 else base.with_microbatch(size).objective
        calls = {
            "gradient": ("grad", (w,)),
            "HVP": ("hvp", (w, v)),
            "third derivative": ("third_derivative", (w, u, v)),
        }
        for name, (method, vectors) in calls.items():
            operands = (objective, *vectors)  # the data are an argument, not constants of the program
            compiled = jax.jit(lambda o, *a, method=method: getattr(o, method)(*a)).lower(*operands).compile()
            memory = compiled.memory_analysis().temp_size_in_bytes / 2**20
            result = compiled(*operands).block_until_ready()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                compiled(*operands).block_until_ready()
                times.append(time.perf_counter() - start)
            reference.setdefault(name, np.asarray(result))
            diff = np.abs(np.asarray(result) - reference[name]).max() / np.abs(reference[name]).max()
            print(f"| {size} | {name} | {memory:.1f} | {1e3 * min(times):.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
