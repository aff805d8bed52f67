"""Using a trained model: sample from the prior, forecast a prefix, infer latents, fill gaps.

Plain functions of (params, key, data, config) for every model family: each goes through the
family's guide (``dmm_jax.models``) and its generation hooks, so the same call serves a DMM
and a VRNN. ``params`` is what ``fit`` or ``load_run`` returns. Shapes: N sequences, T steps,
X observation dim, Z latent dim, S draws; batch-major, ``lengths`` [N] marks the real steps
of each padded sequence. Forecast scoring is for 0/1 data (Bernoulli or NADE emission),
imputation for the Bernoulli emission.

For notes, ``logits`` and ``probs`` are p(x_td = 1 | ...) at the drawn x: the emission's
own for the Bernoulli; for the NADE, each note's given the drawn notes below it
(``dmm_jax.emissions.note_logits``), an unbiased one-draw estimate of the note's marginal.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from dmm_jax.config import BINARY_EMISSIONS
from dmm_jax.data.batching import PaddedSequences, sorted_batches
from dmm_jax.emissions import emission_mean, emission_sample, note_logits
from dmm_jax.models import family_of
from dmm_jax.models.common import sequence_mask

Array = jax.Array


def emission_log_prob(logits: Array, x: Array) -> Array:
    """log p(x_ti | ...) per entry of a Bernoulli emission, from logits so that saturated notes
    never give log(0)."""
    return x * jax.nn.log_sigmoid(logits) + (1 - x) * jax.nn.log_sigmoid(-logits)


def _generation(config):
    family = family_of(config)
    if family.generation is None:
        raise NotImplementedError(f"the {family.name} family cannot generate")
    return family.generation


def _guide_latents(params: dict, key: Array, x: Array, lengths: Array, config):
    """One trajectory z ~ q(z_{1:T} | x_{1:T}) per sequence, [N, T, Z]."""
    seeded = handlers.seed(handlers.substitute(family_of(config).guide, data=params), key)
    return handlers.trace(seeded).get_trace(x, lengths, config=config)["z"]["value"]


def _described(config, draws: dict) -> dict:
    """Adds the emission's mean (``probs`` for notes, ``mean`` otherwise) and, for notes,
    ``logits``; 0/1 draws as uint8 piano-roll entries."""
    kind = _generation(config).emission(config)
    if kind not in BINARY_EMISSIONS:
        return {**draws, "mean": emission_mean(kind, draws["emission"])}
    logits = note_logits(kind, draws["emission"], draws["x"])
    out = {**draws, "logits": logits, "probs": jax.nn.sigmoid(logits)}
    out["x"] = draws["x"].astype(jnp.uint8)
    return out


# ----------------------------------------------------------------------------- prior


@functools.partial(jax.jit, static_argnames=("config", "num_sequences", "num_steps"))
def sample_prior(
    params: dict, key: Array, config, num_sequences: int, num_steps: int
) -> dict[str, Array]:
    """Draws N sequences of T steps from p(x, z): z [N, T, Z], x [N, T, X], ``emission`` (the
    emission's parameters) and its mean: ``logits`` and ``probs`` [N, T, X] for notes,
    ``mean`` otherwise. The same key gives the same sequences."""
    gen = _generation(config)
    state = gen.start(params, config, num_sequences)
    return _described(config, gen.roll_out(params, key, config, state, num_steps))


# ----------------------------------------------------------------------------- forecasting


@functools.partial(jax.jit, static_argnames=("config", "horizon", "num_samples"))
def forecast(
    params: dict,
    key: Array,
    x_prefix: Array,
    prefix_lengths: Array,
    config,
    horizon: int,
    num_samples: int = 1,
) -> dict[str, Array]:
    """Continues each prefix x_{1:k} for ``horizon`` steps.

    The latents of the prefix are drawn from the guide run over the prefix only, the model's
    state after step k follows from them, and the model is rolled forward from there. Returns,
    with S = num_samples draws, ``x`` samples [S, N, horizon, X] and the emission's parameters
    and mean per draw (for notes: ``logits`` and ``probs`` [S, N, horizon, X] and
    ``mean_probs`` [N, horizon, X], the predictive marginals; otherwise ``mean`` and
    ``mean_of_draws``). Horizon 0 gives empty arrays: nothing new.
    """
    gen = _generation(config)

    def one(key):
        guide_key, roll_key = jax.random.split(key)
        z = _guide_latents(params, guide_key, x_prefix, prefix_lengths, config)
        state = gen.state_after(params, z, x_prefix, prefix_lengths, config)
        return gen.roll_out(params, roll_key, config, state, horizon)

    draws = _described(config, jax.vmap(one)(jax.random.split(key, num_samples)))
    draws.pop("z")
    if "probs" in draws:
        return {**draws, "mean_probs": draws["probs"].mean(0)}
    return {**draws, "mean_of_draws": draws["mean"].mean(0)}


def forecast_log_likelihood(logits: Array, x_future: Array, lengths: Array) -> Array:
    """log p(x_future | prefix) per sequence, [N], estimated by log (1/S) sum_s prod_t p_s(x_t).

    ``logits`` [S, N, H, X] from ``forecast`` (S may be 1 and N may broadcast, as for the
    baseline's constant logits); ``x_future`` [N, H, X]; steps t >= lengths[n] are ignored (a
    continuation shorter than the horizon).
    """
    log_p = emission_log_prob(logits, x_future)
    keep = jnp.arange(log_p.shape[2])[None, :] < lengths[:, None]
    per_draw = jnp.sum(jnp.where(keep[None, ..., None], log_p, 0.0), axis=(2, 3))
    return jax.scipy.special.logsumexp(per_draw, axis=0) - jnp.log(logits.shape[0])


def note_frequencies(sequences: Sequence[np.ndarray], smoothing: float = 1.0) -> np.ndarray:
    """The baseline's per-note probabilities [X]: how often each note sounds in ``sequences``.

    (count_i + smoothing) / (steps + 2 smoothing), so a note never heard keeps a small
    probability and its log-likelihood stays finite.
    """
    if not len(sequences):
        raise ValueError("note_frequencies needs at least one sequence")
    if smoothing <= 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}")
    counts = sum(np.asarray(s, np.float64).sum(0) for s in sequences)
    steps = sum(len(s) for s in sequences)
    return (counts + smoothing) / (steps + 2.0 * smoothing)


def frequency_baseline_logits(frequencies: np.ndarray) -> Array:
    """The baseline as a forecast: every step of every sequence independent with these
    per-note probabilities; logits [1, 1, 1, X] broadcast in ``forecast_log_likelihood``."""
    p = jnp.asarray(frequencies, jnp.float32)
    return (jnp.log(p) - jnp.log1p(-p))[None, None, None, :]


def forecast_split(
    params: dict,
    key: Array,
    sequences: Sequence[np.ndarray],
    config,
    *,
    prefix_length: int,
    horizon: int,
    num_samples: int = 100,
    frequencies: np.ndarray,
    batch_size: int = 32,
) -> dict[str, float | int | list[float]]:
    """Forecast log-likelihood over a split, against the per-note-frequency baseline.

    Every sequence longer than ``prefix_length`` is cut after its first k = prefix_length
    steps; the model forecasts the next min(horizon, length - k) steps from the prefix and is
    scored on the truth. Returns per-step figures (nats per forecast step, summed over
    sequences, divided by the scored steps; higher is better):

        ``model_log_likelihood_per_step``:  sum_n log p(x_{k+1:k+h} | x_{1:k}) / steps, the
            joint continuation, estimated by log (1/S) sum_s prod_j p_s(x_{k+j}). In
            expectation a lower bound (Jensen) that is loose for long horizons and few draws:
            one draw rarely follows the whole continuation.
        ``model_marginal_log_likelihood_per_step``: sum_n sum_j log p(x_{k+j} | x_{1:k}) /
            steps, each step's predictive marginal scored on its own (S draws estimate one
            step's mixture far better than a whole path's).
        ``baseline_log_likelihood_per_step``: under ``frequencies`` (no context, steps
            independent, so joint and marginal agree).

    and ``model_marginal_by_step`` / ``baseline_marginal_by_step``: for each horizon step j,
    the mean over sequences of log p(x_{k+j} | x_{1:k}) (how far ahead the model still helps).
    """
    kind = _generation(config).emission(config)
    if kind not in BINARY_EMISSIONS:
        raise NotImplementedError("forecast_split scores models of 0/1 data only")
    if prefix_length < 1:
        raise ValueError(f"prefix_length must be >= 1, got {prefix_length}")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    usable = [np.asarray(s) for s in sequences if len(s) > prefix_length]
    if not usable:
        raise ValueError(f"no sequence is longer than the prefix ({prefix_length} steps)")
    baseline = frequency_baseline_logits(frequencies)
    totals = {"model": 0.0, "baseline": 0.0}
    by_step = {"model": np.zeros(horizon), "baseline": np.zeros(horizon)}
    counts = np.zeros(horizon)
    steps = 0
    for i, start in enumerate(range(0, len(usable), batch_size)):
        batch = usable[start : start + batch_size]
        x_prefix = np.zeros((batch_size, prefix_length, config.obs_dim), np.float32)
        x_future = np.zeros((batch_size, horizon, config.obs_dim), np.float32)
        future_lengths = np.zeros(batch_size, np.int32)
        prefix_lengths = np.zeros(batch_size, np.int32)  # padded rows: empty prefix, not scored
        for n, seq in enumerate(batch):
            future = seq[prefix_length : prefix_length + horizon]
            x_prefix[n] = seq[:prefix_length]
            x_future[n, : len(future)] = future
            future_lengths[n], prefix_lengths[n] = len(future), prefix_length
        out = forecast(
            params,
            jax.random.fold_in(key, i),
            jnp.asarray(x_prefix),
            jnp.asarray(prefix_lengths),
            config,
            horizon,
            num_samples,
        )
        # Each draw's emission scored at the truth (a NADE's notes given the true lower notes).
        scored = note_logits(kind, out["emission"], jnp.asarray(x_future))
        for name, logits in (("model", scored), ("baseline", baseline)):
            joint = forecast_log_likelihood(logits, x_future, future_lengths)
            totals[name] += float(jnp.sum(joint))
            by_step[name] += np.asarray(_marginal_by_step(logits, x_future, future_lengths))
        counts += (np.arange(horizon)[None, :] < future_lengths[:, None]).sum(0)
        steps += int(future_lengths.sum())
    safe = np.maximum(counts, 1)
    return {
        "model_log_likelihood_per_step": totals["model"] / steps,
        "model_marginal_log_likelihood_per_step": float(by_step["model"].sum()) / steps,
        "baseline_log_likelihood_per_step": totals["baseline"] / steps,
        "model_marginal_by_step": (by_step["model"] / safe).tolist(),
        "baseline_marginal_by_step": (by_step["baseline"] / safe).tolist(),
        "num_sequences": len(usable),
        "num_steps": steps,
        "prefix_length": prefix_length,
        "horizon": horizon,
        "num_samples": num_samples,
    }


@jax.jit
def _marginal_by_step(logits: Array, x_future: Array, lengths: Array) -> Array:
    """sum over sequences of log (1/S) sum_s p_s(x_{k+j}), per horizon step j: [H]."""
    per_step = jnp.sum(emission_log_prob(logits, x_future), axis=-1)  # [S, N, H]
    log_marginal = jax.scipy.special.logsumexp(per_step, axis=0) - jnp.log(logits.shape[0])
    keep = jnp.arange(x_future.shape[1])[None, :] < lengths[:, None]
    return jnp.sum(jnp.where(keep, log_marginal, 0.0), axis=0)


# ----------------------------------------------------------------------------- posterior


@functools.partial(jax.jit, static_argnames=("config", "num_samples", "quantiles"))
def posterior_latents(
    params: dict,
    key: Array,
    x: Array,
    lengths: Array,
    config,
    num_samples: int = 100,
    quantiles: tuple[float, ...] = (0.05, 0.5, 0.95),
) -> dict[str, Array]:
    """Summaries of the latent trajectories under the guide, z_{1:T} ~ q(z | x_{1:T}).

    Returns ``mean`` [N, T, Z] (Monte Carlo mean over S = num_samples draws) and
    ``quantiles`` [Q, N, T, Z] at the levels ``quantiles`` (a tuple, static under jit);
    padded steps are exactly 0.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not all(0.0 <= q <= 1.0 for q in quantiles):
        raise ValueError(f"quantiles must lie in [0, 1], got {quantiles}")
    z = jax.vmap(lambda k: _guide_latents(params, k, x, lengths, config))(
        jax.random.split(key, num_samples)
    )
    real = sequence_mask(lengths, x.shape[1])[..., None]
    levels = jnp.quantile(z, jnp.asarray(quantiles, z.dtype), axis=0)
    return {
        "mean": jnp.where(real, z.mean(0), 0.0),
        "quantiles": jnp.where(real[None], levels, 0.0),
    }


# ----------------------------------------------------------------------------- imputation


@functools.partial(jax.jit, static_argnames=("config", "num_iterations"))
def impute(
    params: dict,
    key: Array,
    x: Array,
    lengths: Array,
    missing: Array,
    config,
    num_iterations: int = 20,
) -> dict[str, Array]:
    """Fills the entries of ``x`` [N, T, X] marked True in ``missing`` [N, T, X], given the rest.

    Missing entries start as rests (0); each iteration runs the guide over the filled
    sequence, draws z ~ q(z | x), and redraws only the missing entries from p(x | z). The
    guide is an approximation of p(z | x), so this is a stochastic fixed point in the spirit
    of Gibbs sampling rather than an exact posterior sampler. The values of ``x`` at missing
    entries are never read to fill them. Where x_t also feeds later steps (the VRNN's RNN
    state), the redraw from p(x_t | ...) does not weigh x_t's effect on them: an approximation
    (DMM-Aug models, whose x_t conditions the next transition, are refused).

    Returns, each [N, T, X]:
        ``x``: the last filled sequence; observed entries (and all of ``x`` when nothing is
            missing) exactly as given, in ``x``'s dtype.
        ``probs``: the emission mean averaged over iterations where missing, ``x`` elsewhere.
        ``log_prob``: where missing, log (1/I) sum_i p(x_ti | z_i) of the value ``x`` holds
            there (the predictive log-likelihood of held-out truth, if ``x`` holds it); 0
            elsewhere.
    Padded steps are never filled.
    """
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    gen = _generation(config)
    if gen.emission(config) != "bernoulli":
        # A NADE gives each note given the notes below it, not given an arbitrary subset.
        raise NotImplementedError("impute fills 0/1 data of a Bernoulli emission only")
    missing = missing & sequence_mask(lengths, x.shape[1])[..., None]
    start = jnp.where(missing, jnp.zeros_like(x), x)

    def step(filled, key):
        z_key, x_key = jax.random.split(key)
        z = _guide_latents(params, z_key, filled, lengths, config)
        decoded = gen.emission_params(params, z, filled, lengths, config)
        drawn = emission_sample("bernoulli", x_key, decoded).astype(x.dtype)
        scores = emission_log_prob(decoded[0], x.astype(decoded[0].dtype))
        return jnp.where(missing, drawn, x), (emission_mean("bernoulli", decoded), scores)

    keys = jax.random.split(key, num_iterations)
    filled, (means, scores) = jax.lax.scan(step, start, keys)
    log_prob = jax.scipy.special.logsumexp(scores, axis=0) - jnp.log(num_iterations)
    return {
        "x": filled,
        "probs": jnp.where(missing, means.mean(0), x.astype(means.dtype)),
        "log_prob": jnp.where(missing, log_prob, 0.0),
    }


def hide_entries(
    key: Array,
    x: Array,
    lengths: Array,
    fraction: float = 0.0,
    gap: tuple[int, int] | None = None,
) -> Array:
    """A ``missing`` mask [N, T, X] for ``impute``: each real entry hidden with probability
    ``fraction``, and every entry of the steps start <= t < stop of ``gap`` hidden."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    missing = jax.random.bernoulli(key, fraction, x.shape)
    if gap is not None:
        start, stop = gap
        if not 0 <= start < stop:
            raise ValueError(f"gap must be (start, stop) with 0 <= start < stop, got {gap}")
        steps = jnp.arange(x.shape[1])
        missing = missing | ((steps >= start) & (steps < stop))[None, :, None]
    return missing & sequence_mask(lengths, x.shape[1])[..., None]


def impute_split(
    params: dict,
    key: Array,
    sequences: Sequence[np.ndarray],
    config,
    *,
    frequencies: np.ndarray,
    fraction: float = 0.0,
    gap: tuple[int, int] | None = None,
    num_iterations: int = 20,
    batch_size: int = 32,
) -> dict[str, float | int]:
    """Hides entries of every sequence (``hide_entries``), imputes them, scores the truth.

    Returns ``model_log_likelihood_per_entry`` (the mean over hidden entries of
    ``impute``'s ``log_prob``), ``baseline_log_likelihood_per_entry`` (the same under the
    per-note ``frequencies``), ``model_accuracy`` / ``baseline_accuracy`` (hidden entries
    whose more probable value is the true one), and the counts.
    """
    if not fraction and gap is None:
        raise ValueError("nothing to impute: give a fraction > 0 or a gap")
    data = PaddedSequences([np.asarray(s) for s in sequences])
    baseline_logits = frequency_baseline_logits(frequencies)[0]
    baseline_probs = jax.nn.sigmoid(baseline_logits)
    sums = {"model_ll": 0.0, "baseline_ll": 0.0, "model_hits": 0, "baseline_hits": 0}
    hidden = 0
    for i, indices in enumerate(sorted_batches(data.lengths, batch_size)):
        x, lengths = (jnp.asarray(a) for a in data.batch(indices, batch_size))
        hide_key, impute_key = jax.random.split(jax.random.fold_in(key, i))
        missing = hide_entries(hide_key, x, lengths, fraction, gap)
        out = impute(params, impute_key, x, lengths, missing, config, num_iterations)
        for name, log_prob, probs in (
            ("model", out["log_prob"], out["probs"]),
            ("baseline", emission_log_prob(baseline_logits, x), baseline_probs),
        ):
            sums[f"{name}_ll"] += float(jnp.sum(jnp.where(missing, log_prob, 0.0)))
            sums[f"{name}_hits"] += int(jnp.sum(missing & ((probs > 0.5) == (x > 0.5))))
        hidden += int(jnp.sum(missing))
    if not hidden:
        raise ValueError("no entry was hidden (the gap lies beyond every sequence?)")
    return {
        "model_log_likelihood_per_entry": sums["model_ll"] / hidden,
        "baseline_log_likelihood_per_entry": sums["baseline_ll"] / hidden,
        "model_accuracy": sums["model_hits"] / hidden,
        "baseline_accuracy": sums["baseline_hits"] / hidden,
        "num_hidden_entries": hidden,
        "num_sequences": len(data),
        "num_iterations": num_iterations,
    }
