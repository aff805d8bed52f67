"""Rolling a trained VRNN forward outside NumPyro: the generation hooks of the ``vrnn`` family
(``dmm_jax.models.ModelFamily``), used by ``dmm_jax.generate``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmm_jax.config import VRNNConfig
from dmm_jax.emissions import (
    emission_sample,
)
from dmm_jax.models.common import observed_entries
from dmm_jax.models.vrnn.networks import (
    State,
    decoded_with_weights,
    hidden_before,
    hidden_of,
    initial_state,
    networks,
    prior_params,
    run_rnn,
    time_major,
)

Array = jax.Array


def roll_out(
    params: dict, key: Array, config: VRNNConfig, state: State, num_steps: int
) -> dict[str, Array]:
    """Draws z_t ~ p(z_t | g_t) and x_t ~ p(x_t | z_t, g_t) for ``num_steps`` steps from the
    RNN ``state`` (no covariates). Returns z [N, T, Z], x [N, T, X] and the emission's
    parameters ``emission`` (a tuple, each [N, T, ...])."""
    if config.covariate_dim:
        raise NotImplementedError("sampling a VRNN with inputs or time gaps is not supported")
    nets = networks(params, config)

    def step(state, key):
        z_key, x_key = jax.random.split(key)
        g = hidden_of(state)
        loc, scale = prior_params(nets, config, g)
        z = loc + scale * jax.random.normal(z_key, loc.shape, loc.dtype)
        features_z = nets["phi_z"](z)
        decoded = nets["decoder"](jnp.concatenate([features_z, g], axis=-1))
        x = emission_sample(config.emission, x_key, decoded_with_weights(nets, config, decoded))
        state = nets["rnn"](state, jnp.concatenate([nets["phi_x"](x), features_z], axis=-1))
        return state, (z, x, decoded)

    _, (z, x, decoded) = jax.lax.scan(step, state, jax.random.split(key, num_steps))
    decoded = tuple(time_major(a) for a in decoded)
    return {
        "z": time_major(z),
        "x": time_major(x),
        "emission": decoded_with_weights(nets, config, decoded),
    }


def state_after(params: dict, z: Array, x: Array, lengths: Array, config: VRNNConfig) -> State:
    """The RNN state after each sequence's last real step of (x, z), [N, ...]; h_0 for empty."""
    nets = networks(params, config)
    x, _ = observed_entries(x)
    states = run_rnn(nets, config, nets["phi_x"](x), nets["phi_z"](z))
    last = jnp.maximum(lengths - 1, 0)

    def pick(s, s0):
        chosen = jnp.take_along_axis(s, last[:, None, None], axis=1)[:, 0]
        return jnp.where((lengths > 0)[:, None], chosen, s0)

    return jax.tree.map(pick, states, initial_state(config, x.shape[0]))


def emission_params(
    params: dict, z: Array, x: Array, lengths: Array, config: VRNNConfig
) -> tuple[Array, ...]:
    """p(x_t | z_{<=t}, x_{<t})'s parameters at every step of (x, z), [N, T, ...]."""
    del lengths
    nets = networks(params, config)
    x, _ = observed_entries(x)
    features_z = nets["phi_z"](z)
    g = hidden_before(run_rnn(nets, config, nets["phi_x"](x), features_z))
    decoded = nets["decoder"](jnp.concatenate([features_z, g], axis=-1))
    return decoded_with_weights(nets, config, decoded)


def start(params: dict, config: VRNNConfig, num_sequences: int) -> State:
    del params
    return initial_state(config, num_sequences)


def emission(config: VRNNConfig) -> str:
    return config.emission
