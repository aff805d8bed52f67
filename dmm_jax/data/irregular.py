"""Irregularly sampled time series: a container, a validated ``.npz`` format, and the toy
periodic data of the Latent ODE paper (Rubanova, Chen & Duvenaud 2019).

Shapes, batch-major: N series, T time slots, D features. A set of series is

- ``t`` [N, T] float32: observation times, strictly increasing over the first ``lengths[i]``
  slots of series i (different series may have different times);
- ``x`` [N, T, D] float32: values, NaN where a feature was not observed at that time;
- ``lengths`` [N] int32 in 1..T: slots at or past ``lengths[i]`` are padding, normalised to
  t = the series' last real time and x = NaN.

An ``.npz`` file holds exactly the arrays ``t``, ``x`` and ``lengths``; :func:`load_irregular`
refuses anything else with a one-line :class:`DataError` naming the file and the problem.

The two tasks of the paper (:func:`split_observed_targets`):

- interpolation: the encoder sees a (possibly subsampled) set of points, the decoder is scored
  on every point of the series;
- extrapolation: the encoder sees the points before the midpoint of each series' time range,
  the decoder is scored on the points from the midpoint on.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
from typing import Literal

import numpy as np

from dmm_jax.data.canonical import DataError
from dmm_jax.files import atomic_write_bytes

ARRAY_NAMES = ("t", "x", "lengths")
MODES = ("interpolate", "extrapolate")


@dataclasses.dataclass(frozen=True, eq=False)
class IrregularSeries:
    """N series of irregularly timed, possibly partly observed values (module docstring).

    The constructor validates (raising :class:`DataError`), casts to float32/int32 and
    normalises the padding; a series may hold no observed value at all (the first half of a
    short series in the extrapolation task can be empty), unlike a file.
    """

    t: np.ndarray
    x: np.ndarray
    lengths: np.ndarray

    def __post_init__(self):
        t, x, lengths = _normalised(self.t, self.x, self.lengths, "IrregularSeries")
        object.__setattr__(self, "t", t)
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "lengths", lengths)

    def __len__(self) -> int:
        return self.num_series

    @property
    def num_series(self) -> int:
        return self.x.shape[0]

    @property
    def dim(self) -> int:
        return self.x.shape[2]

    @property
    def real(self) -> np.ndarray:
        """[N, T] bool: slots within each series' length."""
        return np.arange(self.t.shape[1])[None, :] < self.lengths[:, None]

    @property
    def mask(self) -> np.ndarray:
        """[N, T, D] bool: the observed entries (not NaN and within the length)."""
        return ~np.isnan(self.x) & self.real[..., None]

    @property
    def num_observed(self) -> int:
        return int(self.mask.sum())

    def subset(self, indices) -> IrregularSeries:
        """The series at ``indices`` (integers or a boolean mask over the N series)."""
        indices = np.atleast_1d(np.asarray(indices))
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        return IrregularSeries(self.t[indices], self.x[indices], self.lengths[indices])

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"t": self.t, "x": self.x, "lengths": self.lengths}


@dataclasses.dataclass(frozen=True, eq=False)
class IrregularTask:
    """One split set up for a task: what the encoder sees and what the decoder is scored on.

    ``observed``: the encoder's input; ``targets``: the points to predict (NaN where there is
    nothing to score); ``truth``: every point of the series, before any subsampling or split.
    """

    mode: Literal["interpolate", "extrapolate"]
    observed: IrregularSeries
    targets: IrregularSeries
    truth: IrregularSeries


def load_irregular(path: str | os.PathLike) -> IrregularSeries:
    """Reads and validates an ``.npz`` holding exactly ``t``, ``x`` and ``lengths``."""
    from dmm_jax.data.arrays import read_npz  # arrays reads this format through here

    path = pathlib.Path(path)
    arrays = read_npz(path, "irregular series file")
    unknown = sorted(set(arrays) - set(ARRAY_NAMES))
    if unknown:
        raise DataError(f"{path}: unknown arrays {unknown}; expected exactly {list(ARRAY_NAMES)}")
    missing = [name for name in ARRAY_NAMES if name not in arrays]
    if missing:
        raise DataError(f"{path}: missing arrays {missing}; expected exactly {list(ARRAY_NAMES)}")
    t, x, lengths = _normalised(arrays["t"], arrays["x"], arrays["lengths"], str(path))
    if len(lengths) == 0:
        raise DataError(f"{path}: holds no series (N = 0)")
    empty = np.flatnonzero(~np.any(~np.isnan(x), axis=(1, 2)))  # padding is NaN already
    if len(empty):
        raise DataError(
            f"{path}: series {empty[0]} has no observed value (all of x is NaN within its "
            f"length; {len(empty)} such series in all)"
        )
    return IrregularSeries(t, x, lengths)


def save_irregular(path: str | os.PathLike, series: IrregularSeries) -> pathlib.Path:
    """Atomically writes ``series`` to ``path`` (exactly that name: no suffix is added)."""
    buffer = io.BytesIO()
    np.savez(buffer, **series.as_dict())
    return atomic_write_bytes(path, buffer.getvalue())


def split_observed_targets(
    series: IrregularSeries,
    mode: Literal["interpolate", "extrapolate"],
    *,
    subsample: int | None = None,
    rng: np.random.Generator | int | None = None,
) -> IrregularTask:
    """Sets ``series`` up for interpolation or extrapolation.

    Args:
        series: every point of every series (becomes ``truth``).
        mode: ``"interpolate"``: observed = the series (subsampled if asked) on its own time
            slots, targets = the whole series. ``"extrapolate"``: with m_i = (t_i[0] +
            t_i[last]) / 2, observed = the points with t < m_i (subsampled if asked), targets =
            the points with t >= m_i, each packed from slot 0 with its own lengths. Needs at
            least two points per series, which makes both halves non-empty. (The reference
            code cuts its one shared grid at index T // 2, near the midpoint for uniform times;
            the midpoint also serves series with their own times and lengths.)
        subsample: if set, each series keeps ``subsample`` random observed time points of
            ``observed`` (all of them if it has fewer) and the others become NaN; the time slots
            stay. The reference code redraws this every time it forms a batch; call again with
            a fresh ``rng`` to do the same.
        rng: a ``numpy.random.Generator`` or seed; required with ``subsample``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "interpolate":
        observed, targets = series, series
    else:
        short = np.flatnonzero(series.lengths < 2)
        if len(short):
            raise ValueError(
                f"extrapolation needs at least 2 points per series; series {short[0]} has 1"
            )
        last = series.t[np.arange(series.num_series), series.lengths - 1]
        midpoint = (series.t[:, 0].astype(np.float64) + last) / 2  # exact for float32 inputs
        # Times increase, so the first half is a prefix of each series and the second a suffix.
        num_before = np.sum(series.real & (series.t < midpoint[:, None]), axis=1)
        observed = _window(series, np.zeros_like(num_before), num_before)
        targets = _window(series, num_before, series.lengths - num_before)
    if subsample is not None:
        if rng is None:
            raise ValueError("subsample needs an rng (a numpy Generator or a seed)")
        observed = _subsample(observed, subsample, np.random.default_rng(rng))
    return IrregularTask(mode, observed, targets, series)


def periodic_dataset(
    n: int = 1000,
    n_points: int = 100,
    max_t: float = 5.0,
    noise_weight: float = 0.01,
    seed: int = 1991,
    subsample: int | None = None,
    extrapolate: bool = False,
) -> dict[str, IrregularTask]:
    """The Latent ODE paper's 1-D periodic toy data, as its reference code draws it.

    One time grid shared by all series: {0} together with n_points - 1 sorted draws of
    U(0, max_t]. Series i: frequency f_i ~ U(0.4, 0.8), offset c_i = 1 + N(0, 0.1^2),

        y_i(t) = sin(2 pi f_i t) + c_i,

    plus noise_weight * U[0, 1) on every point but the first (uniform noise, as the reference
    adds; so x[i, 0] = c_i exactly). The first 80% of the series are ``train``, the rest
    ``test``; each is an :class:`IrregularTask` (D = 1) from :func:`split_observed_targets`
    with mode ``"extrapolate"`` if ``extrapolate`` else ``"interpolate"``, and ``subsample``.

    One ``numpy.random.Generator(seed)`` draws, in order: the grid, the n frequencies, the n
    offsets, the noise [n, n_points - 1], then the train and the test subsample. The numbers are
    not those of the reference (it mixes torch's and numpy's global generators), and the grid is
    the same in both modes (the reference's extrapolation flag adds one point and stretches
    max_t by (n_points + 1) / n_points, a side effect of adding a boolean to a count).
    """
    if n < 2 or n_points < 2:
        raise ValueError(f"n and n_points must be at least 2, got n={n}, n_points={n_points}")
    if not (np.isfinite(max_t) and max_t > 0) or not noise_weight >= 0:
        raise ValueError(f"need max_t > 0 and noise_weight >= 0, got {max_t}, {noise_weight}")
    if subsample is not None and not 1 <= subsample <= n_points:
        raise ValueError(f"subsample must be in 1..{n_points}, got {subsample}")
    rng = np.random.default_rng(seed)
    times = _time_grid(rng, n_points, max_t)
    frequency = rng.uniform(0.4, 0.8, n)
    offset = 1.0 + rng.normal(0.0, 0.1, n)
    y = np.sin(2 * np.pi * frequency[:, None] * times.astype(np.float64)) + offset[:, None]
    y[:, 1:] += noise_weight * rng.random((n, n_points - 1))
    full = IrregularSeries(
        np.broadcast_to(times, (n, n_points)), y[..., None], np.full(n, n_points, np.int32)
    )
    num_train = int(n * 0.8)
    mode = "extrapolate" if extrapolate else "interpolate"
    return {
        name: split_observed_targets(full.subset(indices), mode, subsample=subsample, rng=rng)
        for name, indices in (("train", np.arange(num_train)), ("test", np.arange(num_train, n)))
    }


def _time_grid(rng: np.random.Generator, n_points: int, max_t: float) -> np.ndarray:
    # 1 - U[0, 1) lies in (0, 1], so no draw repeats the 0. Two draws can still round to one
    # float32 (about once in a few thousand grids of 100 points); redraw then, so that times
    # stay strictly increasing.
    for _ in range(100):
        draws = np.sort((max_t * (1.0 - rng.random(n_points - 1))).astype(np.float32))
        times = np.concatenate([np.zeros(1, np.float32), draws])
        if np.all(np.diff(times) > 0):
            return times
    raise ValueError(f"cannot draw {n_points} distinct float32 times in (0, {max_t}]")


def _window(series: IrregularSeries, start: np.ndarray, lengths: np.ndarray) -> IrregularSeries:
    """Slots start[i] .. start[i] + lengths[i] - 1 of each series, moved to the front."""
    num_steps = int(lengths.max(initial=1))
    index = np.minimum(start[:, None] + np.arange(num_steps), series.t.shape[1] - 1)
    t = np.take_along_axis(series.t, index, axis=1)
    x = np.take_along_axis(series.x, index[..., None], axis=1)
    return IrregularSeries(t, x, lengths.astype(np.int32))  # the constructor re-pads


def _subsample(series: IrregularSeries, k: int, rng: np.random.Generator) -> IrregularSeries:
    """Keeps k random observed time points per series (a point: any feature observed)."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"subsample must be a whole number of points >= 1, got {k!r}")
    observed = series.mask.any(axis=2)  # [N, T]
    # The k smallest random keys among observed points: a uniform choice without replacement.
    keys = np.where(observed, rng.random(observed.shape), np.inf)
    chosen = np.argsort(keys, axis=1)[:, :k]
    keep = np.zeros_like(observed)
    np.put_along_axis(keep, chosen, True, axis=1)
    keep &= observed  # a series with fewer than k observed points keeps them all
    return IrregularSeries(series.t, np.where(keep[..., None], series.x, np.nan), series.lengths)


def _numeric(value, name: str, ndim: int, kinds: str, source: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError as err:  # ragged nested lists
        raise DataError(f"{source}: {name} is not an array ({err})") from err
    if array.dtype.kind not in kinds:
        kind = "integer" if kinds == "iu" else "numeric (integer or float)"
        raise DataError(f"{source}: {name} must be {kind}, got dtype {array.dtype}")
    if array.ndim != ndim:
        dims = {"t": "[N, T]", "x": "[N, T, D]", "lengths": "[N]"}[name]
        raise DataError(f"{source}: {name} must be {ndim}-D {dims}, got shape {array.shape}")
    return array


def _normalised(t, x, lengths, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float32 t, x and int32 lengths, with the padding normalised."""
    t = _numeric(t, "t", 2, "iuf", source)
    x = _numeric(x, "x", 3, "iuf", source)
    lengths = _numeric(lengths, "lengths", 1, "iu", source)
    if x.shape[:2] != t.shape or lengths.shape != t.shape[:1] or x.shape[2] == 0:
        raise DataError(
            f"{source}: shapes do not match: t {t.shape} [N, T], x {x.shape} [N, T, D >= 1], "
            f"lengths {lengths.shape} [N]"
        )
    num_steps = t.shape[1]
    bad = np.flatnonzero((lengths < 1) | (lengths > num_steps))
    if len(bad):
        raise DataError(
            f"{source}: lengths must be in 1..{num_steps} (T), got {lengths[bad[0]]} "
            f"for series {bad[0]}"
        )
    # Checked after the cast to float32, the precision kept: distinct float64 times can merge.
    with np.errstate(over="ignore"):
        t, x = t.astype(np.float32), x.astype(np.float32)
    lengths = lengths.astype(np.int32)
    real = np.arange(num_steps)[None, :] < lengths[:, None]
    where = np.argwhere(real & ~np.isfinite(t))
    if len(where):
        i, j = where[0]
        raise DataError(f"{source}: time t[{i}, {j}] = {t[i, j]} is not finite")
    where = np.argwhere(real[:, 1:] & (t[:, 1:] <= t[:, :-1]))
    if len(where):
        i, j = where[0] + (0, 1)
        raise DataError(
            f"{source}: times of series {i} are not strictly increasing at position {j} "
            f"(t[{i}, {j - 1}] = {t[i, j - 1]}, t[{i}, {j}] = {t[i, j]})"
        )
    where = np.argwhere(real[..., None] & np.isinf(x))
    if len(where):
        i, j, d = where[0]
        raise DataError(f"{source}: x[{i}, {j}, {d}] is infinite (use NaN for an unobserved value)")
    last = t[np.arange(len(lengths)), lengths - 1]
    t = np.where(real, t, last[:, None]).astype(np.float32)
    x = np.where(real[..., None], x, np.nan).astype(np.float32)
    return t, x, lengths


def as_sequence_arrays(series: IrregularSeries, source: str = "irregular series"):
    """The series as :class:`dmm_jax.data.arrays.SequenceArrays`, the padded batches every
    model family trains on: ``x`` (NaN where not observed) and ``dt`` with dt[:, 0] = t_0 and
    dt[:, k] = t_k - t_{k-1} (0 on padding), from which the Latent ODE rebuilds the times."""
    from dmm_jax.data.arrays import SequenceArrays

    t = series.t.astype(np.float64)
    dt = np.where(series.real, np.diff(t, axis=1, prepend=0.0), 0.0)
    return SequenceArrays(series.x, series.lengths, dt=dt.astype(np.float32), source=source)


def series_from_arrays(arrays) -> IrregularSeries:
    """The inverse of :func:`as_sequence_arrays`: times t = cumsum(dt) (dt[:, 0] = t_0) of a
    ``SequenceArrays`` with ``dt``; without ``dt`` the steps are at 0, 1, 2, ..."""
    x, lengths = np.asarray(arrays.x), np.asarray(arrays.lengths)
    if arrays.dt is None:
        t = np.broadcast_to(np.arange(x.shape[1], dtype=np.float64), x.shape[:2])
    else:
        t = np.cumsum(np.asarray(arrays.dt, np.float64), axis=1)
    return IrregularSeries(t, x, lengths)


def series_dataset(series: IrregularSeries, name: str, source: str):
    """An :class:`dmm_jax.data.arrays.ArrayDataset` of one set of series, split in file order:
    the first 80% train, the next 10% valid, the last 10% test (each at least one series)."""
    from dmm_jax.data.arrays import ArrayDataset

    n = series.num_series
    if n < 3:
        raise DataError(f"{source}: needs at least 3 series for train/valid/test, has {n}")
    num_train, num_valid = max(1, int(0.8 * n)), max(1, int(0.1 * n))
    bounds = {"train": (0, num_train), "valid": (num_train, num_train + num_valid)}
    bounds["test"] = (num_train + num_valid, n)
    splits = {
        split: as_sequence_arrays(series.subset(np.arange(*b)), f"{source} ({split})")
        for split, b in bounds.items()
    }
    return ArrayDataset(name, source, **splits)


def periodic_arrays(
    subsample: int | None = 50, seed: int = 1991, n: int = 1000, whole_train: bool = False
):
    """The periodic toy data (:func:`periodic_dataset`, interpolation) as an ``ArrayDataset``:
    ``train`` the observed points of the first 80% of the series (``whole_train``: all their
    points, for an encoder that draws its own context, ``LatentODEConfig.context_points``),
    ``test`` the observed points of the rest (the reference code has no validation split)."""
    from dmm_jax.data.arrays import ArrayDataset

    tasks = periodic_dataset(n=n, subsample=subsample, seed=seed)
    source = f"generated (n={n}, subsample={subsample}, seed={seed})"
    train = tasks["train"].truth if whole_train else tasks["train"].observed
    return ArrayDataset(
        "periodic",
        source,
        as_sequence_arrays(train, f"{source} (train{', whole series' if whole_train else ''})"),
        None,
        as_sequence_arrays(tasks["test"].observed, f"{source} (test)"),
    )
