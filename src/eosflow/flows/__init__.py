"""Continuous-time models of the optimizers, as processes."""

from eosflow.flows import langevin  # noqa: F401  (registers "langevin")
from eosflow.flows import edge, rod  # noqa: F401  (registers "rod_flow", "edge_flow")
