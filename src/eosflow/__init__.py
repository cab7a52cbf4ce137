"""eosflow: measure, predict and control training dynamics at the edge of stability.

    import eosflow
    outcome = eosflow.run(eosflow.spec.load_spec_table("examples/demo.toml"), "runs/demo")
    ds = eosflow.load("runs/demo")          # xarray.Dataset over (process, step)
"""

import jax

# Oracles and small problems run in float64; networks choose float32 per spec (`dtype`).
jax.config.update("jax_enable_x64", True)

from eosflow import flows, optim  # noqa: E402,F401  (register processes)
from eosflow.experiment import run  # noqa: E402
from eosflow.load import load, load_params  # noqa: E402
from eosflow.objective import Objective  # noqa: E402

__all__ = ["Objective", "load", "load_params", "run"]
from eosflow.version import __version__  # noqa: E402,F401  (from the package metadata)
