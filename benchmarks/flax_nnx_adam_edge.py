"""The Flax NNX loop of docs/monitor.md ("A Flax NNX loop"): Adam on a digits MLP with BatchNorm, the tracker
measuring its preconditioned sharpness on the module itself every 100 steps; prints S / threshold (1 at Adam's
edge, 38 / lr). `PYTHONPATH=src .venv/bin/python benchmarks/flax_nnx_adam_edge.py` (needs `eosflow[flax]`)."""

import jax
import jax.numpy as jnp
from flax import nnx
from sklearn.datasets import load_digits

import eosflow

digits = load_digits()
x, y = jnp.asarray(digits.data[:512] / 16, "float32"), jax.nn.one_hot(digits.target[:512], 10)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.first, self.norm = nnx.Linear(64, 64, rngs=rngs), nnx.BatchNorm(64, rngs=rngs)
        self.last = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.last(jnp.tanh(self.norm(self.first(x))))


def loss_fn(model, batch):
    x, y = batch
    return 0.5 * jnp.mean(jnp.sum((model(x) - y) ** 2, axis=-1))


model = MLP(nnx.Rngs(0))
adam = eosflow.optimizer_edges.adam(1e-2)  # optax.adam(1e-2), its P and its edge 38/lr
optimizer = nnx.Optimizer(model, adam.transform, wrt=nnx.Param)
tracker = eosflow.SharpnessTracker(loss_fn, k=1)
state = tracker.init(model, jax.random.key(1))


@nnx.jit
def train_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def measure(state, model, optimizer, batch):  # the module itself: its nnx.Params, the rest held fixed
    return tracker.update(state, model, batch, preconditioner=adam.preconditioner(optimizer.opt_state))


for t in range(1, 1001):
    loss = train_step(model, optimizer, (x, y))
    if t % 100 == 0:
        state, eig = measure(state, model, optimizer, (x, y))
        print(f"step {t}: loss {loss:.4f}, S / threshold {eig.values[0] / adam.threshold:.3f}")
