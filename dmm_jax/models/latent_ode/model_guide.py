"""The Latent ODE's NumPyro model and guide (Rubanova, Chen & Duvenaud, NeurIPS 2019).

    model:  z_0 ~ N(0, I),  z(t) = ODESolve(f, z_0, t_0, t),  x_t ~ N(W z(t_t) + b, obs_std^2)
            with ``poisson``: the times each feature was observed, a Poisson process of rate
            lambda(z(t)) (site "observation_times", ``networks.poisson_log_likelihood``)
    guide:  q(z_0 | x) = N(mu(h_0), sigma(h_0)^2),  h_0 = Encoder(x_{T..0}) (ODE-RNN or RNN)

The times of a series come from ``dt`` (``dt[:, 0]`` is its first time), so the family trains
on the same padded batches as the others: ``x`` [B, T, D] with NaN (or ``obs_mask`` False)
where an entry was not observed, ``lengths`` [B]. The latent site "z" holds z_0 [B, Z]; the
annealing factor scales its log densities (KL annealing) as for the other families.

``draws`` = K > 1 puts K draws of z_0 per series in one trace (a plate "draws" of dim -2, z_0
[K, B, Z]) with every site scaled by 1/K: the ELBO averaged over K draws, as
``Trace_ELBO(num_particles=K)`` gives, but with the encoder run once and the K x B paths
solved together (training with ``TrainConfig.particles`` = K does this).
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.contrib.module import flax_module

from dmm_jax.continuous_config import LatentODEConfig
from dmm_jax.models.common import registered_params, sequence_mask
from dmm_jax.models.latent_ode.networks import (
    GaussianHead,
    ODEFunction,
    decoder,
    encode,
    module_field,
    ode_function,
    poisson_log_likelihood,
    series_inputs,
    solve,
)

Array = jax.Array


def model(
    x: Array,
    lengths: Array,
    annealing_factor: Array | float = 1.0,
    *,
    config: LatentODEConfig,
    inputs: Array | None = None,
    dt: Array | None = None,
    obs_mask: Array | None = None,
    steps=None,  # the batch's real steps: every step is solved, nothing to skip
    draws: int = 1,
):
    """p(x, z_0) for each series of the batch; returns the latent path z(t) [B, T, Z]
    ([draws, B, T, Z] with more than one draw)."""
    del inputs, steps
    batch, num_steps, _ = x.shape
    times, x, present = series_inputs(x, dt, obs_mask)
    ode = ode_function(config)
    params = {"ode": registered_params("ode", ode, input_shape=(1, config.z_dim))}
    decode = flax_module("decoder", decoder(config), input_shape=(1, config.z_dim))
    mask = sequence_mask(lengths, num_steps)
    with numpyro.plate("sequences", batch), draws_plate(draws):
        with handlers.scale(scale=annealing_factor):
            prior = dist.Normal(jnp.zeros((batch, config.z_dim)), 1.0).to_event(1)
            z0 = numpyro.sample("z", prior)
        if config.poisson:
            intensity = ODEFunction(config.obs_dim, config.units)  # z -> log lambda
            shape = (1, config.z_dim)
            params["intensity"] = registered_params("intensity", intensity, input_shape=shape)
            log_rate = module_field(intensity, "intensity")
            path, cumulative_rate = solve(
                module_field(ode, "ode"), params, z0, times, config, log_rate
            )
            log_rates = log_rate(params, path)
            times_log_lik = poisson_log_likelihood(log_rates, cumulative_rate, present, mask)
            numpyro.factor("observation_times", times_log_lik)
        else:
            path = solve(module_field(ode, "ode"), params, z0, times, config)
        emission = dist.Normal(decode(path), config.obs_std)
        numpyro.sample("x", emission.mask(present).to_event(1).mask(mask).to_event(1), obs=x)
    return path


def guide(
    x: Array,
    lengths: Array,
    annealing_factor: Array | float = 1.0,
    *,
    config: LatentODEConfig,
    inputs: Array | None = None,
    dt: Array | None = None,
    obs_mask: Array | None = None,
    steps=None,
    draws: int = 1,
):
    """q(z_0 | x) from the encoder run backward over each series; returns z_0 [B, Z]
    ([draws, B, Z] with more than one draw; the encoder runs once). With
    ``config.context_points`` the encoder reads a random subset of each series' points,
    one for all draws, drawn from the guide's PRNG key."""
    del inputs, steps
    batch, num_steps, obs_dim = x.shape
    times, x, present = series_inputs(x, dt, obs_mask)
    mask = sequence_mask(lengths, num_steps)
    if config.context_points:
        chosen = context_choice(numpyro.prng_key(), present, mask, config.context_points)
        present = present & chosen[..., None]
    hidden = config.rnn_dim
    gru_in = 2 * obs_dim + (1 if config.encoder == "rnn" else 0)
    nets = {
        "gru": flax_module(
            "gru", nn.GRUCell(hidden), jnp.zeros((1, hidden)), jnp.zeros((1, gru_in))
        )
    }
    if config.encoder == "ode-rnn":
        nets["encoder_ode"] = flax_module(
            "encoder_ode", ODEFunction(hidden, config.units), input_shape=(1, hidden)
        )
    head = flax_module("z0_head", GaussianHead(config.z_dim, config.units), input_shape=(1, hidden))
    h = encode(nets, x, present, times, mask, config)
    loc, scale = head(h)
    with (
        numpyro.plate("sequences", batch),
        draws_plate(draws),
        handlers.scale(scale=annealing_factor),
    ):
        return numpyro.sample("z", dist.Normal(loc, scale).to_event(1))


def context_choice(key: Array, present: Array, mask: Array, points: int) -> Array:
    """[B, T] bool: ``points`` time points of each series chosen uniformly without
    replacement among those where something is observed (all of them where there are fewer).
    ``present`` [B, T, D], ``mask`` [B, T] (False: padding)."""
    if key is None:
        raise ValueError("context_points needs a PRNG key: run the guide under a seed handler")
    candidates = jnp.any(present, axis=-1) & mask
    scores = jnp.where(candidates, jax.random.uniform(key, candidates.shape), jnp.inf)
    rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
    return candidates & (rank < points)


@contextlib.contextmanager
def draws_plate(draws: int):
    """Nothing for one draw; for more, a plate "draws" (dim -2) whose sites count 1/draws."""
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    if draws == 1:
        yield
        return
    with handlers.scale(scale=1.0 / draws), numpyro.plate("draws", draws, dim=-2):
        yield
