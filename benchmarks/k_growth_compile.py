"""What the tracked block's growth costs a short run of a small model: each k it grows to is a new shape, so GD's
step program compiles again (docs/sharpness.md, "The tracker"). GD on a user's tanh MLP (5-16-16-2, 402 parameters,
64 examples, Problem.from_model) for 300 steps in chunks of 100, the block growing from k = 1 to k_max = 3 against
k = k_max = 3 from step 0; prints each chunk's seconds (compilation included), the run's wall time and the HVPs per
measurement, and where the run's compilation went (JAX's compile events): tracing, lowering to StableHLO and XLA's
compilation of every program the run compiled, and XLA's seconds for the longest ones, the step programs (one per k).
With ``--kernels``, first GD's 100-step program alone at k = 1 and 3, measuring (``spectrum.every = 1``) or not (0):
XLA's seconds (wall and process CPU) and the fused kernels it compiled, each compiled apart by MLIR and LLVM.

    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python \\
        benchmarks/k_growth_compile.py [--kernels]
"""

import collections
import json
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import monitoring

import eosflow
from eosflow.experiment import prepare
from eosflow.process import _scan
from eosflow.simulation import simulation_table

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


def step_program(k: int, every: int) -> None:
    """XLA's compilation of GD's 100-step program (the run's: ``_scan``'s jit of the process's arrays), timed."""
    spectrum = {"k": k, "k_max": 3, "every": every}
    gd = prepare(simulation_table(problem, lr=1.0, steps=100, spectrum=spectrum), problem)[3]["gd"]
    dynamic, static = eqx.partition((gd, gd.init(problem.w0), None), eqx.is_array)
    lowered = _scan._compile(static).lower(dynamic, 100)
    wall, cpu = time.perf_counter(), time.process_time()
    kernels = lowered.compile().as_text().count(" fusion(")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"GD's 100 steps, k = {k}, every = {every}: XLA {wall:.2f} s ({cpu:.2f} s CPU), {kernels} fused kernels")


if "--kernels" in sys.argv:
    for k in (1, 3):
        for every in (0, 1):
            step_program(k, every)
events: dict[str, list[float]] = collections.defaultdict(list)
monitoring.register_event_duration_secs_listener(lambda event, seconds, **_: events[event].append(seconds))
STAGES = {"trace": "jaxpr_trace_duration", "lower": "jaxpr_to_mlir_module_duration", "XLA": "backend_compile_duration"}
for k in (1, 3):
    events.clear()
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
    spent = {stage: events[f"/jax/core/compile/{name}"] for stage, name in STAGES.items()}
    longest = sorted(spent["XLA"], reverse=True)[: len(set(tracked))]
    print(
        f"  compilation: {', '.join(f'{stage} {sum(seconds):.2f} s' for stage, seconds in spent.items())} "
        f"({len(spent['XLA'])} programs); the step programs' XLA {', '.join(f'{s:.2f}' for s in longest)} s"
    )
