"""Training: the epoch loop, evaluation during training, early stopping, checkpoints.

``fit`` trains any model family (``dmm_jax.models``) by SVI with the jitted update of
``dmm_jax.step`` and the optimizer of ``dmm_jax.optim``.

Randomness: one root key from ``TrainConfig.seed`` is split into (svi, data, eval) keys; epoch
e shuffles with ``fold_in(data_key, e)`` and evaluates with ``fold_in(eval_key, e)``; with
``TrainConfig.transpose`` batch i of epoch e is transposed with ``fold_in(fold_in(data_key, e),
TRANSPOSE_STREAM + i)``. The SVI state carries its own key, so a run resumed from a checkpoint
repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dmm_jax import distributed
from dmm_jax.checkpoint import (
    BEST_FILE,
    CHECKPOINT_FILE,
    CheckpointError,
    checkpoint_path,
    migrate_state,
    read_checkpoint,
    restore_state,
    save_checkpoint,
)
from dmm_jax.config import BINARY_EMISSIONS, DMMConfig, TrainConfig
from dmm_jax.data.arrays import SequenceArrays
from dmm_jax.data.batching import (
    PaddedSequences,
    epoch_batches,
    group_real_steps,
)
from dmm_jax.data.splits import Batchable, as_batchable
from dmm_jax.data.transpose import transpose_rolls
from dmm_jax.evaluate import evaluate_split, particle_filter_split
from dmm_jax.models import family_of
from dmm_jax.models.common import example_covariates
from dmm_jax.optim import annealing_factor
from dmm_jax.real_steps import grouped_real_steps, real_steps
from dmm_jax.step import (
    TrainState,
    UpdateStep,
    build_svi,
    init_train_state,
    real_step_plan,
    trained_params,
)

# Transposition keys fold the batch index into the epoch's key above this offset, apart from
# what the shuffle derives from that key.
TRANSPOSE_STREAM = 1 << 20

# Settings a resumed run may change without changing what an update computes: how long it runs,
# how often it evaluates, and real_steps (the same numbers, up to float summation order).
RESUMABLE_TRAIN_FIELDS = (
    "epochs",
    "eval_every",
    "eval_samples",
    "eval_batch_size",
    "early_stopping_patience",
    "real_steps",
)


def changed_settings(saved: Any, requested: Any) -> list[str]:
    """Names of the config fields that differ (``model`` when the families differ)."""
    if type(saved) is not type(requested):
        return ["model"]
    return [
        f.name
        for f in dataclasses.fields(saved)
        if getattr(saved, f.name) != getattr(requested, f.name)
    ]


class LoadedRun(NamedTuple):
    params: dict[str, Any]
    state: TrainState
    model_config: Any  # DMMConfig, VRNNConfig, ...: see dmm_jax.models
    train_config: TrainConfig
    history: list[dict[str, Any]]
    metadata: dict[str, Any]


def load_run(checkpoint_dir: str | os.PathLike, *, best: bool = False) -> LoadedRun:
    """Restores a run saved by ``fit``: parameters, full state, configs, history, metadata.

    ``checkpoint_dir``: a ``checkpoint_dir`` of ``fit``, or one ``.msgpack`` file in it.
    ``best``: the state of the best validation bound (``best.msgpack``, kept with early
    stopping) instead of the latest.
    """
    path = Path(checkpoint_dir)
    if path.suffix == ".msgpack":
        saved = read_checkpoint(path.parent, path.name)
    else:
        saved = read_checkpoint(path, BEST_FILE if best else CHECKPOINT_FILE)
    svi = build_svi(saved["model_config"], saved["train_config"])
    model_config = saved["model_config"]
    covariates = example_covariates(model_config)
    template = init_train_state(svi, saved["train_config"].seed, model_config.obs_dim, covariates)
    params = svi.get_params(template.svi_state)
    state = restore_state(template, migrate_state(saved["state"], params), saved["path"])
    return LoadedRun(
        trained_params(svi, state.svi_state),
        state,
        saved["model_config"],
        saved["train_config"],
        saved["history"],
        saved["metadata"],
    )


def validation_bound(
    params: Any,
    key: jax.Array,
    data: Any,
    model_config: Any,
    train_config: TrainConfig,
    *,
    mesh: Mesh | None = None,
    name: str = "split",
) -> float:
    """The bound a run trains on, as a negative log-likelihood per time step of ``data``: the
    ELBO (``eval_samples`` draws), the IWAE bound (``particles`` draws) or the filtering bound
    (``particles`` particles). Evaluation during training and early stopping use it, so a run
    keeps the state best under its own objective. Raises FloatingPointError if not finite."""
    if train_config.objective == "fivo":
        # The particle filter runs on one device (it takes no mesh).
        result = particle_filter_split(
            params,
            key,
            data,
            model_config,
            num_particles=train_config.particles,
            resampling=train_config.resampling,
            name=name,
        )
        return result["pf_nll_per_step"]
    iwae = train_config.objective == "iwae"
    result = evaluate_split(
        params,
        key,
        data,
        model_config,
        num_samples=train_config.particles if iwae else train_config.eval_samples,
        estimator="is" if iwae else "elbo",
        batch_size=train_config.eval_batch_size,
        mesh=mesh,
        name=name,
    )
    return result["is_nll_per_step" if iwae else "loss_per_step"]


def _check_same_shapes(params: dict[str, Any], init_params: dict[str, Any]) -> None:
    """Raises ValueError naming the first parameter site ``init_params`` lacks or shapes
    differently from ``params`` (a fresh initialisation of the model being trained)."""
    for name, value in params.items():
        if name not in init_params:
            raise ValueError(f"init_params has no parameter {name!r} of this model")
        want = jax.tree.map(np.shape, value)
        got = jax.tree.map(np.shape, init_params[name])
        if want != got:
            raise ValueError(f"init_params[{name!r}] does not match this model's shapes")
    extra = sorted(set(init_params) - set(params))
    if extra:
        raise ValueError(f"init_params has parameters this model lacks: {', '.join(extra)}")


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


def _batchable(split: Any, name: str, config: Any) -> Batchable:
    """The split as padded batches (``dmm_jax.data.splits``), checked against the config."""
    data = as_batchable(split, name)
    if config.emission in BINARY_EMISSIONS and isinstance(data, SequenceArrays):
        x = data.x[~np.isnan(data.x)]
        if np.any((x != 0) & (x != 1)):
            raise ValueError(
                f"{name} data holds values other than 0/1; the emission is {config.emission}"
            )
    obs_dim = data.padded_shape(np.arange(1), 1)[-1]
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
        if config.transpose:
            key = jax.random.fold_in(epoch_key, TRANSPOSE_STREAM + i)
            x = transpose_rolls(key, jnp.asarray(x), config.transpose)
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
    init_params: dict[str, Any] | None = None,
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
        init_params: parameters to start from (``load_run(...).params`` of a run of the same
            model configuration) with a fresh optimizer, schedule and epoch count: a run
            trained further under other training settings (another objective, learning
            rate). Not used when ``resume`` finds a checkpoint.

    Returns:
        TrainResult with the final parameters (their moving average with
        ``train_config.weight_average``), state, per-epoch history and compiled shapes.
    """
    model_config = model_config or DMMConfig()
    train_config = train_config or TrainConfig()
    say = log or (lambda line: None)
    train_data = _batchable(train, "train", model_config)
    if train_config.transpose and not isinstance(train_data, PaddedSequences):
        raise ValueError(
            "TrainConfig.transpose shifts piano rolls; the training data are real-valued arrays"
        )
    eval_sets = {
        name: _batchable(split, name, model_config)
        for name, split in (("val", valid), ("test", test))
        if split is not None
    }
    steps_per_epoch = math.ceil(len(train_data) / train_config.batch_size)
    svi = build_svi(model_config, train_config, steps_per_epoch)
    covariates = example_covariates(model_config)
    state = init_train_state(svi, train_config.seed, model_config.obs_dim, covariates)
    history: list[dict[str, Any]] = []
    resuming = resume and checkpoint_dir is not None and checkpoint_path(checkpoint_dir).is_file()
    if init_params is not None and not resuming:  # a resumed run has its own parameters
        _check_same_shapes(svi.get_params(state.svi_state), init_params)
        state = init_train_state(
            svi, train_config.seed, model_config.obs_dim, covariates, init_params
        )

    if resuming:
        saved = load_run(checkpoint_dir)
        changed = changed_settings(saved.model_config, model_config) + [
            f"train_config.{c}"
            for c in changed_settings(saved.train_config, train_config)
            if c not in RESUMABLE_TRAIN_FIELDS
            or (c == "epochs" and train_config.lr_schedule == "cosine")  # sets the decay
        ]
        if changed:
            raise CheckpointError(
                f"{checkpoint_path(checkpoint_dir)}: the run was trained with other settings; "
                f"changed: {', '.join(changed)}"
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
                params = trained_params(svi, state.svi_state)
                for name, data in eval_sets.items():
                    key = jax.random.fold_in(state.eval_key, epoch)
                    try:
                        loss = validation_bound(
                            params, key, data, model_config, train_config, mesh=mesh, name=name
                        )
                    except FloatingPointError as err:  # reported, and training goes on
                        record[f"{name}_error"] = str(err)
                        continue
                    record[f"{name}_loss_per_step"] = loss
                    metrics = family_of(model_config).split_metrics
                    if metrics is not None:
                        extra = metrics(params, key, model_config, data)
                        record.update({f"{name}_{k}": v for k, v in extra.items()})
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
    return TrainResult(trained_params(svi, state.svi_state), state, history, update.compiled_shapes)


def _format_record(record: dict[str, Any]) -> str:
    line = f"[training epoch {record['epoch']:04d}]  {record['train_loss_per_step']:.4f}"
    for name in ("val", "test"):
        if f"{name}_loss_per_step" in record:
            line += f"  {name} {record[f'{name}_loss_per_step']:.4f}"
        if f"{name}_mse" in record:
            line += f" (MSE {record[f'{name}_mse']:.4g})"
    for name in ("val", "test"):
        if f"{name}_error" in record:
            line += f"  ({record[f'{name}_error']})"
    if record.get("skipped_updates"):
        line += f"  ({record['skipped_updates']} non-finite updates skipped)"
    return line + f" \t\t\t\t(dt = {record['seconds']:.3f} sec)"
