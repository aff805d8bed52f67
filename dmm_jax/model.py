"""The NumPyro model p(x, z) and guide q(z | x) of the Deep Markov Model.

Both take a padded mini-batch: ``x`` [B, T, X] (0/1 piano rolls, float) and ``lengths`` [B]
(int; steps t >= lengths[b] are padding and contribute exactly zero). ``annealing_factor`` is
an array scaling the z terms of model and guide alike (KL annealing); as a traced argument a
new value never recompiles.

    model:  z_t ~ N(GatedTransition(z_{t-1})),           x_t ~ Bernoulli(logits=Emitter(z_t))
    guide:  h_{1:T} = BackwardEncoder(x),                 z_t ~ N(Combiner(z_{t-1}, h_t))

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
from dmm_jax.distributions import MarkovGaussianChain, StructuredPosterior
from dmm_jax.nn import BackwardEncoder, BernoulliEmitter, Combiner, GatedTransition

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
    """q(z_{1:T} | x_{1:T}), the structured ST-R guide; returns the latents z [B, T, Z]."""
    batch, num_steps, _ = x.shape
    encoder = flax_module(
        "encoder",
        BackwardEncoder(config.rnn_dim, config.rnn_cell, config.custom_vjp),
        jnp.zeros((1, 1, config.obs_dim)),
        jnp.ones((1, 1), dtype=bool),
    )
    combiner = flax_module(
        "combiner",
        Combiner(config.z_dim, config.rnn_dim, config.custom_vjp),
        jnp.zeros((1, config.z_dim)),
        jnp.zeros((1, config.rnn_dim)),
    )
    z_q_0 = numpyro.param("z_q_0", jnp.zeros(config.z_dim))
    mask = sequence_mask(lengths, num_steps)
    hidden = encoder(x, mask)
    trajectory = functools.partial(combiner, method="sample_trajectory")
    posterior = StructuredPosterior(combiner, z_q_0, hidden, mask, trajectory)
    with numpyro.plate("sequences", batch), handlers.scale(scale=annealing_factor):
        return numpyro.sample("z", posterior)
