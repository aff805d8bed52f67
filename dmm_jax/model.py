"""The NumPyro model p(x, z) and guide q(z | x) of the Deep Markov Model.

Both take a padded mini-batch: ``x`` [B, T, X] (0/1 piano rolls, float) and ``lengths`` [B]
(int; steps t >= lengths[b] are padding and contribute exactly zero). ``annealing_factor`` is
an array scaling the z terms of model and guide alike (KL annealing); as a traced argument a
new value never recompiles.

    model:  z_t ~ N(GatedTransition(z_{t-1})),           x_t ~ Bernoulli(logits=Emitter(z_t))
    guide:  h_{1:T} = BackwardEncoder(x),                 z_t ~ N(Combiner(z_{t-1}, h_t))

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
from dmm_jax.nn import (
    BackwardEncoder,
    BernoulliEmitter,
    Combiner,
    ForwardEncoder,
    GatedTransition,
    GaussianHead,
    InverseAutoregressiveFlow,
)

Array = jax.Array


def sequence_mask(lengths: Array, num_steps: int) -> Array:
    """[B, T] boolean, True where t < lengths[b]."""
    return jnp.arange(num_steps)[None, :] < lengths[:, None]


def model(x: Array, lengths: Array, annealing_factor: Array | float = 1.0, *, config: DMMConfig):
    """p(x_{1:T}, z_{1:T}) for each sequence of the batch; returns the latents z [B, T, Z]."""
    batch, num_steps, _ = x.shape
    transition = flax_module(
        "transition",
        GatedTransition(config.z_dim, config.transition_dim),
        input_shape=(1, config.z_dim),
    )
    emitter = flax_module(
        "emitter",
        BernoulliEmitter(config.obs_dim, config.emission_dim),
        input_shape=(1, config.z_dim),
    )
    z_0 = numpyro.param("z_0", jnp.zeros(config.z_dim))
    mask = sequence_mask(lengths, num_steps)
    with numpyro.plate("sequences", batch):
        with handlers.scale(scale=annealing_factor):
            z = numpyro.sample("z", MarkovGaussianChain(transition, z_0, batch, num_steps, mask))
        emission = dist.Bernoulli(logits=emitter(z)).to_event(1).mask(mask).to_event(1)
        numpyro.sample("x", emission, obs=x)
    return z


def guide(x: Array, lengths: Array, annealing_factor: Array | float = 1.0, *, config: DMMConfig):
    """q(z_{1:T} | x_{1:T}), the inference network ``config.guide``; returns z [B, T, Z]."""
    batch, num_steps, _ = x.shape
    z_dim, rnn_dim = config.z_dim, config.rnn_dim
    uses_right = config.guide in ("st-r", "st-lr", "mf-lr")
    uses_left = config.guide in ("st-l", "st-lr", "mf-l", "mf-lr")
    structured = config.guide.startswith("st")
    x_init, mask_init = jnp.zeros((1, 1, config.obs_dim)), jnp.ones((1, 1), dtype=bool)
    # Registration order is fixed (it decides the initial parameters drawn from the key):
    # ST-R registers exactly what it always has, in the same order.
    if uses_right:
        encoder = flax_module(
            "encoder",
            BackwardEncoder(rnn_dim, config.rnn_cell, config.custom_vjp),
            x_init,
            mask_init,
        )
    if uses_left:
        encoder_left = flax_module(
            "encoder_left",
            ForwardEncoder(rnn_dim, config.rnn_cell, config.custom_vjp),
            x_init,
            mask_init,
        )
    if structured:
        mix = 1.0 / 3.0 if config.guide == "st-lr" else 0.5
        combiner = flax_module(
            "combiner",
            Combiner(z_dim, rnn_dim, config.custom_vjp, mix),
            jnp.zeros((1, z_dim)),
            jnp.zeros((1, rnn_dim)),
        )
        z_q_0 = numpyro.param("z_q_0", jnp.zeros(z_dim))
    else:
        head = flax_module("head", GaussianHead(z_dim), input_shape=(1, rnn_dim))
    flow = None
    if config.num_iafs:
        flow = flax_module(
            "iaf",
            InverseAutoregressiveFlow(z_dim, config.num_iafs, config.iaf_dim),
            input_shape=(1, z_dim),
        )

    mask = sequence_mask(lengths, num_steps)
    states = []  # h^L_t and/or h^R_t, [B, T, H] each
    if uses_left:
        states.append(encoder_left(x, mask))
    if uses_right:
        states.append(encoder(x, mask))
    hidden = states[0] if len(states) == 1 else states[0] + states[1]
    if structured:
        trajectory = functools.partial(combiner, method="sample_trajectory")
        posterior = StructuredPosterior(combiner, z_q_0, hidden, mask, trajectory, flow)
    else:
        loc, scale = head(0.5 * hidden if config.guide == "mf-lr" else hidden)
        posterior = MeanFieldPosterior(loc, scale, mask, flow)
    with numpyro.plate("sequences", batch), handlers.scale(scale=annealing_factor):
        return numpyro.sample("z", posterior)
