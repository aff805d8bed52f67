"""The NumPyro model and guide: exact references for the batched scoring, padding, the ELBO's
agreement with NumPyro's Trace_ELBO, and finite numerics when q's scale collapses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, random_binary_batch
from numpyro import handlers
from numpyro.infer import Trace_ELBO
from scipy import stats

from dmm_jax.evaluate import elbo_per_sequence
from dmm_jax.models.dmm import guide, model
from dmm_jax.nn import BernoulliEmitter, GatedTransition

RTOL = 1e-5


@pytest.fixture
def params(tiny_config):
    """Parameters of model and guide as the SVI would initialise them."""
    p = init_params(tiny_config)
    # Non-trivial starts, so the tests see where z_0 and z_q_0 enter.
    p["z_0"] = jnp.linspace(-1.0, 1.0, tiny_config.z_dim)
    p["z_q_0"] = jnp.linspace(0.5, -0.5, tiny_config.z_dim)
    return p


def _log_joint(params, x, lengths, z, config):
    """log p(x, z) per sequence from the model's (batched) trace."""
    conditioned = handlers.condition(handlers.substitute(model, data=params), data={"z": z})
    tr = handlers.trace(conditioned).get_trace(x, lengths, config=config)
    return sum(
        site["fn"].log_prob(site["value"]) for site in tr.values() if site["type"] == "sample"
    )


def test_log_joint_equals_python_loop_over_time(params, tiny_config):
    cfg = tiny_config
    x, lengths = random_binary_batch(1, 3, 8, cfg.obs_dim, lengths=[8, 5, 1])
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (3, 8, cfg.z_dim)))
    got = np.asarray(_log_joint(params, x, lengths, z, cfg))

    trans = functools.partial(
        GatedTransition(cfg.z_dim, cfg.transition_dim).apply,
        {"params": params["transition$params"]},
    )
    emit = functools.partial(
        BernoulliEmitter(cfg.obs_dim, cfg.emission_dim).apply, {"params": params["emitter$params"]}
    )
    want = np.zeros(3)
    for b in range(3):
        z_prev = np.asarray(params["z_0"])
        for t in range(lengths[b]):
            loc, scale = trans(z_prev)
            want[b] += stats.norm.logpdf(z[b, t], loc, scale).sum()
            p = jax.nn.sigmoid(emit(z[b, t]))
            want[b] += stats.bernoulli.logpmf(x[b, t], p).sum()
            z_prev = z[b, t]
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_guide_scan_sampler_and_batched_scorer_agree(params, tiny_config, key):
    x, lengths = random_binary_batch(2, 4, 7, tiny_config.obs_dim)
    seeded = handlers.seed(handlers.substitute(guide, data=params), key)
    site = handlers.trace(seeded).get_trace(x, lengths, config=tiny_config)["z"]
    through_noise = site["fn"].log_prob(site["value"], site["intermediates"])
    recomputed = site["fn"].log_prob(site["value"])  # loc, scale from the shifted draw
    np.testing.assert_allclose(through_noise, recomputed, rtol=1e-4)


def test_elbo_per_sequence_sums_to_numpyro_trace_elbo(params, tiny_config, key):
    x, lengths = random_binary_batch(3, 4, 6, tiny_config.obs_dim)
    af = jnp.float32(0.3)
    ours = elbo_per_sequence(params, key, x, lengths, tiny_config, af)
    loss = Trace_ELBO().loss(
        key,
        params,
        functools.partial(model, config=tiny_config),
        functools.partial(guide, config=tiny_config),
        x,
        lengths,
        af,
    )
    np.testing.assert_allclose(-jnp.sum(ours), loss, rtol=RTOL)


def test_padding_in_time_leaves_the_loss_unchanged(params, tiny_config, key):
    x, lengths = random_binary_batch(4, 3, 6, tiny_config.obs_dim, lengths=[6, 2, 4])
    padded = np.concatenate([x, np.ones((3, 9, tiny_config.obs_dim), np.float32)], axis=1)
    short = elbo_per_sequence(params, key, x, lengths, tiny_config)
    long = elbo_per_sequence(params, key, padded, lengths, tiny_config)
    np.testing.assert_allclose(short, long, rtol=RTOL)


def test_empty_rows_contribute_exactly_zero(params, tiny_config, key):
    x, lengths = random_binary_batch(5, 3, 5, tiny_config.obs_dim, lengths=[5, 0, 0])
    elbo = elbo_per_sequence(params, key, x, lengths, tiny_config)
    assert elbo[1] == 0.0 and elbo[2] == 0.0 and elbo[0] != 0.0


def test_collapsed_guide_scale_keeps_loss_and_gradients_finite(params, tiny_config, key):
    """q's scale ~1e-30: (z - loc) / scale would lose eps entirely; the standardized-noise
    form keeps the exact log density and finite gradients."""
    p = jax.tree.map(lambda a: a, params)
    p["combiner$params"]["b_scale"] = jnp.full((tiny_config.z_dim,), -69.0)
    p["combiner$params"]["w_scale"] = jnp.zeros_like(p["combiner$params"]["w_scale"])
    x, lengths = random_binary_batch(6, 4, 7, tiny_config.obs_dim)

    def loss(q):
        return -jnp.sum(elbo_per_sequence(q, key, x, lengths, tiny_config))

    value, grads = jax.value_and_grad(loss)(p)
    assert np.isfinite(value)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))

    seeded = handlers.seed(handlers.substitute(guide, data=p), jax.random.split(key)[1])
    site = handlers.trace(seeded).get_trace(x, lengths, config=tiny_config)["z"]
    eps, scale = site["intermediates"]
    mask = np.arange(7)[None] < lengths[:, None]
    assert float(scale[mask].max()) < 1e-29
    exact = np.where(
        mask,
        stats.norm.logpdf(np.asarray(eps)).sum(-1) - np.log(np.asarray(scale, np.float64)).sum(-1),
        0.0,
    ).sum(-1)
    np.testing.assert_allclose(
        site["fn"].log_prob(site["value"], site["intermediates"]), exact, rtol=RTOL
    )
