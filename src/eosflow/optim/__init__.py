"""Discrete optimizers as processes (the real runs that the flows model)."""

# Each import registers its processes; the import order is the registration (listing) order, so isort must
# not sort across these lines.
from eosflow.optim import gd  # noqa: F401  (registers "gd")

# isort: split
from eosflow.optim import sgd  # noqa: F401  (registers "sgd")

# isort: split
from eosflow.optim import (
    adaptive,  # noqa: F401  (registers "momentum", "nesterov", "rmsprop", "adam")
    flatland,  # noqa: F401  (registers "nls", "ponls", "armijo")
)
