"""Dropout inside a model while training: on the emission network's input
(``TrainConfig.dropout``) and on the VRNN's RNN input (``TrainConfig.input_dropout``). The
mask's rate and scale, the training loss each changes for the DMM and the VRNN (the model only;
a rate near 0 leaves every other draw as it was), finite gradients, and the settings refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_binary_batch
from numpyro import handlers

from dmm_jax.config import DMMConfig, TrainConfig, VRNNConfig
from dmm_jax.continuous_config import LatentODEConfig
from dmm_jax.models.common import model_dropout
from dmm_jax.models.vrnn import guide, model
from dmm_jax.step import build_svi, init_train_state


def test_the_mask_drops_at_its_rate_and_keeps_the_expectation():
    features = jnp.ones((200, 500))
    dropped = handlers.seed(model_dropout, 0)(features, 0.3)
    kept = np.asarray(dropped) != 0.0
    assert abs(1.0 - kept.mean() - 0.3) < 0.01
    np.testing.assert_allclose(np.asarray(dropped)[kept], 1.0 / 0.7, rtol=1e-6)
    assert abs(float(dropped.mean()) - 1.0) < 0.02
    assert model_dropout(features, 0.0) is features
    with pytest.raises(ValueError, match="seed"), pytest.warns(UserWarning):
        model_dropout(features, 0.3)


CONFIGS = {
    "dmm-aug-nade": DMMConfig(
        obs_dim=6,
        z_dim=3,
        emission_dim=8,
        transition_dim=8,
        rnn_dim=10,
        augmented=True,
        emission="nade",
        nade_hidden=5,
    ),
    "vrnn": VRNNConfig(obs_dim=6, z_dim=3, rnn_dim=8, feature_dim=6, hidden_dim=6),
}


@pytest.mark.parametrize(
    "name, field", [("dmm-aug-nade", "dropout"), ("vrnn", "dropout"), ("vrnn", "input_dropout")]
)
def test_dropout_changes_the_training_loss_only_through_its_mask(name, field, key):
    config = CONFIGS[name]
    x, lengths = random_binary_batch(1, 3, 7, config.obs_dim, lengths=[7, 4, 2])
    # The closed-form-KL ELBO (the DMM's) traces the model as the IWAE bound does; the VRNN's
    # ELBO is NumPyro's Trace_ELBO, which seeds the model itself.
    settings = {"dmm-aug-nade": {"kl": "analytic"}, "vrnn": {}}[name]
    svis = {
        rate: build_svi(config, TrainConfig(**{field: rate}, **settings))
        for rate in (0.0, 1e-9, 0.5)
    }
    params = svis[0.0].get_params(init_train_state(svis[0.0], 0, config.obs_dim).svi_state)

    def loss(rate, params):
        svi = svis[rate]
        return svi.loss.loss(key, params, svi.model, svi.guide, x, lengths, 1.0)

    plain = float(loss(0.0, params))
    # A rate so small that no entry is dropped: the same draws, the same loss.
    np.testing.assert_allclose(float(loss(1e-9, params)), plain, rtol=1e-5)
    dropped, grads = jax.value_and_grad(lambda p: loss(0.5, p))(params)
    assert np.isfinite(float(dropped)) and abs(float(dropped) - plain) > 1e-3, (dropped, plain)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_dropout_settings_that_do_not_combine_are_refused():
    with pytest.raises(ValueError, match="dropout"):
        TrainConfig(dropout=1.0)
    with pytest.raises(ValueError, match="dropout"):
        TrainConfig(dropout=-0.1)
    with pytest.raises(ValueError, match="fivo"):
        TrainConfig(dropout=0.2, objective="fivo", particles=2)
    with pytest.raises(ValueError, match="latent-ode family has no dropout"):
        build_svi(LatentODEConfig(), TrainConfig(dropout=0.2))
    with pytest.raises(ValueError, match="input_dropout"):
        TrainConfig(input_dropout=1.0)
    with pytest.raises(ValueError, match="input_dropout.*fivo"):
        TrainConfig(input_dropout=0.2, objective="fivo", particles=2)
    with pytest.raises(ValueError, match="the dmm family has no input_dropout \\(vrnn do\\)"):
        build_svi(CONFIGS["dmm-aug-nade"], TrainConfig(input_dropout=0.2))


def test_input_dropout_reaches_the_model_rnn_and_not_the_guide(key):
    """With every feature dropped but a few, the model's RNN runs on (nearly) nothing: the prior
    it scores the guide's draw under differs from the undropped one. ``build_svi`` hands the
    rate to the model only; the guide's RNN reads every feature."""
    config = CONFIGS["vrnn"]
    x, lengths = random_binary_batch(1, 3, 7, config.obs_dim, lengths=[7, 4, 2])
    svi = build_svi(config, TrainConfig(input_dropout=0.5))
    assert svi.model.keywords["input_dropout"] == 0.5
    assert "input_dropout" not in svi.guide.keywords
    params = svi.get_params(init_train_state(svi, 0, config.obs_dim).svi_state)
    guided = handlers.trace(handlers.substitute(handlers.seed(guide, key), params))
    drawn = guided.get_trace(x, lengths, config=config)["z"]["value"]

    def prior_log_prob(rate):
        conditioned = handlers.substitute(
            handlers.seed(model, jax.random.fold_in(key, 1)), {**params, "z": drawn}
        )
        model_trace = handlers.trace(conditioned).get_trace(
            x, lengths, config=config, input_dropout=rate
        )
        return model_trace["z"]["fn"].log_prob(drawn)

    assert float(jnp.max(jnp.abs(prior_log_prob(0.0) - prior_log_prob(0.99)))) > 1e-3
