"""docs/monitor.md's "Your loop's readings on disk": a plain JAX loop (a two-layer tanh MLP on 512 digits, Adam at
lr = 0.01, 1500 steps) logging its loss every 5 steps and, through ``monitored``, Adam's preconditioned sharpness
every 20, into an EdgeLog; prints the log's summary and writes its figure.
`PYTHONPATH=src .venv/bin/python benchmarks/edge_log_adam.py [OUT_DIR] [--sine]` (default /tmp/eosflow-edge-log).
``--sine``: the loop of docs/monitor.md's "An example loop" instead (8 inputs, 256 examples, a sine target, Adam at
lr = 0.01 for 500 steps, measured every 10), whose S / threshold at step 0 is above 1 (the start transient)."""

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from sklearn.datasets import load_digits

import eosflow
from eosflow.edge_log import EdgeLog, plot, read, summary

parser = argparse.ArgumentParser()
parser.add_argument("out", nargs="?", default="/tmp/eosflow-edge-log")
parser.add_argument("--sine", action="store_true", help="docs/monitor.md's example loop")
args = parser.parse_args()
out = Path(args.out)
path = out / ("adam-sine.jsonl" if args.sine else "adam.jsonl")
path.unlink(missing_ok=True)
if args.sine:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k1, (256, 8))
    y = jnp.sin(x @ jnp.ones(8))[:, None]
    params = {"w1": jax.random.normal(k2, (8, 32)) / 8**0.5, "w2": jax.random.normal(k3, (32, 1)) / 32**0.5}
    steps, every = 500, 10
else:
    digits = load_digits()
    x, y = jnp.asarray(digits.data[:512] / 16, "float32"), jax.nn.one_hot(digits.target[:512], 10)
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (64, 64)) / 8, "w2": jax.random.normal(k2, (64, 10)) / 8}
    steps, every = 1500, 20


def loss_fn(p, batch):
    x, y = batch
    return 0.5 * jnp.mean(jnp.sum((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2, -1))


adam = eosflow.optimizer_edges.adam(1e-2)
start = time.perf_counter()
with EdgeLog(path) as log:
    opt = eosflow.monitor.monitored(adam, loss_fn, every=every, log=log)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(loss_fn)(params, (x, y))
        updates, state = opt.update(g, state, params, batch=(x, y))
        return optax.apply_updates(params, updates), state, loss

    for t in range(steps):
        params, state, loss = step(params, state)
        if t % 5 == 0:
            log.write(t, loss=loss)
    jax.effects_barrier()
ds = read(path)
print(f"{path}: {ds.sizes['step']} steps logged, {time.perf_counter() - start:.1f} s")
first = ds["edge_ratio"].dropna("step")[:3]
print("  S / threshold at steps " + ", ".join(f"{int(t)}: {float(r):.4f}" for t, r in zip(first["step"], first)))
for key, value in summary(ds).items():
    print(f"  {key}: {value}")
print(plot(path))
