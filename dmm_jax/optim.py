"""The optimizer and the KL annealing schedule, as the reference's.

``clipped_adam`` is Pyro's ClippedAdam as an optax transformation over the parameters raveled
into one vector: each gradient element clipped to +-clip_norm, L2 weight decay added to the
gradient, Adam(beta1, beta2, eps) with Pyro's bias correction, and a learning-rate schedule
(``TrainConfig.lr_schedule``). ``average_weights`` keeps an exponential moving average of the
parameters beside it (``TrainConfig.weight_average``). ``annealing_factor`` scales the KL term
per mini-batch.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dmm_jax.config import TrainConfig


def scale_by_pyro_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam moments exactly as torch/Pyro apply them (eps outside the bias correction).

        m_t = b1 m_{t-1} + (1 - b1) g_t,     v_t = b2 v_{t-1} + (1 - b2) g_t^2
        u_t = sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + eps)

    ``optax.scale_by_adam`` adds eps to sqrt(v_hat) instead, which differs when v is tiny.
    """

    def init_fn(params):
        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
        )

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, updates)
        count = state.count + 1
        t = count.astype(jnp.float32)
        step_scale = jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        updates = jax.tree.map(lambda m, v: step_scale * m / (jnp.sqrt(v) + eps), mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int = 1) -> optax.Schedule:
    """Step size at update k = 0, 1, ... (``config.lr_schedule``):

    exponential: learning_rate * lr_decay^(k + 1)                (the reference's: Pyro's
                 ClippedAdam decays its rate before each step, the first one included)
    constant:    learning_rate
    cosine:      learning_rate * (1 + cos(pi k / K)) / 2,  K = epochs * steps_per_epoch
    """
    if config.lr_schedule == "constant":
        return optax.constant_schedule(config.learning_rate)
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(
            config.learning_rate, decay_steps=max(config.epochs * steps_per_epoch, 1)
        )
    return optax.exponential_decay(
        config.learning_rate * config.lr_decay, transition_steps=1, decay_rate=config.lr_decay
    )


def clipped_adam(config: TrainConfig, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """Pyro's ClippedAdam from optax parts.

    Each gradient element is clipped to +-clip_norm, then weight_decay * param is added, then
    Adam; the step size follows ``learning_rate_schedule`` (by default learning_rate *
    lr_decay^(k + 1) at step k = 0, 1, ...). The state has the same structure under every
    schedule.

    Every step is elementwise, so it runs on all parameters raveled into one vector
    (``optax.flatten``): the same numbers, but a handful of fused loops instead of a few per
    parameter array, which compiles about a second faster per batch shape. With
    ``config.weight_average`` the chain ends with ``average_weights``.
    """
    adam = optax.flatten(
        optax.chain(
            optax.clip(config.clip_norm),
            optax.add_decayed_weights(config.weight_decay),
            scale_by_pyro_adam(config.beta1, config.beta2, config.adam_eps),
            optax.scale_by_learning_rate(learning_rate_schedule(config, steps_per_epoch)),
        )
    )
    if config.weight_average:  # outside flatten: the average keeps the parameters' tree
        return optax.chain(adam, average_weights(config.weight_average))
    return adam


class WeightAverage(NamedTuple):
    """State of ``average_weights``: the moving average before its bias correction."""

    total: Any  # sum over updates k of (1 - decay) decay^(n - k) params_k, a parameter pytree
    count: jax.Array  # int32: updates averaged, n
    decay: jax.Array  # float32 scalar, kept so that the state alone gives the average


def average_weights(decay: float) -> optax.GradientTransformation:
    """Passes the updates through unchanged and keeps an exponential moving average of the
    parameters they produce (Polyak averaging with a forgetting factor), read by
    ``averaged_params``. Starting from zero with Adam's bias correction, the average after one
    update is that update's parameters, not a mix with the initial ones."""

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return WeightAverage(zeros, jnp.zeros([], jnp.int32), jnp.asarray(decay, jnp.float32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("average_weights needs the parameters (optax update's params)")
        new_params = optax.apply_updates(params, updates)
        d = state.decay
        total = jax.tree.map(lambda t, p: d * t + (1.0 - d) * p, state.total, new_params)
        return updates, WeightAverage(total, state.count + 1, d)

    return optax.GradientTransformation(init_fn, update_fn)


def averaged_params(optimizer_state: Any, params: Any) -> Any:
    """The moving average that ``average_weights`` keeps somewhere in ``optimizer_state``
    (bias-corrected: total / (1 - decay^count)); ``params`` where there is none or before the
    first update."""
    found = [
        leaf
        for leaf in jax.tree.leaves(
            optimizer_state, is_leaf=lambda node: isinstance(node, WeightAverage)
        )
        if isinstance(leaf, WeightAverage)
    ]
    if not found:
        return params
    (state,) = found
    updated = state.count > 0
    correction = jnp.where(updated, 1.0 - state.decay ** state.count.astype(jnp.float32), 1.0)
    return jax.tree.map(lambda t, p: jnp.where(updated, t / correction, p), state.total, params)


def annealing_factor(epoch: int, batch_index: int, num_batches: int, config: TrainConfig) -> float:
    """KL annealing, advanced per mini-batch: from the minimum to 1 over annealing_epochs,
    linearly as the reference ("linear") or along a half cosine ("cosine")."""
    if config.annealing_epochs > 0 and epoch < config.annealing_epochs:
        progress = (batch_index + epoch * num_batches + 1) / (config.annealing_epochs * num_batches)
        if config.annealing_schedule == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        minimum = config.minimum_annealing_factor
        return minimum + (1.0 - minimum) * progress
    return 1.0
