"""The hand-written backward passes equal autodiff of the plain scans, through the modules
and through the whole NumPyro ELBO."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, random_binary_batch

from dmm_jax.evaluate import elbo_per_sequence
from dmm_jax.nn import BackwardEncoder, Combiner
from dmm_jax.scans import RELU_CAP, scan_up_to

RTOL = 1e-5


def _assert_trees_close(a, b, rtol=RTOL):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = float(jnp.max(jnp.abs(y))) + 1e-12
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("activation", ["relu", "capped-relu", "soft-capped-relu", "tanh"])
def test_elman_rnn_backward_matches_autodiff(key, activation):
    x, lengths = random_binary_batch(0, 5, 11, 6, lengths=[11, 3, 0, 8, 11])
    mask = jnp.arange(11)[None] < lengths[:, None]
    fast = BackwardEncoder(12, "rnn", True, activation)
    plain = BackwardEncoder(12, "rnn", False, activation)
    params = fast.init(key, x, mask)
    params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero h_0, biases shifted
    if activation == "capped-relu":  # large weights: some states reach the cap
        params = jax.tree.map(lambda p: 8.0 * p, params)
        states = fast.apply(params, x, mask)
        assert np.any(states == RELU_CAP) and np.any((states > 0) & (states < RELU_CAP))
    if activation == "soft-capped-relu":  # large weights: some states pass the cap
        params = jax.tree.map(lambda p: 8.0 * p, params)
        states = fast.apply(params, x, mask)
        assert np.any(states > RELU_CAP + 1.0) and np.any((states > 0) & (states < RELU_CAP))
    weights = jax.random.normal(jax.random.PRNGKey(1), (5, 11, 12))

    def loss(module):
        return lambda p, x: jnp.sum(weights * module.apply(p, x, mask) ** 2)

    np.testing.assert_allclose(fast.apply(params, x, mask), plain.apply(params, x, mask), rtol=RTOL)
    _assert_trees_close(
        jax.grad(loss(fast), argnums=(0, 1))(params, x),
        jax.grad(loss(plain), argnums=(0, 1))(params, x),
    )


def test_combiner_trajectory_backward_matches_autodiff(key):
    fast, plain = Combiner(3, 7, True), Combiner(3, 7, False)
    z0 = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    hidden = jax.random.normal(jax.random.PRNGKey(2), (4, 9, 7))
    noise = jax.random.normal(jax.random.PRNGKey(3), (4, 9, 3))
    params = fast.init(key, z0, hidden[:, 0])
    wz, ws = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 9, 3))

    def loss(module):
        def f(p, z0, hidden, noise):
            z, scale = module.apply(p, z0, hidden, noise, method="sample_trajectory")
            return jnp.sum(wz * z**2) + jnp.sum(ws * jnp.log(scale))

        return f

    args = (params, z0, hidden, noise)
    _assert_trees_close(
        fast.apply(params, z0, hidden, noise, method="sample_trajectory"),
        plain.apply(params, z0, hidden, noise, method="sample_trajectory"),
    )
    _assert_trees_close(
        jax.grad(loss(fast), argnums=(0, 1, 2, 3))(*args),
        jax.grad(loss(plain), argnums=(0, 1, 2, 3))(*args),
    )


def test_scans_skip_the_steps_after_the_longest_sequence(key):
    # T = 11 but no sequence is longer than 7: the loops run 7 steps, and everything a masked
    # loss can see (states, real-step draws, every gradient) equals the full plain scans.
    x, lengths = random_binary_batch(0, 3, 11, 6, lengths=[7, 2, 5])
    mask = jnp.arange(11)[None] < lengths[:, None]
    fast, plain = BackwardEncoder(12, "rnn", True), BackwardEncoder(12, "rnn", False)
    params = jax.tree.map(lambda p: p + 0.1, fast.init(key, x, mask))
    weights = jax.random.normal(jax.random.PRNGKey(1), (3, 11, 12))

    def rnn_loss(module):
        return lambda p, x: jnp.sum(weights * module.apply(p, x, mask) ** 2)

    np.testing.assert_allclose(fast.apply(params, x, mask), plain.apply(params, x, mask), rtol=RTOL)
    _assert_trees_close(
        jax.jit(jax.grad(rnn_loss(fast), argnums=(0, 1)))(params, x),
        jax.jit(jax.grad(rnn_loss(plain), argnums=(0, 1)))(params, x),
    )

    fast, plain = Combiner(3, 12, True), Combiner(3, 12, False)
    z0 = jax.random.normal(jax.random.PRNGKey(2), (3, 3))
    hidden = jax.random.normal(jax.random.PRNGKey(3), (3, 11, 12))
    noise = jax.random.normal(jax.random.PRNGKey(4), (3, 11, 3))
    params = fast.init(key, z0, hidden[:, 0])
    real = mask[..., None]

    def draw(module, p, z0, hidden):
        return module.apply(p, z0, hidden, noise, mask, method="sample_trajectory")

    def combiner_loss(module):
        def f(p, z0, hidden):
            z, scale = draw(module, p, z0, hidden)
            return jnp.sum(jnp.where(real, z**2 + jnp.log(scale), 0.0))

        return f

    (z_fast, s_fast), (z_plain, s_plain) = (
        draw(fast, params, z0, hidden),
        draw(plain, params, z0, hidden),
    )
    np.testing.assert_allclose(jnp.where(real, z_fast, 0), jnp.where(real, z_plain, 0), rtol=RTOL)
    np.testing.assert_allclose(jnp.where(real, s_fast, 1), jnp.where(real, s_plain, 1), rtol=RTOL)
    np.testing.assert_array_equal(z_fast[:, 7:], 0.0)  # never drawn
    np.testing.assert_array_equal(s_fast[:, 7:], 1.0)
    _assert_trees_close(
        jax.jit(jax.grad(combiner_loss(fast), argnums=(0, 1, 2)))(params, z0, hidden),
        jax.jit(jax.grad(combiner_loss(plain), argnums=(0, 1, 2)))(params, z0, hidden),
    )


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_whole_elbo_and_gradients_match_plain_autodiff(tiny_config, key, cell):
    fast_cfg = dataclasses.replace(tiny_config, rnn_cell=cell, custom_vjp=True)
    plain_cfg = dataclasses.replace(fast_cfg, custom_vjp=False)
    # Padded to 13 steps, longest sequence 10: the fast loops stop at 10.
    x, lengths = random_binary_batch(7, 4, 13, tiny_config.obs_dim, lengths=[10, 6, 1, 9])
    params = init_params(fast_cfg)

    def loss(cfg):
        return jax.jit(
            jax.value_and_grad(lambda p: -jnp.sum(elbo_per_sequence(p, key, x, lengths, cfg, 0.4)))
        )

    fast_value, fast_grads = loss(fast_cfg)(params)
    plain_value, plain_grads = loss(plain_cfg)(params)
    np.testing.assert_allclose(fast_value, plain_value, rtol=RTOL)
    _assert_trees_close(fast_grads, plain_grads)


def _tanh_rnn(weights):
    def step(h, x_t):
        h = jnp.tanh(x_t + h @ weights)
        return h, (h, jnp.sum(h, -1))

    return step


def test_scan_up_to_stops_at_the_longest_sequence_with_the_same_gradients():
    # Against lax.scan over the first `num_steps` steps only: the same carry, outputs filled
    # past it, and the same gradients with respect to the weights the step closes over.
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    weights = 0.3 * jax.random.normal(keys[0], (8, 8))
    inputs = jax.random.normal(keys[1], (12, 3, 8))
    start = jax.random.normal(keys[2], (3, 8))

    def up_to(w):
        carry, (states, sums) = scan_up_to(_tanh_rnn(w), start, inputs, jnp.asarray(7), (0.0, 2.0))
        return carry, states, sums

    def truncated(w):
        carry, (states, sums) = jax.lax.scan(_tanh_rnn(w), start, inputs[:7])
        return carry, states, sums

    carry, states, sums = up_to(weights)
    want_carry, want_states, want_sums = truncated(weights)
    np.testing.assert_allclose(carry, want_carry, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(states[:7], want_states, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sums[:7], want_sums, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(states[7:], 0.0)
    np.testing.assert_array_equal(sums[7:], 2.0)

    def loss(f):
        return lambda w: sum(jnp.sum(jnp.sin(a)) for a in f(w)[:2])

    np.testing.assert_allclose(
        jax.grad(loss(up_to))(weights), jax.grad(loss(truncated))(weights), rtol=1e-5, atol=1e-6
    )


def test_scan_up_to_keeps_no_copy_of_the_weights_per_step():
    # The gradient of a long scan over one sequence whose step closes over a [256, 256]
    # matrix: the residuals kept for the backward pass are per-step activations, not a copy
    # of the matrix per step (256 KiB each, 256 MiB over 1,000 steps).
    steps, width = 1000, 256
    weights = jax.ShapeDtypeStruct((width, width), jnp.float32)
    inputs = jax.ShapeDtypeStruct((steps, 1, width), jnp.float32)

    def loss(w, x):
        _, (states, _) = scan_up_to(_tanh_rnn(w), jnp.zeros((1, width)), x, jnp.asarray(900))
        return jnp.sum(states)

    compiled = jax.jit(jax.grad(loss)).lower(weights, inputs).compile()
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    copies_mib = steps * width * width * 4 / 2**20
    assert temp_mib < copies_mib / 20
