"""Rolling a trained DMM forward outside NumPyro: the generation hooks of the ``dmm`` family
(``dmm_jax.models.ModelFamily``), used by ``dmm_jax.generate``.

The state carried between steps is (z_t [N, Z], x_t [N, X]); x_t matters to DMM-Aug only,
whose transition and emission read the previous observation. Bernoulli emission, gated or
linear transition, no inputs or time gaps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dmm_jax.config import DMMConfig
from dmm_jax.distributions import MarkovGaussianChain
from dmm_jax.emissions import emission_sample
from dmm_jax.models.common import observed_entries
from dmm_jax.models.dmm.model_guide import emitter_module, transition_module

Array = jax.Array
State = tuple[Array, Array]


def emission(config: DMMConfig) -> str:
    return config.emission


def _networks(params: dict, config: DMMConfig):
    if config.emission != "bernoulli" or config.covariate_dim:
        raise NotImplementedError(
            "generating from a DMM needs the Bernoulli emission and no inputs or time gaps"
        )
    transition = functools.partial(
        transition_module(config).apply, {"params": params["transition$params"]}
    )
    emitter = functools.partial(
        emitter_module(config).apply,
        {"params": params["emitter$params"]},
    )
    return transition, emitter


def start(params: dict, config: DMMConfig, num_sequences: int) -> State:
    """(z_0, x_0 = 0) for every sequence."""
    z_0 = jnp.broadcast_to(params["z_0"], (num_sequences, config.z_dim))
    return z_0, jnp.zeros((num_sequences, config.obs_dim), jnp.float32)


def state_after(params: dict, z: Array, x: Array, lengths: Array, config: DMMConfig) -> State:
    """(z, x) at each sequence's last real step; the start for an empty prefix."""
    last_step = jnp.maximum(lengths - 1, 0)[:, None, None]
    started = (lengths > 0)[:, None]
    z_0, x_0 = start(params, config, z.shape[0])
    z_last = jnp.take_along_axis(z, last_step, axis=1)[:, 0]
    x, _ = observed_entries(x.astype(jnp.float32))  # missing entries as 0, as the model reads them
    x_last = jnp.take_along_axis(x, last_step, axis=1)[:, 0]
    return jnp.where(started, z_last, z_0), jnp.where(started, x_last, x_0)


def roll_out(params: dict, key: Array, config: DMMConfig, state: State, num_steps: int) -> dict:
    """z_{t+1..t+T} from the prior chain started at the state's z, then x ~ p(x | z); DMM-Aug
    draws z and x together, each x_t feeding step t+1."""
    transition, emitter = _networks(params, config)
    z_start, x_start = state
    if config.augmented:
        return _roll_out_augmented(transition, emitter, key, z_start, x_start, num_steps)
    z_key, x_key = jax.random.split(key)
    z = MarkovGaussianChain(transition, z_start, z_start.shape[0], num_steps).sample(z_key)
    logits = emitter(z)
    return {"z": z, "x": emission_sample("bernoulli", x_key, (logits,)), "emission": (logits,)}


def _roll_out_augmented(transition, emitter, key, z_start, x_start, num_steps):
    def step(carry, key):
        z_prev, x_prev = carry
        z_key, x_key = jax.random.split(key)
        loc, scale = transition(z_prev, x_prev)
        z = loc + scale * jax.random.normal(z_key, loc.shape, loc.dtype)
        logits = emitter(jnp.concatenate([z, x_prev], axis=-1))
        x = emission_sample("bernoulli", x_key, (logits,))
        return (z, x), (z, logits, x)

    _, (z, logits, x) = jax.lax.scan(step, (z_start, x_start), jax.random.split(key, num_steps))
    z, logits, x = (jnp.swapaxes(a, 0, 1) for a in (z, logits, x))  # time-major -> [N, T, ...]
    return {"z": z, "x": x, "emission": (logits,)}


def emission_params(
    params: dict, z: Array, x: Array, lengths: Array, config: DMMConfig
) -> tuple[Array]:
    """(logits [N, T, X],) of p(x_t | z_t) given the trajectory z."""
    del x, lengths
    if config.augmented:
        # Redrawing x_t from p(x_t | z_t, x_{t-1}) alone would ignore x_t's effect on step t+1.
        raise NotImplementedError("impute does not support DMM-Aug (config.augmented) models")
    return (_networks(params, config)[1](z),)
