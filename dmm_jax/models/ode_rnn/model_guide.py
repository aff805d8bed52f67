"""The ODE-RNN's and the RNN-dt's NumPyro model, their empty guide (no latents: the ELBO is
the log-likelihood itself) and ``predict``, the means at any query times.

    model:  x_i ~ N(decoder(h(t_i-)), obs_std^2) on the observed entries of each point

The configs, ``ODERNNConfig`` and ``RNNDtConfig``, are in ``dmm_jax.continuous_config``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from dmm_jax.models.common import bound_networks, registered_networks, sequence_mask
from dmm_jax.models.latent_ode.networks import series_inputs
from dmm_jax.models.ode_rnn.networks import networks, step_ahead_means

Array = jax.Array


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
    """p(x | times) of each series of the batch; returns the step-ahead means [B, T, D]."""
    del annealing_factor, inputs, steps  # no latents to anneal
    batch, num_steps, _ = x.shape
    times, x, present = series_inputs(x, dt, obs_mask)
    nets = registered_networks(networks(config))
    mask = sequence_mask(lengths, num_steps)
    means = step_ahead_means(nets, x, present, times, mask, config)
    with numpyro.plate("sequences", batch):
        emission = dist.Normal(means, config.obs_std).mask(present).to_event(1)
        numpyro.sample("x", emission.mask(mask).to_event(1), obs=x)
    return means


def guide(x: Array, lengths: Array, annealing_factor: Array | float = 1.0, **kwargs) -> None:
    """No latents, nothing to infer."""
    del x, lengths, annealing_factor, kwargs


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
    """The means [S, B, T_q, D] at ``query_times`` [B, T_q] given the observed ``x``
    [B, T, D] (NaN: not observed) at the times of ``dt`` (``dmm_jax.models.series_tasks``);
    the S copies are equal (no latents). The observations and the queries run as one
    timeline sorted by time, a query before an observation at the same time (so a point is
    never predicted from itself)."""
    del key
    batch, num_steps, obs_dim = x.shape
    num_queries = query_times.shape[1]
    times, x, present = series_inputs(x, dt, None)
    real = sequence_mask(lengths, num_steps)
    last = jnp.maximum(jnp.max(query_times, 1), jnp.max(jnp.where(real, times, -jnp.inf), 1))
    # By time, then padding last, then queries before observations (they come first here):
    # each query is predicted before an observation at its time is read.
    all_times = jnp.concatenate([query_times, jnp.where(real, times, last[:, None])], 1)
    is_padding = jnp.concatenate([jnp.zeros_like(query_times, bool), ~real], 1)
    index = jnp.broadcast_to(jnp.arange(all_times.shape[1]), all_times.shape)
    order = jnp.lexsort((index, is_padding, all_times), axis=1)

    def timeline(a):  # [B, T_q + T, ...] in the sorted order
        take = order.reshape(order.shape + (1,) * (a.ndim - 2))
        return jnp.take_along_axis(a, take, axis=1)

    no_entries = jnp.zeros((batch, num_queries, obs_dim), x.dtype)
    timeline_x = timeline(jnp.concatenate([no_entries, x], 1))
    timeline_present = timeline(jnp.concatenate([no_entries.astype(bool), present], 1))
    nets = bound_networks(networks(config), params)
    means = step_ahead_means(
        nets, timeline_x, timeline_present, timeline(all_times), ~timeline(is_padding), config
    )
    position = jnp.argsort(order, axis=1)[:, :num_queries]  # where each query landed
    query_means = jnp.take_along_axis(means, position[..., None], axis=1)
    return jnp.broadcast_to(query_means, (samples, *query_means.shape))
