"""What the tracked block's growth costs a short run of a small model: each k it grows to is a new shape, so GD's
step program compiles again (docs/sharpness.md, "The tracker"). GD on a user's tanh MLP (5-16-16-2, 402 parameters,
64 examples, Problem.from_model) for 300 steps in chunks of 100, the block growing from k = 1 to k_max = 3 against
k = k_max = 3 from step 0; prints each chunk's seconds (compilation included), the run's wall time and the HVPs per
measurement.

    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python \\
        benchmarks/k_growth_compile.py
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import eosflow

keys = jax.random.split(jax.random.key(0), 4)
x = jax.random.normal(keys[0], (64, 5))
y = jnp.tanh(2.0 * x[:, :2])
sizes = [(5, 16), (16, 16), (16, 2)]
params = [(jax.random.normal(k, shape) / np.sqrt(shape[0]), jnp.zeros(shape[1])) for k, shape in zip(keys[1:], sizes)]


def apply(params, x):
    for w, b in params[:-1]:
        x = jnp.tanh(x @ w + b)
    w, b = params[-1]
    return x @ w + b


problem = eosflow.Problem.from_model(apply, params, x, y, loss="mse")
for k in (1, 3):
    start = time.perf_counter()
    ds = eosflow.simulate(
        problem, lr=1.0, steps=300, processes=["gd"], spectrum={"k": k, "k_max": 3}, record={"chunk": 100}
    )
    chunks = [f"{seconds:.2f}" for _, seconds, _ in json.loads(ds.attrs["timing"])["gd"]["chunks"]]
    tracked = np.isfinite(ds["eigenvalues"].sel(process="gd").values).sum(axis=1)
    print(
        f"k = {k} -> k_max = 3: chunks of 100 steps {', '.join(chunks)} s; run {time.perf_counter() - start:.1f} s; "
        f"tracked {tracked[0]} at step 0, {tracked[-1]} at the end; "
        f"{float(ds['measurement_hvps'].sel(process='gd').mean()):.2f} HVPs per measurement"
    )
