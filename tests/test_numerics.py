"""Numerics on long sequences: the unbounded ReLU state of the reference's encoder overflows
in float32, the default soft-capped one ("soft") and the hard-capped one ("stable") do not
and are the ReLU below the cap; the reference-exact numerics stay available and old
checkpoints keep them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from conftest import init_params, random_binary_batch

from dmm_jax.config import DMMConfig
from dmm_jax.evaluate import elbo_per_sequence
from dmm_jax.nn import BackwardEncoder
from dmm_jax.scans import RELU_CAP

SMALL = {"obs_dim": 6, "z_dim": 3, "emission_dim": 5, "transition_dim": 7, "rnn_dim": 8}


def _amplified(params, gain=1.3):
    """The encoder's recurrence set to gain * I: a spectral radius above 1, as training can
    reach, under which a ReLU state grows as gain^t."""
    encoder = dict(params["encoder$params"])
    encoder["w_hh"] = gain * jnp.eye(encoder["w_hh"].shape[0])
    encoder["b_hh"] = jnp.abs(encoder["b_hh"]) + 0.1
    return {**params, "encoder$params": encoder}


@pytest.mark.parametrize("activation", ["relu", "capped-relu", "soft-capped-relu", "tanh"])
def test_elman_state_over_long_sequences(key, activation):
    steps = 600
    encoder = BackwardEncoder(8, "rnn", True, activation)
    x = jnp.ones((2, steps, 3))
    mask = jnp.ones((2, steps), bool)
    params = encoder.init(key, x, mask)
    params["params"]["w_hh"] = 1.3 * jnp.eye(8)
    params["params"]["w_ih"] = jnp.abs(params["params"]["w_ih"])
    states = encoder.apply(params, x, mask)
    if activation == "relu":  # 1.3^600 is far beyond float32's range
        assert not np.all(np.isfinite(states))
    elif activation == "soft-capped-relu":  # past the cap, but only logarithmically
        assert np.all(np.isfinite(states))
        assert RELU_CAP < float(jnp.max(states)) < RELU_CAP + 3.0
    else:
        bound = RELU_CAP if activation == "capped-relu" else 1.0
        assert np.all(np.isfinite(states)) and float(jnp.max(jnp.abs(states))) <= bound


def _loss_and_grads(numerics, key, steps=600):
    config = DMMConfig(**SMALL, numerics=numerics)
    x, lengths = random_binary_batch(3, 3, steps, SMALL["obs_dim"], lengths=[steps, 400, 40])
    params = _amplified(init_params(config))

    def loss(p):
        return -jnp.sum(elbo_per_sequence(p, key, x, lengths, config=config))

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("numerics", ["soft", "stable"])
def test_bounded_numerics_keep_long_sequences_finite(key, numerics):
    loss, grads = _loss_and_grads(numerics, key)
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_reference_numerics_overflow_where_stable_ones_do_not(key):
    with numpyro.validation_enabled(False):  # else the overflowed logits are refused
        loss, _ = _loss_and_grads("reference", key)
    assert not np.isfinite(float(loss))


def test_numerics_choice_is_checked_and_soft_by_default():
    assert DMMConfig().numerics == "soft"
    assert DMMConfig().encoder_activation == "soft-capped-relu"
    assert DMMConfig(numerics="stable").encoder_activation == "capped-relu"
    assert DMMConfig(numerics="reference").encoder_activation == "relu"
    with pytest.raises(ValueError, match="DMMConfig.numerics must be one of"):
        DMMConfig(numerics="fast")


def test_numerics_change_only_the_elman_cell(key):
    """With a GRU encoder both settings are the same model, number for number."""
    x, lengths = random_binary_batch(4, 2, 9, SMALL["obs_dim"], lengths=[9, 5])
    stable = DMMConfig(**SMALL, rnn_cell="gru")
    reference = dataclasses.replace(stable, numerics="reference")
    params = init_params(stable)
    a = elbo_per_sequence(params, key, x, lengths, config=stable)
    b = elbo_per_sequence(params, key, x, lengths, config=reference)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("numerics", ["soft", "stable"])
def test_bounded_numerics_are_the_reference_below_the_cap(key, numerics):
    """Where no state reaches the cap (healthy training), the settings give the same ELBO
    and gradients, number for number."""
    x, lengths = random_binary_batch(5, 3, 12, SMALL["obs_dim"], lengths=[12, 7, 3])
    stable = DMMConfig(**SMALL, numerics=numerics)
    reference = dataclasses.replace(stable, numerics="reference")
    params = init_params(stable)

    def loss(p, config):
        return -jnp.sum(elbo_per_sequence(p, key, x, lengths, config=config))

    a, grad_a = jax.value_and_grad(loss)(params, stable)
    b, grad_b = jax.value_and_grad(loss)(params, reference)
    np.testing.assert_array_equal(a, b)
    for g, h in zip(jax.tree.leaves(grad_a), jax.tree.leaves(grad_b), strict=True):
        np.testing.assert_array_equal(g, h)


def test_soft_cap_is_the_relu_below_the_cap_and_keeps_a_gradient_above():
    from dmm_jax.scans import soft_capped_relu

    v = jnp.array([-3.0, 0.5, 3.9, 4.0, 5.0, 1e3, 1e30])
    h = soft_capped_relu(v)
    np.testing.assert_allclose(h[:4], jnp.clip(v[:4], 0.0, None))
    np.testing.assert_allclose(h[4:], RELU_CAP + np.log1p(np.asarray(v[4:]) - RELU_CAP), rtol=1e-6)
    slope = jax.vmap(jax.grad(soft_capped_relu))(v)
    assert np.all(np.asarray(slope[4:]) > 0) and np.all(np.isfinite(slope))
    np.testing.assert_allclose(slope[4], 0.5, rtol=1e-6)
