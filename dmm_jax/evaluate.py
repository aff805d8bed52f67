"""The evidence lower bound per sequence, and -ELBO per time step over a whole split.

    ELBO(x) = E_q[ log p(x, z) - log q(z | x) ] <= log p(x)

The per-step figure is the reference's: the negative ELBO summed over the split's sequences,
divided by the split's total number of time steps (nats per step).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from dmm_jax.config import DMMConfig
from dmm_jax.data.batching import PaddedSequences, sorted_batches
from dmm_jax.model import guide, model

Array = jax.Array
Params = dict


def _site_log_prob(site: dict) -> Array:
    fn = site["fn"]
    if site["intermediates"]:
        return fn.log_prob(site["value"], site["intermediates"])
    return fn.log_prob(site["value"])


def elbo_per_sequence(
    params: Params,
    key: Array,
    x: Array,
    lengths: Array,
    config: DMMConfig,
    annealing_factor: Array | float = 1.0,
) -> Array:
    """One-sample ELBO of each sequence, [B]: log p(x, z) - log q(z | x) with z ~ q.

    Uses the same key convention as NumPyro's Trace_ELBO (the guide is seeded with the second
    half of ``split(key)``), so ``-sum(elbo_per_sequence(...))`` equals ``Trace_ELBO().loss``
    for the same key. Padded rows (length 0) give exactly 0.
    """
    _, guide_key = jax.random.split(key)
    kwargs = {"config": config}
    args = (x, lengths, annealing_factor)
    seeded_guide = handlers.seed(handlers.substitute(guide, data=params), guide_key)
    guide_trace = handlers.trace(seeded_guide).get_trace(*args, **kwargs)
    replayed = handlers.replay(handlers.substitute(model, data=params), guide_trace)
    model_trace = handlers.trace(replayed).get_trace(*args, **kwargs)

    elbo = jnp.zeros(x.shape[0])
    for site in model_trace.values():
        if site["type"] == "sample":
            elbo = elbo + (site["scale"] if site["scale"] is not None else 1.0) * _site_log_prob(site)
    for site in guide_trace.values():
        if site["type"] == "sample":
            elbo = elbo - (site["scale"] if site["scale"] is not None else 1.0) * _site_log_prob(site)
    return elbo


@functools.partial(jax.jit, static_argnames=("config",))
def _batch_elbo_sum(params: Params, keys: Array, x: Array, lengths: Array, config: DMMConfig):
    """Sum over the batch of the ELBO averaged over one draw per key."""
    elbos = jax.vmap(lambda k: elbo_per_sequence(params, k, x, lengths, config))(keys)
    return jnp.sum(jnp.mean(elbos, axis=0))


def evaluate_split(
    params: Params,
    key: Array,
    sequences: Sequence[np.ndarray] | PaddedSequences,
    config: DMMConfig,
    *,
    num_samples: int = 1,
    batch_size: int = 64,
) -> dict[str, float | int]:
    """-ELBO per time step over a split (sum over sequences / total steps).

    Each sequence's ELBO is averaged over ``num_samples`` draws from the guide. Sequences are
    batched by sorted length and padded to length buckets, so few shapes compile.

    Returns a dict with ``loss_per_step``, ``num_sequences``, ``num_steps``, ``num_samples``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    data = sequences if isinstance(sequences, PaddedSequences) else PaddedSequences(sequences)
    total = 0.0
    for i, indices in enumerate(sorted_batches(data.lengths, batch_size)):
        x, lengths = data.batch(indices, batch_size)
        keys = jax.random.split(jax.random.fold_in(key, i), num_samples)
        total += float(_batch_elbo_sum(params, keys, jnp.asarray(x), jnp.asarray(lengths), config))
    return {
        "loss_per_step": -total / data.num_steps,
        "num_sequences": len(data),
        "num_steps": data.num_steps,
        "num_samples": num_samples,
    }
