"""The DMM's particle filter (``dmm_jax.filtering``): the guide's step q(z_t | z_{t-1}, h_t)
proposes, the gated transition and the emission weigh.

The encoders run once over the whole batch, as in the guide; the proposal then reads h_t and
each particle's z_{t-1} (ST guides) or h_t alone (MF guides). With the right-to-left
encoders (ST-R, ST-LR, MF-LR) q sees future observations; the estimate stays a valid bound
(any proposal that depends on x only is), the filtering guides ST-L and MF-L are the
paper's FIVO proposals. Flows (``num_iafs``) are not supported.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from numpyro import handlers

from dmm_jax.config import DMMConfig
from dmm_jax.distributions import normal_log_prob, standardized_normal_log_prob
from dmm_jax.filtering import particle_filter as run_particle_filter
from dmm_jax.filtering import per_particle
from dmm_jax.models.common import (
    observed_entries,
    previous_observations,
    sequence_mask,
    transition_covariates,
)
from dmm_jax.models.dmm.model_guide import (
    emission_extras,
    guide_conditioning,
    guide_networks,
    model_networks,
    step_emission,
    with_extras,
)

Array = jax.Array


def particle_filter(
    params: dict,
    key: Array,
    x: Array,
    lengths: Array,
    annealing_factor: Array | float = 1.0,
    *,
    config: DMMConfig,
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
    if config.num_iafs:
        raise ValueError("the particle filter proposes Gaussian steps: not with num_iafs > 0")
    batch, num_steps, _ = x.shape
    covariates = transition_covariates(config, batch, num_steps, inputs, dt)
    x, present = observed_entries(x, obs_mask)
    x_prev = previous_observations(x) if config.augmented else None
    extras = emission_extras(config, inputs, x_prev)
    transition_in = covariates
    if x_prev is not None:
        transition_in = x_prev if covariates is None else jnp.concatenate([covariates, x_prev], -1)
    encoder_in = x if covariates is None else jnp.concatenate([x, covariates], axis=-1)
    mask = sequence_mask(lengths, num_steps)

    with handlers.substitute(data=params):
        transition, emitter, weights, z_0 = model_networks(config)
        nets = guide_networks(config)
        hidden = guide_conditioning(nets, config, encoder_in, mask)

    particles = functools.partial(per_particle, num_particles=num_particles)

    def step(carry, inputs_t, noise_t):
        z_prev_model, z_prev_guide = carry
        h_t, x_t, present_t, transition_in_t, extras_t = inputs_t
        if "combiner" in nets:
            loc_q, scale_q = nets["combiner"](z_prev_guide, particles(h_t))
        else:
            loc_q, scale_q = (particles(a) for a in nets["head"](h_t))
        z = loc_q + scale_q * noise_t
        log_q = standardized_normal_log_prob(noise_t, scale_q)
        if transition_in_t is None:
            loc_p, scale_p = transition(z_prev_model)
        else:
            loc_p, scale_p = transition(z_prev_model, particles(transition_in_t))
        decoded = emitter(with_extras(z, particles(extras_t)))
        emission = step_emission(config, decoded, weights, present_t[:, None])
        log_x = emission.log_prob(x_t[:, None])
        log_alpha = log_x + annealing_factor * (normal_log_prob(z, loc_p, scale_p) - log_q)
        return (z, z), log_alpha, z

    def time_major(a: Array | None) -> Array | None:
        return None if a is None else jnp.swapaxes(a, 0, 1)

    start = particles(jnp.broadcast_to(z_0, (batch, config.z_dim)))
    guide_start = particles(jnp.broadcast_to(nets.get("z_q_0", z_0), (batch, config.z_dim)))
    inputs_by_step = tuple(time_major(a) for a in (hidden, x, present, transition_in, extras))
    return run_particle_filter(
        step,
        (start, guide_start),
        inputs_by_step,
        mask,
        key,
        num_particles,
        config.z_dim,
        resampling,
        keep_particles,
    )
