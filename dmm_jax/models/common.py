"""Parts shared by every model family: masks, missing entries, covariates, and networks
registered with NumPyro or bound to trained parameters.

Shapes (batch-major throughout): B sequences, T steps, X observation dims, U input dims.
``lengths`` [B] marks the real steps of each padded sequence; steps t >= lengths[b] are padding.
A config that takes covariates has ``input_dim`` (control inputs u_t, 0: none) and ``use_dt``
(time gaps dt_t) fields.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpyro
from numpyro.contrib.module import flax_module

Array = jax.Array


def registered_networks(networks: dict) -> dict:
    """{name: (Flax module, example arguments)} -> the modules registered with NumPyro (their
    parameters the sites "<name>$params"), each called like the module."""
    return {
        name: flax_module(name, module, *example) for name, (module, example) in networks.items()
    }


def registered_params(name: str, module, *example, **kwargs):
    """The parameters of ``module``, registered with NumPyro as the site "<name>$params" the
    way ``flax_module`` registers them, for functions that take parameters explicitly (a
    ``jax.custom_vjp`` cannot differentiate parameters captured in a closure)."""
    return flax_module(name, module, *example, **kwargs).args[0]  # partial(apply, params)


def bound_networks(networks: dict, params: dict) -> dict:
    """The same modules bound to trained ``params`` (outside a NumPyro model)."""
    return {
        name: functools.partial(module.apply, {"params": params[f"{name}$params"]})
        for name, (module, _) in networks.items()
    }


def model_dropout(features: Array, rate: float) -> Array:
    """Inverted dropout inside a model (on its emission network's input, or the VRNN's on the
    observations' features entering its RNN): each entry zeroed with probability ``rate`` and
    the rest scaled by 1 / (1 - rate), so its expectation is unchanged; ``rate`` 0 returns
    ``features`` itself. The mask's key is NumPyro's (``numpyro.prng_key``)."""
    if rate == 0.0:
        return features
    key = numpyro.prng_key()
    if key is None:
        raise ValueError("dropout draws a mask: run the model under numpyro.handlers.seed")
    keep = jax.random.bernoulli(key, 1.0 - rate, features.shape)
    return jnp.where(keep, features / (1.0 - rate), 0.0)


def sequence_mask(lengths: Array, num_steps: int) -> Array:
    """[B, T] boolean, True where t < lengths[b]."""
    return jnp.arange(num_steps)[None, :] < lengths[:, None]


def observed_entries(x: Array, obs_mask: Array | None = None) -> tuple[Array, Array]:
    """(x with missing entries set to 0, [B, T, X] boolean True where observed).

    An entry is missing where it is NaN or where ``obs_mask`` is False. The fill comes first,
    so later arithmetic never touches a NaN (and the gradient of a masked term stays 0).
    """
    present = ~jnp.isnan(x)
    if obs_mask is not None:
        present = present & obs_mask.astype(bool)
    return jnp.where(present, x, 0.0), present


def transition_covariates(
    config, batch: int, num_steps: int, inputs: Array | None, dt: Array | None
) -> Array | None:
    """[B, T, C] = [inputs, dt] as the config asks for them, or None; names what is missing."""
    parts = []
    if config.input_dim:
        if inputs is None:
            raise ValueError(f"config.input_dim={config.input_dim} needs inputs [B, T, U]")
        if inputs.shape != (batch, num_steps, config.input_dim):
            raise ValueError(
                f"inputs must have shape {(batch, num_steps, config.input_dim)}, got {inputs.shape}"
            )
        parts.append(jnp.asarray(inputs, jnp.float32))
    elif inputs is not None:
        raise ValueError("inputs given but config.input_dim is 0")
    if config.use_dt:
        if dt is None or dt.shape != (batch, num_steps):
            got = None if dt is None else dt.shape
            raise ValueError(f"config.use_dt needs dt of shape {(batch, num_steps)}, got {got}")
        parts.append(jnp.asarray(dt, jnp.float32)[..., None])
    elif dt is not None:
        raise ValueError("dt given but config.use_dt is False")
    return jnp.concatenate(parts, axis=-1) if parts else None


def previous_observations(x: Array) -> Array:
    """x_{t-1} at step t, [B, T, X]; zeros at t = 0 (DMM-Aug's extra input)."""
    return jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


def example_covariates(config) -> dict[str, Array]:
    """Zero ``inputs``/``dt`` of one step of one sequence, for initialising parameters."""
    example = {}
    if config.input_dim:
        example["inputs"] = jnp.zeros((1, 1, config.input_dim), jnp.float32)
    if config.use_dt:
        example["dt"] = jnp.zeros((1, 1), jnp.float32)
    return example
