"""Continuous-time models of the optimizers, as processes."""

from eosflow.flows import langevin  # noqa: F401  (registers "langevin")
