"""DMM-Aug (``DMMConfig.augmented``): x_{t-1} feeds the transition and the emission.

The model's batched log joint is checked against a Python loop over time written from the
definition; sampling and forecasting feed each drawn x_t back into the next step.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, random_binary_batch
from numpyro import handlers
from scipy import stats

from dmm_jax.config import DMMConfig, config_from_dict, config_to_dict
from dmm_jax.generate import forecast, impute, sample_prior
from dmm_jax.models.common import previous_observations
from dmm_jax.models.dmm import model
from dmm_jax.nn import BernoulliEmitter, GatedTransition


@pytest.fixture(scope="module")
def aug_config(tiny_config):
    return dataclasses.replace(tiny_config, augmented=True)


@pytest.fixture(scope="module")
def aug_params(aug_config):
    params = init_params(aug_config)
    params["z_0"] = jnp.linspace(-1.0, 1.0, aug_config.z_dim)
    return params


def _networks(params, cfg):
    trans = functools.partial(
        GatedTransition(cfg.z_dim, cfg.transition_dim).apply,
        {"params": params["transition$params"]},
    )
    emit = functools.partial(
        BernoulliEmitter(cfg.obs_dim, cfg.emission_dim).apply, {"params": params["emitter$params"]}
    )
    return trans, emit


def test_previous_observations_shifts_time_by_one_with_zeros_first():
    x = jnp.arange(12.0).reshape(1, 4, 3)
    shifted = previous_observations(x)
    np.testing.assert_array_equal(shifted[0, 0], 0.0)
    np.testing.assert_array_equal(shifted[0, 1:], x[0, :-1])


def test_augmented_parameters_see_the_previous_observation(aug_params, aug_config, tiny_config):
    cfg = aug_config
    kernels = aug_params["transition$params"]
    assert kernels["gate_z_to_hidden"]["kernel"].shape == (cfg.z_dim + cfg.obs_dim, 8)
    assert kernels["proposed_z_to_hidden"]["kernel"].shape == (cfg.z_dim + cfg.obs_dim, 8)
    assert kernels["z_to_loc"]["kernel"].shape == (cfg.z_dim, cfg.z_dim)  # z_{t-1} only
    emit_in = aug_params["emitter$params"]["z_to_hidden"]["kernel"].shape[0]
    assert emit_in == cfg.z_dim + cfg.obs_dim
    plain = init_params(tiny_config)["emitter$params"]["z_to_hidden"]["kernel"]
    assert plain.shape[0] == tiny_config.z_dim


def test_augmented_log_joint_equals_python_loop_over_time(aug_params, aug_config):
    cfg = aug_config
    x, lengths = random_binary_batch(3, 3, 7, cfg.obs_dim, lengths=[7, 4, 1])
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (3, 7, cfg.z_dim)))
    conditioned = handlers.condition(handlers.substitute(model, data=aug_params), data={"z": z})
    tr = handlers.trace(conditioned).get_trace(x, lengths, config=cfg)
    got = sum(s["fn"].log_prob(s["value"]) for s in tr.values() if s["type"] == "sample")

    trans, emit = _networks(aug_params, cfg)
    want = np.zeros(3)
    for b in range(3):
        z_prev, x_prev = np.asarray(aug_params["z_0"]), np.zeros(cfg.obs_dim, np.float32)
        for t in range(lengths[b]):
            loc, scale = trans(z_prev, x_prev)
            want[b] += stats.norm.logpdf(z[b, t], loc, scale).sum()
            p = jax.nn.sigmoid(emit(np.concatenate([z[b, t], x_prev])))
            want[b] += stats.bernoulli.logpmf(x[b, t], p).sum()
            z_prev, x_prev = z[b, t], x[b, t]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_augmented_prior_samples_feed_each_draw_into_the_next_step(aug_params, aug_config, key):
    cfg = aug_config
    out = sample_prior(aug_params, key, cfg, 4, 9)
    assert out["x"].shape == out["logits"].shape == (4, 9, cfg.obs_dim)
    assert out["z"].shape == (4, 9, cfg.z_dim)
    assert out["x"].dtype == jnp.uint8
    # The logits of step t are the emitter's given z_t and the *drawn* x_{t-1}.
    _, emit = _networks(aug_params, cfg)
    x_prev = previous_observations(out["x"].astype(jnp.float32))
    want = emit(jnp.concatenate([out["z"], x_prev], axis=-1))
    np.testing.assert_allclose(out["logits"], want, rtol=1e-5, atol=1e-6)
    again = sample_prior(aug_params, key, cfg, 4, 9)
    np.testing.assert_array_equal(out["x"], again["x"])


def test_augmented_forecast_starts_from_the_last_observed_step(aug_params, aug_config, key):
    cfg = aug_config
    x, lengths = random_binary_batch(5, 3, 6, cfg.obs_dim, lengths=[6, 3, 0])
    out = forecast(aug_params, key, x, lengths, cfg, 4, 2)
    assert out["logits"].shape == (2, 3, 4, cfg.obs_dim)
    assert bool(jnp.all(jnp.isfinite(out["logits"])))
    # The first forecast step's emission reads x_k, the prefix's last step (x_0 = 0 if empty):
    # changing only that step changes the forecast, changing an earlier step's value need not.
    x_other = x.copy()
    x_other[0, 5] = 1.0 - x_other[0, 5]
    moved = forecast(aug_params, key, x_other, lengths, cfg, 4, 2)
    assert not np.allclose(moved["logits"][:, 0, 0], out["logits"][:, 0, 0])
    np.testing.assert_allclose(moved["logits"][:, 1:], out["logits"][:, 1:], rtol=1e-6)


def test_impute_refuses_augmented_models(aug_params, aug_config, key):
    x, lengths = random_binary_batch(0, 2, 4, aug_config.obs_dim)
    with pytest.raises(NotImplementedError, match="DMM-Aug"):
        impute(aug_params, key, x, lengths, jnp.zeros(x.shape, bool), aug_config, 2)


def test_augmented_config_round_trips_and_old_configs_load_unaugmented(aug_config):
    assert config_from_dict(DMMConfig, config_to_dict(aug_config)) == aug_config
    old = config_to_dict(DMMConfig())
    del old["augmented"]  # a checkpoint written before the field existed
    assert config_from_dict(DMMConfig, old).augmented is False
