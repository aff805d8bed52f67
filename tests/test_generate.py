"""Sampling, forecasting, posterior latents and imputation with a (here untrained) DMM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, random_binary_batch
from scipy import stats

from dmm_jax.generate import (
    forecast,
    forecast_log_likelihood,
    forecast_split,
    frequency_baseline_logits,
    hide_entries,
    impute,
    impute_split,
    note_frequencies,
    posterior_latents,
    sample_prior,
)
from dmm_jax.models.common import sequence_mask
from dmm_jax.nn import BackwardEncoder, Combiner


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


def test_note_frequencies_and_the_baseline_likelihood_are_the_smoothed_closed_form():
    seqs = [np.array([[1, 0, 0], [1, 1, 0]]), np.array([[0, 1, 0]])]
    freq = note_frequencies(seqs, smoothing=1.0)
    np.testing.assert_allclose(freq, [(2 + 1) / (3 + 2), (2 + 1) / 5, (0 + 1) / 5])
    x = np.array([[[1, 0, 1], [0, 0, 0]]], np.float32)
    got = forecast_log_likelihood(frequency_baseline_logits(freq), x, np.array([2]))
    want = stats.bernoulli.logpmf(x[0], freq[None, :]).sum()
    np.testing.assert_allclose(got, [want], rtol=1e-5)


def test_forecast_split_scores_every_real_continuation_step(tiny_config, key):
    params = init_params(tiny_config)
    x, lengths = random_binary_batch(2, 5, 12, tiny_config.obs_dim, lengths=[12, 3, 7, 9, 4])
    seqs = [x[i, : lengths[i]] for i in range(5)]
    freq = note_frequencies(seqs)
    out = forecast_split(
        params,
        key,
        seqs,
        tiny_config,
        prefix_length=4,
        horizon=6,
        num_samples=3,
        frequencies=freq,
        batch_size=2,
    )
    # Sequences longer than the prefix (12, 7, 9) give min(6, L - 4) steps each.
    assert out["num_sequences"] == 3 and out["num_steps"] == 6 + 3 + 5
    # The baseline needs no model: check it against scipy on the same continuations.
    want = sum(stats.bernoulli.logpmf(s[4:10], freq[None, :]).sum() for s in seqs if len(s) > 4)
    np.testing.assert_allclose(out["baseline_log_likelihood_per_step"], want / 14, rtol=1e-5)
    assert np.isfinite(out["model_log_likelihood_per_step"])
    assert len(out["model_marginal_by_step"]) == 6
    # Per-step marginals: the joint of one step equals its marginal, and the baseline's steps
    # are independent, so its marginals sum to its joint.
    base_steps = np.array(out["baseline_marginal_by_step"]) * [3, 3, 3, 2, 2, 1]
    np.testing.assert_allclose(base_steps.sum(), want, rtol=1e-5)
    model_steps = np.array(out["model_marginal_by_step"]) * [3, 3, 3, 2, 2, 1]
    np.testing.assert_allclose(
        out["model_marginal_log_likelihood_per_step"], model_steps.sum() / 14
    )
    with pytest.raises(ValueError, match="horizon"):
        forecast_split(params, key, seqs, tiny_config, prefix_length=4, horizon=0, frequencies=freq)
    with pytest.raises(ValueError, match="longer than the prefix"):
        forecast_split(
            params, key, seqs, tiny_config, prefix_length=12, horizon=2, frequencies=freq
        )


def test_posterior_summaries_match_the_guide_first_step_in_closed_form(tiny_config, key):
    """z_1 ~ q is exactly N(loc, scale) of the combiner at (z_q_0, h_1): check the Monte Carlo
    mean and quantiles against it; later steps are mixtures, checked for order only."""
    params = init_params(tiny_config)
    x, lengths = random_binary_batch(3, 2, 5, tiny_config.obs_dim, lengths=[5, 3])
    levels = (0.1, 0.5, 0.9)
    out = posterior_latents(params, key, x, lengths, tiny_config, 4000, levels)
    assert out["mean"].shape == (2, 5, tiny_config.z_dim)
    assert out["quantiles"].shape == (3, 2, 5, tiny_config.z_dim)
    assert bool(jnp.all(out["mean"][1, 3:] == 0) & jnp.all(out["quantiles"][:, 1, 3:] == 0))
    assert bool(jnp.all(jnp.diff(out["quantiles"][:, 0], axis=0) >= 0))

    c = tiny_config
    hidden = BackwardEncoder(c.rnn_dim, c.rnn_cell, activation=c.encoder_activation).apply(
        {"params": params["encoder$params"]}, x, sequence_mask(lengths, 5)
    )
    loc, scale = Combiner(c.z_dim, c.rnn_dim).apply(
        {"params": params["combiner$params"]}, params["z_q_0"][None], hidden[:, 0]
    )
    np.testing.assert_allclose(out["mean"][:, 0], loc, atol=5 * float(scale.max()) / 4000**0.5)
    for i, q in enumerate(levels):
        want = loc + scale * stats.norm.ppf(q)
        np.testing.assert_allclose(out["quantiles"][i, :, 0], want, atol=0.1 * float(scale.max()))


def test_imputation_with_nothing_missing_returns_the_input_exactly(tiny_config, key):
    params = init_params(tiny_config)
    x, lengths = random_binary_batch(4, 3, 7, tiny_config.obs_dim)
    out = impute(params, key, x, lengths, np.zeros(x.shape, bool), tiny_config, 3)
    assert out["x"].dtype == x.dtype
    np.testing.assert_array_equal(out["x"], x)
    np.testing.assert_array_equal(out["probs"], x)


def test_imputation_fills_only_missing_entries_from_the_emitter(tiny_config, key):
    params = init_params(tiny_config)
    x, lengths = random_binary_batch(5, 3, 7, tiny_config.obs_dim, lengths=[7, 4, 6])
    missing = np.random.default_rng(0).random(x.shape) < 0.4
    real = np.asarray(sequence_mask(lengths, 7))[..., None]
    for bias, value in ((40.0, 1.0), (-40.0, 0.0)):
        # A saturated emitter bias makes p(x | z) certain, whatever z the guide draws.
        loud = jax.tree.map(lambda a: a, params)
        last = dict(loud["emitter$params"]["hidden_to_logits"])
        last["bias"] = jnp.full_like(last["bias"], bias)
        loud["emitter$params"] = {**loud["emitter$params"], "hidden_to_logits": last}
        out = impute(loud, key, x, lengths, missing, tiny_config, 4)
        filled = np.asarray(out["x"])
        np.testing.assert_array_equal(filled[missing & real], value)
        np.testing.assert_array_equal(filled[~(missing & real)], x[~(missing & real)])
        np.testing.assert_allclose(np.asarray(out["probs"])[missing & real], value, atol=1e-6)
        # log p of the values x holds at the hidden entries: ~0 where they agree, ~-40 where not.
        log_prob = np.asarray(out["log_prob"])[missing & real]
        agree = x[missing & real] == value
        assert np.all(log_prob[agree] > -1e-6) and np.all(log_prob[~agree] < -30)
        assert bool(jnp.all(out["log_prob"][~(missing & real)] == 0))
    # The hidden values are never read to fill them: garbage there changes nothing filled.
    garbage = np.where(missing & real, 1 - x, x)
    first = impute(params, key, x, lengths, missing, tiny_config, 4)
    again = impute(params, key, garbage, lengths, missing, tiny_config, 4)
    np.testing.assert_array_equal(first["x"], again["x"])
    np.testing.assert_array_equal(first["probs"][missing], again["probs"][missing])
    first = first["x"]
    np.testing.assert_array_equal(
        first, impute(params, key, x, lengths, missing, tiny_config, 4)["x"]
    )


def test_hidden_entries_cover_the_gap_and_stay_inside_each_sequence(key):
    x = jnp.zeros((2, 10, 4))
    lengths = jnp.array([10, 6])
    missing = np.asarray(hide_entries(key, x, lengths, gap=(4, 8)))
    np.testing.assert_array_equal(missing.sum((0, 2)), [0] * 4 + [8, 8, 4, 4] + [0, 0])
    some = np.asarray(hide_entries(key, jnp.zeros((50, 10, 4)), jnp.full(50, 10), fraction=0.3))
    assert 0.25 < some.mean() < 0.35
    with pytest.raises(ValueError, match="gap"):
        hide_entries(key, x, lengths, gap=(5, 5))


def test_impute_split_scores_exactly_the_hidden_entries(tiny_config, key):
    params = init_params(tiny_config)
    x, lengths = random_binary_batch(6, 4, 9, tiny_config.obs_dim, lengths=[9, 5, 3, 7])
    seqs = [x[i, : lengths[i]] for i in range(4)]
    freq = note_frequencies(seqs)
    out = impute_split(
        params,
        key,
        seqs,
        tiny_config,
        frequencies=freq,
        gap=(2, 6),
        num_iterations=3,
        batch_size=3,
    )
    hidden = [s[2:6] for s in seqs]  # the gap's steps that exist in each sequence
    assert out["num_hidden_entries"] == sum(h.size for h in hidden) == (4 + 3 + 1 + 4) * 6
    want = sum(stats.bernoulli.logpmf(h, freq[None, :]).sum() for h in hidden)
    np.testing.assert_allclose(
        out["baseline_log_likelihood_per_entry"], want / out["num_hidden_entries"], rtol=1e-5
    )
    assert np.isfinite(out["model_log_likelihood_per_entry"])
    assert 0 <= out["model_accuracy"] <= 1
    with pytest.raises(ValueError, match="nothing to impute"):
        impute_split(params, key, seqs, tiny_config, frequencies=freq)
