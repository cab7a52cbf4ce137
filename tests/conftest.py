import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax

# The test process's choice, not the library's: oracles (dense eigh, closed forms) built directly
# in tests compute in float64. eosflow itself sets no JAX configuration (runs scope their dtype).
jax.config.update("jax_enable_x64", True)

import eosflow  # noqa: F401  (registers problems and processes)
