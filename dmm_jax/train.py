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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.svi import SVIState
from numpyro.optim import optax_to_numpyro
from tqdm.auto import tqdm

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
from dmm_jax.data.batching import PaddedSequences, length_grouped_batches, shuffled_batches
from dmm_jax.evaluate import evaluate_split
from dmm_jax.model import guide, model
from dmm_jax.objectives import AnalyticKLTraceELBO

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

    exponential: learning_rate * lr_decay^k                      (the reference's)
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
        config.learning_rate, transition_steps=1, decay_rate=config.lr_decay
    )


def clipped_adam(config: TrainConfig, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """Pyro's ClippedAdam from optax parts.

    Each gradient element is clipped to +-clip_norm, then weight_decay * param is added, then
    Adam; the step size follows ``learning_rate_schedule`` (by default learning_rate *
    lr_decay^k at step k). The state has the same structure under every schedule.
    """
    return optax.chain(
        optax.clip(config.clip_norm),
        optax.add_decayed_weights(config.weight_decay),
        scale_by_pyro_adam(config.beta1, config.beta2, config.adam_eps),
        optax.scale_by_learning_rate(learning_rate_schedule(config, steps_per_epoch)),
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


def build_svi(model_config: DMMConfig, train_config: TrainConfig, steps_per_epoch: int = 1) -> SVI:
    """NumPyro SVI over the DMM model/guide with ClippedAdam and Trace_ELBO (``kl="sampled"``)
    or the closed-form-KL ELBO (``kl="analytic"``). ``steps_per_epoch`` sets the length of a
    cosine learning-rate schedule (``fit`` passes the real number)."""
    if train_config.kl == "analytic" and model_config.num_iafs:
        raise ValueError(
            "TrainConfig.kl='analytic' needs Gaussian guide steps: not available with "
            f"DMMConfig.num_iafs={model_config.num_iafs}; use kl='sampled'"
        )
    return SVI(
        functools.partial(model, config=model_config),
        functools.partial(guide, config=model_config),
        optax_to_numpyro(clipped_adam(train_config, steps_per_epoch)),
        AnalyticKLTraceELBO() if train_config.kl == "analytic" else Trace_ELBO(),
    )


def init_train_state(svi: SVI, seed: int, obs_dim: int) -> TrainState:
    """Initial parameters and optimizer state from ``seed`` (shape-independent)."""
    svi_key, data_key, eval_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jnp.zeros((1, 1, obs_dim), jnp.float32)
    svi_state = svi.init(svi_key, x, jnp.ones(1, jnp.int32), jnp.float32(1.0))
    return TrainState(svi_state, jnp.int32(0), data_key, eval_key)


class UpdateStep:
    """``jax.jit(svi.update)``, compiled ahead of time once per batch shape.

    Call: (svi_state, x [B, T, X], lengths [B], annealing_factor []) -> (svi_state, loss).
    Every new shape is lowered and compiled explicitly, so ``compiled_shapes`` and
    ``compile_seconds`` say exactly what compiled and what it cost; a call with a new
    annealing factor reuses the executable (it is a float32 array argument). The incoming
    state's buffers are donated: it must not be used after the call.
    """

    def __init__(self, svi: SVI):
        self._jitted = jax.jit(svi.update, donate_argnums=0)
        self._executables: dict[tuple[int, ...], Any] = {}
        self.compile_seconds: dict[tuple[int, ...], float] = {}

    @property
    def compiled_shapes(self) -> list[tuple[int, ...]]:
        return list(self._executables)

    def __call__(self, svi_state, x, lengths, annealing):
        annealing = jnp.asarray(annealing, jnp.float32)
        shape = tuple(x.shape)
        executable = self._executables.get(shape)
        if executable is None:
            start = time.perf_counter()
            executable = self._jitted.lower(svi_state, x, lengths, annealing).compile()
            self.compile_seconds[shape] = time.perf_counter() - start
            self._executables[shape] = executable
        return executable(svi_state, x, lengths, annealing)


# ----------------------------------------------------------------------------- loop


class LoadedRun(NamedTuple):
    params: dict[str, Any]
    state: TrainState
    model_config: DMMConfig
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
    template = init_train_state(svi, saved["train_config"].seed, saved["model_config"].obs_dim)
    state = restore_state(template, saved["state"], saved["path"])
    return LoadedRun(
        svi.get_params(state.svi_state),
        state,
        saved["model_config"],
        saved["train_config"],
        saved["history"],
        saved["metadata"],
    )


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


def train_epoch(
    update: UpdateStep,
    state: TrainState,
    data: PaddedSequences,
    config: TrainConfig,
    *,
    progress: bool = False,
) -> tuple[TrainState, float, float]:
    """One pass over ``data`` in shuffled mini-batches.

    Returns (new state, summed loss, last annealing factor).
    """
    epoch = int(state.epoch)
    epoch_key = jax.random.fold_in(state.data_key, epoch)
    if config.length_bucketing:
        batches = length_grouped_batches(epoch_key, data.lengths, config.batch_size)
    else:
        batches = shuffled_batches(epoch_key, len(data), config.batch_size)
    svi_state, losses, factor = state.svi_state, [], 1.0
    for i, indices in enumerate(
        tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress)
    ):
        x, lengths = data.batch(indices, config.batch_size)
        factor = annealing_factor(epoch, i, len(batches), config)
        svi_state, loss = update(svi_state, x, lengths, factor)
        losses.append(loss)  # stays on device: no sync per batch
    total = float(jnp.sum(jnp.stack(losses)))
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
) -> TrainResult:
    """Trains a DMM by SVI; evaluates validation/test every ``eval_every`` epochs and at the end.

    Args:
        train, valid, test: splits, each a sequence of [length, X] 0/1 arrays (or an object
            with ``.sequences``, such as ``dmm_jax.data.SequenceSplit``); valid/test optional.
        model_config, train_config: default to the reference's settings.
        checkpoint_dir: where to write an atomic checkpoint after every epoch.
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one.
        log_json: file receiving one JSON object per epoch (appended to when resuming).
        progress: show a progress bar over the mini-batches of each epoch.
        log: called with one human-readable line per epoch (e.g. ``print``).
        metadata: JSON-serializable facts stored in the checkpoint (e.g. the dataset name).

    Returns:
        TrainResult with the final parameters, state, per-epoch history and compiled shapes.
    """
    model_config = model_config or DMMConfig()
    train_config = train_config or TrainConfig()
    say = log or (lambda line: None)
    train_data = PaddedSequences(_sequences(train))
    eval_sets = {
        name: PaddedSequences(_sequences(split))
        for name, split in (("val", valid), ("test", test))
        if split is not None
    }
    steps_per_epoch = math.ceil(len(train_data) / train_config.batch_size)
    svi = build_svi(model_config, train_config, steps_per_epoch)
    state = init_train_state(svi, train_config.seed, model_config.obs_dim)
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
    update = UpdateStep(svi)
    with contextlib.ExitStack() as stack:
        log_file = None
        if log_json is not None:
            Path(log_json).parent.mkdir(parents=True, exist_ok=True)
            log_file = stack.enter_context(open(log_json, "a" if resume and history else "w"))
        while int(state.epoch) < train_config.epochs and not stopper.stopped:
            epoch = int(state.epoch)
            start = time.perf_counter()
            state, loss_sum, factor = train_epoch(
                update, state, train_data, train_config, progress=progress
            )
            if not np.isfinite(loss_sum):
                raise FloatingPointError(f"training loss is {loss_sum} at epoch {epoch}")
            record = {
                "epoch": epoch,
                "train_loss_per_step": loss_sum / train_data.num_steps,
                "seconds": time.perf_counter() - start,
                "annealing_factor": factor,
                "compiled_shapes": len(update.compiled_shapes),
                "compile_seconds": sum(update.compile_seconds.values()),
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
            if checkpoint_dir is not None:
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
        f"{sum(update.compile_seconds.values()):.1f} s: {update.compiled_shapes}"
    )
    return TrainResult(svi.get_params(state.svi_state), state, history, update.compiled_shapes)


def _format_record(record: dict[str, Any]) -> str:
    line = f"[training epoch {record['epoch']:04d}]  {record['train_loss_per_step']:.4f}"
    for name in ("val", "test"):
        if f"{name}_loss_per_step" in record:
            line += f"  {name} {record[f'{name}_loss_per_step']:.4f}"
    return line + f" \t\t\t\t(dt = {record['seconds']:.3f} sec)"
