"""Continuous-time models of the optimizers, as processes (vector fields on one integrator)."""

# Each import registers its processes; the import order is the registration (listing) order, so isort must
# not sort across these lines.
from eosflow.flows import central, gradient, projected  # noqa: F401  (registers gradient, projected and central flows)

# isort: split
from eosflow.flows import langevin  # noqa: F401  (registers "langevin")

# isort: split
from eosflow.flows import edge, rod  # noqa: F401  (registers "rod_flow", "edge_flow")

# isort: split
from eosflow.flows import free_energy  # noqa: F401  (registers "free_energy")

# isort: split
from eosflow.flows import particle  # noqa: F401  (registers "particle_model")

# isort: split
from eosflow.flows import phase_rod, preconditioned_central, stable  # noqa: F401  (models of adaptive optimizers)
