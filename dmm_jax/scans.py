"""The DMM's two recurrences with hand-written backward passes (``jax.custom_vjp``).

Only two things in a DMM are truly sequential: the inference RNN over x and the guide's draw
of z_t given z_{t-1}. Differentiating a ``lax.scan`` with autodiff keeps the weight-gradient
products inside the reverse loop, as many small [B, H] x [B, H] outer products as there are
steps. The backward passes below carry only the state cotangent through the loop (one small
matmul per step, like the forward) and compute every weight gradient afterwards as one large
matmul over all steps, which is what a CPU or GPU runs fastest. Values and gradients are those
of the plain scans; ``tests/test_scans.py`` checks both against autodiff.

All arrays here are time-major ([T, B, ...]) and in processing order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _shift_in(first: Array, states: Array) -> Array:
    """[first, s_0, ..., s_{T-2}]: the state each step started from."""
    return jnp.concatenate([first[None], states[:-1]], axis=0)


def _outer_sum(a: Array, b: Array) -> Array:
    """sum over (t, b) of a[t, b]^T b[t, b]: one [T*B, I]^T x [T*B, J] matmul."""
    return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])


# ----------------------------------------------------------------------------- ReLU RNN


@jax.custom_vjp
def reverse_relu_rnn_scan(
    x_proj: Array, keep: Array, h_start: Array, w_hh: Array, b_hh: Array
) -> Array:
    """A ReLU RNN run backward in time, from t = T-1 down to 0:

        h_t = relu(x_proj_t + h_{t+1} W_hh + b_hh) where keep_t, else h_{t+1};  h_T = h_start.

    Args:
        x_proj: input projections [T, B, H] (x_t W_ih + b_ih, computed outside the loop).
        keep: [T, B, 1] bool, False on padded steps (the state passes through unchanged).
        h_start: [B, H]. w_hh: [H, H]. b_hh: [H].

    Returns:
        states h_t [T, B, H], in time order.
    """
    return _relu_rnn_forward(x_proj, keep, h_start, w_hh, b_hh)[0]


def _relu_rnn_forward(x_proj, keep, h_start, w_hh, b_hh):
    def step(h, inputs):
        xp_t, keep_t = inputs
        h = jnp.where(keep_t, jax.nn.relu(xp_t + h @ w_hh + b_hh), h)
        return h, h

    _, states = jax.lax.scan(step, h_start, (x_proj, keep), reverse=True)
    return states, (states, keep, h_start, w_hh)


def _relu_rnn_backward(residuals, g_states):
    states, keep, h_start, w_hh = residuals
    active = keep & (states > 0)  # where the ReLU passed its input through
    w_hh_t = w_hh.T

    def step(dh_next, inputs):
        g_t, active_t, keep_t = inputs
        dh = g_t + dh_next
        d_pre = jnp.where(active_t, dh, 0.0)
        dh_prev = jnp.where(keep_t, d_pre @ w_hh_t, dh)
        return dh_prev, d_pre

    dh_start, d_pre = jax.lax.scan(step, jnp.zeros_like(h_start), (g_states, active, keep))
    # The state each step started from: h_{t+1}, with h_T = h_start.
    previous = jnp.concatenate([states[1:], h_start[None]], axis=0)
    dw_hh = _outer_sum(previous, d_pre)
    return d_pre, None, dh_start, dw_hh, jnp.sum(d_pre, axis=(0, 1))


reverse_relu_rnn_scan.defvjp(_relu_rnn_forward, _relu_rnn_backward)


# ----------------------------------------------------------------------------- guide chain


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def combiner_scan(
    z_start: Array,
    hidden: Array,
    noise: Array,
    w_z: Array,
    b_z: Array,
    w_out: Array,
    b_out: Array,
    mix: float = 0.5,
) -> tuple[Array, Array]:
    """Draws z_{1:T} from the combiner chain, reparameterized by ``noise``.

        u_t = tanh(z_{t-1} W_z + b_z),  c_t = mix * (u_t + h_t)
        [loc_t, a_t] = c_t W_out + b_out,  scale_t = softplus(a_t)
        z_t = loc_t + scale_t * noise_t

    Args:
        z_start: [B, Z]. hidden: [T, B, H]. noise: [T, B, Z].
        w_z: [Z, H]. b_z: [H]. w_out: [H, 2Z] (loc and scale columns side by side). b_out: [2Z].
        mix: a Python float, 1/2 for ST-R/ST-L (h_t one RNN state) and 1/3 for ST-LR (h_t the
            sum of the two directions' states), so c_t is the average of its terms.

    Returns:
        (z, scale), each [T, B, Z].
    """
    return _combiner_forward(z_start, hidden, noise, w_z, b_z, w_out, b_out, mix)[0]


def _combiner_forward(z_start, hidden, noise, w_z, b_z, w_out, b_out, mix=0.5):
    z_dim = z_start.shape[-1]

    def step(z_prev, inputs):
        h_t, eps_t = inputs
        u = jnp.tanh(z_prev @ w_z + b_z)
        out = (mix * (u + h_t)) @ w_out + b_out
        scale = jax.nn.softplus(out[..., z_dim:])
        z = out[..., :z_dim] + scale * eps_t
        return z, (z, scale, out[..., z_dim:])

    _, (z, scale, scale_pre) = jax.lax.scan(step, z_start, (hidden, noise))
    # u_t is not kept: rebuilt in the backward pass by one batched matmul over all steps, so
    # long sequences hold one [T, B, H] array fewer between the two passes.
    residuals = (z_start, hidden, noise, w_z, b_z, w_out, z, scale, scale_pre)
    return (z, scale), residuals


def _combiner_backward(mix, residuals, cotangents):
    z_start, hidden, noise, w_z, b_z, w_out, z, scale, scale_pre = residuals
    g_z, g_scale = cotangents
    w_out_t, w_z_t = w_out.T, w_z.T
    z_prev = _shift_in(z_start, z)
    u = jnp.tanh(z_prev @ w_z + b_z)
    d_tanh = 1.0 - u**2
    d_softplus = jax.nn.sigmoid(scale_pre)
    # The scale's cotangent from outside the chain does not depend on the carry: hoist it.
    g_scale_pre = g_scale * d_softplus

    def d_output(dz, eps, d_softplus, g_scale_pre):
        return jnp.concatenate([dz, dz * eps * d_softplus + g_scale_pre], axis=-1)

    def step(dz_next, inputs):
        g_z_t, eps_t, d_softplus_t, g_scale_pre_t, d_tanh_t = inputs
        dz = g_z_t + dz_next
        d_c = d_output(dz, eps_t, d_softplus_t, g_scale_pre_t) @ w_out_t
        return (mix * d_c * d_tanh_t) @ w_z_t, (dz, d_c)

    # Only the carry's path runs step by step; what else the gradients need is rebuilt
    # from (dz, d_c) in batched ops, which also keeps fewer [T, B, H] arrays alive.
    dz_start, (dz, d_c) = jax.lax.scan(
        step,
        jnp.zeros_like(z_start),
        (g_z, noise, d_softplus, g_scale_pre, d_tanh),
        reverse=True,
    )
    d_out = d_output(dz, noise, d_softplus, g_scale_pre)
    d_a = mix * d_c * d_tanh
    c = mix * (u + hidden)
    return (
        dz_start,
        mix * d_c,  # d hidden
        dz * scale,  # d noise
        _outer_sum(z_prev, d_a),
        jnp.sum(d_a, axis=(0, 1)),
        _outer_sum(c, d_out),
        jnp.sum(d_out, axis=(0, 1)),
    )


combiner_scan.defvjp(_combiner_forward, _combiner_backward)
