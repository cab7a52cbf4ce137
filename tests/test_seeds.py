"""Seeds of up to 63 bits (the spec allows 2**63 - 1) reach every random draw: PRNG keys keep every bit of the seed."""

import jax
import numpy as np
import pytest

from eosflow.process import process_key
from eosflow.seeds import seed_key


@pytest.mark.parametrize("seed", [0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1])
def test_a_seed_of_32_bits_keeps_prngkeys_own_key(seed):
    """The streams of every earlier run (seeds below 2**32) are unchanged."""
    np.testing.assert_array_equal(seed_key(seed), jax.random.PRNGKey(seed))


@pytest.mark.parametrize("low", [0, 1, 12345, 2**32 - 1])
@pytest.mark.parametrize("high", [1, 2, 2**30, 2**31 - 1])
def test_a_larger_seed_draws_other_numbers_than_its_low_32_bits(low, high):
    """Without x64, seed 2**32 drew seed 0's minibatches, noise and eigensolver starts (from a probe); now the key
    of every 63-bit seed is the one PRNGKey makes of it under x64, and the process's x64 setting is left alone."""
    seed = high * 2**32 + low
    x64 = jax.config.jax_enable_x64
    key = seed_key(seed)
    assert jax.config.jax_enable_x64 == x64
    with jax.enable_x64(True):
        np.testing.assert_array_equal(key, jax.random.PRNGKey(seed))
    assert not np.array_equal(key, seed_key(low))
    assert not np.array_equal(process_key(seed, "sgd/minibatches"), process_key(low, "sgd/minibatches"))
    draws = jax.random.uniform(key, (4,))
    assert not np.array_equal(draws, jax.random.uniform(seed_key(low), (4,)))


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5])
def test_a_seed_out_of_range_is_refused(seed):
    with pytest.raises((ValueError, TypeError), match="seed|integer"):
        seed_key(seed)
