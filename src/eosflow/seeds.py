"""PRNG keys from a seed of up to 63 bits (the spec's ``seed``, a monitor's or a tracker's ``seed``)."""

from __future__ import annotations

import operator

import jax
from jaxtyping import Array


def seed_key(seed: int) -> Array:
    """``jax.random.PRNGKey(seed)`` with every bit of ``seed`` in [0, 2**63).

    Without ``jax_enable_x64`` PRNGKey keeps the low 32 bits only, so seed 2**32 drew seed 0's numbers in a
    float32 run; a seed of 32 bits or fewer gets PRNGKey's own key, and a larger one the key PRNGKey makes of it
    under x64 (made here in a scoped ``jax.enable_x64``: the process's setting is left alone)."""
    seed = operator.index(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if seed < 2**32:
        return jax.random.PRNGKey(seed)
    with jax.enable_x64(True):
        return jax.random.PRNGKey(seed)
