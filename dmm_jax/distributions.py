"""Distributions over whole latent trajectories z_{1:T}, each one NumPyro sample site.

A DMM's latent chain is sequential only when it is *sampled*: given a trajectory z_{1:T},
every factor p(z_t | z_{t-1}) or q(z_t | z_{t-1}, h_t) can be scored for all t at once. So
the chains below sample with ``jax.lax.scan`` and score with one batched op on the shifted
trajectory [z_0, z_1, ..., z_{T-1}]; the mean-field guide, with no z_{t-1} dependence, also
samples in one batched op.

Shapes: batch_shape (B,), event_shape (T, Z): one trajectory per sequence is one event.
``log_prob`` returns [B], the sum over real steps (``mask`` [B, T]; padded steps contribute
exactly zero); KL annealing is applied by the model with a NumPyro scale handler.

Noise for step t is drawn from ``fold_in(key, t)``, each entry from its own counter, so
appending padded steps or sequences to a batch leaves the draws of the real ones, and hence
the loss, unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p
from numpyro.distributions import Distribution, constraints

from dmm_jax.real_steps import RealSteps, per_real_step
from dmm_jax.scans import active_steps, scan_up_to

Array = jax.Array
StepFn = Callable[..., tuple[Array, Array]]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def step_noise(key: Array, num_steps: int, shape: tuple[int, ...]) -> Array:
    """Standard normal noise [T, *shape]; entry [t, i, ..., j] depends only on (key, t, the
    entry's index, shape[-1]), so extra steps or extra sequences (padding) leave the other
    entries unchanged."""
    if _is_raw_threefry_key(key):
        draw = functools.partial(_threefry_normal, shape=shape)
    else:  # typed or non-threefry keys: JAX's sampler (partitionable threefry: the same holds)
        draw = functools.partial(jax.random.normal, shape=shape)
    return jax.vmap(lambda t: draw(jax.random.fold_in(key, t)))(jnp.arange(num_steps))


def _is_raw_threefry_key(key: Array) -> bool:
    return key.dtype == jnp.uint32 and key.shape[-1:] == (2,)


def _threefry_normal(key: Array, shape: tuple[int, ...]) -> Array:
    """N(0, 1) draws of ``shape`` from a raw threefry key, both words of every hash used.

    JAX's default sampler hashes each counter and XORs the two output words (so that an
    entry's bits depend on its index only), twice the hashing of using both. Here the counter
    of pair k of row r is r * ceil(W / 2) + k and its two words are entries k and
    k + ceil(W / 2) of that row: an entry still depends on its index only (and on W). For a
    JSB update's noise (96 x 20 x 100) XLA compiled the hashing of JAX's sampler into two
    kernels of 12.7k lines of LLVM IR in all (of 45k for the whole update), this one's into
    1.4k.
    """
    *rows, width = shape
    num_rows, half = math.prod(rows), -(-width // 2)
    counters = jax.lax.iota(jnp.uint32, num_rows * half)
    words = threefry2x32_p.bind(key[0], key[1], counters, jnp.zeros_like(counters))
    bits = jnp.concatenate([w.reshape(num_rows, half) for w in words], axis=-1)[:, :width]
    # 23 random mantissa bits -> [1, 2) -> [0, 1) -> (-1, 1), as jax.random.uniform does.
    unit = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
    lowest = jnp.nextafter(jnp.float32(-1.0), jnp.float32(0.0))
    symmetric = jnp.maximum(lowest, 2.0 * unit - 1.0)
    return (math.sqrt(2.0) * jax.lax.erf_inv(symmetric)).reshape(shape)


def normal_log_prob(value: Array, loc: Array, scale: Array) -> Array:
    """log N(value; loc, diag(scale^2)) summed over the last axis."""
    eps = (value - loc) / scale
    return jnp.sum(-0.5 * eps**2 - jnp.log(scale) - _HALF_LOG_2PI, axis=-1)


def standardized_normal_log_prob(eps: Array, scale: Array) -> Array:
    """log N(loc + scale * eps; loc, scale) through the standardized noise eps.

    Same value and same total gradient as ``normal_log_prob`` of the reparameterized draw,
    but never forms (z - loc) / scale: when q's scale collapses towards zero (or flushes to a
    subnormal on CPU) that quotient is 0/0 and poisons the gradient.
    """
    return jnp.sum(-0.5 * eps**2 - jnp.log(scale) - _HALF_LOG_2PI, axis=-1)


def gaussian_kl(loc_q: Array, scale_q: Array, loc_p: Array, scale_p: Array) -> Array:
    """KL(N(loc_q, diag scale_q^2) || N(loc_p, diag scale_p^2)) summed over the last axis:

    sum_i log(s_p / s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2.
    """
    ratio = (scale_q / scale_p) ** 2 + ((loc_q - loc_p) / scale_p) ** 2
    return jnp.sum(jnp.log(scale_p) - jnp.log(scale_q) + 0.5 * (ratio - 1.0), axis=-1)


def _shift_right(first: Array, z: Array) -> Array:
    """[z_0, z_1, ..., z_{T-1}]: the previous latent of every step, [B, T, Z]."""
    first = jnp.broadcast_to(first, (z.shape[0], 1, z.shape[-1]))
    return jnp.concatenate([first, z[:, :-1]], axis=1)


def _time_major(a: Array) -> Array:
    return jnp.swapaxes(a, 0, 1)


def _masked_sum(per_step: Array, mask: Array | None) -> Array:
    """Sums [B, T] per-step terms over real steps; where, not multiply, so padding is exactly 0."""
    if mask is not None:
        per_step = jnp.where(mask, per_step, 0.0)
    return jnp.sum(per_step, axis=-1)


class MarkovGaussianChain(Distribution):
    """Prior p(z_{1:T}) = prod_t N(z_t; loc(z_{t-1}), scale(z_{t-1})) with z_0 fixed.

    Args:
        transition: maps z_prev [..., Z] (and covariates [..., C] when given) to (loc, scale),
            each [..., Z].
        z_0: the chain's start, [Z].
        batch_size, num_steps: B and T.
        mask: [B, T], True for real steps (default: all real).
        covariates: [B, T, C] or None; step t's transition sees covariates[:, t] (the control
            applied and the time elapsed between steps t-1 and t).
        steps: the batch's real steps (``dmm_jax.real_steps``) or None: scoring then runs the
            transition on those rows only (padded steps get loc 0, scale 1; masked anyway).
    """

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector
    reparametrized_params: ClassVar[list] = []

    def __init__(
        self,
        transition: StepFn,
        z_0: Array,
        batch_size: int,
        num_steps: int,
        mask: Array | None = None,
        covariates: Array | None = None,
        steps: RealSteps | None = None,
    ):
        self.transition = transition
        self.z_0 = z_0
        self.mask = mask
        self.covariates = covariates
        self.steps = steps
        super().__init__(batch_shape=(batch_size,), event_shape=(num_steps, z_0.shape[-1]))

    def _step_params(self, z_prev: Array, covariates: Array | None) -> tuple[Array, Array]:
        if covariates is None:
            return self.transition(z_prev)
        return self.transition(z_prev, covariates)

    def sample(self, key: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        if sample_shape:
            raise NotImplementedError("sample_shape is not supported; vmap over keys instead")
        (batch,), (num_steps, z_dim) = self.batch_shape, self.event_shape
        noise = step_noise(key, num_steps, (batch, z_dim))
        covariates = None if self.covariates is None else _time_major(self.covariates)

        def step(z_prev, inputs):
            eps_t, c_t = inputs
            loc, scale = self._step_params(z_prev, c_t)
            z_t = loc + scale * eps_t
            return z_t, z_t

        z_start = jnp.broadcast_to(self.z_0, (batch, z_dim))
        _, z = jax.lax.scan(step, z_start, (noise, covariates))
        return _time_major(z)

    def log_prob(self, value: Array) -> Array:
        # With real steps, scored on their rows: the Gaussian's arithmetic (and its gradient)
        # then runs on contiguous [R, Z] rows, not on [B, T, Z] read back through the rows'
        # slots, which XLA's CPU backend fuses into one gather kernel run as scalar code.
        def step_log_prob(z_t, z_prev, covariates):
            loc, scale = self._step_params(z_prev, covariates)
            return normal_log_prob(z_t, loc, scale)

        z_prev = _shift_right(self.z_0, value)
        per_step = per_real_step(step_log_prob, self.steps, value, z_prev, self.covariates)
        return _masked_sum(per_step, self.mask)

    def step_params(self, value: Array) -> tuple[Array, Array]:
        """(loc, scale) of p(z_t | z_{t-1}) at the trajectory ``value``, each [B, T, Z]."""
        z_prev = _shift_right(self.z_0, value)
        return per_real_step(
            self._step_params, self.steps, z_prev, self.covariates, fill=(0.0, 1.0)
        )

    def kl_from(self, posterior: Distribution, value: Array, intermediates: list[Array]) -> Array:
        """sum_t KL(q(z_t | z_{<t}, x) || p(z_t | z_{t-1})) per sequence, [B], in closed form
        given the posterior's draw ``value`` (and its sample intermediates), for a posterior
        whose steps are diagonal Gaussians (no flow)."""
        loc_q, scale_q = posterior.step_params(value, intermediates)
        loc_p, scale_p = self.step_params(value)
        return _masked_sum(gaussian_kl(loc_q, scale_q, loc_p, scale_p), self.mask)


class StructuredPosterior(Distribution):
    """Guide q(z_{1:T} | x) = prod_t N(z_t; loc(z_{t-1}, h_t), scale(z_{t-1}, h_t)).

    h_t summarises x_{t:T} (the backward RNN), so this is the paper's ST-R / DKS guide.

    Args:
        combiner: maps (z_prev [..., Z], h [..., H]) to (loc, scale), each [..., Z].
        z_q_0: the guide's start, [Z].
        hidden: encoder states h_{1:T}, [B, T, H].
        mask: [B, T], True for real steps (default: all real).
        trajectory: optional fast sampler (z_start [B, Z], hidden, noise [B, T, Z], mask) ->
            (z, scale), each [B, T, Z], equal to scanning ``combiner`` on the real steps (e.g.
            ``Combiner.sample_trajectory``); default: a plain scan of ``combiner``.
        flow: optional invertible map of each step's Gaussian draw, base [..., Z] ->
            (z [..., Z], log|det| [...]) (e.g. ``InverseAutoregressiveFlow``); the flowed z_t
            is what the next step conditions on, and log q(z_t) = log N(base) - log|det|.
            With a flow, sampling is a plain scan (``trajectory`` is not used).

    ``sample_with_intermediates`` returns the standardized noise and the scales it used (and
    the flow's log-determinants), and ``log_prob`` scores a draw through them (see
    ``standardized_normal_log_prob``).
    """

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector
    reparametrized_params: ClassVar[list] = []

    def __init__(
        self,
        combiner: StepFn,
        z_q_0: Array,
        hidden: Array,
        mask: Array | None = None,
        trajectory: Callable[..., tuple[Array, Array]] | None = None,
        flow: Callable[[Array], tuple[Array, Array]] | None = None,
    ):
        self.combiner = combiner
        self.trajectory = trajectory
        self.flow = flow
        self.z_q_0 = z_q_0
        self.hidden = hidden
        self.mask = mask
        batch, num_steps = hidden.shape[:2]
        super().__init__(batch_shape=(batch,), event_shape=(num_steps, z_q_0.shape[-1]))

    def sample_with_intermediates(
        self, key: Array, sample_shape: tuple[int, ...] = ()
    ) -> tuple[Array, list[Array]]:
        if sample_shape:
            raise NotImplementedError("sample_shape is not supported; vmap over keys instead")
        (batch,), (num_steps, z_dim) = self.batch_shape, self.event_shape
        noise = _time_major(step_noise(key, num_steps, (batch, z_dim)))
        z_start = jnp.broadcast_to(self.z_q_0, (batch, z_dim))
        if self.flow is not None:
            return self._sample_flowed(z_start, noise)
        if self.trajectory is not None:
            z, scale = self.trajectory(z_start, self.hidden, noise, self.mask)
            return z, [noise, scale]

        def step(z_prev, h_t, eps_t):
            loc, scale = self.combiner(z_prev, h_t)
            z_t = loc + scale * eps_t
            return z_t, (z_t, scale)

        z, scale = self._scan(step, z_start, noise, fill=(0.0, 1.0))
        return z, [noise, scale]

    def _sample_flowed(self, z_start: Array, noise: Array) -> tuple[Array, list[Array]]:
        def step(z_prev, h_t, eps_t):
            loc, scale = self.combiner(z_prev, h_t)
            z_t, log_det = self.flow(loc + scale * eps_t)
            return z_t, (z_t, scale, log_det)

        z, scale, log_det = self._scan(step, z_start, noise, fill=(0.0, 1.0, 0.0))
        return z, [noise, scale, log_det]

    def _scan(self, step, z_start: Array, noise: Array, fill: tuple[float, ...]):
        """Runs ``step(z_prev, h_t, eps_t) -> (z_t, outputs)`` over the steps up to the batch's
        last real one; after it (padding for every sequence) the outputs are the constants
        ``fill``, as in ``dmm_jax.scans.combiner_scan``. Returns the outputs, batch-major."""
        num_steps = None if self.mask is None else active_steps(self.mask)
        _, outputs = scan_up_to(
            lambda z_prev, inputs: step(z_prev, *inputs),
            z_start,
            (_time_major(self.hidden), _time_major(noise)),
            num_steps,
            fill,
        )
        return tuple(_time_major(o) for o in outputs)

    def sample(self, key: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        return self.sample_with_intermediates(key, sample_shape)[0]

    def log_prob(self, value: Array, intermediates: list[Array] | None = None) -> Array:
        if intermediates:
            return _log_prob_from_noise(intermediates, self.mask)
        _refuse_flow_without_intermediates(self.flow)
        loc, scale = self.combiner(_shift_right(self.z_q_0, value), self.hidden)
        return _masked_sum(normal_log_prob(value, loc, scale), self.mask)

    def step_params(self, value: Array, intermediates: list[Array]) -> tuple[Array, Array]:
        """(loc, scale) of each step q(z_t | z_{t-1}, x) of a draw without flow, [B, T, Z]."""
        return _step_params(value, intermediates, self.flow)


def _refuse_flow_without_intermediates(flow) -> None:
    if flow is not None:
        raise NotImplementedError(
            "log_prob of a flowed guide needs the sample intermediates (the flow is not "
            "inverted); score draws from sample_with_intermediates"
        )


def _log_prob_from_noise(intermediates: list[Array], mask: Array | None) -> Array:
    """log q of a draw from its standardized noise, scales and (if flowed) log-determinants."""
    eps, scale, *log_det = intermediates
    log_prob = standardized_normal_log_prob(eps, scale)
    if log_det:
        log_prob = log_prob - log_det[0]
    return _masked_sum(log_prob, mask)


def _step_params(value: Array, intermediates: list[Array], flow) -> tuple[Array, Array]:
    if flow is not None:
        raise ValueError("a flowed guide's steps are not Gaussian: no closed-form KL")
    eps, scale = intermediates
    # value = loc + scale * eps, so this is loc in value and in gradient.
    return value - scale * eps, scale


class MeanFieldPosterior(Distribution):
    """Mean-field guide q(z_{1:T} | x) = prod_t N(z_t; loc_t, scale_t), loc and scale functions
    of x only (MF-L: x_{1:t}; MF-LR: x_{1:T}); drawn in one batched op, no scan.

    Args:
        loc, scale: [B, T, Z].
        mask: [B, T], True for real steps (default: all real).
        flow: as in ``StructuredPosterior``, applied to every step at once.
    """

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector
    reparametrized_params: ClassVar[list] = []

    def __init__(
        self,
        loc: Array,
        scale: Array,
        mask: Array | None = None,
        flow: Callable[[Array], tuple[Array, Array]] | None = None,
    ):
        self.loc, self.scale, self.mask, self.flow = loc, scale, mask, flow
        super().__init__(batch_shape=loc.shape[:1], event_shape=loc.shape[1:])

    def sample_with_intermediates(
        self, key: Array, sample_shape: tuple[int, ...] = ()
    ) -> tuple[Array, list[Array]]:
        if sample_shape:
            raise NotImplementedError("sample_shape is not supported; vmap over keys instead")
        (batch,), (num_steps, z_dim) = self.batch_shape, self.event_shape
        noise = _time_major(step_noise(key, num_steps, (batch, z_dim)))
        z = self.loc + self.scale * noise
        if self.flow is None:
            return z, [noise, self.scale]
        z, log_det = self.flow(z)
        return z, [noise, self.scale, log_det]

    def sample(self, key: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        return self.sample_with_intermediates(key, sample_shape)[0]

    def log_prob(self, value: Array, intermediates: list[Array] | None = None) -> Array:
        if intermediates:
            return _log_prob_from_noise(intermediates, self.mask)
        _refuse_flow_without_intermediates(self.flow)
        return _masked_sum(normal_log_prob(value, self.loc, self.scale), self.mask)

    def step_params(self, value: Array, intermediates: list[Array]) -> tuple[Array, Array]:
        """(loc, scale) of each step q(z_t | x), [B, T, Z] (no flow)."""
        del value, intermediates
        if self.flow is not None:
            raise ValueError("a flowed guide's steps are not Gaussian: no closed-form KL")
        return self.loc, self.scale
