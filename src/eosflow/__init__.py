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
from eosflow.hessian_operator import HessianOperator
from eosflow.load import load, load_params
from eosflow.objective import Objective
from eosflow.problems import Problem
from eosflow.simulate import simulate
from eosflow.tracker import SharpnessTracker, TrackerState

__all__ = [
    "HessianOperator", "Objective", "Problem", "SharpnessTracker", "TrackerState",
    "load", "load_params", "monitor", "optimizer_edges", "run", "simulate",
]


def __getattr__(name: str):
    """``eosflow.monitor`` and ``eosflow.optimizer_edges`` import optax only when first used."""
    if name in ("monitor", "optimizer_edges"):
        import importlib

        return importlib.import_module(f"eosflow.{name}")
    raise AttributeError(f"module 'eosflow' has no attribute {name!r}")


from eosflow.version import __version__  # noqa: E402  (from the package metadata)
