"""Evaluation: the importance-sampled likelihood against the bound, exact references, and
streaming statistics."""

import jax
import numpy as np
import pytest
from conftest import init_params, random_binary_batch
from scipy import stats
from scipy.special import logsumexp

from dmm_jax.evaluate import LogWeightStats, evaluate_split


@pytest.fixture(scope="module")
def trained_like_params(tiny_config):
    return init_params(tiny_config)


@pytest.fixture(scope="module")
def sequences(tiny_config):
    x, lengths = random_binary_batch(1, 5, 9, tiny_config.obs_dim, lengths=[9, 4, 7, 2, 9])
    return [x[i, : lengths[i]].astype(np.uint8) for i in range(5)]


def test_streaming_stats_match_direct_computation():
    w = np.random.default_rng(0).normal(-50.0, 3.0, size=(37, 4))
    s = LogWeightStats(4)
    for chunk in np.array_split(w, 5):  # uneven chunks, rising and falling maxima
        s.update(chunk)
    np.testing.assert_allclose(s.elbo(), w.mean(0))
    np.testing.assert_allclose(s.elbo_variance_of_mean(), w.var(0, ddof=1) / 37)
    np.testing.assert_allclose(s.log_mean_exp(), logsumexp(w, axis=0) - np.log(37))
    e = np.exp(w - w.max(0))
    np.testing.assert_allclose(
        s.log_mean_exp_variance(), e.var(0, ddof=1) / (37 * e.mean(0) ** 2), rtol=1e-10
    )


def test_log_mean_exp_is_exact_when_weights_are_constant():
    """z ~ N(0, 1), x | z ~ N(z, 1), q(z | x) = the exact posterior N(x/2, 1/2): every weight
    p(x, z) / q(z | x) equals p(x) = N(x; 0, 2), so the estimate is exact at any S."""
    x = 0.7
    z = np.random.default_rng(1).normal(x / 2, np.sqrt(0.5), size=(25, 1))
    w = (
        stats.norm.logpdf(z)
        + stats.norm.logpdf(x, z, 1)
        - stats.norm.logpdf(z, x / 2, np.sqrt(0.5))
    )
    s = LogWeightStats(1)
    s.update(w)
    np.testing.assert_allclose(s.log_mean_exp(), stats.norm.logpdf(x, 0, np.sqrt(2)), atol=1e-10)
    np.testing.assert_allclose(s.log_mean_exp_variance(), 0.0, atol=1e-12)


def test_importance_sampled_estimate_never_exceeds_the_bound(
    trained_like_params, sequences, tiny_config, key
):
    r = evaluate_split(
        trained_like_params,
        key,
        sequences,
        tiny_config,
        num_samples=20,
        estimator="is",
        batch_size=4,
        sample_chunk=8,
    )
    assert r["is_nll_per_step"] <= r["elbo_nll_per_step"]
    assert r["loss_per_step"] == r["elbo_nll_per_step"]
    assert r["num_steps"] == 31 and r["num_sequences"] == 5 and r["num_samples"] == 20
    assert r["elbo_nll_per_step_se"] > 0 and r["is_nll_per_step_se"] > 0
    # Same draws whatever the chunking: chunking is a memory knob, not a different estimate.
    r2 = evaluate_split(
        trained_like_params,
        key,
        sequences,
        tiny_config,
        num_samples=20,
        estimator="is",
        batch_size=4,
        sample_chunk=20,
    )
    assert r2["is_nll_per_step"] == pytest.approx(r["is_nll_per_step"], rel=1e-5)


def test_importance_sampled_estimate_falls_as_samples_grow(
    trained_like_params, sequences, tiny_config
):
    def mean_is(num_samples):
        return np.mean(
            [
                evaluate_split(
                    trained_like_params,
                    jax.random.PRNGKey(seed),
                    sequences,
                    tiny_config,
                    num_samples=num_samples,
                    estimator="is",
                    sample_chunk=16,
                )["is_nll_per_step"]
                for seed in range(6)
            ]
        )

    s1, s8, s64 = mean_is(1), mean_is(8), mean_is(64)
    assert s1 > s8 > s64


def test_bad_estimator_is_rejected(trained_like_params, sequences, tiny_config, key):
    with pytest.raises(ValueError, match="estimator"):
        evaluate_split(trained_like_params, key, sequences, tiny_config, estimator="exact")


def test_balanced_batch_size_keeps_the_batch_count_and_drops_empty_rows():
    from dmm_jax.data.batching import balanced_batch_size

    # JSB test (77) and valid (76) in batches of at most 64: two batches either way.
    assert balanced_batch_size(77, 64) == 39 and balanced_batch_size(76, 64) == 38
    assert balanced_batch_size(64, 64) == 64 and balanced_batch_size(65, 64) == 33
    assert balanced_batch_size(10, 64) == 10 and balanced_batch_size(1, 1) == 1
    with pytest.raises(ValueError, match="num_items >= 1"):
        balanced_batch_size(0, 64)


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e150])
def test_log_weight_stats_match_scipy_on_extreme_and_impossible_weights(scale):
    from scipy.special import logsumexp

    rng = np.random.default_rng(0)
    w = rng.normal(size=(37, 4)) * scale
    w[:, 1] -= 1e300  # far below the others
    w[::3, 2] = -np.inf  # some impossible draws
    w[:, 3] = -np.inf  # every draw impossible
    stats = LogWeightStats(4)
    for start in range(0, 37, 8):  # chunks, as evaluate_split feeds them
        stats.update(w[start : start + 8])
    with np.errstate(invalid="ignore"):
        want = logsumexp(w, axis=0) - np.log(37)
    np.testing.assert_allclose(stats.log_mean_exp()[:3], want[:3], rtol=1e-12)
    assert stats.log_mean_exp()[3] == -np.inf
    np.testing.assert_allclose(stats.elbo()[:2], w[:, :2].mean(0), rtol=1e-12)
    variance = stats.elbo_variance_of_mean()
    np.testing.assert_allclose(variance[0], w[:, 0].var(ddof=1) / 37, rtol=1e-9)
    assert np.isfinite(variance[1])  # squares of -1e300 would overflow; deviations do not
    assert np.isfinite(stats.log_mean_exp_variance()[:3]).all()


def test_a_non_finite_bound_is_an_error_naming_the_split_and_sequence(tiny_config):
    params = {}  # never read: the weights are replaced below
    sequences = [np.ones((3, 6), np.float32), np.ones((5, 6), np.float32)]

    def weights(params, keys, x, lengths, config, covariates):
        del params, config, covariates
        w = np.zeros((keys.shape[0], x.shape[0]))
        w[:, np.asarray(lengths) == 5] = np.nan
        return w

    from dmm_jax import evaluate

    original = evaluate._batch_log_weights
    evaluate._batch_log_weights = weights
    try:
        with pytest.raises(FloatingPointError, match=r"test: sequence 1 \(5 steps\).*1 of 2"):
            evaluate_split(
                params, jax.random.PRNGKey(0), sequences, tiny_config, num_samples=2, name="test"
            )
    finally:
        evaluate._batch_log_weights = original


def test_a_nade_evaluation_call_stays_within_its_smaller_step_budget(tiny_config, key, monkeypatch):
    """A NADE's [notes, hidden] activations per step make a call of EVAL_STEP_BUDGET padded
    steps many times larger than a Bernoulli's: its calls score fewer steps, splitting a batch
    whose single draw would not fit (long pieces), and all sequences are still scored."""
    import dataclasses

    from dmm_jax import evaluate

    monkeypatch.setattr(evaluate, "EVAL_STEP_BUDGET", 1200)
    calls = []
    jitted = evaluate._batch_log_weights

    def recording(params, keys, x, lengths, config, covariates):
        calls.append((config.emission, keys.shape[0] * x.shape[0] * x.shape[1], x.shape[0]))
        return jitted(params, keys, x, lengths, config, covariates)

    monkeypatch.setattr(evaluate, "_batch_log_weights", recording)
    lengths = [45, 40, 48, 36, 42, 47]  # one padded bucket of 48 steps
    x, _ = random_binary_batch(3, 6, 48, tiny_config.obs_dim, lengths=lengths)
    sequences = [x[i, : lengths[i]].astype(np.uint8) for i in range(6)]
    for emission in ("bernoulli", "nade"):
        config = dataclasses.replace(tiny_config, emission=emission, nade_hidden=400)
        r = evaluate_split(
            init_params(config), key, sequences, config, num_samples=3, estimator="is"
        )
        assert r["num_sequences"] == 6 and np.isfinite(r["is_nll_per_step"])
    budgets = {
        e: evaluate.steps_per_call(dataclasses.replace(tiny_config, emission=e, nade_hidden=400))
        for e in ("bernoulli", "nade")
    }
    assert budgets == {"bernoulli": 1200, "nade": 256}
    for emission, steps, _ in calls:
        assert steps <= budgets[emission], (emission, steps)
    rows = {e: max(r for em, _, r in calls if em == e) for e in budgets}
    assert rows["nade"] < 6 == rows["bernoulli"]  # 6 x 48 steps exceed the NADE's 256
