"""Using a trained DMM: sample from the prior, and forecast the continuation of a prefix.

Plain functions of (params, key, data); ``params`` is what ``fit`` or ``load_run`` returns.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from numpyro import handlers

from dmm_jax.config import DMMConfig
from dmm_jax.distributions import MarkovGaussianChain
from dmm_jax.model import guide
from dmm_jax.nn import BernoulliEmitter, GatedTransition

Array = jax.Array


def _networks(params: dict, config: DMMConfig):
    if config.emission != "bernoulli" or config.transition != "gated" or config.covariate_dim:
        raise NotImplementedError(
            "dmm_jax.generate samples and forecasts Bernoulli models with the gated transition "
            "and no inputs or time gaps only"
        )
    transition = functools.partial(
        GatedTransition(config.z_dim, config.transition_dim).apply,
        {"params": params["transition$params"]},
    )
    emitter = functools.partial(
        BernoulliEmitter(config.obs_dim, config.emission_dim).apply,
        {"params": params["emitter$params"]},
    )
    return transition, emitter


def _roll_out(params, key, config, z_start, num_steps):
    """z_{1:T} from the prior chain started at z_start [N, Z]; then x ~ p(x | z)."""
    transition, emitter = _networks(params, config)
    z_key, x_key = jax.random.split(key)
    z = MarkovGaussianChain(transition, z_start, z_start.shape[0], num_steps).sample(z_key)
    logits = emitter(z)
    probs = jax.nn.sigmoid(logits)
    x = jax.random.bernoulli(x_key, probs).astype(jnp.uint8)
    return {"z": z, "logits": logits, "probs": probs, "x": x}


@functools.partial(jax.jit, static_argnames=("config", "num_sequences", "num_steps"))
def sample_prior(
    params: dict, key: Array, config: DMMConfig, num_sequences: int, num_steps: int
) -> dict[str, Array]:
    """Draws N sequences of T steps from p(x, z): z [N, T, Z]; logits, probs, x [N, T, X].

    The same key gives the same sequences.
    """
    z_0 = jnp.broadcast_to(params["z_0"], (num_sequences, config.z_dim))
    return _roll_out(params, key, config, z_0, num_steps)


@functools.partial(jax.jit, static_argnames=("config", "horizon", "num_samples"))
def forecast(
    params: dict,
    key: Array,
    x_prefix: Array,
    prefix_lengths: Array,
    config: DMMConfig,
    horizon: int,
    num_samples: int = 1,
) -> dict[str, Array]:
    """Continues each prefix x_{1:k} for ``horizon`` steps.

    z_k is drawn from the guide run over the prefix only (so h_t summarises x_{t:k}), then the
    transition is rolled forward and x emitted. Returns, with S = num_samples draws:
    ``logits`` and ``probs`` [S, N, horizon, X] (per-step note probabilities), ``x`` samples
    [S, N, horizon, X], and ``mean_probs`` [N, horizon, X] (the predictive marginals).
    """

    def one(key):
        guide_key, roll_key = jax.random.split(key)
        seeded = handlers.seed(handlers.substitute(guide, data=params), guide_key)
        z = handlers.trace(seeded).get_trace(x_prefix, prefix_lengths, config=config)["z"]["value"]
        last = jnp.take_along_axis(z, (prefix_lengths - 1)[:, None, None], axis=1)[:, 0]
        # An empty prefix starts from the prior's z_0.
        z_start = jnp.where((prefix_lengths > 0)[:, None], last, params["z_0"])
        return _roll_out(params, roll_key, config, z_start, horizon)

    draws = jax.vmap(one)(jax.random.split(key, num_samples))
    draws.pop("z")
    return {**draws, "mean_probs": draws["probs"].mean(0)}


def forecast_log_likelihood(logits: Array, x_future: Array, lengths: Array) -> Array:
    """log p(x_future | prefix) per sequence, [N], estimated by log (1/S) sum_s prod_t p_s(x_t).

    ``logits`` [S, N, H, X] from ``forecast``; ``x_future`` [N, H, X]; steps t >= lengths[n]
    are ignored (a continuation shorter than the horizon). Scored from logits, so saturated
    notes never give log(0).
    """
    log_p = x_future * jax.nn.log_sigmoid(logits) + (1 - x_future) * jax.nn.log_sigmoid(-logits)
    keep = jnp.arange(logits.shape[2])[None, :] < lengths[:, None]
    per_draw = jnp.sum(jnp.where(keep[None, ..., None], log_p, 0.0), axis=(2, 3))
    return jax.scipy.special.logsumexp(per_draw, axis=0) - jnp.log(logits.shape[0])
