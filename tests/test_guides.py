"""The paper's inference networks (ST-L, ST-R, ST-LR, MF-L, MF-LR) and IAF flows: each guide's
draw and log q against a Python loop over time, finite training steps, the IAF log-determinant
against jax.jacfwd."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, random_binary_batch
from numpyro import handlers
from scipy import stats

from dmm_jax.config import GUIDES, DMMConfig, TrainConfig
from dmm_jax.flows import InverseAutoregressiveFlow
from dmm_jax.models.dmm import guide
from dmm_jax.scans import RELU_CAP
from dmm_jax.train import UpdateStep, build_svi, init_train_state

RTOL = 1e-4


def _config(tiny_config, guide_name, num_iafs=0):
    return dataclasses.replace(tiny_config, guide=guide_name, num_iafs=num_iafs, iaf_dim=7)


def _perturbed_params(config, seed=0):
    """Initial parameters shifted randomly, so that biases, h_0 and z_q_0 all matter."""
    params = init_params(config, seed)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    leaves = [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, leaves)


def _elman_rnn(x, length, p, forward, activation):
    """h_t of an Elman RNN over x_{1:t} (forward) or x_{t:T} (backward), one sequence, [T, H]."""
    x, w_ih, b_ih = np.asarray(x, np.float64), np.asarray(p["w_ih"]), np.asarray(p["b_ih"])
    w_hh, b_hh, h = np.asarray(p["w_hh"]), np.asarray(p["b_hh"]), np.asarray(p["h_0"], np.float64)
    states = np.zeros((x.shape[0], h.shape[0]))
    for t in range(length) if forward else reversed(range(length)):
        pre = x[t] @ w_ih + b_ih + h @ w_hh + b_hh
        if activation == "tanh":
            h = np.tanh(pre)
        else:
            h = np.maximum(pre, 0.0) if activation == "relu" else np.clip(pre, 0.0, RELU_CAP)
        states[t] = h
    return states


def _softplus(a):
    return np.logaddexp(0.0, a)


def _reference_draw(params, config, x, length, eps, flow):
    """z_{1:L} and log q(z_{1:L} | x) of one sequence from the guide's noise, step by step."""
    name = config.guide
    h_parts = []
    if name in ("st-l", "st-lr", "mf-l", "mf-lr"):
        h_parts.append(
            _elman_rnn(
                x, length, params["encoder_left$params"]["rnn"], True, config.encoder_activation
            )
        )
    if name in ("st-r", "st-lr", "mf-lr"):
        h_parts.append(
            _elman_rnn(x, length, params["encoder$params"], False, config.encoder_activation)
        )
    h_sum = sum(h_parts)
    z_prev = np.asarray(params.get("z_q_0", np.zeros(config.z_dim)), np.float64)
    z_out, log_q = np.zeros((length, config.z_dim)), 0.0
    for t in range(length):
        if name.startswith("st"):
            c = params["combiner$params"]
            u = np.tanh(z_prev @ np.asarray(c["w_z"]) + np.asarray(c["b_z"]))
            comb = (u + h_sum[t]) / (1 + len(h_parts))
            loc = comb @ np.asarray(c["w_loc"]) + np.asarray(c["b_loc"])
            scale = _softplus(comb @ np.asarray(c["w_scale"]) + np.asarray(c["b_scale"]))
        else:
            head = params["head$params"]
            h = h_sum[t] / len(h_parts)
            loc = h @ head["hidden_to_loc"]["kernel"] + head["hidden_to_loc"]["bias"]
            scale_pre = h @ head["hidden_to_scale"]["kernel"] + head["hidden_to_scale"]["bias"]
            scale = _softplus(np.asarray(scale_pre, np.float64))
        base = loc + scale * eps[t]
        log_q += stats.norm.logpdf(base, loc, scale).sum()
        z_t = base
        if flow is not None:
            z_t, log_det = flow(jnp.asarray(base, jnp.float32))
            z_t = np.asarray(z_t, np.float64)
            log_q -= float(log_det)
        z_out[t] = z_t
        z_prev = z_t
    return z_out, log_q


CASES = [(g, 0) for g in GUIDES] + [("st-r", 2), ("mf-lr", 1)]


@pytest.mark.parametrize(("guide_name", "num_iafs"), CASES)
def test_guide_draw_and_log_q_equal_a_python_loop(tiny_config, key, guide_name, num_iafs):
    config = _config(tiny_config, guide_name, num_iafs)
    params = _perturbed_params(config)
    # Padded to 9 steps, longest 6: the loops stop after step 6 in either direction.
    x, lengths = random_binary_batch(7, 3, 9, config.obs_dim, lengths=[6, 4, 1])

    @jax.jit
    def draw(params):
        seeded = handlers.seed(handlers.substitute(guide, data=params), key)
        site = handlers.trace(seeded).get_trace(x, lengths, config=config)["z"]
        log_q = site["fn"].log_prob(site["value"], site["intermediates"])
        # Without a flow, scoring the trajectory alone recomputes loc and scale from it.
        rescored = log_q if num_iafs else site["fn"].log_prob(site["value"])
        return site["value"], site["intermediates"][0], log_q, rescored

    z, eps, log_q, rescored = map(np.asarray, draw(params))
    flow = None
    if num_iafs:
        module = InverseAutoregressiveFlow(config.z_dim, num_iafs, config.iaf_dim)
        flow = jax.jit(lambda b: module.apply({"params": params["iaf$params"]}, b))
    for b, length in enumerate(lengths):
        want_z, want_log_q = _reference_draw(params, config, x[b], length, eps[b], flow)
        np.testing.assert_allclose(z[b, :length], want_z, rtol=RTOL, atol=1e-5)
        np.testing.assert_allclose(log_q[b], want_log_q, rtol=RTOL)
    np.testing.assert_allclose(rescored, log_q, rtol=RTOL)


@pytest.mark.parametrize(
    ("guide_name", "num_iafs", "kl", "cell"),
    [  # between them: both directions, both guide families, every cell, flows, both KLs
        ("st-l", 0, "analytic", "gru"),
        ("mf-lr", 0, "sampled", "lstm"),
        ("st-lr", 1, "sampled", "rnn"),
    ],
)
def test_each_guide_trains_with_finite_loss_and_gradients(
    tiny_config, guide_name, num_iafs, kl, cell
):
    config = dataclasses.replace(_config(tiny_config, guide_name, num_iafs), rnn_cell=cell)
    train_config = TrainConfig(learning_rate=1e-2, kl=kl)
    svi = build_svi(config, train_config)
    state = init_train_state(svi, 0, config.obs_dim).svi_state
    before = svi.get_params(state)
    update = UpdateStep(svi)
    x, lengths = random_binary_batch(3, 4, 7, config.obs_dim)
    for i in range(3):
        state, loss = update(state, x, lengths, 0.5 + 0.1 * i)
        assert np.isfinite(float(loss))
    after = svi.get_params(state)
    # Every parameter of every network moved, so every one received a finite gradient.
    for name in before:
        for old, new in zip(
            jax.tree.leaves(before[name]), jax.tree.leaves(after[name]), strict=True
        ):
            assert np.all(np.isfinite(new)), name
            assert not np.array_equal(old, new), name


def test_iaf_log_det_equals_the_jacobians(key):
    flow = InverseAutoregressiveFlow(z_dim=4, num_iafs=2, iaf_dim=9)
    z = jax.random.normal(jax.random.PRNGKey(1), (4,))
    params = flow.init(key, z)
    params = jax.tree.map(lambda p: 0.5 * p + 0.2, params)  # away from small log-scales
    jacobian = jax.jit(jax.jacfwd(lambda v: flow.apply(params, v)[0]))(z)
    _, log_det = jax.jit(flow.apply)(params, z)
    np.testing.assert_allclose(log_det, np.linalg.slogdet(np.asarray(jacobian))[1], rtol=1e-5)

    # One layer is autoregressive: dimension i of the output depends on inputs <= i only.
    one = InverseAutoregressiveFlow(z_dim=4, num_iafs=1, iaf_dim=9)
    params = jax.tree.map(lambda p: p + 0.2, one.init(key, z))
    jacobian = np.asarray(jax.jit(jax.jacfwd(lambda v: one.apply(params, v)[0]))(z))
    assert np.all(np.triu(jacobian, k=1) == 0.0)
    assert np.all(np.abs(jacobian[np.tril_indices(4)]) > 0.0)


def test_iaf_works_for_a_one_dimensional_latent(key):
    flow = InverseAutoregressiveFlow(z_dim=1, num_iafs=2, iaf_dim=3)
    z = jnp.array([0.7])
    params = flow.init(key, z)
    out, log_det = jax.jit(flow.apply)(params, z)
    derivative = jax.jit(jax.grad(lambda v: flow.apply(params, v)[0][0]))(z)
    np.testing.assert_allclose(log_det, np.log(np.abs(derivative[0])), rtol=1e-5)
    assert np.isfinite(out).all()


def test_bad_guide_settings_are_clear_errors(tiny_config):
    with pytest.raises(ValueError, match="DMMConfig.guide"):
        dataclasses.replace(tiny_config, guide="st-x")
    with pytest.raises(ValueError, match="num_iafs"):
        dataclasses.replace(tiny_config, num_iafs=-1)
    with pytest.raises(ValueError, match="not available with DMMConfig.num_iafs=1"):
        build_svi(dataclasses.replace(tiny_config, num_iafs=1), TrainConfig(kl="analytic"))


def test_old_configs_without_the_new_fields_still_load():
    from dmm_jax.config import config_from_dict

    old = {"obs_dim": 88, "z_dim": 100, "rnn_cell": "rnn", "custom_vjp": True}
    assert config_from_dict(DMMConfig, old) == DMMConfig()


def test_st_lr_hand_written_backward_passes_equal_autodiff(tiny_config, key):
    """ST-LR runs both recurrences' custom VJPs (the forward RNN reversed, the combiner with
    mix 1/3): its ELBO gradient equals autodiff of the plain scans."""
    from dmm_jax.evaluate import elbo_per_sequence

    fast = _config(tiny_config, "st-lr")
    plain = dataclasses.replace(fast, custom_vjp=False)
    params = _perturbed_params(fast)
    x, lengths = random_binary_batch(8, 3, 8, fast.obs_dim, lengths=[6, 3, 5])  # 2 padded

    def grads(config):
        def loss(p):
            return -jnp.sum(elbo_per_sequence(p, key, x, lengths, config))

        return jax.jit(jax.value_and_grad(loss))(params)

    (value_fast, grad_fast), (value_plain, grad_plain) = grads(fast), grads(plain)
    np.testing.assert_allclose(value_fast, value_plain, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad_fast), jax.tree.leaves(grad_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
