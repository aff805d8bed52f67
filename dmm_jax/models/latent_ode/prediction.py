"""Predictions of a trained Latent ODE: z_0 from the guide given what was observed, then the
decoder's mean along the ODE's path at any query times (interpolation and extrapolation).

    interpolation: observe some points of a series, predict every point of its time grid
    extrapolation: observe the points before a time, predict the points after it

Both are the same computation: the guide reads only the observed entries (NaN elsewhere),
and the path is solved from the series' first time through the query times.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from dmm_jax.config import LatentODEConfig
from dmm_jax.data.irregular import (
    IrregularSeries,
    IrregularTask,
    as_sequence_arrays,
    series_from_arrays,
    split_observed_targets,
)
from dmm_jax.models.latent_ode.model_guide import guide
from dmm_jax.models.latent_ode.networks import decoder, ode_function, solve

Array = jax.Array


def posterior_z0(params: dict, key: Array, config: LatentODEConfig, x, lengths, dt, samples: int):
    """``samples`` draws of z_0 from q(z_0 | x) per series, [S, B, Z]."""

    def draw(k):
        seeded = handlers.seed(handlers.substitute(guide, data=params), k)
        return seeded(x, lengths, config=config, dt=dt)

    return jax.vmap(draw)(jax.random.split(key, samples))


def decode_path(params: dict, config: LatentODEConfig, z0: Array, query_times: Array) -> Array:
    """The decoder's mean [B, T_q, D] along the path from z0 [B, Z] at ``query_times``
    [B, T_q] (non-decreasing; the first is each series' start time t_0)."""
    f = ode_function(config)
    path = solve(lambda z: f.apply({"params": params["ode$params"]}, z), z0, query_times, config)
    return decoder(config).apply({"params": params["decoder$params"]}, path)


@functools.partial(jax.jit, static_argnames=("config", "samples"))
def predict(
    params: dict,
    key: Array,
    config: LatentODEConfig,
    x: Array,
    lengths: Array,
    dt: Array,
    query_times: Array,
    samples: int = 3,
) -> Array:
    """Predicted means [S, B, T_q, D] at ``query_times`` given the observed ``x`` [B, T, D]
    (NaN: not observed) at the times of ``dt`` [B, T], one per draw of z_0."""
    z0 = posterior_z0(params, key, config, x, lengths, dt, samples)
    return jax.vmap(lambda z: decode_path(params, config, z, query_times))(z0)


def predict_series(
    params: dict,
    key: Array,
    config: LatentODEConfig,
    observed: IrregularSeries,
    query_times: np.ndarray,
    samples: int,
) -> np.ndarray:
    """``predict`` given the ``observed`` series: means [S, N, T_q, D] at ``query_times``
    [N, T_q] (whose first column is each series' start time)."""
    arrays = as_sequence_arrays(observed)
    inputs = (arrays.x, arrays.lengths, arrays.dt, query_times)
    return np.asarray(predict(params, key, config, *(jnp.asarray(a) for a in inputs), samples))


def task_mse(
    params: dict, key: Array, config: LatentODEConfig, task: IrregularTask, samples: int = 3
) -> float:
    """Mean squared error per target entry of an ``IrregularTask``,
    averaged over ``samples`` draws of z_0 as the paper's reference code averages it: the
    guide reads ``task.observed``; the targets are ``task.targets`` (every point of the series
    for interpolation, the second half for extrapolation)."""
    targets = task.targets
    start = task.observed.t[:, :1]  # solve from each series' first time
    query = np.concatenate([start, targets.t], axis=1)
    prediction = predict_series(params, key, config, task.observed, query, samples)[:, :, 1:]
    mask = targets.mask
    error = (np.asarray(prediction) - np.nan_to_num(targets.x)[None]) ** 2
    return float(np.where(mask[None], error, 0.0).sum() / (samples * mask.sum()))


def extrapolate(
    params: dict,
    key: Array,
    config: LatentODEConfig,
    series: IrregularSeries,
    samples: int = 3,
    grid_points: int = 200,
) -> dict:
    """The extrapolation task on ``series``: observe each series' points before the midpoint
    of its time range, predict those after it (``split_observed_targets``).

    Returns ``test_mse`` (``task_mse``, over the points after the midpoints), the ``task``,
    and for pictures ``grid`` [N, G] (G = ``grid_points`` evenly spaced times over each
    series' range) with ``draws`` [S, N, G, D], the decoder's mean along the path of each of
    S draws of z_0 given the observed half.
    """
    task = split_observed_targets(series, "extrapolate")
    mse = task_mse(params, key, config, task, samples)
    last = series.t[np.arange(series.num_series), series.lengths - 1]
    grid = np.linspace(series.t[:, 0], last, grid_points, axis=1).astype(np.float32)
    draws = predict_series(params, key, config, task.observed, grid, samples)
    return {"test_mse": mse, "task": task, "grid": grid, "draws": draws}


def split_mse(params: dict, key: Array, config: LatentODEConfig, arrays, samples: int = 3) -> float:
    """The interpolation MSE of a split of padded arrays (``SequenceArrays`` with ``dt``): the
    decoder's mean at every observed point given all of the split's observed points
    (``task_mse`` of the "interpolate" task). What ``fit`` logs as ``<split>_mse``."""
    task = split_observed_targets(series_from_arrays(arrays), "interpolate")
    return task_mse(params, key, config, task, samples)
