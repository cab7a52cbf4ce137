"""eosflow: measure, predict and control training dynamics at the edge of stability.

    import eosflow
    outcome = eosflow.run(eosflow.spec.load_spec_table("examples/demo.toml"), "runs/demo")
    ds = eosflow.load("runs/demo")          # xarray.Dataset over (process, step)

    problem = eosflow.Problem.from_model(apply_fn, params, inputs, targets, loss="mse")
    ds = eosflow.simulate(problem, lr=0.4, steps=1000, processes=["gd", "central_flow"])
"""

# Importing eosflow changes no global state: a run computes in its spec's `dtype` inside a scoped
# `jax.enable_x64` (eosflow.precision), whatever the caller's JAX configuration.
from eosflow import flows, optim  # noqa: F401  (register processes)
from eosflow.experiment import run
from eosflow.load import load, load_params
from eosflow.objective import Objective
from eosflow.problems import Problem
from eosflow.simulate import simulate

__all__ = ["Objective", "Problem", "load", "load_params", "run", "simulate"]
__version__ = "0.1.0"
