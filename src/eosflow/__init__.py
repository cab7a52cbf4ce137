"""eosflow: measure, predict and control training dynamics at the edge of stability.

    import eosflow
    outcome = eosflow.run(eosflow.spec.load_spec_table("examples/demo.toml"), "runs/demo")
    ds = eosflow.load("runs/demo")          # xarray.Dataset over (process, step)

    problem = eosflow.Problem.from_model(apply_fn, params, inputs, targets, loss="mse")
    ds = eosflow.simulate(problem, lr=0.4, steps=1000, processes=["gd", "central_flow"])

Importing eosflow changes no global state (a run computes in its spec's `dtype` inside a scoped
`jax.enable_x64`, eosflow.precision) and is cheap: JAX, optax and the processes are imported
with the first name that needs them, so ``eosflow --help`` does not pay for them.
"""

import importlib as _importlib

from eosflow.load import load, load_params
from eosflow.version import __version__

_LAZY = {
    "run": "eosflow.experiment",
    "simulate": "eosflow.simulation",
    "Objective": "eosflow.objective",
    "Problem": "eosflow.problems",
    "HessianOperator": "eosflow.hessian_operator",
    "GaussNewtonOperator": "eosflow.gauss_newton",
    "SharpnessTracker": "eosflow.tracker",
    "TrackerState": "eosflow.tracker",
}
# imported when first used (optax, pandas)
_MODULES = (
    "batch_sharpness",
    "compare",
    "edge_log",
    "edge_prediction",
    "gauss_newton",
    "monitor",
    "optimizer_edges",
    "spectral_density",
)

__all__ = ["load", "load_params", "__version__", *_LAZY, *_MODULES]


def __getattr__(name: str):
    if name in _LAZY:
        _importlib.import_module("eosflow.process")  # registers every process
        value = getattr(_importlib.import_module(_LAZY[name]), name)
    elif name in _MODULES:
        value = _importlib.import_module(f"eosflow.{name}")
    else:
        raise AttributeError(f"module 'eosflow' has no attribute {name!r}")
    globals()[name] = value
    return value
