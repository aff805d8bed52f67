"""Observation models p(x_t | c_t) from a conditioning feature c_t: the VRNN's, and the
sampling and means that generation uses for every family (the DMM keeps the reference's
emitters, ``dmm_jax.nn``).

    bernoulli:  p(x_t | c_t) = prod_i Bernoulli(x_ti; sigmoid(l_i(c_t)))       0/1 piano rolls
    gaussian:   p(x_t | c_t) = N(x_t; m(c_t), diag s(c_t)^2)                   real values
    gmm:        p(x_t | c_t) = sum_k pi_k(c_t) N(x_t; m_k(c_t), diag s_k(c_t)^2)  K components

Scales are softplus(.) + ``SCALE_FLOOR``: a component can sharpen on a data point but never
collapse to a zero width, whose log density would overflow. ``EmissionHead`` maps features
[..., F] to the parameters (a tuple); ``emission_distribution`` turns them into a NumPyro
distribution with event shape (X,) whose log density skips missing entries (``present``
False): for the mixture, each component is scored on the observed entries only, the marginal
of a diagonal Gaussian.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import Distribution, constraints

from dmm_jax.nn import Linear

Array = jax.Array

SCALE_FLOOR = 1e-3
# What padded steps hold for each parameter (a valid distribution; masked out anyway).
PADDING_FILL = {"bernoulli": 0.0, "gaussian": (0.0, 1.0), "gmm": (0.0, 0.0, 1.0)}


class EmissionHead(nn.Module):
    """features [..., F] -> the emission's parameters: (logits [..., X],) for bernoulli,
    (loc, scale) [..., X] for gaussian, (mixture logits [..., K], loc, scale [..., K, X]) for
    gmm."""

    kind: str
    obs_dim: int
    components: int = 1

    @nn.compact
    def __call__(self, features: Array) -> tuple[Array, ...]:
        if self.kind == "bernoulli":
            return (Linear(self.obs_dim, name="to_logits")(features),)
        k, x = self.components, self.obs_dim
        shape = features.shape[:-1] + ((k, x) if self.kind == "gmm" else (x,))
        loc = Linear(k * x if self.kind == "gmm" else x, name="to_loc")(features).reshape(shape)
        raw_scale = Linear(k * x if self.kind == "gmm" else x, name="to_scale")(features)
        scale = nn.softplus(raw_scale).reshape(shape) + SCALE_FLOOR
        if self.kind == "gaussian":
            return loc, scale
        return Linear(k, name="to_mixture_logits")(features), loc, scale


def emission_distribution(
    kind: str, params: tuple[Array, ...], present: Array | None = None
) -> Distribution:
    """p(x_t | c_t) with event shape (X,) and batch shape the features' leading shape."""
    if kind == "gmm":
        return DiagonalGaussianMixture(*params, present=present)
    per_entry = dist.Bernoulli(logits=params[0]) if kind == "bernoulli" else dist.Normal(*params)
    if present is not None:
        per_entry = per_entry.mask(present)
    return per_entry.to_event(1)


def emission_mean(kind: str, params: tuple[Array, ...]) -> Array:
    """E[x_t | c_t], [..., X]: note probabilities for bernoulli, the (mixture) mean otherwise."""
    if kind == "bernoulli":
        return jax.nn.sigmoid(params[0])
    if kind == "gaussian":
        return params[0]
    logits, loc, _ = params
    return jnp.sum(jax.nn.softmax(logits, axis=-1)[..., None] * loc, axis=-2)


def emission_sample(kind: str, key: Array, params: tuple[Array, ...]) -> Array:
    """x_t ~ p(x_t | c_t), [..., X], float (0/1 for bernoulli)."""
    if kind == "bernoulli":
        return jax.random.bernoulli(key, jax.nn.sigmoid(params[0])).astype(jnp.float32)
    return emission_distribution(kind, params).sample(key)


class DiagonalGaussianMixture(Distribution):
    """sum_k softmax(logits)_k N(x; loc_k, diag scale_k^2), one event of X dims.

    ``log_prob`` equals NumPyro's ``MixtureSameFamily`` of ``Normal(loc, scale).to_event(1)``
    where every entry is observed; with ``present`` [..., X] it scores the observed entries
    only, in every component.
    """

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector
    reparametrized_params: ClassVar[list] = []

    def __init__(self, logits: Array, loc: Array, scale: Array, present: Array | None = None):
        self.logits, self.loc, self.scale, self.present = logits, loc, scale, present
        super().__init__(batch_shape=logits.shape[:-1], event_shape=loc.shape[-1:])

    def _mixture(self) -> dist.MixtureSameFamily:
        components = dist.Normal(self.loc, self.scale).to_event(1)
        return dist.MixtureSameFamily(dist.CategoricalLogits(self.logits), components)

    def sample(self, key: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        return self._mixture().sample(key, sample_shape)

    def log_prob(self, value: Array) -> Array:
        per_entry = dist.Normal(self.loc, self.scale).log_prob(value[..., None, :])
        if self.present is not None:
            per_entry = jnp.where(self.present[..., None, :], per_entry, 0.0)
        per_component = jnp.sum(per_entry, axis=-1) + jax.nn.log_softmax(self.logits, axis=-1)
        return jax.scipy.special.logsumexp(per_component, axis=-1)

    @property
    def mean(self) -> Array:
        return emission_mean("gmm", (self.logits, self.loc, self.scale))
