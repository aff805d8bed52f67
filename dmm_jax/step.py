"""The jitted SVI update: NumPyro's ``SVI.update`` compiled once per batch shape, with
micro-batching for long sequences, a guard that drops non-finite updates, and data
parallelism over a device mesh.

The update's loss is the negative ELBO summed over the mini-batch, as in the reference, so
the same hyperparameters mean the same thing. Batches come padded to length buckets
(``dmm_jax.data.batching``), so a run compiles a handful of shapes, ahead of time and in
threads; the annealing factor is a traced array and never recompiles.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.svi import SVIState
from numpyro.optim import optax_to_numpyro

from dmm_jax import distributed
from dmm_jax.config import DROPOUTS, TrainConfig
from dmm_jax.data.arrays import SequenceArrays
from dmm_jax.data.batching import (
    PaddedSequences,
    microbatch_count,
    real_step_capacities,
)
from dmm_jax.models import FAMILIES, family_of
from dmm_jax.objectives import AnalyticKLTraceELBO, FilteringObjective, ImportanceWeightedELBO
from dmm_jax.optim import averaged_params, clipped_adam
from dmm_jax.runtime import compiler_options as default_compiler_options

Array = jax.Array


class TrainState(NamedTuple):
    """Everything a resumed run needs besides the configs."""

    svi_state: SVIState
    epoch: Array  # int32 scalar: number of completed epochs
    data_key: Array  # shuffles the training set, one fold_in per epoch
    eval_key: Array


def build_svi(model_config: Any, train_config: TrainConfig, steps_per_epoch: int = 1) -> SVI:
    """NumPyro SVI over the model/guide of ``model_config``'s family (``dmm_jax.models``) with
    ClippedAdam and Trace_ELBO (``kl="sampled"``), the closed-form-KL ELBO
    (``kl="analytic"``), the IWAE bound (``objective="iwae"``) or the particle filter's
    (``objective="fivo"``), over ``train_config.particles`` draws. ``steps_per_epoch`` sets the length of a cosine
    learning-rate schedule (``fit`` passes the real number)."""
    if train_config.kl == "analytic" and getattr(model_config, "num_iafs", 0):
        raise ValueError(
            "TrainConfig.kl='analytic' needs Gaussian guide steps: not available with "
            f"DMMConfig.num_iafs={model_config.num_iafs}; use kl='sampled'"
        )
    family = family_of(model_config)
    bound = {"config": model_config}
    if draws_in_model(model_config, train_config):
        bound["draws"] = train_config.particles
    dropouts = {}
    for field in DROPOUTS:
        if getattr(train_config, field):
            if not family.takes(field):
                takes = ", ".join(name for name, f in FAMILIES.items() if f.takes(field))
                raise ValueError(
                    f"TrainConfig.{field}: the {family.name} family has no {field} ({takes} do)"
                )
            dropouts[field] = getattr(train_config, field)
    return SVI(
        functools.partial(family.model, **bound, **dropouts),
        functools.partial(family.guide, **bound),
        optax_to_numpyro(clipped_adam(train_config, steps_per_epoch)),
        training_objective(model_config, train_config),
    )


def trained_params(svi: SVI, svi_state: SVIState) -> dict[str, Any]:
    """The parameters a run has learned: ``svi.get_params``, or their moving average where the
    run keeps one (``TrainConfig.weight_average``); evaluation, early stopping and everything
    loaded from a checkpoint use these."""
    params = svi.optim.get_params(svi_state.optim_state)
    return svi.constrain_fn(averaged_params(svi_state.optim_state, params))


def draws_in_model(model_config: Any, train_config: TrainConfig) -> bool:
    """Whether the ELBO's ``particles`` draws go inside one trace of the model and guide (their
    ``draws`` argument: the same estimator, the shared work done once) rather than in
    ``particles`` vmapped traces."""
    return (
        family_of(model_config).draws_in_model
        and train_config.objective == "elbo"
        and train_config.particles > 1
    )


def training_objective(model_config: Any, train_config: TrainConfig):
    """The NumPyro loss object that ``train_config`` names."""
    if train_config.objective == "fivo":
        family = family_of(model_config)
        if family.particle_filter is None:
            raise ValueError(
                f"objective 'fivo' needs a latent per step; the {family.name} family has none"
            )
        particle_filter = functools.partial(family.particle_filter, config=model_config)
        return FilteringObjective(particle_filter, train_config.particles, train_config.resampling)
    if train_config.objective == "iwae":
        return ImportanceWeightedELBO(train_config.particles)
    if train_config.kl == "analytic":
        return AnalyticKLTraceELBO()
    if draws_in_model(model_config, train_config):
        return Trace_ELBO(num_particles=1)
    return Trace_ELBO(num_particles=train_config.particles)


def init_train_state(
    svi: SVI,
    seed: int,
    obs_dim: int,
    covariates: dict[str, Array] | None = None,
    init_params: dict[str, Any] | None = None,
) -> TrainState:
    """Initial parameters and optimizer state from ``seed`` (shape-independent).

    ``covariates``: example ``inputs``/``dt`` when the model takes them
    (``dmm_jax.models.common.example_covariates``). ``init_params``: parameters to start
    from instead of the seed's (every site, as ``svi.get_params`` returns them), with a
    fresh optimizer state.
    """
    svi_key, data_key, eval_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jnp.zeros((1, 1, obs_dim), jnp.float32)
    svi_state = svi.init(
        svi_key,
        x,
        jnp.ones(1, jnp.int32),
        jnp.float32(1.0),
        init_params=init_params,
        **(covariates or {}),
    )
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
