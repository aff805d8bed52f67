"""The guide's noise (``step_noise``): standard normal draws that padding never changes."""

import jax
import numpy as np
import pytest
from scipy import stats

from dmm_jax.distributions import step_noise

KEYS = {"raw": lambda: jax.random.PRNGKey(7), "typed": lambda: jax.random.key(7)}


@pytest.mark.parametrize("kind", sorted(KEYS))
@pytest.mark.parametrize("width", [6, 7])
def test_padding_steps_or_sequences_leaves_every_real_entry_unchanged(kind, width):
    key = KEYS[kind]()
    short = step_noise(key, 5, (3, width))
    padded = jax.jit(lambda k: step_noise(k, 9, (8, width)))(key)
    np.testing.assert_array_equal(short, padded[:5, :3])
    assert short.shape == (5, 3, width)
    # Different steps and different sequences get different draws.
    assert not np.allclose(short[0], short[1]) and not np.allclose(short[:, 0], short[:, 1])


def test_noise_is_standard_normal_with_no_correlation_between_paired_entries():
    """Entries k and k + W/2 of a row come from the two words of one hash: check they are
    uncorrelated, and that the draws are N(0, 1) (fixed key, so the test is deterministic)."""
    draws = np.asarray(step_noise(jax.random.PRNGKey(0), 400, (25, 100))).reshape(-1, 100)
    assert np.isfinite(draws).all()
    assert stats.kstest(draws.ravel(), "norm").pvalue > 1e-3
    assert abs(draws.mean()) < 0.01 and abs(draws.std() - 1.0) < 0.01
    paired = np.corrcoef(draws[:, :50].ravel(), draws[:, 50:].ravel())[0, 1]
    neighbours = np.corrcoef(draws[:, :-1].ravel(), draws[:, 1:].ravel())[0, 1]
    assert abs(paired) < 0.01 and abs(neighbours) < 0.01


def test_vmapped_keys_draw_what_each_key_draws_alone():
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    together = jax.vmap(lambda k: step_noise(k, 4, (2, 5)))(keys)
    for i, k in enumerate(keys):
        np.testing.assert_array_equal(together[i], step_noise(k, 4, (2, 5)))
