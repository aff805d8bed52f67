"""Predictions of a trained Latent ODE: z_0 from the guide given what was observed, then the
decoder's mean along the ODE's path at any query times. Interpolation and extrapolation
(``dmm_jax.models.series_tasks``) are the same computation: the guide reads only the
observed entries (NaN elsewhere), and the path is solved from the series' first time
through the query times. ``sample_prior`` draws new series from the model itself.
"""

from __future__ import annotations

import functools

import jax
from numpyro import handlers

from dmm_jax.continuous_config import LatentODEConfig
from dmm_jax.models.latent_ode.model_guide import guide
from dmm_jax.models.latent_ode.networks import (
    decoder,
    module_field,
    ode_function,
    solve,
)

Array = jax.Array


def posterior_z0(params: dict, key: Array, config: LatentODEConfig, x, lengths, dt, samples: int):
    """``samples`` draws of z_0 from q(z_0 | x) per series, [S, B, Z] (the encoder runs once)."""
    seeded = handlers.seed(handlers.substitute(guide, data=params), key)
    z0 = seeded(x, lengths, config=config, dt=dt, draws=samples)
    return z0 if samples > 1 else z0[None]


def decode_path(params: dict, config: LatentODEConfig, z0: Array, query_times: Array) -> Array:
    """The decoder's mean [..., B, T_q, D] along the path from z0 [..., B, Z] at
    ``query_times`` [B, T_q] (non-decreasing; the first is each series' start time t_0); the
    leading dims (draws) are solved together."""
    f = module_field(ode_function(config), "ode")
    path = solve(f, {"ode": params["ode$params"]}, z0, query_times, config)
    return decoder(config).apply({"params": params["decoder$params"]}, path)


@functools.partial(jax.jit, static_argnames=("config", "samples"))
def predict(
    params: dict,
    key: Array,
    config: LatentODEConfig,
    x: Array,
    lengths: Array,
    dt: Array,
    query_times: Array,
    samples: int = 3,
) -> Array:
    """Predicted means [S, B, T_q, D] at ``query_times`` given the observed ``x`` [B, T, D]
    (NaN: not observed) at the times of ``dt`` [B, T], one per draw of z_0."""
    z0 = posterior_z0(params, key, config, x, lengths, dt, samples)
    return decode_path(params, config, z0, query_times)


@functools.partial(jax.jit, static_argnames=("config", "samples"))
def sample_prior(
    params: dict, key: Array, config: LatentODEConfig, times: Array, samples: int = 1
) -> dict[str, Array]:
    """Series drawn from the model at ``times`` [B, T] (non-decreasing; the first is each
    series' start time t_0): z_0 ~ N(0, I), its path z(t) and x(t) ~ N(W z(t) + b,
    obs_std^2). Returns "z0" [S, B, Z], "mean" (W z(t) + b) and "x", both [S, B, T, D]."""
    z_key, x_key = jax.random.split(key)
    z0 = jax.random.normal(z_key, (samples, times.shape[0], config.z_dim))
    mean = decode_path(params, config, z0, times)
    x = mean + config.obs_std * jax.random.normal(x_key, mean.shape)
    return {"z0": z0, "mean": mean, "x": x}
