"""The VRNN's NumPyro model and guide, each latent trajectory z_{1:T} one sample site "z"."""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpyro
from numpyro import handlers
from numpyro.contrib.module import flax_module
from numpyro.distributions import Distribution, constraints

from dmm_jax.config import VRNNConfig
from dmm_jax.distributions import (
    gaussian_kl,
    normal_log_prob,
    standardized_normal_log_prob,
    step_noise,
)
from dmm_jax.emissions import (
    PADDING_FILL,
    emission_distribution,
)
from dmm_jax.models.common import (
    model_dropout,
    observed_entries,
    sequence_mask,
    transition_covariates,
)
from dmm_jax.models.vrnn.networks import (
    decoded_with_weights,
    hidden_before,
    hidden_of,
    initial_state,
    modules,
    prior_params,
    run_rnn,
    time_major,
    with_covariates,
)
from dmm_jax.real_steps import RealSteps, per_real_step
from dmm_jax.scans import active_steps, scan_up_to

Array = jax.Array


def register(config: VRNNConfig, names: tuple[str, ...]) -> dict[str, Any]:
    available = modules(config)
    if config.standard_prior:
        names = tuple(n for n in names if n != "prior")
    names = tuple(n for n in names if n in available)  # "nade" with that emission only
    return {n: flax_module(n, available[n][0], *available[n][1]) for n in names}


class VRNNPrior(Distribution):
    """p(z_{1:T} | x) = prod_t N(z_t; mu_0(g_t), sigma_0(g_t)) given the observed x, one event
    [T, Z] per sequence. g_t depends on z_{<t}, so scoring a trajectory runs the RNN over it
    once; ``conditioning(z)`` returns that pass ([phi_z(z_t), g_t] per step), which the model's
    emission reuses (cached for the value the model was given)."""

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector
    reparametrized_params: ClassVar[list] = []

    def __init__(self, nets, config, features_x, covariates, mask, steps=None):
        self.nets, self.config, self.features_x = nets, config, features_x
        self.covariates, self.mask, self.steps = covariates, mask, steps
        self._cache: tuple[Array, tuple[Array, Array]] | None = None
        batch, num_steps = features_x.shape[:2]
        super().__init__(batch_shape=(batch,), event_shape=(num_steps, config.z_dim))

    def conditioning(self, value: Array) -> tuple[Array, Array]:
        """(phi_z(z_t), g_t), [B, T, F] and [B, T, H + C], for the trajectory ``value``."""
        if self._cache is not None and self._cache[0] is value:
            return self._cache[1]
        features_z = per_real_step(self.nets["phi_z"], self.steps, value)
        states = run_rnn(
            self.nets, self.config, self.features_x, features_z, active_steps(self.mask)
        )
        result = features_z, with_covariates(hidden_before(states), self.covariates)
        self._cache = (value, result)
        return result

    def step_params(self, value: Array) -> tuple[Array, Array]:
        g = self.conditioning(value)[1]
        fill = PADDING_FILL["gaussian"]
        return per_real_step(
            functools.partial(prior_params, self.nets, self.config), self.steps, g, fill=fill
        )

    def sample(self, key, sample_shape=()):
        raise NotImplementedError("the VRNN prior is drawn with x: use dmm_jax.generate")

    def log_prob(self, value: Array) -> Array:
        loc, scale = self.step_params(value)
        return jnp.sum(jnp.where(self.mask, normal_log_prob(value, loc, scale), 0.0), -1)

    def kl_from(self, posterior, value: Array, intermediates: list[Array]) -> Array:
        """sum_t KL(q(z_t | ...) || p(z_t | g_t)) at the drawn trajectory, [B]."""
        loc_q, scale_q = posterior.step_params(value, intermediates)
        loc_p, scale_p = self.step_params(value)
        kl = gaussian_kl(loc_q, scale_q, loc_p, scale_p)
        return jnp.sum(jnp.where(self.mask, kl, 0.0), -1)


class VRNNPosterior(Distribution):
    """q(z_{1:T} | x) = prod_t N(z_t; enc([phi_x(x_t), g_t])), drawn with a scan that carries
    the RNN state. Intermediates: the standardized noise and the scales, [B, T, Z] each."""

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector
    reparametrized_params: ClassVar[list] = []

    def __init__(self, nets, config, features_x, covariates, mask):
        self.nets, self.config, self.features_x = nets, config, features_x
        self.covariates, self.mask = covariates, mask
        batch, num_steps = features_x.shape[:2]
        super().__init__(batch_shape=(batch,), event_shape=(num_steps, config.z_dim))

    def _scan(self, noise: Array | None, given: Array | None):
        """Steps the guide over time, drawing z_t = loc + scale * eps_t or taking ``given``;
        (z, loc, scale), each [B, T, Z] (0, 0, 1 past the batch's longest sequence)."""
        nets = self.nets
        batch = self.features_x.shape[0]
        # The products with phi_x(x_t), known for every step, run once outside the loop.
        encoder_x = nets["encoder"](self.features_x, method="project")
        rnn_x = nets["rnn"](self.features_x, bias=False, method="project")

        def step(state, inputs):
            encoder_x_t, rnn_x_t, c_t, eps_t, given_t = inputs
            g = with_covariates(hidden_of(state), c_t)
            loc, scale = nets["encoder"](encoder_x_t, g, method="from_projection")
            z_t = loc + scale * eps_t if given_t is None else given_t
            features_z = nets["phi_z"](z_t)
            projected = rnn_x_t + nets["rnn"](features_z, method="project_trailing")
            state = nets["rnn"](state, projected, method="advance")
            return state, (z_t, loc, scale)

        inputs = (encoder_x, rnn_x, self.covariates, noise, given)
        _, outputs = scan_up_to(
            step,
            initial_state(self.config, batch),
            tuple(time_major(a) for a in inputs),
            active_steps(self.mask),
            fill=(0.0, 0.0, 1.0),
        )
        return tuple(time_major(o) for o in outputs)

    def sample_with_intermediates(self, key, sample_shape=()):
        if sample_shape:
            raise NotImplementedError("sample_shape is not supported; vmap over keys instead")
        (batch,), (num_steps, z_dim) = self.batch_shape, self.event_shape
        noise = time_major(step_noise(key, num_steps, (batch, z_dim)))
        z, _, scale = self._scan(noise, None)
        return z, [noise, scale]

    def sample(self, key, sample_shape=()):
        return self.sample_with_intermediates(key, sample_shape)[0]

    def log_prob(self, value: Array, intermediates: list[Array] | None = None) -> Array:
        if intermediates:
            eps, scale = intermediates
            per_step = standardized_normal_log_prob(eps, scale)
        else:
            _, loc, scale = self._scan(None, value)
            per_step = normal_log_prob(value, loc, scale)
        return jnp.sum(jnp.where(self.mask, per_step, 0.0), -1)

    def step_params(self, value: Array, intermediates: list[Array]) -> tuple[Array, Array]:
        eps, scale = intermediates
        return value - scale * eps, scale  # loc, in value and in gradient


def model(
    x: Array,
    lengths: Array,
    annealing_factor: Array | float = 1.0,
    *,
    config: VRNNConfig,
    inputs: Array | None = None,
    dt: Array | None = None,
    obs_mask: Array | None = None,
    steps: RealSteps | None = None,
    dropout: float = 0.0,
    input_dropout: float = 0.0,
):
    """p(x_{1:T}, z_{1:T}) per sequence; returns z [B, T, Z]. Arguments as the DMM's model
    (``dmm_jax.models.dmm``); missing entries (NaN or ``obs_mask`` False) are not scored and
    are read as 0 by phi_x. ``dropout``: the rate of dropout on the decoder's input
    [phi_z(z_t), g_t]; ``input_dropout``: on phi_x(x_t) where it enters the model's RNN
    (training only). The guide keeps its own, undropped RNN: any guide gives a bound on the
    model each mask draws, so the two need not share a mask."""
    batch, num_steps, _ = x.shape
    covariates = transition_covariates(config, batch, num_steps, inputs, dt)
    x, present = observed_entries(x, obs_mask)
    nets = register(config, ("phi_x", "phi_z", "rnn", "prior", "decoder", "nade"))
    mask = sequence_mask(lengths, num_steps)
    features_x = model_dropout(per_real_step(nets["phi_x"], steps, x), input_dropout)
    prior = VRNNPrior(nets, config, features_x, covariates, mask, steps)
    with numpyro.plate("sequences", batch):
        with handlers.scale(scale=annealing_factor):
            z = numpyro.sample("z", prior)
        features_z, g = prior.conditioning(z)
        decoded = per_real_step(
            nets["decoder"],
            steps,
            model_dropout(jnp.concatenate([features_z, g], axis=-1), dropout),
            fill=PADDING_FILL[config.emission],
        )
        decoded = decoded_with_weights(nets, config, decoded)
        emission = emission_distribution(config.emission, decoded, present, steps)
        numpyro.sample("x", emission.mask(mask).to_event(1), obs=x)
    return z


def guide(
    x: Array,
    lengths: Array,
    annealing_factor: Array | float = 1.0,
    *,
    config: VRNNConfig,
    inputs: Array | None = None,
    dt: Array | None = None,
    obs_mask: Array | None = None,
    steps: RealSteps | None = None,
):
    """q(z_{1:T} | x_{1:T}), a filter: z_t sees x_{<=t} only. Returns z [B, T, Z]."""
    batch, num_steps, _ = x.shape
    covariates = transition_covariates(config, batch, num_steps, inputs, dt)
    x, _ = observed_entries(x, obs_mask)
    nets = register(config, ("phi_x", "phi_z", "rnn", "encoder"))
    features_x = per_real_step(nets["phi_x"], steps, x)
    posterior = VRNNPosterior(
        nets, config, features_x, covariates, sequence_mask(lengths, num_steps)
    )
    with numpyro.plate("sequences", batch), handlers.scale(scale=annealing_factor):
        return numpyro.sample("z", posterior)
