"""Continuous-time models of the optimizers, as processes (vector fields on one integrator)."""

from eosflow.flows import central, gradient, projected  # noqa: F401  (registers gradient, projected and central flows)
from eosflow.flows import langevin  # noqa: E402,F401  (registers "langevin")
from eosflow.flows import edge, rod  # noqa: E402,F401  (registers "rod_flow", "edge_flow")
from eosflow.flows import free_energy  # noqa: E402,F401  (registers "free_energy")
from eosflow.flows import particle  # noqa: E402,F401  (registers "particle_model")
from eosflow.flows import phase_rod, preconditioned_central, stable  # noqa: E402,F401  (models of adaptive optimizers)
