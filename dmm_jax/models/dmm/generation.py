"""Rolling a trained DMM forward outside NumPyro: the generation hooks of the ``dmm`` family
(``dmm_jax.models.ModelFamily``), used by ``dmm_jax.generate``.

The state carried between steps is (z_t [N, Z], x_t [N, X]); x_t matters to DMM-Aug only,
whose transition and emission read the previous observation. Bernoulli or NADE emission,
gated or linear transition, no inputs or time gaps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dmm_jax.config import BINARY_EMISSIONS, DMMConfig
from dmm_jax.distributions import MarkovGaussianChain
from dmm_jax.emissions import NADEWeights, emission_sample, with_nade_weights
from dmm_jax.models.common import observed_entries
from dmm_jax.models.dmm.model_guide import emitter_module, transition_module

Array = jax.Array
State = tuple[Array, Array]


def emission(config: DMMConfig) -> str:
    return config.emission


def _networks(params: dict, config: DMMConfig):
    """(transition, emitter): the emitter maps the emission's input to the parameter tuple of
    ``dmm_jax.emissions`` (the NADE's with its shared weights)."""
    if config.emission not in BINARY_EMISSIONS or config.covariate_dim:
        raise NotImplementedError(
            "generating from a DMM needs a 0/1 emission (bernoulli or nade) and no inputs or "
            "time gaps"
        )
    transition = functools.partial(
        transition_module(config).apply, {"params": params["transition$params"]}
    )
    apply_emitter = functools.partial(
        emitter_module(config).apply,
        {"params": params["emitter$params"]},
    )
    if config.emission == "bernoulli":
        return transition, lambda inputs: (apply_emitter(inputs),)
    weights = NADEWeights(config.obs_dim, config.nade_hidden).apply(
        {"params": params["nade$params"]}
    )
    return transition, lambda inputs: with_nade_weights(apply_emitter(inputs), weights)


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
    kind = config.emission
    if config.augmented:
        return _roll_out_augmented(transition, emitter, kind, key, z_start, x_start, num_steps)
    z_key, x_key = jax.random.split(key)
    z = MarkovGaussianChain(transition, z_start, z_start.shape[0], num_steps).sample(z_key)
    decoded = emitter(z)
    return {"z": z, "x": emission_sample(kind, x_key, decoded), "emission": decoded}


def _roll_out_augmented(transition, emitter, kind, key, z_start, x_start, num_steps):
    def step(carry, key):
        z_prev, x_prev = carry
        z_key, x_key = jax.random.split(key)
        loc, scale = transition(z_prev, x_prev)
        z = loc + scale * jax.random.normal(z_key, loc.shape, loc.dtype)
        decoded = emitter(jnp.concatenate([z, x_prev], axis=-1))
        x = emission_sample(kind, x_key, decoded)
        return (z, x), (z, decoded, x)

    _, (z, decoded, x) = jax.lax.scan(step, (z_start, x_start), jax.random.split(key, num_steps))
    z, x = (jnp.swapaxes(a, 0, 1) for a in (z, x))  # time-major -> [N, T, ...]
    # A NADE's shared weights come out stacked as [T, 1, H, X] -> [1, T, H, X]: broadcast.
    return {"z": z, "x": x, "emission": tuple(jnp.swapaxes(a, 0, 1) for a in decoded)}


def emission_params(
    params: dict, z: Array, x: Array, lengths: Array, config: DMMConfig
) -> tuple[Array, ...]:
    """p(x_t | z_t)'s parameters given the trajectory z: (logits [N, T, X],) for bernoulli."""
    del x, lengths
    if config.augmented:
        # Redrawing x_t from p(x_t | z_t, x_{t-1}) alone would ignore x_t's effect on step t+1.
        raise NotImplementedError("impute does not support DMM-Aug (config.augmented) models")
    return _networks(params, config)[1](z)
