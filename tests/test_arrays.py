"""Real-valued array data: validation with clear errors, .npz round trips, padded batches, the
synthetic generators, and ``dmm-jax train --data FILE.npz --emission gaussian`` end to end."""

import json

import numpy as np
import pytest

from dmm_jax.cli import main
from dmm_jax.data import DataError
from dmm_jax.data.arrays import SequenceArrays, load_arrays, save_arrays
from dmm_jax.data.synthetic import (
    linear_gaussian_ssm,
    nonlinear_ssm_data,
    sample_linear_gaussian,
)


def _arrays(seed=0, num=4, steps=5, obs=3, inputs=2):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(num, steps, obs)),
        "lengths": rng.integers(1, steps + 1, num),
        "inputs": rng.normal(size=(num, steps, inputs)),
        "dt": rng.uniform(0.1, 1.0, (num, steps)),
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"x": np.zeros((4, 5))}, "x must have 3 dimensions"),
        ({"x": np.full((4, 5, 3), "a")}, "x must be numeric"),
        ({"lengths": np.array([1, 2, 3])}, "lengths must be 4 integers"),
        ({"lengths": np.array([1, 2, 3, 6])}, r"lengths must be in 1\.\.5"),
        ({"lengths": np.array([1.0, 2, 3, 4])}, "lengths must be 4 integers"),
        ({"inputs": np.zeros((4, 4, 2))}, r"inputs must have shape \(4, 5, U\)"),
        ({"inputs": np.full((4, 5, 2), np.nan)}, "inputs must be finite"),
        ({"dt": -np.ones((4, 5))}, "dt must be finite and >= 0"),
        ({"dt": np.ones((4, 6))}, r"dt must have shape \(4, 5\)"),
        ({"mask": np.full((4, 5, 3), 2)}, "mask must be a 0/1 or bool array"),
    ],
)
def test_bad_arrays_raise_data_errors_naming_the_array(change, message):
    with pytest.raises(DataError, match=f"my source: {message}"):
        SequenceArrays(**{**_arrays(), **change}, source="my source")


def test_infinite_observations_are_refused_but_nan_means_missing():
    arrays = _arrays()
    arrays["x"][0, 0, 0] = np.nan
    assert SequenceArrays(**arrays).num_missing == 1
    arrays["x"][0, 0, 1] = np.inf
    with pytest.raises(DataError, match="infinite"):
        SequenceArrays(**arrays)


def test_npz_round_trip_folds_the_mask_and_pads_batches(tmp_path):
    arrays = _arrays()
    mask = np.ones(arrays["x"].shape, bool)
    mask[1, 0, 2] = False
    data = SequenceArrays(**arrays, mask=mask)
    path = save_arrays(tmp_path / "d.npz", train=data, test=data)
    loaded = load_arrays(path)
    assert loaded.valid is None and loaded.test is not None
    np.testing.assert_array_equal(loaded.train.x, data.x)  # NaN where masked, equal_nan
    assert np.isnan(loaded.train.x[1, 0, 2]) and loaded.train.num_missing == 1
    x, lengths = loaded.train.batch(np.array([2, 0]), 3)
    covariates = loaded.train.batch_covariates(np.array([2, 0]), 3)
    # the bucket (48) would pass the arrays' own 5 steps: batches stop there
    assert x.shape == (3, 5, 3) and covariates["inputs"].shape == (3, 5, 2)
    assert covariates["dt"].shape == (3, 5) and lengths[2] == 0
    np.testing.assert_array_equal(lengths[:2], arrays["lengths"][[2, 0]])
    with pytest.raises(DataError, match="no split 'valid'"):
        loaded.split("valid")


def test_npz_with_unknown_or_missing_arrays_is_refused(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((1, 2, 1)), y=np.zeros(3))
    with pytest.raises(DataError, match=r"unknown arrays \['y'\]"):
        load_arrays(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", valid_x=np.zeros((1, 2, 1)))
    with pytest.raises(DataError, match="no train split"):
        load_arrays(tmp_path / "b.npz")
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_arrays(tmp_path / "c.npz")


def test_synthetic_generators_return_data_and_true_parameters():
    ssm = linear_gaussian_ssm(0, z_dim=3, obs_dim=4, input_dim=2)
    assert np.max(np.abs(np.linalg.eigvals(ssm.transition_matrix))) == pytest.approx(0.9)
    data = sample_linear_gaussian(ssm, 1, 50, 20, missing=0.25)
    assert data.x.shape == (50, 20, 4) and data.inputs.shape == (50, 20, 2)
    assert 0.2 < data.num_missing / data.x.size < 0.3
    again = sample_linear_gaussian(ssm, 1, 50, 20, missing=0.25)
    np.testing.assert_array_equal(again.x, data.x)  # the seed fixes everything
    nonlinear, truth = nonlinear_ssm_data(0, 8, 10)
    assert nonlinear.x.shape == (8, 10, 1) and truth["alpha"] == 0.5


def test_cli_trains_and_evaluates_a_gaussian_dmm_on_npz(tmp_path, capsys):
    ssm = linear_gaussian_ssm(0, z_dim=2, obs_dim=3, input_dim=1)
    train = sample_linear_gaussian(ssm, 1, 12, 20, missing=0.1, min_length=5)
    test = sample_linear_gaussian(ssm, 2, 4, 20, missing=0.1)
    data = save_arrays(tmp_path / "lg.npz", train=train, test=test)
    small = ["--z-dim", "2", "--emission-dim", "8", "--transition-dim", "8", "--rnn-dim", "8"]
    log, ckpt = tmp_path / "log.jsonl", tmp_path / "ckpt"
    with pytest.raises(SystemExit, match="use --emission gaussian"):  # Bernoulli, the default
        main(["train", "--data", str(data), "--epochs", "1", "--no-progress"])
    args = ["train", "--data", str(data), "--emission", "gaussian", "--epochs", "2", *small]
    args += ["--learning-rate", "0.01", "--checkpoint-dir", str(ckpt), "--log-json", str(log)]
    assert main([*args, "--no-progress"]) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(np.isfinite(r["train_loss_per_step"]) for r in records)
    assert np.isfinite(records[-1]["test_loss_per_step"])
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--estimator", "is", "--samples", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_steps"] == test.num_steps
    assert result["is_nll_per_step"] <= result["elbo_nll_per_step"]
