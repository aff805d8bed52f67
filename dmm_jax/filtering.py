"""A particle filter over a model with a latent per step: the filtering bound (FIVO; Maddison
et al., NeurIPS 2017) and its estimate of log p(x).

K particles per sequence are proposed step by step from the guide, weighted by

    alpha_t = p(x_t | z_{<=t}, x_{<t}) p(z_t | z_{<t}, x_{<t}) / q(z_t | z_{<t}, x),

and resampled whenever the effective sample size of a sequence's weights falls below K / 2:

    log p^(x) = sum over resampling points and the end of log (1/K) sum_k w_k,

an unbiased estimate of p(x) whose log is a lower bound on log p(x) in expectation, tighter than
the importance-weighted bound with the same K on long sequences. With K = 1 nothing is resampled
and it is the one-sample ELBO. The gradient drops the resampling's score-function term, as the
paper does (the ancestor indices are integers, constants to autodiff).

A family provides one step, ``step(carry, inputs_t, noise_t) -> (carry, log_alpha [B, K], z_t)``
on particles [B, K, ...]; this module runs it over time in ``jax.lax.scan``. Padded steps
(``mask`` False) leave a sequence's particles and weights as they were. An annealing factor
scales the latent terms log p(z_t | ...) - log q(z_t | ...) as in the ELBO.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dmm_jax.config import RESAMPLING
from dmm_jax.distributions import step_noise
from dmm_jax.scans import active_steps, scan_up_to

Array = jax.Array


def per_particle(a: Array | None, num_particles: int) -> Array | None:
    """[B, ...] -> [B, K, ...], the same for every particle (None stays None)."""
    if a is None:
        return None
    return jnp.broadcast_to(a[:, None], (a.shape[0], num_particles, *a.shape[1:]))


def effective_sample_size(log_weights: Array) -> Array:
    """1 / sum_k w_k^2 of the normalised weights, per row of log_weights [B, K]: [B]."""
    lse = jax.scipy.special.logsumexp
    return jnp.exp(2.0 * lse(log_weights, axis=-1) - lse(2.0 * log_weights, axis=-1))


def resample(key: Array, log_weights: Array, scheme: str) -> Array:
    """Ancestor indices [B, K], each row drawn in proportion to exp(log_weights[b]).

    systematic: one uniform per row, points (u + k) / K through the cumulative weights (lower
    variance); multinomial: K independent draws per row. A row's draws depend on its index
    only, not on the batch's size, so padding or sharding a batch leaves them unchanged.
    """
    batch, num = log_weights.shape
    if scheme == "multinomial":  # Gumbel-max per draw: row b's noise depends on b alone
        gumbel = jax.random.gumbel(key, (batch, num, num))
        return jnp.argmax(log_weights[:, None, :] + gumbel, axis=-1)
    if scheme != "systematic":
        raise ValueError(f"resampling must be one of {RESAMPLING}, got {scheme!r}")
    points = (jax.random.uniform(key, (batch, 1)) + jnp.arange(num)) / num
    cumulative = jnp.cumsum(jax.nn.softmax(log_weights, axis=-1), axis=-1)
    ancestors = jnp.sum(points[:, :, None] >= cumulative[:, None, :], axis=-1)
    return jnp.minimum(ancestors, num - 1)


def _take_particles(tree: Any, ancestors: Array, where: Array) -> Any:
    """Each leaf [B, K, ...] with its particles replaced by their ancestors' where ``where``
    [B] is True."""

    def take(leaf):
        index = ancestors.reshape(ancestors.shape + (1,) * (leaf.ndim - 2))
        chosen = jnp.take_along_axis(leaf, index, axis=1)
        return jnp.where(where.reshape((-1,) + (1,) * (leaf.ndim - 1)), chosen, leaf)

    return jax.tree.map(take, tree)


def particle_filter(
    step: Callable,
    carry: Any,
    inputs: Any,
    mask: Array,
    key: Array,
    num_particles: int,
    z_dim: int,
    resampling: str = "systematic",
    keep_particles: bool = False,
) -> tuple[Array, Array | None]:
    """log p^(x) per sequence, [B], and each step's proposed particles z [T, B, K, Z] if
    ``keep_particles`` (else None: nothing of size T x K is kept; zero past the batch's
    longest sequence, where nothing is proposed).

    ``carry``: the particles' state, leaves [B, K, ...]; ``inputs``: time-major leaves
    [T, B, ...] given to ``step`` one step at a time; ``mask`` [B, T]: real steps. Noise for
    step t is ``step_noise`` of the first half of ``split(key)``; resampling uses the second.
    """
    if resampling not in RESAMPLING:
        raise ValueError(f"resampling must be one of {RESAMPLING}, got {resampling!r}")
    batch, num_steps = mask.shape
    noise_key, resample_key = jax.random.split(key)
    noise = step_noise(noise_key, num_steps, (batch, num_particles, z_dim))
    log_k = jnp.log(num_particles)

    def advance(state, per_step):
        carry, log_w, log_z = state
        t, inputs_t, noise_t, real = per_step
        proposed, log_alpha, z_t = step(carry, inputs_t, noise_t)
        carry = jax.tree.map(
            lambda new, old: jnp.where(real.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
            proposed,
            carry,
        )
        log_w = log_w + jnp.where(real[:, None], log_alpha, 0.0)
        collapse = real & (effective_sample_size(log_w) < num_particles / 2)
        lse = jax.scipy.special.logsumexp(log_w, axis=-1)
        log_z = log_z + jnp.where(collapse, lse - log_k, 0.0)
        ancestors = resample(jax.random.fold_in(resample_key, t), log_w, resampling)
        carry = _take_particles(carry, jax.lax.stop_gradient(ancestors), collapse)
        log_w = jnp.where(collapse[:, None], 0.0, log_w)
        return (carry, log_w, log_z), (z_t if keep_particles else None)

    start = (carry, jnp.zeros((batch, num_particles)), jnp.zeros(batch))
    per_step = (jnp.arange(num_steps), inputs, noise, mask.T)
    # Steps past the batch's longest sequence are padding for every sequence: skipped, so a
    # batch padded to a coarse length bucket costs no work there (as in the ELBO's loops).
    (_, log_w, log_z), z = scan_up_to(advance, start, per_step, active_steps(mask))
    return log_z + jax.scipy.special.logsumexp(log_w, axis=-1) - log_k, z
