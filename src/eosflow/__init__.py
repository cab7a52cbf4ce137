"""eosflow: measure, predict and control training dynamics at the edge of stability.

    import eosflow
    outcome = eosflow.run(eosflow.spec.load_spec_table("examples/demo.toml"), "runs/demo")
    ds = eosflow.load("runs/demo")          # xarray.Dataset over (process, step)
"""

# Importing eosflow changes no global state: a run computes in its spec's `dtype` inside a scoped
# `jax.enable_x64` (eosflow.precision), whatever the caller's JAX configuration.
from eosflow import flows, optim  # noqa: F401  (register processes)
from eosflow.experiment import run
from eosflow.load import load, load_params
from eosflow.objective import Objective

__all__ = ["Objective", "load", "load_params", "run"]
__version__ = "0.1.0"
