"""The RNN-VAE, the Latent ODE paper's latent baseline (Rubanova, Chen & Duvenaud, NeurIPS
2019): the Latent ODE's z_0 and RNN encoder, its ODE replaced by a GRU that steps from
point to point with the time gap as an input.

    model:  z_0 ~ N(0, I),  h_0 = tanh(W z_0 + b),
            h_i = GRU(h_{i-1}, [decoder(h_{i-1}), t_i - t_{i-1}])   (t_{-1} = t_0),
            (a time equal to the one before it keeps the state: padding changes nothing)
            x_i ~ N(decoder(h_i), obs_std^2) on the observed entries
    guide:  q(z_0 | x), the Latent ODE's guide with its "rnn" encoder (run backward in time)

The decoder feeds its own last mean back, as the reference's, so the means are a function of
z_0 and the times alone and can be asked for at any times (``predict``). The config,
``RNNVAEConfig``, is in ``dmm_jax.continuous_config``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers

from dmm_jax.models.common import bound_networks, registered_networks, sequence_mask
from dmm_jax.models.latent_ode.model_guide import guide
from dmm_jax.models.latent_ode.networks import _INIT, series_inputs
from dmm_jax.models.latent_ode.prediction import posterior_z0
from dmm_jax.models.ode_rnn.networks import MLPDecoder

Array = jax.Array

__all__ = ["decode", "guide", "model", "predict"]


def networks(config) -> dict[str, tuple[nn.Module, tuple]]:
    """The decoder's networks by name, each with example arguments for its initialisation."""
    h = jnp.zeros((1, config.decoder_dim))
    return {
        "initial_state": (nn.Dense(config.decoder_dim, **_INIT), (jnp.zeros((1, config.z_dim)),)),
        "decoder_gru": (nn.GRUCell(config.decoder_dim), (h, jnp.zeros((1, config.obs_dim + 1)))),
        "decoder": (MLPDecoder(config.obs_dim, config.units), (h,)),
    }


def decode(nets: dict, z0: Array, times: Array) -> Array:
    """The means [B, T, D] at ``times`` [B, T] (non-decreasing) from z_0 [B, Z]. A time
    repeated (padding, or the start time asked for twice) repeats the mean before it: only
    the first time and each later, greater one take a GRU step."""

    def step(carry, inputs):
        h, clock = carry
        t, first = inputs
        gap = (t - clock)[:, None]
        h_next, _ = nets["decoder_gru"](h, jnp.concatenate([nets["decoder"](h), gap], -1))
        h = jnp.where(first | (gap > 0), h_next, h)
        return (h, t), nets["decoder"](h)

    h0 = jnp.tanh(nets["initial_state"](z0))
    first = jnp.arange(times.shape[1]) == 0
    _, means = jax.lax.scan(step, (h0, times[:, 0]), (times.T, first))
    return jnp.swapaxes(means, 0, 1)


def model(
    x: Array,
    lengths: Array,
    annealing_factor: Array | float = 1.0,
    *,
    config,
    inputs: Array | None = None,
    dt: Array | None = None,
    obs_mask: Array | None = None,
    steps=None,
):
    """p(x, z_0) for each series of the batch; returns the means [B, T, D]."""
    del inputs, steps
    batch, num_steps, _ = x.shape
    times, x, present = series_inputs(x, dt, obs_mask)
    nets = registered_networks(networks(config))
    with numpyro.plate("sequences", batch):
        with handlers.scale(scale=annealing_factor):
            z0 = numpyro.sample("z", dist.Normal(jnp.zeros((batch, config.z_dim)), 1.0).to_event(1))
        means = decode(nets, z0, times)
        emission = dist.Normal(means, config.obs_std).mask(present).to_event(1)
        numpyro.sample("x", emission.mask(sequence_mask(lengths, num_steps)).to_event(1), obs=x)
    return means


@functools.partial(jax.jit, static_argnames=("config", "samples"))
def predict(
    params: dict,
    key: Array,
    config,
    x: Array,
    lengths: Array,
    dt: Array,
    query_times: Array,
    samples: int = 3,
) -> Array:
    """The means [S, B, T_q, D] at ``query_times`` given the observed ``x`` [B, T, D] (NaN:
    not observed) at the times of ``dt``, one per draw of z_0 from the guide."""
    z0 = posterior_z0(params, key, config, x, lengths, dt, samples)
    nets = bound_networks(networks(config), params)
    return jax.vmap(lambda z: decode(nets, z, query_times))(z0)
