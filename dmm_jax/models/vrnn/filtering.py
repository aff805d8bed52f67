"""The VRNN's particle filter (``dmm_jax.filtering``): its own filtering guide
q(z_t | phi_x(x_t), h_{t-1}) proposes, the prior p(z_t | h_{t-1}) and the emission
p(x_t | phi_z(z_t), h_{t-1}) weigh, and each particle carries its own RNN state."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from numpyro import handlers

from dmm_jax.config import VRNNConfig
from dmm_jax.distributions import normal_log_prob, standardized_normal_log_prob
from dmm_jax.emissions import emission_distribution
from dmm_jax.filtering import particle_filter as run_particle_filter
from dmm_jax.filtering import per_particle
from dmm_jax.models.common import observed_entries, sequence_mask, transition_covariates
from dmm_jax.models.vrnn.model_guide import register
from dmm_jax.models.vrnn.networks import (
    decoded_with_weights,
    hidden_of,
    initial_state,
    prior_params,
    time_major,
    with_covariates,
)

Array = jax.Array


def particle_filter(
    params: dict,
    key: Array,
    x: Array,
    lengths: Array,
    annealing_factor: Array | float = 1.0,
    *,
    config: VRNNConfig,
    num_particles: int,
    resampling: str = "systematic",
    inputs: Array | None = None,
    dt: Array | None = None,
    obs_mask: Array | None = None,
    steps=None,
    keep_particles: bool = False,
) -> tuple[Array, Array | None]:
    """(log p^(x) [B], the proposed particles [T, B, K, Z] if ``keep_particles``) for a padded
    batch, arguments as the model's (``steps`` is accepted and not needed)."""
    del steps
    batch, num_steps, _ = x.shape
    covariates = transition_covariates(config, batch, num_steps, inputs, dt)
    x, present = observed_entries(x, obs_mask)
    names = ("phi_x", "phi_z", "rnn", "prior", "encoder", "decoder", "nade")
    with handlers.substitute(data=params):
        nets = register(config, names)
    features_x = nets["phi_x"](x)

    particles = functools.partial(per_particle, num_particles=num_particles)

    def step(state, inputs_t, noise_t):
        features_x_t, x_t, present_t, c_t = (particles(a) for a in inputs_t)
        g = with_covariates(hidden_of(state), c_t)
        loc_p, scale_p = prior_params(nets, config, g)
        loc_q, scale_q = nets["encoder"](jnp.concatenate([features_x_t, g], axis=-1))
        z = loc_q + scale_q * noise_t
        log_z = normal_log_prob(z, loc_p, scale_p) - standardized_normal_log_prob(noise_t, scale_q)
        features_z = nets["phi_z"](z)
        decoded = nets["decoder"](jnp.concatenate([features_z, g], axis=-1))
        emission = emission_distribution(
            config.emission, decoded_with_weights(nets, config, decoded), present_t
        )
        log_alpha = emission.log_prob(x_t) + annealing_factor * log_z
        state = nets["rnn"](state, jnp.concatenate([features_x_t, features_z], axis=-1))
        return state, log_alpha, z

    start = jax.tree.map(particles, initial_state(config, batch))
    inputs_by_step = tuple(time_major(a) for a in (features_x, x, present, covariates))
    return run_particle_filter(
        step,
        start,
        inputs_by_step,
        sequence_mask(lengths, num_steps),
        key,
        num_particles,
        config.z_dim,
        resampling,
        keep_particles,
    )
