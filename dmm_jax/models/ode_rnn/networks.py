"""The ODE-RNN's and the RNN-dt's recurrences, forward in time over a series' points.

At each point t_i the state just before it, h(t_i-), gives the prediction decoder(h(t_i-));
then a point where something is observed updates the state and a point where nothing is
(a query) leaves it as it was:

    ODE-RNN   h(t_i-) = h(t_{i-1}) carried to t_i by Euler steps of dh/dt = f(h)
              at an observation: h(t_i) = GRU(h(t_i-), [x_i, m_i]); a query keeps h(t_i-)
    RNN-dt    h(t_i-) = GRU(h_last, [x_last, m_last, t_i - t_last]), (x_last, t_last) the
              last observation (zeros and the first time before any); at an observation
              h_last becomes h(t_i-) and x_last x_i: one GRU step per observation, whose
              gap input is the time to the next point, as the paper's RNN-dt

So a query never changes the predictions at the other points of the RNN-dt; for the
ODE-RNN a query between two observations only splits an interval's Euler steps in two.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmm_jax.models.latent_ode.networks import _INIT, ODEFunction, euler

Array = jax.Array


class MLPDecoder(nn.Module):
    """h [..., H] -> the observation's mean [..., D]: one tanh layer of ``units``."""

    dim: int
    units: int

    @nn.compact
    def __call__(self, h: Array) -> Array:
        return nn.Dense(self.dim, **_INIT)(jnp.tanh(nn.Dense(self.units, **_INIT)(h)))


def networks(config) -> dict[str, tuple[nn.Module, tuple]]:
    """The family's networks by name, each with example arguments for its initialisation."""
    hidden, obs_dim = config.rnn_dim, config.obs_dim
    gap_input = 1 if config.encoder == "rnn" else 0
    h = jnp.zeros((1, hidden))
    nets = {
        "gru": (nn.GRUCell(hidden), (h, jnp.zeros((1, 2 * obs_dim + gap_input)))),
        "decoder": (MLPDecoder(obs_dim, config.units), (h,)),
    }
    if config.encoder == "ode-rnn":
        nets["ode"] = (ODEFunction(hidden, config.units), (h,))
    return nets


def step_ahead_means(nets: dict, x: Array, present: Array, times: Array, mask: Array, config):
    """decoder(h(t_i-)) at every point, [B, T, D] (module docstring).

    ``nets``: bound "gru", "decoder" and (ODE-RNN) "ode". ``x`` [B, T, D] with missing entries
    0, ``present`` [B, T, D], ``times`` [B, T] non-decreasing, ``mask`` [B, T] False on
    padding (which changes nothing).
    """
    batch = x.shape[0]
    h0 = jnp.zeros((batch, config.rnn_dim), x.dtype)
    step_inputs = jnp.concatenate([x, present.astype(x.dtype)], -1)
    observed = jnp.any(present, axis=-1) & mask

    def ode_rnn_step(carry, inputs):
        h, clock = carry
        inp, t, update = inputs
        h_before = euler(nets["ode"], h, t - clock, config.euler_steps)
        h_after, _ = nets["gru"](h_before, inp)
        h = jnp.where(update[:, None], h_after, h_before)
        return (h, t), nets["decoder"](h_before)

    def rnn_dt_step(carry, inputs):
        h, last_input, clock = carry
        inp, t, update = inputs
        h_before, _ = nets["gru"](h, jnp.concatenate([last_input, (t - clock)[:, None]], -1))
        keep = update[:, None]
        carry = (
            jnp.where(keep, h_before, h),
            jnp.where(keep, inp, last_input),
            jnp.where(update, t, clock),
        )
        return carry, nets["decoder"](h_before)

    # Padding repeats the last time, so an ODE-RNN's clock stays put over it.
    last = jnp.max(jnp.where(mask, times, times[:, :1]), axis=1, keepdims=True)
    times = jnp.where(mask, times, last)
    inputs = (jnp.swapaxes(step_inputs, 0, 1), times.T, observed.T)
    if config.encoder == "ode-rnn":
        _, means = jax.lax.scan(ode_rnn_step, (h0, times[:, 0]), inputs)
    else:
        start = (h0, jnp.zeros_like(step_inputs[:, 0]), times[:, 0])
        _, means = jax.lax.scan(rnn_dt_step, start, inputs)
    return jnp.swapaxes(means, 0, 1)
