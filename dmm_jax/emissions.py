"""Observation models p(x_t | c_t) from a conditioning feature c_t: the VRNN's, and the
sampling and means that generation uses for every family (the DMM keeps the reference's
emitters, ``dmm_jax.nn``).

    bernoulli:  p(x_t | c_t) = prod_i Bernoulli(x_ti; sigmoid(l_i(c_t)))       0/1 piano rolls
    gaussian:   p(x_t | c_t) = N(x_t; m(c_t), diag s(c_t)^2)                   real values
    gmm:        p(x_t | c_t) = sum_k pi_k(c_t) N(x_t; m_k(c_t), diag s_k(c_t)^2)  K components
    nade:       p(x_t | c_t) = prod_d Bernoulli(x_td; sigmoid(b_d(c_t) + V_d . h_d)),      0/1,
                h_d = sigmoid(a(c_t) + W[:, <d] x_t,<d)       notes conditioned on lower notes

Scales are softplus(.) + ``SCALE_FLOOR``: a component can sharpen on a data point but never
collapse to a zero width, whose log density would overflow. ``EmissionHead`` maps features
[..., F] to the parameters (a tuple); ``emission_distribution`` turns them into a NumPyro
distribution with event shape (X,) whose log density skips missing entries (``present``
False): for the mixture, each component is scored on the observed entries only, the marginal
of a diagonal Gaussian.

The NADE (Larochelle & Murray, AISTATS 2011; the DMM's emission in Krishnan et al. 2017,
Table 4) makes each note depend on the notes below it, so chords need not be independent
given the latent. Its biases a(c_t) [..., H] and b(c_t) [..., X] come from the head per step;
its weights W [H, X] and V [X, H] are shared by all steps (``NADEWeights``, a module of its
own, so that running the head on real steps only never touches them) and join the biases in
the parameter tuple (``with_nade_weights``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import Distribution, constraints

from dmm_jax.nn import Linear, uniform_init
from dmm_jax.real_steps import per_real_step

Array = jax.Array

SCALE_FLOOR = 1e-3
# What padded steps hold for each parameter (a valid distribution; masked out anyway).
PADDING_FILL = {
    "bernoulli": 0.0,
    "gaussian": (0.0, 1.0),
    "gmm": (0.0, 0.0, 1.0),
    "nade": (0.0, 0.0),
}


class EmissionHead(nn.Module):
    """features [..., F] -> the emission's parameters: (logits [..., X],) for bernoulli,
    (loc, scale) [..., X] for gaussian, (mixture logits [..., K], loc, scale [..., K, X]) for
    gmm, (hidden bias [..., H], visible bias [..., X]) for nade (its weights apart)."""

    kind: str
    obs_dim: int
    components: int = 1
    nade_hidden: int = 100

    @nn.compact
    def __call__(self, features: Array) -> tuple[Array, ...]:
        if self.kind == "bernoulli":
            return (Linear(self.obs_dim, name="to_logits")(features),)
        if self.kind == "nade":
            return nade_biases(self, features, self.obs_dim, self.nade_hidden)
        k, x = self.components, self.obs_dim
        shape = features.shape[:-1] + ((k, x) if self.kind == "gmm" else (x,))
        loc = Linear(k * x if self.kind == "gmm" else x, name="to_loc")(features).reshape(shape)
        raw_scale = Linear(k * x if self.kind == "gmm" else x, name="to_scale")(features)
        scale = nn.softplus(raw_scale).reshape(shape) + SCALE_FLOOR
        if self.kind == "gaussian":
            return loc, scale
        return Linear(k, name="to_mixture_logits")(features), loc, scale


def nade_biases(
    module: nn.Module, features: Array, obs_dim: int, hidden: int
) -> tuple[Array, Array]:
    """A NADE's per-step biases from features [..., F], as layers of ``module`` (compact)."""
    hidden_bias = Linear(hidden, name="to_nade_hidden_bias")(features)
    return hidden_bias, Linear(obs_dim, name="to_logits")(features)


class NADEWeights(nn.Module):
    """A NADE's shared weights: W [H, X] (note d into the hidden units of notes above it) and
    V [X, H] (note d's readout of its hidden units), initialised as PyTorch's linear layers."""

    obs_dim: int
    hidden: int

    @nn.compact
    def __call__(self) -> tuple[Array, Array]:
        x, h = self.obs_dim, self.hidden
        w = self.param("W", uniform_init(1.0 / math.sqrt(x)), (h, x))
        v = self.param("V", uniform_init(1.0 / math.sqrt(h)), (x, h))
        return w, v


def with_nade_weights(biases: tuple[Array, Array], weights: tuple[Array, Array]) -> tuple:
    """(hidden bias, visible bias, W, V): the weights with leading unit axes, one per leading
    axis of the biases, so that stacking parameter tuples (vmap, scan) keeps them broadcast."""
    lead = (1,) * (biases[0].ndim - 1)
    w, v = weights
    return (*biases, w.reshape(lead + w.shape), v.reshape(lead + v.shape))


def emission_distribution(
    kind: str, params: tuple[Array, ...], present: Array | None = None, steps=None
) -> Distribution:
    """p(x_t | c_t) with event shape (X,) and batch shape the features' leading shape. With
    ``steps`` (``dmm_jax.real_steps``) a NADE scores the batch's real steps only."""
    if kind == "gmm":
        return DiagonalGaussianMixture(*params, present=present)
    if kind == "nade":
        return NADE(*params, present=present, steps=steps)
    per_entry = dist.Bernoulli(logits=params[0]) if kind == "bernoulli" else dist.Normal(*params)
    if present is not None:
        per_entry = per_entry.mask(present)
    return per_entry.to_event(1)


def emission_mean(kind: str, params: tuple[Array, ...]) -> Array:
    """E[x_t | c_t], [..., X]: note probabilities for bernoulli, the (mixture) mean otherwise.
    A NADE's note marginals have no closed form: see ``note_logits``."""
    if kind == "bernoulli":
        return jax.nn.sigmoid(params[0])
    if kind == "nade":
        raise ValueError("a NADE's note marginals have no closed form; use note_logits(x)")
    if kind == "gaussian":
        return params[0]
    logits, loc, _ = params
    return jnp.sum(jax.nn.softmax(logits, axis=-1)[..., None] * loc, axis=-2)


def emission_sample(kind: str, key: Array, params: tuple[Array, ...]) -> Array:
    """x_t ~ p(x_t | c_t), [..., X], float (0/1 for bernoulli and nade)."""
    if kind == "bernoulli":
        return jax.random.bernoulli(key, jax.nn.sigmoid(params[0])).astype(jnp.float32)
    return emission_distribution(kind, params).sample(key)


def note_logits(kind: str, params: tuple[Array, ...], x: Array) -> Array:
    """logit p(x_td = 1 | x_t,<d, c_t) per note at the 0/1 values ``x`` [..., X]: what scores
    x (sum over d of the Bernoulli log densities is log p(x_t | c_t)). For bernoulli these are
    the emission's logits, whatever x; for nade they follow x's lower notes, so at a draw of
    x they are a one-draw unbiased estimate of the note marginals (E[p(x_d | x_<d)] = p(x_d))."""
    if kind == "bernoulli":
        return jnp.broadcast_to(params[0], jnp.broadcast_shapes(params[0].shape, x.shape))
    if kind == "nade":
        return NADE(*params).conditional_logits(x)
    raise ValueError(f"note_logits needs a 0/1 emission (bernoulli or nade), got {kind!r}")


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


class NADE(Distribution):
    """A conditional NADE over 0/1 vectors of X notes, one event per step:

        p(x | a, b) = prod_d Bernoulli(x_d; sigmoid(b_d + V_d . h_d)),
        h_d = sigmoid(a + sum_{j<d} W[:, j] x_j).

    ``hidden_bias`` [..., H] and ``visible_bias`` [..., X] per step; ``weights`` W [..., H, X]
    and ``readout`` V [..., X, H] broadcast against them (leading axes right-aligned).
    ``log_prob`` scores all notes in one pass (an exclusive cumulative sum over notes, as one
    matmul, gives every h_d at once); ``sample`` draws note after note with a scan. With ``present``
    [..., X], notes marked False are not scored; later notes still read them (as given, 0
    where missing): the observed notes' conditionals, not their marginal. With ``steps`` (the
    batch's real steps, ``dmm_jax.real_steps``; biases and values [B, T, ...]) ``log_prob``
    runs on those rows only, padded steps scoring 0.
    """

    arg_constraints: ClassVar[dict] = {}
    support = constraints.independent(constraints.boolean, 1)
    reparametrized_params: ClassVar[list] = []

    def __init__(self, hidden_bias, visible_bias, weights, readout, present=None, steps=None):
        self.hidden_bias, self.visible_bias = hidden_bias, visible_bias
        self.weights, self.readout, self.present = weights, readout, present
        self.steps = steps
        batch_shape = jnp.broadcast_shapes(
            hidden_bias.shape[:-1], visible_bias.shape[:-1], weights.shape[:-2], readout.shape[:-2]
        )
        super().__init__(batch_shape=batch_shape, event_shape=visible_bias.shape[-1:])

    def conditional_logits(self, value: Array) -> Array:
        """logit p(x_d = 1 | x_<d) for every note d at ``value`` [..., X]: [..., X]."""
        return _nade_logits(self.hidden_bias, self.visible_bias, self.weights, self.readout, value)

    def log_prob(self, value: Array) -> Array:
        weights, readout = self.weights, self.readout
        shared = math.prod(weights.shape[:-2]) == 1 and math.prod(readout.shape[:-2]) == 1
        if shared:  # one W and V for every step: drop their leading unit axes
            weights, readout = (a.reshape(a.shape[-2:]) for a in (weights, readout))

        def score(hidden_bias, visible_bias, value, present):
            logits = _nade_logits(hidden_bias, visible_bias, weights, readout, value)
            log_p = value * jax.nn.log_sigmoid(logits) + (1 - value) * jax.nn.log_sigmoid(-logits)
            return jnp.sum(log_p if present is None else jnp.where(present, log_p, 0.0), axis=-1)

        def score_steps(*args):
            shape = jnp.broadcast_shapes(*(a.shape[:-1] for a in args if a is not None))
            if not shared or math.prod(shape) <= NADE_CHUNK_ROWS:
                return score(*args)

            def as_rows(a):  # [*shape, n] -> [steps, n]
                if a is None:
                    return None
                return jnp.broadcast_to(a, shape + a.shape[-1:]).reshape(-1, a.shape[-1])

            rows = [as_rows(a) for a in args]
            return in_row_chunks(score, NADE_CHUNK_ROWS, *rows).reshape(shape)

        args = (self.hidden_bias, self.visible_bias, value, self.present)
        return per_real_step(score_steps, self.steps, *args)

    def sample(self, key: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        shape = sample_shape + self.batch_shape
        num_notes = self.event_shape[0]
        uniforms = jax.random.uniform(key, (num_notes, *shape))
        per_note = (
            jnp.moveaxis(jnp.broadcast_to(self.visible_bias, (*shape, num_notes)), -1, 0),
            jnp.moveaxis(self.readout, -2, 0),  # V_d [..., H]
            jnp.moveaxis(self.weights, -1, 0),  # W[:, d] [..., H]
            uniforms,
        )

        def note(into_hidden, inputs):
            b_d, v_d, w_d, u_d = inputs
            logit = b_d + jnp.sum(jax.nn.sigmoid(into_hidden) * v_d, axis=-1)
            x_d = (u_d < jax.nn.sigmoid(logit)).astype(jnp.float32)
            return into_hidden + x_d[..., None] * w_d, x_d

        start = jnp.broadcast_to(self.hidden_bias, (*shape, self.hidden_bias.shape[-1]))
        _, notes = jax.lax.scan(note, start, per_note)
        return jnp.moveaxis(notes, 0, -1)


# Notes per block of the NADE's cumulative sum (88 keys: 11 blocks, no padding).
_NADE_BLOCK = 8
# Steps whose NADE log densities are computed at once. Each step holds [notes, hidden]
# activations (88 x 100 floats on piano rolls): a Nottingham training batch of 20 pieces of
# 1,792 steps would hold 1.3 GB per such array, several of them kept for the gradient. More
# steps than this are scored in chunks of this many, each recomputed in the backward pass, so
# memory holds one chunk's activations. No JSB training batch (at most 20 x 144 steps) is
# chunked.
NADE_CHUNK_ROWS = 4096


def in_row_chunks(fn, chunk: int, *rows: Array | None) -> Array:
    """``fn(*rows)`` -> [N] for arrays [N, ...] (None passes through), computed ``chunk`` rows
    at a time (the last chunk padded with zeros, dropped after) in a ``lax.map`` of a
    ``jax.checkpoint``-ed ``fn``: its activations are recomputed in the backward pass instead
    of kept for every chunk. The same values and gradients as ``fn(*rows)``."""
    count = -(-rows[0].shape[0] // chunk)

    def split(a):
        if a is None:
            return None
        a = jnp.pad(a, [(0, count * chunk - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(count, chunk, *a.shape[1:])

    remat = jax.checkpoint(lambda parts: fn(*parts), prevent_cse=False)
    out = jax.lax.map(remat, tuple(split(a) for a in rows))
    return out.reshape(-1)[: rows[0].shape[0]]


def _nade_logits(hidden_bias, visible_bias, weights, readout, value: Array) -> Array:
    """The NADE's logit p(x_d = 1 | x_<d) for every note d at ``value`` [..., X]."""
    num_notes, hidden_units = value.shape[-1], hidden_bias.shape[-1]
    # The exclusive cumulative sum over notes, sum_{j<d} x_j W[:, j] for every d, in blocks of
    # notes: within a block as one matmul with [j < d] W[:, j] laid out [block (j), block * H
    # (d, h)], plus the sums of all earlier blocks (a matmul with [c' < c] over block totals).
    # On CPU the log density and its gradient ran 1.4x faster than one such matmul over all
    # 88 notes (9x the multiply-adds; 3000 rows, H = 100); jnp.cumsum over the [..., X, H]
    # products, which XLA runs as a windowed reduction, was slower than either.
    block = min(_NADE_BLOCK, num_notes)
    num_blocks = -(-num_notes // block)
    pad = num_blocks * block - num_notes
    value = jnp.pad(value, [(0, 0)] * (value.ndim - 1) + [(0, pad)])
    by_row = jnp.swapaxes(weights, -1, -2)  # W^T [..., X, H]
    by_row = jnp.pad(by_row, [(0, 0)] * (by_row.ndim - 2) + [(0, pad), (0, 0)])
    by_row = by_row.reshape(*by_row.shape[:-2], num_blocks, block, hidden_units)
    value_blocks = value.reshape(*value.shape[:-1], num_blocks, 1, block)
    earlier = jnp.tril(jnp.ones((block, block), value.dtype), -1).T  # [j, d]: j < d
    by_note = earlier[:, :, None] * by_row[..., :, :, None, :]  # [..., blocks, j, d, H]
    by_note = by_note.reshape(*by_note.shape[:-3], block, block * hidden_units)
    within = (value_blocks @ by_note)[..., 0, :]
    within = within.reshape(*within.shape[:-2], num_blocks, block, hidden_units)
    totals = (value_blocks @ by_row)[..., 0, :]  # [..., blocks, H]
    earlier_blocks = jnp.tril(jnp.ones((num_blocks, num_blocks), value.dtype), -1)  # c' < c
    below = within + (earlier_blocks @ totals)[..., :, None, :]
    below = below.reshape(*below.shape[:-3], num_blocks * block, hidden_units)[..., :num_notes, :]
    hidden = jax.nn.sigmoid(hidden_bias[..., None, :] + below)
    return visible_bias + jnp.sum(hidden * readout, axis=-1)
