"""eosflow: measure, predict and control training dynamics at the edge of stability.

    import eosflow
    outcome = eosflow.run(eosflow.spec.load_spec_table("examples/demo.toml"), "runs/demo")
    ds = eosflow.load("runs/demo")          # xarray.Dataset over (process, step)

Importing eosflow is cheap: JAX is imported with the first name that needs it (``run``,
``Objective``), so ``eosflow --help`` does not pay for it.
"""

import importlib

from eosflow.load import load, load_params

__all__ = ["Objective", "load", "load_params", "run"]
__version__ = "0.1.0"

_LAZY = {"run": "eosflow.experiment", "Objective": "eosflow.objective"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'eosflow' has no attribute {name!r}")
