"""Training objectives: the ELBO with the KL of the latent chain in closed form per step, and
the importance-weighted bound over several draws of every latent path.

NumPyro's ``Trace_ELBO`` (the reference's estimator) scores the guide's draw z ~ q:

    ELBO = log p(x | z) + log p(z) - log q(z | x)

The paper (Krishnan et al. 2017, eq. 6) instead integrates each step's KL analytically, given
the sampled z_{t-1}:

    ELBO = log p(x | z) - sum_t KL(q(z_t | z_{t-1}, x) || p(z_t | z_{t-1}))

Both have the same expectation over z ~ q; the second has less variance. The annealing factor
(the site's scale) multiplies the KL as it multiplies log p(z) - log q(z), and padded steps
contribute exactly zero. It needs every step of q to be a diagonal Gaussian, so not with flows.

The importance-weighted bound (IWAE; Burda, Grosse & Salakhutdinov, ICLR 2016) draws K
independent paths z_k ~ q and averages their weights inside the log:

    IWAE_K = log (1/K) sum_k p(x, z_k) / q(z_k | x)   >=   ELBO,

tighter as K grows and equal to the (sampled) ELBO at K = 1. With annealing, each weight's
latent terms carry the annealing factor as in the ELBO. The particle filter's bound (FIVO)
resamples the draws along the way: ``dmm_jax.filtering``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from numpyro import handlers
from numpyro.infer import ELBO

Array = jax.Array
Trace = dict[str, dict[str, Any]]


def trace_guide_and_model(
    params: dict, key: Array, model: Callable, guide: Callable, *args, **kwargs
) -> tuple[Trace, Trace]:
    """Traces the guide under ``params`` and the model replayed on its draws.

    Seeds the model and the guide with the two halves of ``split(key)``, as ``Trace_ELBO``, so
    the same key gives the same draws (and the same dropout mask) under either objective.
    """
    model_key, guide_key = jax.random.split(key)
    seeded_guide = handlers.seed(handlers.substitute(guide, data=params), guide_key)
    guide_trace = handlers.trace(seeded_guide).get_trace(*args, **kwargs)
    replayed = handlers.replay(handlers.substitute(model, data=params), guide_trace)
    model_trace = handlers.trace(handlers.seed(replayed, model_key)).get_trace(*args, **kwargs)
    return guide_trace, model_trace


def log_weight(
    params: dict, key: Array, model: Callable, guide: Callable, *args, **kwargs
) -> Array:
    """log p(x, z) - log q(z | x) per plate element ([B]) at one guide draw z, each site times
    its handler scale: the one-sample ELBO, ``Trace_ELBO``'s with the same key."""
    guide_trace, model_trace = trace_guide_and_model(params, key, model, guide, *args, **kwargs)
    log_p = sum(scaled_log_prob(s) for s in model_trace.values() if s["type"] == "sample")
    log_q = sum(scaled_log_prob(s) for s in guide_trace.values() if s["type"] == "sample")
    return log_p - log_q


def _scaled(site: dict, value: Array) -> Array:
    return value if site["scale"] is None else site["scale"] * value


def _log_prob(site: dict) -> Array:
    if site["intermediates"]:
        return site["fn"].log_prob(site["value"], site["intermediates"])
    return site["fn"].log_prob(site["value"])


def scaled_log_prob(site: dict) -> Array:
    """A sample site's log density per sequence, [B], times its handler scale."""
    return _scaled(site, _log_prob(site))


def analytic_kl_elbo(guide_trace: Trace, model_trace: Trace) -> Array:
    """ELBO per plate element ([B]) with closed-form KLs.

    A latent site whose prior has ``kl_from`` (``MarkovGaussianChain``) contributes
    -scale * KL(q || p); every other site contributes its scaled log density as in Trace_ELBO.
    """
    elbo = 0.0
    closed_form = set()
    for name, site in guide_trace.items():
        if site["type"] != "sample":
            continue
        prior = model_trace[name]["fn"]
        if hasattr(prior, "kl_from"):
            kl = prior.kl_from(site["fn"], site["value"], site["intermediates"])
            elbo = elbo - _scaled(site, kl)
            closed_form.add(name)
        else:
            elbo = elbo - _scaled(site, _log_prob(site))
    for name, site in model_trace.items():
        if site["type"] == "sample" and name not in closed_form:
            elbo = elbo + _scaled(site, _log_prob(site))
    return elbo


class AnalyticKLTraceELBO(ELBO):
    """``Trace_ELBO`` with the latent chain's KL in closed form (see module docstring).

    One particle, the same key convention as ``Trace_ELBO``; the loss is the negative ELBO
    summed over the mini-batch.
    """

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        guide_trace, model_trace = trace_guide_and_model(
            param_map, rng_key, model, guide, *args, **kwargs
        )
        return {"loss": -jnp.sum(analytic_kl_elbo(guide_trace, model_trace)), "mutable_state": None}


class ImportanceWeightedELBO(ELBO):
    """The IWAE bound with ``num_particles`` = K draws of every latent path (see module
    docstring); the loss is minus the bound summed over the mini-batch. Draw k uses
    ``split(rng_key, K)[k]`` with ``Trace_ELBO``'s convention."""

    def __init__(self, num_particles: int = 1):
        if num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        super().__init__(num_particles=num_particles)

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        keys = jax.random.split(rng_key, self.num_particles)
        weights = jax.vmap(lambda k: log_weight(param_map, k, model, guide, *args, **kwargs))(
            keys
        )  # [K, B]
        bound = jax.scipy.special.logsumexp(weights, axis=0) - jnp.log(self.num_particles)
        return {"loss": -jnp.sum(bound), "mutable_state": None}


class FilteringObjective(ELBO):
    """The particle filter's bound (FIVO; ``dmm_jax.filtering``) of a family's
    ``particle_filter(params, key, *args, num_particles, resampling, **kwargs)`` (with its
    config bound); the loss is minus the bound summed over the mini-batch. The model and guide
    SVI passes are not traced (they only name the parameters)."""

    def __init__(self, particle_filter: Callable, num_particles: int, resampling: str):
        super().__init__(num_particles=num_particles)
        self.particle_filter, self.resampling = particle_filter, resampling

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        del model, guide
        log_z, _ = self.particle_filter(
            param_map,
            rng_key,
            *args,
            num_particles=self.num_particles,
            resampling=self.resampling,
            **kwargs,
        )
        return {"loss": -jnp.sum(log_z), "mutable_state": None}
