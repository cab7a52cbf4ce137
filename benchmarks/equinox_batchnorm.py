"""The Equinox BatchNorm example of docs/problems.md ("Your own model"): GD at lr = 0.2 on a digits MLP
with BatchNorm in training mode, through Problem.from_equinox; prints the sharpness along the run.

    PYTHONPATH=src .venv/bin/python benchmarks/equinox_batchnorm.py
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from sklearn.datasets import load_digits

import eosflow


class Net(eqx.Module):
    first: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    last: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.first, self.last = eqx.nn.Linear(64, 32, key=k1), eqx.nn.Linear(32, 10, key=k2)
        self.norm = eqx.nn.BatchNorm(32, axis_name="batch", mode="batch")

    def __call__(self, x, state):  # one example, as Equinox modules take them
        h, state = self.norm(jnp.tanh(self.first(x)), state)
        return self.last(h), state


model, state = eqx.nn.make_with_state(Net)(jax.random.key(0))
digits = load_digits()
x = jnp.asarray(digits.data[:500] / 16, "float32")
y = jax.nn.one_hot(digits.target[:500], 10)
problem = eosflow.Problem.from_equinox(model, x, y, loss="mse", state=state)
print(problem.info)
ds = eosflow.simulate(problem, lr=0.2, steps=1000, processes=["gd"], spectrum={"k_max": 2})
s = ds.sharpness.sel(process="gd").values
steps = (0, 100, 200, 400, 600, 800, 999)
print(f"sharpness at steps {steps}:", [round(float(s[i]), 2) for i in steps], "2/lr =", 2 / 0.2)
print("loss", float(ds.loss.sel(process="gd").values[0]), float(ds.loss.sel(process="gd").values[-1]))
