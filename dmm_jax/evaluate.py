"""The evidence lower bound per sequence, and negative log-likelihood per time step over a
whole split, by the bound or by importance sampling.

    ELBO(x) = E_q[ log p(x, z) - log q(z | x) ] <= log p(x)

The per-step figure is the reference's: summed over the split's sequences, divided by the
split's total number of time steps (nats per step).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dmm_jax import distributed
from dmm_jax.data.batching import balanced_batch_size, length_bucket, sorted_batches
from dmm_jax.data.splits import Batchable, SequenceSplit, as_batchable
from dmm_jax.models import family_of
from dmm_jax.objectives import log_weight

Array = jax.Array
Params = dict


def elbo_per_sequence(
    params: Params,
    key: Array,
    x: Array,
    lengths: Array,
    config,
    annealing_factor: Array | float = 1.0,
    *,
    inputs: Array | None = None,
    dt: Array | None = None,
    obs_mask: Array | None = None,
) -> Array:
    """One-sample ELBO of each sequence, [B]: log p(x, z) - log q(z | x) with z ~ q.

    Uses the same key convention as NumPyro's Trace_ELBO (the guide is seeded with the second
    half of ``split(key)``), so ``-sum(elbo_per_sequence(...))`` equals ``Trace_ELBO().loss``
    for the same key. Padded rows (length 0) give exactly 0. ``inputs``, ``dt`` and
    ``obs_mask`` go to model and guide (see ``dmm_jax.models.dmm``).
    """
    covariates = {"inputs": inputs, "dt": dt, "obs_mask": obs_mask}
    kwargs = {"config": config, **{k: v for k, v in covariates.items() if v is not None}}
    family = family_of(config)
    return log_weight(
        params, key, family.model, family.guide, x, lengths, annealing_factor, **kwargs
    )


def _log_weights(params: Params, keys: Array, x: Array, lengths: Array, config, covariates: dict):
    """log p(x, z_s) - log q(z_s | x) for one guide draw z_s per key: [S, B]."""
    return jax.vmap(lambda k: elbo_per_sequence(params, k, x, lengths, config, **covariates))(keys)


_batch_log_weights = jax.jit(_log_weights, static_argnames=("config",))


@functools.lru_cache(maxsize=8)
def _sharded_log_weights(mesh: Mesh):
    """``_batch_log_weights`` over a batch split along sequences; every process gets all [S, B]
    weights back (they are small), so the statistics below run unchanged."""
    return jax.jit(
        _log_weights, static_argnames=("config",), out_shardings=distributed.replicated(mesh)
    )


class LogWeightStats:
    """Streaming per-sequence statistics of log importance weights w_s, s = 1..S.

    Keeps the mean and the sum of squared deviations of w (Chan et al.'s pairwise update: no
    w^2 is formed, so weights of any size keep their spread) for the ELBO and its error, and,
    relative to a running maximum m, sum exp(w - m) and sum exp(2 (w - m)) for log mean exp w
    and its delta-method error; any number of samples is processed in fixed-size chunks in
    float64. A weight of -inf (a draw the model deems impossible) contributes exp(-inf) = 0; a
    sequence whose every weight is -inf has log mean exp -inf, never NaN.
    """

    def __init__(self, num_sequences: int):
        self.count = 0
        self.mean = np.zeros(num_sequences)
        self.squared_deviations = np.zeros(num_sequences)
        self.max = np.full(num_sequences, -np.inf)
        self.sum_exp = np.zeros(num_sequences)
        self.sum_exp2 = np.zeros(num_sequences)

    def update(self, log_weights: np.ndarray) -> None:
        """Adds draws [S_chunk, num_sequences]."""
        w = np.asarray(log_weights, np.float64)
        n, total = w.shape[0], self.count + w.shape[0]
        with np.errstate(invalid="ignore"):  # -inf - -inf below: handled by the where()s
            chunk_mean = w.mean(0)
            chunk_deviations = ((w - chunk_mean) ** 2).sum(0)
            if self.count == 0:
                self.mean, self.squared_deviations = chunk_mean, chunk_deviations
            else:
                delta = chunk_mean - self.mean
                self.mean = self.mean + delta * n / total
                correction = delta**2 * self.count * n / total
                self.squared_deviations = self.squared_deviations + chunk_deviations + correction
            new_max = np.maximum(self.max, w.max(0))
            nothing = np.isneginf(new_max)  # every weight so far -inf: the sums stay 0
            shift = np.where(nothing, 0.0, np.exp(self.max - new_max))
            scaled = np.where(nothing, 0.0, np.exp(w - new_max))
        self.sum_exp = self.sum_exp * shift + scaled.sum(0)
        self.sum_exp2 = self.sum_exp2 * shift**2 + (scaled**2).sum(0)
        self.max = new_max
        self.count = total

    def elbo(self) -> np.ndarray:
        return self.mean

    def elbo_variance_of_mean(self) -> np.ndarray:
        if self.count < 2:
            return np.full_like(self.mean, np.nan)
        return self.squared_deviations / (self.count - 1) / self.count

    def log_mean_exp(self) -> np.ndarray:
        """The importance-sampled log p(x): log (1/S) sum_s exp(w_s)."""
        with np.errstate(divide="ignore"):  # log 0 = -inf where every weight is -inf
            return np.where(
                np.isneginf(self.max), -np.inf, self.max + np.log(self.sum_exp / self.count)
            )

    def log_mean_exp_variance(self) -> np.ndarray:
        """Delta method: Var[log mean] ~ Var[exp(w - m)] / (S mean(exp(w - m))^2)."""
        if self.count < 2:
            return np.full_like(self.mean, np.nan)
        mean = self.sum_exp / self.count
        var = np.maximum(self.sum_exp2 / self.count - mean**2, 0.0) * self.count / (self.count - 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(mean > 0, var / (self.count * mean**2), np.nan)


ESTIMATORS = ("elbo", "is")
# Padded steps (draws x sequences x steps) scored per call: fewer draws per call on long
# sequences (no JSB batch is affected). The draws themselves do not depend on it.
EVAL_STEP_BUDGET = 2**19
# A NADE holds [notes, hidden] activations per step (88 x 100 floats on piano rolls), tens of
# times a factorised emission's: its budget is EVAL_STEP_BUDGET x 512 / (notes x hidden). Its
# log density runs in chunks (emissions.NADE_CHUNK_ROWS) anyway, but calls of the full budget
# were still larger and slower (docs/USAGE.md, "Long sequences").
_NADE_BUDGET_FLOATS = 512


def steps_per_call(config) -> int:
    """Padded steps (draws x sequences x steps) one evaluation call scores at most: 30,504 for
    a NADE over 88 notes with 100 hidden units, EVAL_STEP_BUDGET for the other emissions."""
    if config.emission != "nade":
        return EVAL_STEP_BUDGET
    floats = config.obs_dim * config.nade_hidden
    return max(1, EVAL_STEP_BUDGET * _NADE_BUDGET_FLOATS // max(floats, _NADE_BUDGET_FLOATS))


def evaluate_split(
    params: Params,
    key: Array,
    sequences: Batchable | SequenceSplit | Sequence[np.ndarray],
    config,
    *,
    num_samples: int = 1,
    estimator: str = "elbo",
    batch_size: int = 64,
    sample_chunk: int = 16,
    mesh: Mesh | None = None,
    name: str = "split",
) -> dict[str, float | int | str]:
    """Negative log-likelihood per time step over a split, by the ELBO or importance sampling.

    With S = ``num_samples`` guide draws z_s per sequence and log weights
    w_s = log p(x, z_s) - log q(z_s | x):

        bound:   -sum_seq mean_s w_s / total steps                      ("elbo", the reference's)
        IS:      -sum_seq log((1/S) sum_s exp(w_s)) / total steps        ("is", Krishnan et al.)

    The IS estimate is never above the bound computed from the same draws (Jensen) and tends
    to -log p(x) per step as S grows. Draws are taken ``sample_chunk`` at a time; sequences
    are batched by sorted length and padded to length buckets, so few shapes compile. With a
    ``mesh`` (``dmm_jax.distributed.data_mesh``) each batch is split over its devices along
    sequences, all S draws of a sequence on the device holding it; the draws, hence the
    estimates, are the same as on one device.

    ``name`` (e.g. "test") names the split in the error raised (FloatingPointError) when a
    sequence's bound is not finite.

    Returns a dict: ``loss_per_step`` and ``elbo_nll_per_step`` (the bound), its standard
    error ``elbo_nll_per_step_se``, ``elbo_nll_per_sequence_step`` (the bound normalised per
    sequence, then averaged), with estimator "is" also ``is_nll_per_step`` and its
    delta-method standard error ``is_nll_per_step_se``; and the counts.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    data = as_batchable(sequences)
    budget = steps_per_call(config)
    # One draw of a batch must fit the budget too: fewer sequences per batch on long pieces
    # (Nottingham's run to 1,793 steps) with a NADE; no Bernoulli or JSB batch is affected.
    batch_size = min(batch_size, max(1, budget // length_bucket(int(data.lengths.max()))))
    batch_size = balanced_batch_size(len(data), batch_size)  # no batch mostly empty rows
    per_sequence = {name: np.empty(len(data)) for name in ("elbo", "elbo_var", "lme", "lme_var")}
    log_weights = _batch_log_weights
    if mesh is not None:
        log_weights, params = _sharded_log_weights(mesh), distributed.replicate(params, mesh)
    for i, indices in enumerate(sorted_batches(data.lengths, batch_size)):
        if mesh is None:
            x, lengths = data.batch(indices, batch_size)
            x, lengths = jnp.asarray(x), jnp.asarray(lengths)
        else:  # each process reads only the rows its devices hold
            x, lengths = distributed.global_batch(data, indices, batch_size, mesh)
        covariates = jax.tree.map(jnp.asarray, data.batch_covariates(indices, batch_size))
        if mesh is not None and covariates:
            raise NotImplementedError("sharded evaluation does not take inputs or dt yet")
        keys = jax.random.split(jax.random.fold_in(key, i), num_samples)
        batch_stats = LogWeightStats(len(indices))
        # Memory: at most `budget` padded steps (draws x sequences x steps) per call.
        chunk = max(1, min(sample_chunk, num_samples, budget // math.prod(x.shape[:2])))
        for start in range(0, num_samples, chunk):
            chunk_keys = keys[start : start + chunk]
            used = len(chunk_keys)
            if used < chunk:  # keep one compiled shape: pad with repeats, drop them after
                chunk_keys = jnp.concatenate([chunk_keys, keys[: chunk - used]])
            if mesh is not None:
                chunk_keys = distributed.replicate(chunk_keys, mesh)
            w = log_weights(params, chunk_keys, x, lengths, config, covariates)
            batch_stats.update(np.asarray(w)[:used, : len(indices)])
        per_sequence["elbo"][indices] = batch_stats.elbo()
        per_sequence["elbo_var"][indices] = batch_stats.elbo_variance_of_mean()
        per_sequence["lme"][indices] = batch_stats.log_mean_exp()
        per_sequence["lme_var"][indices] = batch_stats.log_mean_exp_variance()
    bad = np.flatnonzero(~np.isfinite(per_sequence["elbo"]))
    if len(bad):  # an error naming where, never a NaN averaged into the figure
        i = int(bad[0])
        raise FloatingPointError(
            f"{name}: sequence {i} ({int(data.lengths[i])} steps) has a non-finite bound "
            f"({per_sequence['elbo'][i]}); {len(bad)} of {len(data)} sequences do"
        )
    steps = data.num_steps
    result: dict[str, float | int | str] = {
        "estimator": estimator,
        "elbo_nll_per_step": float(-per_sequence["elbo"].sum() / steps),
        "elbo_nll_per_step_se": float(np.sqrt(per_sequence["elbo_var"].sum()) / steps),
        "elbo_nll_per_sequence_step": float(np.mean(-per_sequence["elbo"] / data.lengths)),
    }
    if estimator == "is":
        result["is_nll_per_step"] = float(-per_sequence["lme"].sum() / steps)
        result["is_nll_per_step_se"] = float(np.sqrt(per_sequence["lme_var"].sum()) / steps)
    return {
        "loss_per_step": result["elbo_nll_per_step"],
        **result,
        "num_sequences": len(data),
        "num_steps": steps,
        "num_samples": num_samples,
    }


def _particle_filter_log_z(params, key, x, lengths, config, num_particles, resampling, covariates):
    family = family_of(config)
    log_z, _ = family.particle_filter(
        params,
        key,
        x,
        lengths,
        config=config,
        num_particles=num_particles,
        resampling=resampling,
        **covariates,
    )
    return log_z


_batch_particle_filter = jax.jit(
    _particle_filter_log_z, static_argnames=("config", "num_particles", "resampling")
)


def particle_filter_split(
    params: Params,
    key: Array,
    sequences: Batchable | SequenceSplit | Sequence[np.ndarray],
    config,
    *,
    num_particles: int,
    resampling: str = "systematic",
    rows_per_call: int = 4096,
    name: str = "split",
) -> dict[str, float | int | str]:
    """Negative log-likelihood per time step by the particle filter (``dmm_jax.filtering``):
    -sum_seq log p^(x) / total steps with K = ``num_particles`` particles per sequence, a
    stochastic upper bound on -log p(x) (in expectation) that tightens as K grows. Batches hold
    about ``rows_per_call`` sequence-particles; ``name`` names the split in errors.

    Returns ``pf_nll_per_step``, ``num_particles``, ``resampling`` and the counts.
    """
    family = family_of(config)
    if family.particle_filter is None:
        raise ValueError(f"the particle filter needs a latent per step; {family.name} has none")
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    data = as_batchable(sequences)
    batch_size = balanced_batch_size(len(data), max(1, rows_per_call // num_particles))
    log_z = np.empty(len(data))
    for i, indices in enumerate(sorted_batches(data.lengths, batch_size)):
        x, lengths = (jnp.asarray(a) for a in data.batch(indices, batch_size))
        covariates = jax.tree.map(jnp.asarray, data.batch_covariates(indices, batch_size))
        batch_key = jax.random.fold_in(key, i)
        out = _batch_particle_filter(
            params, batch_key, x, lengths, config, num_particles, resampling, covariates
        )
        log_z[indices] = np.asarray(out)[: len(indices)]
    bad = np.flatnonzero(~np.isfinite(log_z))
    if len(bad):
        i = int(bad[0])
        raise FloatingPointError(
            f"{name}: sequence {i} ({int(data.lengths[i])} steps) has a non-finite particle "
            f"filter estimate ({log_z[i]}); {len(bad)} of {len(data)} sequences do"
        )
    return {
        "pf_nll_per_step": float(-log_z.sum() / data.num_steps),
        "num_particles": num_particles,
        "resampling": resampling,
        "num_sequences": len(data),
        "num_steps": data.num_steps,
    }
