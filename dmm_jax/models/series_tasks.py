"""The tasks of irregularly sampled series, for any continuous-time family's ``predict``:

    interpolation: observe some points of a series, predict every point of its time grid
    extrapolation: observe the points before the midpoint of its time range, predict after

``predict(params, key, config, x [B, T, D], lengths [B], dt [B, T], query_times [B, T_q],
samples) -> [S, B, T_q, D]`` gives the predicted means at the query times (non-decreasing;
the first is each series' start time) given what was observed (NaN: not observed), one per
draw of the family's latents (the same S copies for a family without latents). The test
MSE is averaged over the draws as the paper's reference code averages it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dmm_jax.data.irregular import (
    IrregularSeries,
    IrregularTask,
    as_sequence_arrays,
    series_from_arrays,
    split_observed_targets,
)

Array = jax.Array
Predict = Callable[..., Array]


def predict_series(
    predict: Predict,
    params: dict,
    key: Array,
    config,
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
    predict: Predict, params: dict, key: Array, config, task: IrregularTask, samples: int = 3
) -> float:
    """Mean squared error per target entry of an ``IrregularTask``, averaged over ``samples``
    draws: the family reads ``task.observed``; the targets are ``task.targets`` (every point
    of the series for interpolation, the second half for extrapolation)."""
    targets = task.targets
    start = task.observed.t[:, :1]  # predictions start from each series' first time
    query = np.concatenate([start, targets.t], axis=1)
    prediction = predict_series(predict, params, key, config, task.observed, query, samples)
    mask = targets.mask
    error = (prediction[:, :, 1:] - np.nan_to_num(targets.x)[None]) ** 2
    return float(np.where(mask[None], error, 0.0).sum() / (samples * mask.sum()))


def extrapolate(
    predict: Predict,
    params: dict,
    key: Array,
    config,
    series: IrregularSeries,
    samples: int = 3,
    grid_points: int = 200,
) -> dict:
    """The extrapolation task on ``series`` (``split_observed_targets``).

    Returns ``test_mse`` (``task_mse``, over the points after the midpoints), the ``task``,
    and for pictures ``grid`` [N, G] (G = ``grid_points`` evenly spaced times over each
    series' range) with ``draws`` [S, N, G, D], the predicted means given the observed half.
    """
    task = split_observed_targets(series, "extrapolate")
    mse = task_mse(predict, params, key, config, task, samples)
    last = series.t[np.arange(series.num_series), series.lengths - 1]
    grid = np.linspace(series.t[:, 0], last, grid_points, axis=1).astype(np.float32)
    draws = predict_series(predict, params, key, config, task.observed, grid, samples)
    return {"test_mse": mse, "task": task, "grid": grid, "draws": draws}


def split_mse(predict: Predict, params: dict, key: Array, config, arrays, samples: int = 3):
    """The interpolation MSE of a split of padded arrays (``SequenceArrays`` with ``dt``): the
    predicted means at every observed point given all of the split's observed points
    (``task_mse`` of the "interpolate" task). What ``fit`` logs as ``<split>_mse``."""
    task = split_observed_targets(series_from_arrays(arrays), "interpolate")
    return task_mse(predict, params, key, config, task, samples)
