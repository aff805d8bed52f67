"""Training: the ClippedAdam optimizer, KL annealing, the jitted SVI update and the epoch loop.

The update is NumPyro's ``SVI.update`` with ``Trace_ELBO`` under ``jax.jit``; its loss is the
negative ELBO summed over the mini-batch, as in the reference, so the same hyperparameters mean
the same thing. Batches come padded to length buckets (``dmm_jax.data.batching``), so a run
compiles a handful of shapes; the annealing factor is a traced array and never recompiles.

Randomness: one root key from ``TrainConfig.seed`` is split into (svi, data, eval) keys; epoch
e shuffles with ``fold_in(data_key, e)`` and evaluates with ``fold_in(eval_key, e)``, and the
SVI state carries its own key, so a run resumed from a checkpoint repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.svi import SVIState
from numpyro.optim import optax_to_numpyro
from tqdm.auto import tqdm

from dmm_jax import distributed
from dmm_jax.checkpoint import (
    BEST_FILE,
    CHECKPOINT_FILE,
    CheckpointError,
    checkpoint_path,
    read_checkpoint,
    restore_state,
    save_checkpoint,
)
from dmm_jax.config import DMMConfig, TrainConfig
from dmm_jax.data.arrays import SequenceArrays
from dmm_jax.data.batching import (
    PaddedSequences,
    epoch_batches,
    group_real_steps,
    microbatch_count,
    real_step_capacities,
)
from dmm_jax.evaluate import evaluate_split
from dmm_jax.models import family_of
from dmm_jax.objectives import AnalyticKLTraceELBO
from dmm_jax.real_steps import grouped_real_steps, real_steps
from dmm_jax.runtime import compiler_options as default_compiler_options

Array = jax.Array


# ----------------------------------------------------------------------------- optimizer


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
    parameter array, which compiles about a second faster per batch shape.
    """
    return optax.flatten(
        optax.chain(
            optax.clip(config.clip_norm),
            optax.add_decayed_weights(config.weight_decay),
            scale_by_pyro_adam(config.beta1, config.beta2, config.adam_eps),
            optax.scale_by_learning_rate(learning_rate_schedule(config, steps_per_epoch)),
        )
    )


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


# ----------------------------------------------------------------------------- SVI


class TrainState(NamedTuple):
    """Everything a resumed run needs besides the configs."""

    svi_state: SVIState
    epoch: Array  # int32 scalar: number of completed epochs
    data_key: Array  # shuffles the training set, one fold_in per epoch
    eval_key: Array


def build_svi(model_config: Any, train_config: TrainConfig, steps_per_epoch: int = 1) -> SVI:
    """NumPyro SVI over the model/guide of ``model_config``'s family (``dmm_jax.models``) with
    ClippedAdam and Trace_ELBO (``kl="sampled"``) or the closed-form-KL ELBO
    (``kl="analytic"``). ``steps_per_epoch`` sets the length of a cosine learning-rate
    schedule (``fit`` passes the real number)."""
    if train_config.kl == "analytic" and getattr(model_config, "num_iafs", 0):
        raise ValueError(
            "TrainConfig.kl='analytic' needs Gaussian guide steps: not available with "
            f"DMMConfig.num_iafs={model_config.num_iafs}; use kl='sampled'"
        )
    family = family_of(model_config)
    return SVI(
        functools.partial(family.model, config=model_config),
        functools.partial(family.guide, config=model_config),
        optax_to_numpyro(clipped_adam(train_config, steps_per_epoch)),
        AnalyticKLTraceELBO() if train_config.kl == "analytic" else Trace_ELBO(),
    )


def init_train_state(
    svi: SVI, seed: int, obs_dim: int, covariates: dict[str, Array] | None = None
) -> TrainState:
    """Initial parameters and optimizer state from ``seed`` (shape-independent).

    ``covariates``: example ``inputs``/``dt`` when the model takes them
    (``dmm_jax.models.common.example_covariates``).
    """
    svi_key, data_key, eval_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jnp.zeros((1, 1, obs_dim), jnp.float32)
    svi_state = svi.init(svi_key, x, jnp.ones(1, jnp.int32), jnp.float32(1.0), **(covariates or {}))
    return TrainState(svi_state, jnp.int32(0), data_key, eval_key)


def microbatched_update(
    svi: SVI, num_microbatches: int, svi_state: SVIState, x, lengths, annealing, **covariates
):
    """``svi.update`` with the batch's loss and gradient summed over ``num_microbatches`` groups
    of its sequences, each differentiated on its own inside a scan.

    The ELBO is a sum over sequences, so this is the same estimator with a fraction of the
    activations alive at once; micro-batch c draws its noise from ``fold_in(step_key, c)``.
    ``steps``, if passed, holds each micro-batch's real steps (``grouped_real_steps``).
    """
    if jax.tree.leaves(svi_state.mutable_state):
        raise NotImplementedError("micro-batching does not support mutable model state")
    rng_key, step_key = jax.random.split(svi_state.rng_key)
    params = svi.optim.get_params(svi_state.optim_state)

    def accumulate(total, microbatch):
        index, x_m, lengths_m, covariates_m, steps_m = microbatch
        if steps_m is not None:
            covariates_m = {**covariates_m, "steps": steps_m}

        def loss_fn(p):
            key = jax.random.fold_in(step_key, index)
            args = (x_m, lengths_m, annealing)
            kwargs = {**covariates_m, **svi.static_kwargs}
            return svi.loss.loss(key, svi.constrain_fn(p), svi.model, svi.guide, *args, **kwargs)

        loss_and_grads = jax.value_and_grad(loss_fn)(params)
        return jax.tree.map(jnp.add, total, loss_and_grads), None

    steps = covariates.pop("steps", None)  # already one set of real steps per micro-batch
    slots_rows = x.shape[0] // num_microbatches * x.shape[1]
    if steps is not None and steps.batch_major_slots.shape != (num_microbatches, slots_rows):
        raise ValueError(
            f"steps must hold the real steps of each of the {num_microbatches} micro-batches "
            f"(grouped_real_steps(lengths, {x.shape[1]}, capacity, {num_microbatches})); its "
            f"batch_major_slots have shape {steps.batch_major_slots.shape}"
        )
    microbatches = (
        jnp.arange(num_microbatches),
        x.reshape(num_microbatches, -1, *x.shape[1:]),
        lengths.reshape(num_microbatches, -1),
        {k: v.reshape(num_microbatches, -1, *v.shape[1:]) for k, v in covariates.items()},
        steps,
    )
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, microbatches)
    optim_state = svi.optim.update(grads, svi_state.optim_state, value=loss)
    return SVIState(optim_state, svi_state.mutable_state, rng_key), loss


_LARGE_ARRAY = 10_000  # elements; see skipping_nonfinite


def skipping_nonfinite(update: Callable) -> Callable:
    """``update`` that leaves the optimizer state (parameters, moments, step count) as it was
    when the loss or any updated parameter is not finite; the random key still advances.

    A collapsing prior scale can make one mini-batch's loss or gradient overflow early in
    training (see README, known limitations); this drops that one step instead of letting
    NaN into the parameters. Where everything is finite it returns ``update``'s result as is.
    """

    def guarded(svi_state: SVIState, *args, **kwargs):
        new_state, loss = update(svi_state, *args, **kwargs)
        # One branch for the whole state (a per-array select compiles slowly). A large array
        # is checked by its sum; the small ones (biases, scalars) together, concatenated:
        # summed one by one, each added kernels of XLA's tree-reduction rewrite, and a JSB
        # update compiled about 0.4 s slower (4.37 against 3.99 s, medians of 8). Integer
        # arrays (step counts) are always finite.
        leaves = [
            a
            for a in jax.tree.leaves(new_state.optim_state)
            if jnp.issubdtype(a.dtype, jnp.inexact)
        ]
        large = sum(jnp.sum(a) for a in leaves if a.size >= _LARGE_ARRAY)
        finite = jnp.isfinite(loss) & jnp.isfinite(large)
        small = [a.ravel() for a in leaves if a.size < _LARGE_ARRAY]
        if small:
            finite &= jnp.all(jnp.isfinite(jnp.concatenate(small)))
        optim_state = jax.lax.cond(
            finite, lambda: new_state.optim_state, lambda: svi_state.optim_state
        )
        return new_state._replace(optim_state=optim_state), loss

    return guarded


class UpdateStep:
    """``jax.jit(svi.update)``, compiled ahead of time once per batch shape.

    Call: (svi_state, x [B, T, X], lengths [B], annealing_factor [], **covariates) ->
    (svi_state, loss); covariates are the model's optional ``inputs``/``dt``/``obs_mask`` and
    ``steps`` (the batch's real steps, ``real_steps``; for a shape split into micro-batches,
    ``grouped_real_steps`` with ``microbatches(shape)`` groups; not data-parallel). A shape is
    x's shape plus the number of real-step slots per (micro-)batch (0: none).
    Every new shape is lowered and compiled explicitly, so ``compiled_shapes`` and
    ``compile_seconds`` (wall time, all shapes) say exactly what compiled and what it cost; a
    call with a new annealing factor reuses the executable (it is a float32 array argument).
    ``compile`` builds several shapes at once in threads (XLA compiles outside the GIL), which
    is how ``train_epoch`` prepares the shapes of an epoch before running it. The incoming
    state's buffers are donated: it must not be used after the call.

    With ``microbatch_steps`` > 0, shapes whose batch holds more padded steps than that run
    ``microbatched_update`` instead (see ``TrainConfig.microbatch_steps``).

    With a ``mesh`` (``dmm_jax.distributed.data_mesh``) the same update runs data-parallel:
    the batch is split over the devices along its sequences (padded with empty sequences to a
    multiple of the device count; shapes are then the padded ones) and the state replicated.

    ``compiler_options``: XLA options for every shape; None takes
    ``dmm_jax.runtime.compiler_options`` for the platform it runs on, {} XLA's defaults.
    """

    def __init__(
        self,
        svi: SVI,
        mesh: Mesh | None = None,
        *,
        max_workers: int | None = None,
        microbatch_steps: int = 0,
        compiler_options: dict[str, Any] | None = None,
    ):
        self._svi = svi
        self.mesh = mesh
        if compiler_options is None:
            platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
            compiler_options = default_compiler_options(platform)
        self._jit_options = {"donate_argnums": 0, "compiler_options": compiler_options or None}
        if mesh is not None:  # data parallel: see dmm_jax.distributed
            same, split = distributed.replicated(mesh), distributed.batch_sharded(mesh)
            self._jit_options.update(in_shardings=(same, split, split, same), out_shardings=same)
        self._jitted = {1: jax.jit(skipping_nonfinite(svi.update), **self._jit_options)}
        self._microbatch_steps = microbatch_steps
        self._executables: dict[tuple[int, ...], Any] = {}
        self._max_workers = max_workers or os.cpu_count() or 1
        self.compile_seconds = 0.0
        self.skipped_updates = 0  # steps dropped for a non-finite loss or parameter

    @property
    def compiled_shapes(self) -> list[tuple[int, ...]]:
        return list(self._executables)

    def compile(self, svi_state: SVIState, batches: Iterable[tuple[Any, Any, dict]]) -> None:
        """Compiles, concurrently, every batch shape not compiled yet.

        ``batches``: example (x, lengths, covariates) triples (arrays or ``ShapeDtypeStruct``s;
        covariates as passed to ``__call__``), one per shape; only their shapes matter.
        """
        specs = {}
        for x, lengths, covariates in batches:
            x, lengths, covariates = jax.tree.map(_spec, (x, lengths, dict(covariates)))
            if self.mesh is not None:
                rows = distributed.padded_batch_size(x.shape[0], self.mesh)
                x = jax.ShapeDtypeStruct((rows, *x.shape[1:]), x.dtype)
                lengths = jax.ShapeDtypeStruct((rows,), lengths.dtype)
            key = _batch_key(x, covariates)
            if key not in self._executables:
                specs.setdefault(key, (x, lengths, covariates))
        if not specs:
            return
        start = time.perf_counter()
        if self.mesh is not None:
            svi_state = distributed.replicate(svi_state, self.mesh)
        annealing = jax.ShapeDtypeStruct((), jnp.float32)
        lowered = [
            self._jitted_for(shape).lower(svi_state, x, lengths, annealing, **covariates)
            for shape, (x, lengths, covariates) in specs.items()
        ]
        workers = min(len(lowered), self._max_workers)
        if workers == 1:
            executables = [low.compile() for low in lowered]
        else:
            with ThreadPoolExecutor(workers) as pool:
                executables = list(pool.map(lambda low: low.compile(), lowered))
        self._executables.update(zip(specs, executables))
        self.compile_seconds += time.perf_counter() - start

    def has_compiled(self, shape: tuple[int, ...], real_step_slots: int = 0) -> bool:
        """Whether a batch of ``shape`` (before padding for the mesh) is compiled already."""
        if self.mesh is not None:
            shape = (distributed.padded_batch_size(shape[0], self.mesh), *shape[1:])
        return (*shape, real_step_slots) in self._executables

    def executable(self, shape: tuple[int, ...], real_step_slots: int = 0):
        """The compiled update for batches of ``shape`` (after padding for the mesh), e.g. for
        its ``memory_analysis()``; KeyError if not compiled."""
        return self._executables[(*shape, real_step_slots)]

    @property
    def microbatch_steps(self) -> int:
        return self._microbatch_steps

    def microbatches(self, shape: tuple[int, ...]) -> int:
        """How many micro-batches a batch of ``shape`` [B, T, ...] is differentiated in."""
        return microbatch_count(shape[0], shape[1], self._microbatch_steps)

    def takes_real_steps(self, shape: tuple[int, ...]) -> bool:
        """Whether a batch of ``shape`` may pass ``steps``: not when data-parallel (the
        steps' indices would have to follow the batch's split over devices)."""
        del shape
        return self.mesh is None

    def _jitted_for(self, shape: tuple[int, ...]):
        count = self.microbatches(shape)
        if count not in self._jitted:
            update = skipping_nonfinite(functools.partial(microbatched_update, self._svi, count))
            self._jitted[count] = jax.jit(update, **self._jit_options)
        return self._jitted[count]

    def __call__(self, svi_state, x, lengths, annealing, **covariates):
        if self.mesh is not None:
            if covariates:
                raise NotImplementedError(
                    "data-parallel training does not take inputs or dt yet; use one device"
                )
            svi_state, annealing = distributed.replicate(
                (svi_state, np.float32(annealing)), self.mesh
            )
            x, lengths = distributed.shard_batch(x, lengths, self.mesh)
        key = _batch_key(x, covariates)
        if key not in self._executables:
            self.compile(svi_state, [(x, lengths, covariates)])
        annealing = jnp.asarray(annealing, jnp.float32)
        return self._executables[key](svi_state, x, lengths, annealing, **covariates)


def _spec(array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(array), array.dtype)


def _batch_key(x, covariates: dict) -> tuple[int, ...]:
    steps = covariates.get("steps")
    return (*x.shape, 0 if steps is None else int(np.shape(steps.batch_major)[-1]))


@functools.lru_cache(maxsize=8)
def _planned_capacities(
    lengths: bytes, batch_size: int, length_grouped: bool, microbatch_steps: int
) -> dict[int, int]:
    return real_step_capacities(
        np.frombuffer(lengths, np.int32),
        batch_size,
        length_grouped,
        microbatch_steps=microbatch_steps,
    )


def real_step_plan(
    data: PaddedSequences | SequenceArrays, config: TrainConfig, microbatch_steps: int = 0
) -> dict[int, int]:
    """Real-step slots planned for ``data``'s batches, per padded length (absent: none), per
    micro-batch where ``microbatch_steps`` splits a length's batches; planned once per (data,
    batching) and cached."""
    if not config.real_steps:
        return {}
    lengths = np.asarray(data.lengths, np.int32).tobytes()
    return _planned_capacities(
        lengths, config.batch_size, config.length_bucketing, microbatch_steps
    )


# ----------------------------------------------------------------------------- loop


class LoadedRun(NamedTuple):
    params: dict[str, Any]
    state: TrainState
    model_config: Any  # DMMConfig, VRNNConfig, ...: see dmm_jax.models
    train_config: TrainConfig
    history: list[dict[str, Any]]
    metadata: dict[str, Any]


def load_run(checkpoint_dir: str | os.PathLike, *, best: bool = False) -> LoadedRun:
    """Restores a run saved by ``fit``: parameters, full state, configs, history, metadata.

    ``best``: the state of the best validation bound (``best.msgpack``, kept with early
    stopping) instead of the latest.
    """
    saved = read_checkpoint(checkpoint_dir, BEST_FILE if best else CHECKPOINT_FILE)
    svi = build_svi(saved["model_config"], saved["train_config"])
    model_config = saved["model_config"]
    covariates = family_of(model_config).example_covariates(model_config)
    template = init_train_state(svi, saved["train_config"].seed, model_config.obs_dim, covariates)
    state = _restore_train_state(template, saved)
    return LoadedRun(
        svi.get_params(state.svi_state),
        state,
        saved["model_config"],
        saved["train_config"],
        saved["history"],
        saved["metadata"],
    )


def _restore_train_state(template: TrainState, saved: dict[str, Any]) -> TrainState:
    """``restore_state``, also for checkpoints written before the optimizer ran on one raveled
    vector (``optax.flatten`` in ``clipped_adam``): their Adam moments are trees shaped like
    the parameters, raveled here in the order ``optax.flatten`` uses (``jax.tree.leaves``)."""
    try:
        return restore_state(template, saved["state"], saved["path"])
    except CheckpointError:
        raw = _ravel_per_array_adam_moments(template, saved["state"])
        if raw is None:
            raise
        return restore_state(template, raw, saved["path"])


def _ravel_per_array_adam_moments(template: TrainState, raw: dict[str, Any]) -> dict | None:
    """The raw state with per-array Adam moments raveled; None if it has none to ravel."""
    try:
        inner = raw["svi_state"]["optim_state"]["1"]  # numpyro: (step, (params, optax state))
        params_raw, chain_raw = inner["0"], inner["1"]
        adam = chain_raw["2"]  # clip, weight decay, Adam, learning rate
    except (KeyError, TypeError, AttributeError, ValueError):
        return None
    if not isinstance(adam, dict) or not isinstance(adam.get("mu"), dict):
        return None
    params = template.svi_state.optim_state[1][0]

    def ravel(tree_raw):  # ravel_pytree concatenates the leaves in optax.flatten's order
        return ravel_pytree(serialization.from_state_dict(params, tree_raw))[0]

    adam = {**adam, "mu": ravel(adam["mu"]), "nu": ravel(adam["nu"])}
    chain_raw = {**chain_raw, "2": adam}
    optim = {**raw["svi_state"]["optim_state"], "1": {"0": params_raw, "1": chain_raw}}
    return {**raw, "svi_state": {**raw["svi_state"], "optim_state": optim}}


class EarlyStopping:
    """Counts evaluations since the best validation bound (``val_loss_per_step``, lower is
    better); ``stopped`` once ``patience`` of them pass without improvement (0: never).

    Rebuilt from a resumed run's history, so a resumed run stops where an uninterrupted one
    would.
    """

    def __init__(self, patience: int, history: Sequence[dict[str, Any]] = ()):
        self.patience = patience
        self.best, self.best_epoch, self.since_best = math.inf, -1, 0
        self.stopped = False
        for record in history:
            self.update(record)

    def update(self, record: dict[str, Any]) -> bool:
        """Takes one epoch's record; True when it holds a new best validation bound."""
        value = record.get("val_loss_per_step")
        if value is None or self.patience <= 0:
            return False
        if value < self.best:
            self.best, self.best_epoch, self.since_best = value, record["epoch"], 0
            return True
        self.since_best += 1
        self.stopped = self.since_best >= self.patience
        return False


class TrainResult(NamedTuple):
    params: dict[str, Any]
    state: TrainState
    history: list[dict[str, Any]]
    compiled_shapes: list[tuple[int, ...]]


def _sequences(split: Any) -> Sequence[np.ndarray]:
    return split.sequences if hasattr(split, "sequences") else split


def _batchable(split: Any, name: str, config: DMMConfig) -> Any:
    """PaddedSequences of a music split; a SequenceArrays (real-valued) as it is."""
    data = split if hasattr(split, "batch_covariates") else PaddedSequences(_sequences(split))
    obs_dim = data.batch(np.arange(1), 1)[0].shape[-1]
    if obs_dim != config.obs_dim:
        raise ValueError(
            f"{name} data has {obs_dim} dims per step, config.obs_dim is {config.obs_dim}"
        )
    return data


def train_epoch(
    update: UpdateStep,
    state: TrainState,
    data: PaddedSequences | SequenceArrays,
    config: TrainConfig,
    *,
    progress: bool = False,
) -> tuple[TrainState, float, float]:
    """One pass over ``data`` in shuffled mini-batches.

    Returns (new state, loss summed over the updates applied, last annealing factor). An
    update with a non-finite loss or result is dropped (``skipping_nonfinite``) and counted in
    ``update.skipped_updates``; an epoch in which every update was dropped raises.
    """
    epoch = int(state.epoch)
    epoch_key = jax.random.fold_in(state.data_key, epoch)
    batches = epoch_batches(epoch_key, data.lengths, config.batch_size, config.length_bucketing)

    shapes = [data.padded_shape(indices, config.batch_size) for indices in batches]
    plan = real_step_plan(data, config, update.microbatch_steps)

    def slots(indices, shape) -> int:  # real-step slots per micro-batch (0: scored densely)
        capacity = plan.get(shape[1], 0) if update.takes_real_steps(shape) else 0
        if not capacity:
            return 0
        groups = update.microbatches(shape)
        most = group_real_steps(data.lengths[indices], config.batch_size, groups).max()
        return capacity if most <= capacity else 0

    def covariates(indices, shape, lengths, num_slots) -> dict:
        covariates = data.batch_covariates(indices, config.batch_size)
        groups = update.microbatches(shape)
        if num_slots and groups > 1:
            covariates["steps"] = grouped_real_steps(lengths, shape[1], num_slots, groups)
        elif num_slots:
            covariates["steps"] = real_steps(lengths, shape[1], num_slots)
        return covariates

    batch_slots = [slots(indices, shape) for indices, shape in zip(batches, shapes)]
    one_per_shape = {}  # one example batch per shape this epoch needs and has not compiled
    for indices, shape, n in zip(batches, shapes, batch_slots):
        if not update.has_compiled(shape, n):
            one_per_shape.setdefault((*shape, n), (indices, shape))
    examples = []
    for (*_, n), (indices, shape) in one_per_shape.items():
        x, lengths = data.batch(indices, config.batch_size)
        examples.append((x, lengths, covariates(indices, shape, lengths, n)))
    update.compile(state.svi_state, examples)
    svi_state, losses, factor = state.svi_state, [], 1.0
    for i, indices in enumerate(
        tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress)
    ):
        if update.mesh is None:
            x, lengths = data.batch(indices, config.batch_size)
        else:  # each process reads only the rows its devices hold
            x, lengths = distributed.global_batch(data, indices, config.batch_size, update.mesh)
        factor = annealing_factor(epoch, i, len(batches), config)
        cov = covariates(indices, shapes[i], lengths, batch_slots[i])
        svi_state, loss = update(svi_state, x, lengths, factor, **cov)
        losses.append(loss)  # stays on device: no sync per batch
    losses = np.asarray(jnp.stack(losses))
    finite = np.isfinite(losses)
    if not finite.any():
        raise FloatingPointError(f"every update of epoch {epoch} had a non-finite loss")
    update.skipped_updates += int((~finite).sum())
    total = float(losses[finite].sum())  # over the updates applied
    return state._replace(svi_state=svi_state, epoch=jnp.int32(epoch + 1)), total, factor


def fit(
    train: Any,
    valid: Any = None,
    test: Any = None,
    *,
    model_config: DMMConfig | None = None,
    train_config: TrainConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    log_json: str | os.PathLike | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    metadata: dict[str, Any] | None = None,
    mesh: Mesh | None = None,
) -> TrainResult:
    """Trains a DMM by SVI; evaluates validation/test every ``eval_every`` epochs and at the end.

    Args:
        train, valid, test: splits, each a sequence of [length, X] 0/1 arrays (or an object
            with ``.sequences``, such as ``dmm_jax.data.SequenceSplit``), or real-valued
            ``dmm_jax.data.arrays.SequenceArrays`` (with inputs, dt, missing entries);
            valid/test optional.
        model_config, train_config: default to the reference's settings.
        checkpoint_dir: where to write an atomic checkpoint after every epoch.
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one.
        log_json: file receiving one JSON object per epoch (appended to when resuming).
        progress: show a progress bar over the mini-batches of each epoch.
        log: called with one human-readable line per epoch (e.g. ``print``).
        metadata: JSON-serializable facts stored in the checkpoint (e.g. the dataset name).
        mesh: train and evaluate data-parallel over this device mesh
            (``dmm_jax.distributed.data_mesh``); None: today's single-device run. In a
            multi-process run only process 0 writes the checkpoint and the JSON log.

    Returns:
        TrainResult with the final parameters, state, per-epoch history and compiled shapes.
    """
    model_config = model_config or DMMConfig()
    train_config = train_config or TrainConfig()
    say = log or (lambda line: None)
    train_data = _batchable(train, "train", model_config)
    eval_sets = {
        name: _batchable(split, name, model_config)
        for name, split in (("val", valid), ("test", test))
        if split is not None
    }
    steps_per_epoch = math.ceil(len(train_data) / train_config.batch_size)
    svi = build_svi(model_config, train_config, steps_per_epoch)
    covariates = family_of(model_config).example_covariates(model_config)
    state = init_train_state(svi, train_config.seed, model_config.obs_dim, covariates)
    history: list[dict[str, Any]] = []

    if resume and checkpoint_dir is not None and checkpoint_path(checkpoint_dir).is_file():
        saved = load_run(checkpoint_dir)
        if saved.model_config != model_config:
            raise CheckpointError(
                f"{checkpoint_path(checkpoint_dir)}: saved model config {saved.model_config} "
                f"differs from the requested {model_config}"
            )
        state, history = saved.state, saved.history
        say(f"resumed from {checkpoint_path(checkpoint_dir)} after epoch {int(state.epoch) - 1}")

    patience = train_config.early_stopping_patience
    if patience and "val" not in eval_sets:
        raise ValueError("TrainConfig.early_stopping_patience needs a validation split (valid)")
    stopper = EarlyStopping(patience, history)
    update = UpdateStep(svi, mesh, microbatch_steps=train_config.microbatch_steps)
    writes = jax.process_index() == 0  # one writer when several processes share a run
    with contextlib.ExitStack() as stack:
        log_file = None
        if log_json is not None and writes:
            Path(log_json).parent.mkdir(parents=True, exist_ok=True)
            log_file = stack.enter_context(open(log_json, "a" if resume and history else "w"))
        while int(state.epoch) < train_config.epochs and not stopper.stopped:
            epoch = int(state.epoch)
            start = time.perf_counter()
            skipped_before = update.skipped_updates
            state, loss_sum, factor = train_epoch(
                update, state, train_data, train_config, progress=progress
            )
            record = {
                "epoch": epoch,
                "train_loss_per_step": loss_sum / train_data.num_steps,
                "seconds": time.perf_counter() - start,
                "annealing_factor": factor,
                "compiled_shapes": len(update.compiled_shapes),
                "compile_seconds": update.compile_seconds,
                "skipped_updates": update.skipped_updates - skipped_before,
            }
            every = train_config.eval_every
            due = epoch + 1 == train_config.epochs or (every and (epoch + 1) % every == 0)
            if eval_sets and due:
                params = svi.get_params(state.svi_state)
                for name, data in eval_sets.items():
                    result = evaluate_split(
                        params,
                        jax.random.fold_in(state.eval_key, epoch),
                        data,
                        model_config,
                        num_samples=train_config.eval_samples,
                        batch_size=train_config.eval_batch_size,
                        mesh=mesh,
                    )
                    record[f"{name}_loss_per_step"] = result["loss_per_step"]
            improved = patience > 0 and stopper.update(record)
            if stopper.stopped:
                record["early_stopped"] = True
            history.append(record)
            say(_format_record(record))
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if checkpoint_dir is not None and writes:
                for filename in (BEST_FILE, CHECKPOINT_FILE) if improved else (CHECKPOINT_FILE,):
                    save_checkpoint(
                        checkpoint_dir,
                        state,
                        model_config=model_config,
                        train_config=train_config,
                        history=history,
                        metadata=metadata,
                        filename=filename,
                    )
            if stopper.stopped:
                say(
                    f"early stopping after epoch {epoch}: no better validation bound in "
                    f"{patience} evaluations (best {stopper.best:.4f} at epoch {stopper.best_epoch})"
                )
    say(
        f"compiled {len(update.compiled_shapes)} training shapes in "
        f"{update.compile_seconds:.1f} s: {update.compiled_shapes}"
    )
    return TrainResult(svi.get_params(state.svi_state), state, history, update.compiled_shapes)


def _format_record(record: dict[str, Any]) -> str:
    line = f"[training epoch {record['epoch']:04d}]  {record['train_loss_per_step']:.4f}"
    for name in ("val", "test"):
        if f"{name}_loss_per_step" in record:
            line += f"  {name} {record[f'{name}_loss_per_step']:.4f}"
    if record.get("skipped_updates"):
        line += f"  ({record['skipped_updates']} non-finite updates skipped)"
    return line + f" \t\t\t\t(dt = {record['seconds']:.3f} sec)"
