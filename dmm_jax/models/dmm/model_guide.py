"""The NumPyro model p(x, z) and guide q(z | x) of the Deep Markov Model.

Both take a padded mini-batch: ``x`` [B, T, X] (0/1 piano rolls or real values, float) and
``lengths`` [B] (int; steps t >= lengths[b] are padding and contribute exactly zero).
``annealing_factor`` is an array scaling the z terms of model and guide alike (KL annealing);
as a traced argument a new value never recompiles. Optional keyword arguments:

    inputs    [B, T, U]  control inputs; inputs[:, t] acts between steps t-1 and t (u_{t-1})
    dt        [B, T]     time gaps; dt[:, t] is the time from step t-1 to step t
    obs_mask  [B, T, X]  False where an entry is missing; NaN entries of x are missing too
    steps     RealSteps  the batch's real steps (``dmm_jax.real_steps``): per-step networks
                         then run on those rows only; the same values, less work on padding

    model:  z_t ~ N(Transition(z_{t-1}, c_t)),  x_t ~ Bernoulli(logits=Emitter(z_t)) or
                                                x_t ~ N(Emitter(z_t)) or
                                                x_t ~ NADE(Emitter(z_t))  (c_t = [u_t, dt_t])
            DMM-Aug (``config.augmented``): c_t gains x_{t-1} and the emitter reads
            [z_t, x_{t-1}] (x_0 = 0)
    guide:  h_{1:T} = BackwardEncoder([x, c]),   z_t ~ N(Combiner(z_{t-1}, h_t))

A missing entry contributes nothing to log p(x | z) and is fed to the encoder as 0; it is
zero-filled before any arithmetic, so no NaN reaches a value or a gradient.

The guide is the paper's ST-R (DKS) by default; ``DMMConfig.guide`` picks another of its
inference networks (Krishnan et al. 2017, Table 1), with h^L_t = ForwardEncoder(x)_t over
x_{1:t} and h^R_t = BackwardEncoder(x)_t over x_{t:T}:

    st-r:   z_t ~ N(Combiner(z_{t-1}, h^R_t)),  c = (tanh(W z_{t-1} + b) + h^R_t) / 2
    st-l:   z_t ~ N(Combiner(z_{t-1}, h^L_t)),  c = (tanh(W z_{t-1} + b) + h^L_t) / 2
    st-lr:  z_t ~ N(Combiner(z_{t-1}, h^L_t + h^R_t)),  c = (tanh(W z_{t-1} + b) + h^L_t + h^R_t) / 3
    mf-l:   z_t ~ N(GaussianHead(h^L_t))
    mf-lr:  z_t ~ N(GaussianHead((h^L_t + h^R_t) / 2))

With ``num_iafs`` > 0 each step's Gaussian draw is pushed through inverse autoregressive
flows before the next step conditions on it.

Each trajectory z_{1:T} is one event of the sample site "z" (see ``dmm_jax.distributions``):
the guide samples it with a scan, the model scores it in one batched op. The plate runs over
sequences only; time lives in the event shape, since steps are not independent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.contrib.module import flax_module

from dmm_jax.config import DMMConfig
from dmm_jax.distributions import MarkovGaussianChain, MeanFieldPosterior, StructuredPosterior
from dmm_jax.emissions import (
    PADDING_FILL,
    NADEWeights,
    emission_distribution,
    with_nade_weights,
)
from dmm_jax.flows import InverseAutoregressiveFlow
from dmm_jax.models.common import (
    model_dropout,
    observed_entries,
    previous_observations,
    sequence_mask,
    transition_covariates,
)
from dmm_jax.nn import (
    BackwardEncoder,
    BernoulliEmitter,
    Combiner,
    ForwardEncoder,
    GatedTransition,
    GaussianEmitter,
    GaussianHead,
    LinearTransition,
    NADEEmitter,
)
from dmm_jax.real_steps import RealSteps, per_real_step

Array = jax.Array


def transition_module(config: DMMConfig):
    if config.transition == "linear":
        return LinearTransition(config.z_dim)
    return GatedTransition(config.z_dim, config.transition_dim)


def emitter_module(config: DMMConfig):
    if config.emission == "nade":
        return NADEEmitter(config.obs_dim, config.emission_dim, config.nade_hidden)
    if config.emission == "gaussian":
        return GaussianEmitter(
            config.obs_dim,
            config.emission_dim,
            config.emission_net,
            config.emission_scale,
            config.emission_scale_init,
        )
    return BernoulliEmitter(config.obs_dim, config.emission_dim)


def model_networks(config: DMMConfig):
    """Registers the model's networks, in a fixed order (it decides the initial parameters):
    (transition, emitter, the NADE's shared weights or None, z_0)."""
    cov_dim = config.transition_covariate_dim
    cov_example = (jnp.zeros((1, cov_dim)),) if cov_dim else ()
    transition = flax_module(
        "transition", transition_module(config), jnp.zeros((1, config.z_dim)), *cov_example
    )
    emitter = flax_module(
        "emitter", emitter_module(config), input_shape=(1, config.emission_input_dim)
    )
    z_0 = numpyro.param("z_0", jnp.zeros(config.z_dim))
    weights = None
    if config.emission == "nade":
        weights = flax_module("nade", NADEWeights(config.obs_dim, config.nade_hidden))()
    return transition, emitter, weights, z_0


def step_emission(
    config: DMMConfig, decoded, weights, present: Array, steps: RealSteps | None = None
) -> dist.Distribution:
    """p(x_t | ...) with event shape (X,) from the emitter's output (and a NADE's weights);
    entries not ``present`` are not scored (a NADE on the real ``steps`` only, if given)."""
    if config.emission == "nade":
        params = with_nade_weights(decoded, weights)
        return emission_distribution("nade", params, present, steps)
    if config.emission == "gaussian":
        per_entry = dist.Normal(*decoded)
    else:
        per_entry = dist.Bernoulli(logits=decoded)
    return per_entry.mask(present).to_event(1)


def emission_extras(config: DMMConfig, inputs: Array | None, x_prev: Array | None):
    """What the emission reads besides z_t, [B, T, E]: u_t if inputs_to_emission, then x_{t-1}
    if augmented; None if nothing."""
    extras = []
    if config.inputs_to_emission:
        extras.append(jnp.asarray(inputs, jnp.float32))
    if x_prev is not None:
        extras.append(x_prev.astype(jnp.float32))
    return jnp.concatenate(extras, axis=-1) if extras else None


def with_extras(z: Array, extras: Array | None) -> Array:
    return z if extras is None else jnp.concatenate([z, extras.astype(z.dtype)], axis=-1)


def model(
    x: Array,
    lengths: Array,
    annealing_factor: Array | float = 1.0,
    *,
    config: DMMConfig,
    inputs: Array | None = None,
    dt: Array | None = None,
    obs_mask: Array | None = None,
    steps: RealSteps | None = None,
    dropout: float = 0.0,
):
    """p(x_{1:T}, z_{1:T}) for each sequence of the batch; returns the latents z [B, T, Z].
    ``dropout``: the rate of dropout on the emitter's input (training only)."""
    batch, num_steps, _ = x.shape
    covariates = transition_covariates(config, batch, num_steps, inputs, dt)
    x, present = observed_entries(x, obs_mask)
    x_prev = previous_observations(x) if config.augmented else None
    if x_prev is not None:
        covariates = x_prev if covariates is None else jnp.concatenate([covariates, x_prev], -1)
    transition, emitter, weights, z_0 = model_networks(config)
    mask = sequence_mask(lengths, num_steps)
    with numpyro.plate("sequences", batch):
        with handlers.scale(scale=annealing_factor):
            z = numpyro.sample(
                "z",
                MarkovGaussianChain(transition, z_0, batch, num_steps, mask, covariates, steps),
            )
        emission_in = with_extras(z, emission_extras(config, inputs, x_prev))
        emission_in = model_dropout(emission_in, dropout)
        fill = PADDING_FILL[config.emission]
        decoded = per_real_step(emitter, steps, emission_in, fill=fill)
        per_step = step_emission(config, decoded, weights, present, steps)
        numpyro.sample("x", per_step.mask(mask).to_event(1), obs=x)
    return z


def guide(
    x: Array,
    lengths: Array,
    annealing_factor: Array | float = 1.0,
    *,
    config: DMMConfig,
    inputs: Array | None = None,
    dt: Array | None = None,
    obs_mask: Array | None = None,
    steps: RealSteps | None = None,
):
    """q(z_{1:T} | x_{1:T}), the inference network ``config.guide``; returns z [B, T, Z].

    The encoders read [x_t, c_t] (missing entries of x as 0), so their states summarise the
    observations and covariates of steps t..T (right), 1..t (left), or both.
    """
    batch, num_steps, _ = x.shape
    covariates = transition_covariates(config, batch, num_steps, inputs, dt)
    x, _ = observed_entries(x, obs_mask)
    if covariates is not None:
        x = jnp.concatenate([x, covariates], axis=-1)
    nets = guide_networks(config)
    mask = sequence_mask(lengths, num_steps)
    hidden = guide_conditioning(nets, config, x, mask, steps)
    if "combiner" in nets:
        combiner = nets["combiner"]
        trajectory = functools.partial(combiner, method="sample_trajectory", steps=steps)
        posterior = StructuredPosterior(
            combiner, nets["z_q_0"], hidden, mask, trajectory, nets["iaf"]
        )
    else:
        loc, scale = nets["head"](hidden)
        posterior = MeanFieldPosterior(loc, scale, mask, nets["iaf"])
    with numpyro.plate("sequences", batch), handlers.scale(scale=annealing_factor):
        return numpyro.sample("z", posterior)


def guide_networks(config: DMMConfig) -> dict:
    """Registers the guide's networks, in a fixed order (it decides the initial parameters):
    "encoder" (right) and/or "encoder_left", then "combiner" and "z_q_0" (structured guides) or
    "head" (mean-field), and "iaf" (None without flows)."""
    z_dim, rnn_dim = config.z_dim, config.rnn_dim
    x_init = jnp.zeros((1, 1, config.obs_dim + config.covariate_dim))
    mask_init = jnp.ones((1, 1), dtype=bool)
    activation = config.encoder_activation
    nets = {"iaf": None}
    # ST-R registers exactly what it always has, in the same order.
    if config.guide in ("st-r", "st-lr", "mf-lr"):
        nets["encoder"] = flax_module(
            "encoder",
            BackwardEncoder(rnn_dim, config.rnn_cell, config.custom_vjp, activation),
            x_init,
            mask_init,
        )
    if config.guide in ("st-l", "st-lr", "mf-l", "mf-lr"):
        nets["encoder_left"] = flax_module(
            "encoder_left",
            ForwardEncoder(rnn_dim, config.rnn_cell, config.custom_vjp, activation),
            x_init,
            mask_init,
        )
    if config.guide.startswith("st"):
        mix = 1.0 / 3.0 if config.guide == "st-lr" else 0.5
        nets["combiner"] = flax_module(
            "combiner",
            Combiner(z_dim, rnn_dim, config.custom_vjp, mix),
            jnp.zeros((1, z_dim)),
            jnp.zeros((1, rnn_dim)),
        )
        nets["z_q_0"] = numpyro.param("z_q_0", jnp.zeros(z_dim))
    else:
        nets["head"] = flax_module("head", GaussianHead(z_dim), input_shape=(1, rnn_dim))
    if config.num_iafs:
        nets["iaf"] = flax_module(
            "iaf",
            InverseAutoregressiveFlow(z_dim, config.num_iafs, config.iaf_dim),
            input_shape=(1, z_dim),
        )
    return nets


def guide_conditioning(
    nets: dict, config: DMMConfig, x: Array, mask: Array, steps: RealSteps | None = None
) -> Array:
    """What q(z_t | ...) reads besides z_{t-1}, [B, T, H], from the encoders over ``x`` (the
    observations with missing entries as 0, then the covariates): h^L_t, h^R_t or their sum;
    for MF-LR their average."""
    states = []  # h^L_t and/or h^R_t, [B, T, H] each
    if "encoder_left" in nets:
        states.append(nets["encoder_left"](x, mask))
    if "encoder" in nets:
        states.append(nets["encoder"](x, mask, steps))
    hidden = states[0] if len(states) == 1 else states[0] + states[1]
    return 0.5 * hidden if config.guide == "mf-lr" else hidden
