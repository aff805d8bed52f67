"""The closed-form-KL ELBO: its per-step KL against a hand-written Gaussian KL along a Python
loop, the annealing factor and masks, and its expectation against the sampled-KL ELBO."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from conftest import init_params, random_binary_batch

from dmm_jax.evaluate import elbo_per_sequence
from dmm_jax.models.dmm import guide, model
from dmm_jax.nn import BackwardEncoder, Combiner, GatedTransition
from dmm_jax.objectives import AnalyticKLTraceELBO, analytic_kl_elbo, trace_guide_and_model


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
