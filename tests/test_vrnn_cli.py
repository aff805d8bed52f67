"""``dmm-jax train --model vrnn`` and every command that uses its checkpoint, on tiny data: a
JSON piano-roll file (Bernoulli) and a .npz of real values with missing entries (gmm)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import write_tiny_chorales

from dmm_jax.cli import main
from dmm_jax.config import VRNNConfig
from dmm_jax.data.arrays import SequenceArrays, save_arrays
from dmm_jax.generate import sample_prior
from dmm_jax.music import read_midi
from dmm_jax.train import load_run

TINY = ["--z-dim", "3", "--rnn-dim", "8", "--feature-dim", "8", "--hidden-dim", "8"]
TEST_LENGTHS = [10, 4, 7]


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A canonical dataset file: train/valid/test -> sequences -> steps -> MIDI notes."""
    lengths = {"train": [9, 12, 6, 8], "valid": [5], "test": TEST_LENGTHS}
    return write_tiny_chorales(tmp_path_factory.mktemp("data") / "tiny.json", lengths)


@pytest.fixture(scope="module")
def checkpoint(data_file, tmp_path_factory):
    """A VRNN trained for one epoch by ``dmm-jax train --model vrnn`` (with both dropouts and a
    moving average of its weights)."""
    directory = tmp_path_factory.mktemp("vrnn")
    log = directory / "log.jsonl"
    args = ["train", "--model", "vrnn", "--data", str(data_file), *TINY, "--epochs", "1"]
    args += ["--batch-size", "4", "--checkpoint-dir", str(directory), "--log-json", str(log)]
    dropouts = ["--dropout", "0.2", "--input-dropout", "0.1", "--weight-average", "0.5"]
    assert main([*args, *dropouts, "--no-progress"]) == 0
    [record] = [json.loads(line) for line in log.read_text().splitlines()]
    assert np.isfinite(record["train_loss_per_step"]) and np.isfinite(record["test_loss_per_step"])
    return directory


def test_train_writes_a_vrnn_checkpoint(checkpoint):
    run = load_run(checkpoint)
    assert run.model_config == VRNNConfig(
        obs_dim=88, z_dim=3, rnn_dim=8, feature_dim=8, hidden_dim=8
    )
    assert int(run.state.epoch) == 1 and run.metadata["dataset"] == "jsb_chorales"
    assert run.train_config.dropout == 0.2 and run.train_config.input_dropout == 0.1
    assert run.train_config.weight_average == 0.5
    assert "encoder$params" in run.params and "prior$params" in run.params


def test_evaluate_by_importance_sampling(checkpoint, data_file, capsys):
    args = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data_file)]
    assert main([*args, "--estimator", "is", "--samples", "4"]) == 0
    out = _last_json(capsys)
    assert out["num_steps"] == sum(TEST_LENGTHS) and out["epochs_trained"] == 1
    assert np.isfinite(out["is_nll_per_step"]) and np.isfinite(out["elbo_nll_per_step"])
    assert out["is_nll_per_step"] <= out["elbo_nll_per_step"]


def test_sample_writes_the_prior_draws(checkpoint, tmp_path, capsys):
    args = ["sample", "--checkpoint", str(checkpoint), "--num", "2", "--length", "5"]
    args += ["--seed", "3", "--midi", str(tmp_path / "midi"), "--png", str(tmp_path / "png")]
    assert main(args) == 0
    out = _last_json(capsys)
    run = load_run(checkpoint)
    rolls = sample_prior(run.params, jax.random.PRNGKey(3), run.model_config, 2, 5)["x"]
    assert len(out["midi"]) == len(out["png"]) == 2
    for path, roll in zip(out["midi"], np.asarray(rolls), strict=True):
        np.testing.assert_array_equal(read_midi(path), roll)
    for path in out["png"]:
        assert Path(path).read_bytes().startswith(b"\x89PNG")


def test_forecast_posterior_and_impute(checkpoint, data_file, tmp_path, capsys):
    common = ["--checkpoint", str(checkpoint), "--data", str(data_file)]
    args = ["forecast", *common, "--prefix", "3", "--horizon", "2", "--samples", "2"]
    assert main([*args, "--batch-size", "4"]) == 0
    out = _last_json(capsys)
    assert out["num_sequences"] == 3 and out["num_steps"] == 2 + 1 + 2  # 4 steps: 1 after 3
    assert np.isfinite(out["model_log_likelihood_per_step"])
    assert out["model_log_likelihood_per_step"] < 0

    png, npz = tmp_path / "post.png", tmp_path / "post.npz"
    args = ["posterior", *common, "--index", "1", "--samples", "3", "--png", str(png)]
    assert main([*args, "--out", str(npz)]) == 0
    out = _last_json(capsys)
    assert out["num_steps"] == TEST_LENGTHS[1] and png.read_bytes().startswith(b"\x89PNG")
    saved = np.load(npz)
    assert saved["mean"].shape == (TEST_LENGTHS[1], 3)
    assert saved["quantiles"].shape == (3, TEST_LENGTHS[1], 3)

    args = ["impute", *common, "--fraction", "0.2", "--iterations", "2", "--batch-size", "4"]
    assert main(args) == 0
    out = _last_json(capsys)
    assert 0 < out["num_hidden_entries"] < sum(TEST_LENGTHS) * 88
    assert np.isfinite(out["model_log_likelihood_per_entry"])
    assert 0 <= out["model_accuracy"] <= 1


def test_train_refuses_dmm_flags_for_the_vrnn(data_file):
    args = ["train", "--model", "vrnn", "--data", str(data_file), "--epochs", "1"]
    with pytest.raises(SystemExit, match="--guide"):
        main([*args, "--guide", "st-l"])


def test_gmm_vrnn_trains_on_real_values_with_missing_entries(tmp_path, capsys):
    rng = np.random.default_rng(1)

    def split(num):
        x = rng.normal(size=(num, 6, 3))
        x[rng.random(x.shape) < 0.2] = np.nan
        return SequenceArrays(x, rng.integers(2, 7, num))

    data = save_arrays(tmp_path / "real.npz", train=split(6), test=split(3))
    ckpt, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    args = ["train", "--data", str(data), "--model", "vrnn", "--emission", "gmm", *TINY]
    args += ["--mixture-components", "2", "--epochs", "2", "--batch-size", "4"]
    args += ["--checkpoint-dir", str(ckpt), "--log-json", str(log), "--no-progress"]
    assert main(args) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["train_loss_per_step"]) for r in records)
    assert np.isfinite(records[-1]["test_loss_per_step"])
    config = load_run(ckpt).model_config
    assert (config.emission, config.mixture_components, config.obs_dim) == ("gmm", 2, 3)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--estimator", "is", "--samples", "4"]) == 0
    out = _last_json(capsys)
    assert (
        np.isfinite(out["is_nll_per_step"]) and out["is_nll_per_step"] <= out["elbo_nll_per_step"]
    )
    # The other subcommands on the real-valued checkpoint: posterior and sample work, the
    # piano-roll scores are refused naming the file.
    post = tmp_path / "post.npz"
    assert main(["posterior", "--checkpoint", str(ckpt), "--samples", "3", "--out", str(post)]) == 0
    assert _last_json(capsys)["num_steps"] >= 2 and np.load(post)["mean"].shape[1] == 3
    assert main(["sample", "--checkpoint", str(ckpt), "--num", "2", "--length", "5"]) == 0
    sampled = _last_json(capsys)
    assert "notes_per_step" not in sampled and np.isfinite(sampled["mean_value"])
    for command in (["forecast"], ["impute", "--fraction", "0.5"]):
        with pytest.raises(SystemExit, match=f"piano rolls.*{data.name}.*real-valued"):
            main([*command, "--checkpoint", str(ckpt)])
