"""Irregularly sampled series: the container, the validated .npz round trip with its one-line
errors, the task splits, and the Latent ODE paper's periodic toy data."""

import re

import numpy as np
import pytest

from dmm_jax.data.canonical import DataError
from dmm_jax.data.irregular import (
    IrregularSeries,
    load_irregular,
    periodic_dataset,
    save_irregular,
    split_observed_targets,
)


def _arrays() -> dict[str, np.ndarray]:
    """Three series of 2 features over T = 4 slots, lengths 4, 2, 3; junk in the padding."""
    t = np.array([[0.0, 0.5, 1.2, 3.0], [0.1, 0.2, np.nan, -7.0], [1.0, 2.0, 4.0, 0.0]])
    x = np.arange(24, dtype=np.float64).reshape(3, 4, 2)
    x[0, 1, 0] = x[2, 0, :] = np.nan  # unobserved entries
    x[1, 3, 1] = np.inf  # padding: ignored
    return {"t": t, "x": x, "lengths": np.array([4, 2, 3])}


def _set(name: str, index, value):
    def edit(arrays):
        array = arrays[name].copy()
        array[index] = value
        return {**arrays, name: array}

    return edit


BAD_FILES = [
    (lambda a: {**a, "y": np.zeros(2)}, r"unknown arrays \['y'\]; expected exactly"),
    (lambda a: {"t": a["t"], "x": a["x"]}, r"missing arrays \['lengths'\]"),
    (lambda a: {**a, "t": a["t"][0]}, r"t must be 2-D \[N, T\], got shape \(4,\)"),
    (lambda a: {**a, "x": a["x"][..., 0]}, r"x must be 3-D \[N, T, D\]"),
    (
        lambda a: {**a, "lengths": a["lengths"][:, None]},
        r"lengths must be 1-D \[N\], got shape \(3, 1\)",
    ),
    (lambda a: {**a, "x": a["x"][:, :3]}, r"shapes do not match: t \(3, 4\) .* x \(3, 3, 2\)"),
    (lambda a: {**a, "lengths": a["lengths"][:2]}, r"shapes do not match: .* lengths \(2,\)"),
    (lambda a: {**a, "x": a["x"].astype(str)}, r"x must be numeric .* got dtype <U"),
    (lambda a: {**a, "t": a["t"] + 0j}, "t must be numeric .* got dtype complex128"),
    (lambda a: {**a, "lengths": a["lengths"] * 1.0}, "lengths must be integer, got dtype float64"),
    (_set("t", (2, 1), np.nan), r"time t\[2, 1\] = nan is not finite"),
    (_set("t", (0, 3), np.inf), r"time t\[0, 3\] = inf is not finite"),
    (_set("t", (2, 2), 2.0), r"times of series 2 are not strictly increasing at position 2 "),
    (
        _set("t", (0, 1), -1.0),
        r"times of series 0 are not strictly increasing at position 1 \(t\[0, 0\]",
    ),
    (
        _set("t", (1, 1), 0.1 + 1e-12),
        "times of series 1 are not strictly increasing",
    ),  # float32 merges
    (_set("lengths", 1, 0), r"lengths must be in 1\.\.4 \(T\), got 0 for series 1"),
    (_set("lengths", 2, 5), r"lengths must be in 1\.\.4 \(T\), got 5 for series 2"),
    (_set("x", (0, 2, 1), -np.inf), r"x\[0, 2, 1\] is infinite \(use NaN"),
    (_set("x", (1, slice(0, 2)), np.nan), "series 1 has no observed value"),
    (lambda a: {k: v[:0] for k, v in a.items()}, r"holds no series \(N = 0\)"),
]


@pytest.mark.parametrize("edit, message", BAD_FILES)
def test_bad_files_raise_one_line_errors_naming_the_file(tmp_path, edit, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **edit(_arrays()))
    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + message) as info:
        load_irregular(path)
    assert "\n" not in str(info.value)


def test_unreadable_or_absent_files_are_refused(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz: not a readable .npz file"):
        load_irregular(tmp_path / "junk.npz")
    np.savez(tmp_path / "obj.npz", **{**_arrays(), "t": np.array([[0.0], None], dtype=object)})
    with pytest.raises(DataError, match="obj.npz: not a readable .npz file"):  # no unpickling
        load_irregular(tmp_path / "obj.npz")
    with pytest.raises(DataError, match="no irregular series file at .*absent.npz"):
        load_irregular(tmp_path / "absent.npz")


def test_round_trip_normalises_padding_and_keeps_values(tmp_path):
    arrays = _arrays()
    series = IrregularSeries(**arrays)
    assert series.t.dtype == np.float32 and series.x.dtype == np.float32
    assert series.lengths.dtype == np.int32
    assert (series.num_series, series.dim, len(series)) == (3, 2, 3)
    np.testing.assert_array_equal(
        series.t[1], np.float32([0.1, 0.2, 0.2, 0.2])
    )  # padding: last real time
    np.testing.assert_array_equal(series.t[2, 3], 4.0)
    assert np.isnan(series.x[1, 2:]).all() and np.isnan(series.x[2, 3]).all()
    np.testing.assert_array_equal(series.x[0], arrays["x"][0])
    # 4*2 + 2*2 + 3*2 real entries, 3 of them NaN
    assert series.num_observed == 15 == series.mask.sum()
    assert not series.mask[2, 0].any() and series.mask[0, 1].tolist() == [False, True]

    path = save_irregular(tmp_path / "sub" / "series.npz", series)
    assert path == tmp_path / "sub" / "series.npz"
    assert [p.name for p in path.parent.iterdir()] == ["series.npz"]  # no temporary left
    loaded = load_irregular(path)
    for name in ("t", "x", "lengths"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(series, name))

    picked = loaded.subset([2, 0])
    np.testing.assert_array_equal(picked.lengths, [3, 4])
    np.testing.assert_array_equal(picked.x[1], series.x[0])
    assert loaded.subset(np.array([False, True, False])).num_observed == 4


def test_in_memory_series_may_have_nothing_observed_but_not_bad_times():
    arrays = _arrays()
    arrays["x"][1] = np.nan
    assert IrregularSeries(**arrays).mask[1].sum() == 0  # a file would be refused
    with pytest.raises(DataError, match="IrregularSeries: times of series 0"):
        IrregularSeries(**_set("t", (0, 2), 0.0)(arrays))


def test_extrapolation_splits_each_series_at_the_midpoint_of_its_time_range():
    arrays = _arrays()
    arrays["x"][2, 0] = 1.0
    task = split_observed_targets(IrregularSeries(**arrays), "extrapolate")
    # midpoints 1.5, 0.15, 2.5: observed prefixes of 3, 1, 2 points, the rest are targets
    np.testing.assert_array_equal(task.observed.lengths, [3, 1, 2])
    np.testing.assert_array_equal(task.targets.lengths, [1, 1, 1])
    assert task.observed.t.shape == (3, 3) and task.targets.t.shape == (3, 1)
    np.testing.assert_array_equal(task.observed.t[0], np.float32([0.0, 0.5, 1.2]))
    np.testing.assert_array_equal(task.targets.t[:, 0], np.float32([3.0, 0.2, 4.0]))
    np.testing.assert_array_equal(task.targets.x[:, 0], task.truth.x[[0, 1, 2], [3, 1, 2]])
    assert task.observed.num_observed + task.targets.num_observed == task.truth.num_observed
    one_point = IrregularSeries(**{**arrays, "lengths": np.array([4, 1, 3])})
    with pytest.raises(ValueError, match="series 1 has 1"):
        split_observed_targets(one_point, "extrapolate")
    with pytest.raises(ValueError, match="mode must be one of"):
        split_observed_targets(one_point, "forecast")


def test_subsample_keeps_time_points_with_any_feature_and_needs_an_rng():
    series = IrregularSeries(**_arrays())  # observed points per series: 4, 2, 2
    with pytest.raises(ValueError, match="needs an rng"):
        split_observed_targets(series, "interpolate", subsample=2)
    task = split_observed_targets(series, "interpolate", subsample=3, rng=0)
    kept = task.observed.mask.any(axis=2).sum(axis=1)
    np.testing.assert_array_equal(kept, [3, 2, 2])  # fewer than 3: all kept
    assert task.targets is series and task.truth is series
    np.testing.assert_array_equal(task.observed.t, series.t)  # the time slots stay
    kept = task.observed.mask
    np.testing.assert_array_equal(task.observed.x[kept], series.x[kept])


def test_periodic_shapes_grid_and_splits():
    data = periodic_dataset(n=50)
    train, test = data["train"], data["test"]
    assert train.mode == "interpolate" and train.observed is train.truth
    assert train.truth.x.shape == (40, 100, 1) and test.truth.x.shape == (10, 100, 1)
    assert (train.truth.lengths == 100).all() and train.truth.num_observed == 4000
    grid = train.truth.t[0]
    assert (train.truth.t == grid).all() and (test.truth.t == grid).all()  # one shared grid
    assert grid[0] == 0.0 and (np.diff(grid) > 0).all()
    assert 0.0 < grid[1] and grid[-1] <= 5.0 and grid[-1] > 4.5


def test_periodic_values_follow_the_documented_draws():
    n, noise_weight = 30, 0.01
    data = periodic_dataset(n=n, n_points=40, max_t=5.0, noise_weight=noise_weight, seed=7)
    x = np.concatenate([data["train"].truth.x, data["test"].truth.x])[..., 0]
    times = data["train"].truth.t[0].astype(np.float64)
    # An independent rebuild in the reference's own way: phase integrated step by step.
    rng = np.random.default_rng(7)
    rng.random(39)  # the grid
    frequency, offset = rng.uniform(0.4, 0.8, n), 1.0 + rng.normal(0.0, 0.1, n)
    clean = np.zeros((n, 40))
    for i in range(n):
        phase = 0.0
        for j in range(1, 40):
            phase += 2 * np.pi * frequency[i] * (times[j] - times[j - 1])
            clean[i, j] = np.sin(phase)
    clean += offset[:, None]
    np.testing.assert_allclose(x[:, 0], offset, rtol=0, atol=1e-6)  # the first point: no noise
    noise = x[:, 1:] - clean[:, 1:]
    assert noise.min() > -1e-5 and noise.max() < noise_weight + 1e-5  # uniform, not Gaussian
    assert abs(noise.mean() - noise_weight / 2) < 0.1 * noise_weight


def test_periodic_statistics_match_the_papers_data():
    data = periodic_dataset(n=1000)
    x = np.concatenate([data["train"].truth.x, data["test"].truth.x])[..., 0]
    offset = x[:, 0]  # sin(0) = 0 and no noise on the first point
    assert abs(offset.mean() - 1.0) < 0.02 and abs(offset.std() - 0.1) < 0.015
    spread = x.max(axis=1) - x.min(axis=1)  # amplitude 1: 2 + noise at most
    assert spread.min() > 1.9 and spread.max() < 2.0 + 0.01
    # Frequencies fitted by least squares over a fine grid lie in the drawn range, and fill it.
    t = data["train"].truth.t[0].astype(np.float64)
    candidates = np.arange(0.3, 0.9, 0.001)
    fits = np.sin(2 * np.pi * candidates[:, None] * t)  # [F, T]
    values = x[:100] - offset[:100, None] - 0.005  # less the offset and the mean noise
    errors = (fits**2).sum(axis=1) - 2 * values @ fits.T  # [S, F], less a per-series constant
    fitted = candidates[errors.argmin(axis=1)]
    assert fitted.min() >= 0.4 - 0.002 and fitted.max() <= 0.8 + 0.002
    assert fitted.min() < 0.45 and fitted.max() > 0.75


def test_periodic_is_deterministic_per_seed():
    first, again = periodic_dataset(n=20, seed=3), periodic_dataset(n=20, seed=3)
    other = periodic_dataset(n=20, seed=4)
    for split in ("train", "test"):
        np.testing.assert_array_equal(first[split].truth.x, again[split].truth.x)
        np.testing.assert_array_equal(first[split].truth.t, again[split].truth.t)
        assert not np.allclose(first[split].truth.x, other[split].truth.x)
    assert not np.allclose(first["train"].truth.t, other["train"].truth.t)


def test_periodic_subsample_keeps_exactly_k_points_per_series():
    data = periodic_dataset(n=50, subsample=10, seed=5)
    for task in data.values():
        observed, truth = task.observed, task.truth
        np.testing.assert_array_equal(observed.mask.sum(axis=(1, 2)), 10)
        np.testing.assert_array_equal(observed.t, truth.t)
        np.testing.assert_array_equal(observed.x[observed.mask], truth.x[observed.mask])
        assert task.targets.num_observed == truth.num_observed == 100 * truth.num_series
    picked = data["train"].observed.mask[..., 0]
    assert len({row.tobytes() for row in picked}) == len(picked)  # each series its own points
    again = periodic_dataset(n=50, subsample=10, seed=5)
    np.testing.assert_array_equal(again["train"].observed.mask, data["train"].observed.mask)


def test_periodic_extrapolation_observes_the_first_half_and_targets_the_second():
    data = periodic_dataset(n=20, extrapolate=True, subsample=20)
    for task in data.values():
        observed, targets, truth = task.observed, task.targets, task.truth
        assert task.mode == "extrapolate"
        last_seen = np.where(observed.mask[..., 0], observed.t, -np.inf).max(axis=1)
        first_target = np.where(targets.mask[..., 0], targets.t, np.inf).min(axis=1)
        midpoint = truth.t[:, -1] / 2  # every series starts at 0
        assert (last_seen < midpoint).all() and (midpoint <= first_target).all()
        np.testing.assert_array_equal(observed.mask.sum(axis=(1, 2)), 20)
        # Without the subsample, the two halves are the whole series.
        assert (observed.lengths + targets.lengths == truth.lengths).all()
        assert targets.num_observed + observed.lengths.sum() == truth.num_observed


def test_periodic_refuses_bad_arguments():
    with pytest.raises(ValueError, match="subsample must be in 1..100"):
        periodic_dataset(n=10, subsample=101)
    with pytest.raises(ValueError, match="at least 2"):
        periodic_dataset(n=1)
    with pytest.raises(ValueError, match="max_t > 0"):
        periodic_dataset(n=10, max_t=0.0)


def test_periodic_arrays_train_on_whole_series_when_asked():
    from dmm_jax.data.irregular import periodic_arrays

    observed, whole = periodic_arrays(n=20), periodic_arrays(n=20, whole_train=True)
    assert np.isnan(observed.train.x).sum() == 16 * 50  # 50 of each series' 100 points hidden
    assert not np.isnan(whole.train.x).any() and whole.train.x.shape == (16, 100, 1)
    np.testing.assert_array_equal(
        whole.train.x[~np.isnan(observed.train.x)], observed.train.x[~np.isnan(observed.train.x)]
    )
    np.testing.assert_array_equal(whole.test.x, observed.test.x)  # the test split as before
