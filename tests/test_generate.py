"""Sampling from the prior and forecasting a prefix with a (here untrained) DMM."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import init_params, random_binary_batch
from scipy import stats

from dmm_jax.generate import forecast, forecast_log_likelihood, sample_prior


def test_prior_samples_have_the_right_shapes_and_repeat_with_their_key(tiny_config, key):
    params = init_params(tiny_config)
    out = sample_prior(params, key, tiny_config, 3, 11)
    assert out["z"].shape == (3, 11, tiny_config.z_dim)
    assert out["x"].shape == out["probs"].shape == (3, 11, tiny_config.obs_dim)
    assert out["x"].dtype == jnp.uint8 and set(np.unique(out["x"])) <= {0, 1}
    assert bool(jnp.all((out["probs"] > 0) & (out["probs"] < 1)))
    again = sample_prior(params, key, tiny_config, 3, 11)
    np.testing.assert_array_equal(out["x"], again["x"])
    other = sample_prior(params, jax.random.PRNGKey(1), tiny_config, 3, 11)
    assert not np.array_equal(out["z"], other["z"])


def test_forecast_shapes_horizon_zero_and_empty_prefix(tiny_config, key):
    params = init_params(tiny_config)
    x, lengths = random_binary_batch(0, 3, 6, tiny_config.obs_dim, lengths=[6, 3, 0])
    out = forecast(params, key, x, lengths, tiny_config, 5, 4)
    assert out["x"].shape == out["logits"].shape == (4, 3, 5, tiny_config.obs_dim)
    assert out["mean_probs"].shape == (3, 5, tiny_config.obs_dim)
    assert bool(jnp.all(jnp.isfinite(out["logits"])))
    nothing = forecast(params, key, x, lengths, tiny_config, 0, 4)
    assert nothing["x"].shape == (4, 3, 0, tiny_config.obs_dim)


def test_forecast_log_likelihood_is_the_bernoulli_likelihood_of_the_continuation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 2, 4, 3))
    x = (rng.random((2, 4, 3)) < 0.5).astype(np.float32)
    lengths = np.array([4, 2])
    got = forecast_log_likelihood(jnp.asarray(logits), jnp.asarray(x), jnp.asarray(lengths))
    p = 1 / (1 + np.exp(-logits[0]))
    want = [stats.bernoulli.logpmf(x[n, : lengths[n]], p[n, : lengths[n]]).sum() for n in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Two identical draws average to the same likelihood.
    twice = forecast_log_likelihood(jnp.asarray(np.concatenate([logits, logits])), x, lengths)
    np.testing.assert_allclose(twice, want, rtol=1e-5)
