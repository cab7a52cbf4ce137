"""Discrete optimizers as processes (the real runs that the flows model)."""

from eosflow.optim import gd  # noqa: F401  (registers "gd")
from eosflow.optim import sgd  # noqa: F401  (registers "sgd")
from eosflow.optim import flatland  # noqa: F401  (registers "nls", "ponls", "armijo")
from eosflow.optim import adaptive  # noqa: F401  (registers "momentum", "nesterov", "rmsprop", "adam")
