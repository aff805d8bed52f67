"""The closed-form-KL ELBO: its per-step KL against a hand-written Gaussian KL along a Python
loop, the annealing factor and masks, and its expectation against the sampled-KL ELBO. The
importance-weighted bound: the ELBO at one particle, never looser with more, padding-proof
and trainable through the jitted update."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, random_binary_batch
from numpyro.infer import Trace_ELBO

from dmm_jax.config import TrainConfig
from dmm_jax.evaluate import elbo_per_sequence
from dmm_jax.models.dmm import guide, model
from dmm_jax.nn import BackwardEncoder, Combiner, GatedTransition
from dmm_jax.objectives import (
    AnalyticKLTraceELBO,
    ImportanceWeightedELBO,
    analytic_kl_elbo,
    trace_guide_and_model,
)


def _gaussian_kl(m_q, s_q, m_p, s_p):
    """KL(N(m_q, S_q) || N(m_p, S_p)) for diagonal covariances, by the general formula
    1/2 [tr(S_p^-1 S_q) + (m_p - m_q)' S_p^-1 (m_p - m_q) - k + log det S_p / det S_q]."""
    cov_q, cov_p = np.diag(s_q**2), np.diag(s_p**2)
    inv_p, diff = np.linalg.inv(cov_p), m_p - m_q
    log_dets = np.linalg.slogdet(cov_p)[1] - np.linalg.slogdet(cov_q)[1]
    return 0.5 * (np.trace(inv_p @ cov_q) + diff @ inv_p @ diff - len(m_q) + log_dets)


def _analytic_elbo(params, key, x, lengths, config, annealing):
    traces = trace_guide_and_model(params, key, model, guide, x, lengths, annealing, config=config)
    return analytic_kl_elbo(*traces), traces


def test_closed_form_kl_per_step_matches_a_python_loop(tiny_config, key):
    cfg = tiny_config
    params = init_params(cfg)
    params["z_q_0"] = jnp.linspace(0.5, -0.5, cfg.z_dim)
    x, lengths = random_binary_batch(2, 3, 5, cfg.obs_dim, lengths=[5, 2, 0])

    @jax.jit
    def elbo_z_kl(annealing):
        elbo, (guide_trace, model_trace) = _analytic_elbo(params, key, x, lengths, cfg, annealing)
        q, p = guide_trace["z"], model_trace["z"]
        return elbo, q["value"], p["fn"].kl_from(q["fn"], q["value"], q["intermediates"])

    elbo, z, got = elbo_z_kl(1.0)
    z = np.asarray(z, np.float64)

    f64 = functools.partial(jax.tree.map, lambda a: np.asarray(a, np.float64))
    mask = jnp.arange(5)[None] < lengths[:, None]
    hidden = BackwardEncoder(cfg.rnn_dim, cfg.rnn_cell, activation=cfg.encoder_activation).apply(
        {"params": params["encoder$params"]}, x, mask
    )
    combiner = jax.jit(Combiner(cfg.z_dim, cfg.rnn_dim).apply)
    transition = jax.jit(GatedTransition(cfg.z_dim, cfg.transition_dim).apply)
    kl = np.zeros(3)
    for b in range(3):
        z_q_prev, z_p_prev = params["z_q_0"], params["z_0"]
        for t in range(lengths[b]):
            m_q, s_q = f64(combiner({"params": params["combiner$params"]}, z_q_prev, hidden[b, t]))
            m_p, s_p = f64(transition({"params": params["transition$params"]}, z_p_prev))
            kl[b] += _gaussian_kl(m_q, s_q, m_p, s_p)
            z_q_prev = z_p_prev = z[b, t]
    np.testing.assert_allclose(got, kl, rtol=1e-4)
    assert got[2] == 0.0  # an empty sequence has no KL

    # The annealing factor scales the KL term only; log p(x | z) is untouched.
    annealed, _, _ = elbo_z_kl(0.25)
    np.testing.assert_allclose(annealed - elbo, 0.75 * kl, rtol=1e-4, atol=1e-4)


def test_analytic_and_sampled_kl_elbos_have_the_same_expectation(tiny_config, key):
    params = init_params(tiny_config)
    x, lengths = random_binary_batch(4, 2, 3, tiny_config.obs_dim, lengths=[3, 2])
    annealing = jnp.float32(0.7)

    @jax.jit
    def both(k):
        sampled = elbo_per_sequence(params, k, x, lengths, tiny_config, annealing)
        analytic, _ = _analytic_elbo(params, k, x, lengths, tiny_config, annealing)
        return sampled, analytic

    sampled, analytic = jax.vmap(both)(jax.random.split(key, 4000))
    diff = np.asarray(sampled - analytic, np.float64)
    standard_error = diff.std(0) / np.sqrt(len(diff))
    assert np.all(np.abs(diff.mean(0)) < 4 * standard_error)
    # The analytic estimator has the smaller variance (the point of the paper's choice).
    assert np.all(np.asarray(analytic).var(0) < np.asarray(sampled).var(0))


def test_analytic_kl_elbo_class_is_the_summed_negative_elbo(tiny_config, key):
    params = init_params(tiny_config)
    x, lengths = random_binary_batch(5, 3, 4, tiny_config.obs_dim)
    loss = AnalyticKLTraceELBO().loss(
        key,
        params,
        functools.partial(model, config=tiny_config),
        functools.partial(guide, config=tiny_config),
        x,
        lengths,
        0.5,
    )
    elbo = jax.jit(lambda k: _analytic_elbo(params, k, x, lengths, tiny_config, 0.5)[0])(key)
    np.testing.assert_allclose(loss, -jnp.sum(elbo), rtol=1e-6)


def _iwae_loss(particles, key, params, x, lengths, config, annealing=1.0):
    return ImportanceWeightedELBO(particles).loss(
        key, params, model, guide, x, lengths, annealing, config=config
    )


def test_iwae_with_one_particle_is_the_elbo_of_the_same_draw(tiny_config, key):
    params = init_params(tiny_config)
    x, lengths = random_binary_batch(3, 4, 6, tiny_config.obs_dim)
    draw_key = jax.random.split(key, 1)[0]
    for annealing in (1.0, 0.3):
        elbo = Trace_ELBO().loss(
            draw_key, params, model, guide, x, lengths, annealing, config=tiny_config
        )
        iwae = _iwae_loss(1, key, params, x, lengths, tiny_config, annealing)
        np.testing.assert_allclose(iwae, elbo, rtol=1e-6)


def test_iwae_bound_tightens_with_more_particles(tiny_config):
    """E[IWAE_K] is non-decreasing in K (Burda et al., Theorem 1); averaged over 32 keys the
    loss falls from K = 1 to 4 to 16, by more than the spread of the averages."""
    params = init_params(tiny_config)
    x, lengths = random_binary_batch(4, 3, 8, tiny_config.obs_dim, lengths=[8, 5, 3])
    keys = jax.random.split(jax.random.PRNGKey(5), 32)
    means = []
    for particles in (1, 4, 16):
        losses = jax.jit(
            jax.vmap(lambda k, K=particles: _iwae_loss(K, k, params, x, lengths, tiny_config))
        )(keys)
        means.append(float(losses.mean()))
        spread = float(losses.std() / np.sqrt(len(keys)))
    assert means[0] > means[1] > means[2], means
    assert means[0] - means[2] > 2 * spread


def test_iwae_gradients_are_finite_and_padding_changes_nothing(tiny_config, key):
    params = init_params(tiny_config)
    x, lengths = random_binary_batch(5, 3, 5, tiny_config.obs_dim, lengths=[5, 1, 3])
    padded = np.concatenate([x, np.ones((3, 3, tiny_config.obs_dim), np.float32)], axis=1)
    loss, grads = jax.value_and_grad(_iwae_loss, argnums=2)(4, key, params, x, lengths, tiny_config)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(
        _iwae_loss(4, key, params, padded, lengths, tiny_config), loss, rtol=1e-5
    )


def test_train_config_names_objectives_that_do_not_combine():
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="fivo-ish")
    with pytest.raises(ValueError, match="kl='sampled'"):
        TrainConfig(objective="iwae", kl="analytic")
    with pytest.raises(ValueError, match="particles"):
        TrainConfig(particles=0)
