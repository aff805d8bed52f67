"""``dmm-jax sample``, ``forecast`` and ``plot`` on a tiny checkpoint and a tiny data file."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import write_tiny_chorales

from dmm_jax.checkpoint import save_checkpoint
from dmm_jax.cli import main
from dmm_jax.config import DMMConfig, TrainConfig
from dmm_jax.generate import posterior_latents, sample_prior
from dmm_jax.music import read_midi
from dmm_jax.train import build_svi, init_train_state, load_run

TINY = DMMConfig(z_dim=3, emission_dim=8, transition_dim=8, rnn_dim=8)


def _untrained_checkpoint(directory, model_config):
    """An untrained 88-key model saved as ``dmm-jax train`` saves one."""
    config = TrainConfig(epochs=1)
    state = init_train_state(build_svi(model_config, config), 0, model_config.obs_dim)
    save_checkpoint(
        directory,
        state,
        model_config=model_config,
        train_config=config,
        history=[],
        metadata={"dataset": "jsb_chorales"},
    )
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _untrained_checkpoint(tmp_path_factory.mktemp("ckpt"), TINY)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A canonical dataset file: train/valid/test -> sequences -> steps -> MIDI notes."""
    lengths = {"train": [9, 12], "valid": [5], "test": [10, 4, 7]}
    path = write_tiny_chorales(tmp_path_factory.mktemp("data") / "tiny.json", lengths)
    return path


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_sample_writes_the_prior_draws_as_midi_and_png(checkpoint, tmp_path, capsys):
    args = [
        "sample",
        "--checkpoint",
        str(checkpoint),
        "--num",
        "2",
        "--length",
        "6",
        "--seed",
        "3",
        "--midi",
        str(tmp_path / "midi"),
        "--png",
        str(tmp_path / "png"),
    ]
    assert main(args) == 0
    out = _last_json(capsys)
    assert len(out["midi"]) == len(out["png"]) == 2
    # The MIDI files hold exactly the rolls the library draws from the same seed.
    run = load_run(checkpoint)
    rolls = sample_prior(run.params, jax.random.PRNGKey(3), run.model_config, 2, 6)["x"]
    for path, roll in zip(out["midi"], np.asarray(rolls), strict=True):
        np.testing.assert_array_equal(read_midi(path), roll)
    assert out["notes_per_step"] == pytest.approx(float(rolls.sum()) / 12)
    for path in out["png"]:
        assert Path(path).read_bytes().startswith(b"\x89PNG")


def test_sample_refuses_bad_arguments_and_missing_checkpoints(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--length must be >= 1, got 0"):
        main(["sample", "--checkpoint", str(tmp_path), "--length", "0"])
    with pytest.raises(SystemExit, match="--num must be >= 1"):
        main(["sample", "--checkpoint", str(tmp_path), "--num", "-1"])
    assert main(["sample", "--checkpoint", str(tmp_path / "none")]) == 2
    assert str(tmp_path / "none") in capsys.readouterr().err


def test_forecast_reports_model_and_baseline_per_step(checkpoint, data_file, tmp_path, capsys):
    args = [
        "forecast",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data_file),
        "--prefix",
        "5",
        "--horizon",
        "4",
        "--samples",
        "3",
        "--batch-size",
        "2",
        "--png",
        str(tmp_path),
        "--png-count",
        "1",
    ]
    assert main(args) == 0
    out = _last_json(capsys)
    assert out["dataset"] == "jsb_chorales" and out["split"] == "test"
    # Test sequences of 10, 4 and 7 steps: the two longer than the prefix give 4 + 2 steps.
    assert out["num_sequences"] == 2 and out["num_steps"] == 6
    assert out["baseline_log_likelihood_per_step"] < 0
    assert np.isfinite(out["model_log_likelihood_per_step"])
    assert [p.split("/")[-1] for p in out["png"]] == ["forecast_000.png"]
    with pytest.raises(SystemExit, match="--horizon must be >= 1"):
        main(["forecast", "--checkpoint", str(checkpoint), "--horizon", "0"])
    with pytest.raises(SystemExit, match="longer than the prefix"):
        main(
            [
                "forecast",
                "--checkpoint",
                str(checkpoint),
                "--data",
                str(data_file),
                "--prefix",
                "50",
            ]
        )


def test_plot_draws_a_training_log(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"epoch": 0, "train_loss_per_step": 9.0}) + "\n")
    assert main(["plot", "--log", str(log), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit, match="no training log at .*missing.jsonl"):
        main(["plot", "--log", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "d.png")])
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"epoch": 0, "train_loss_per_step": 8.0, "val_loss_per_step": 8.5}))
    log.write_text(json.dumps({"epoch": 0, "train_loss_per_step": 9.0, "val_loss_per_step": 9.5}))
    both = ["plot", "--log", str(log), "--log", str(other), "--out", str(tmp_path / "e.png")]
    assert main(both) == 0
    assert (tmp_path / "e.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit, match="1 --label for 2 --log files"):
        main([*both, "--label", "a"])


def test_posterior_writes_the_library_summaries(checkpoint, data_file, tmp_path, capsys):
    npz, png = tmp_path / "post.npz", tmp_path / "post.png"
    args = [
        "posterior",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data_file),
        "--index",
        "2",
        "--samples",
        "5",
        "--seed",
        "1",
        "--out",
        str(npz),
        "--png",
        str(png),
    ]
    assert main(args) == 0
    out = _last_json(capsys)
    assert out["num_steps"] == 7 and png.read_bytes().startswith(b"\x89PNG")
    saved = np.load(npz)
    run = load_run(checkpoint)
    want = posterior_latents(
        run.params,
        jax.random.PRNGKey(1),
        saved["x"][None].astype(np.float32),
        np.array([7]),
        run.model_config,
        5,
        (0.05, 0.5, 0.95),
    )
    np.testing.assert_allclose(saved["mean"], want["mean"][0], rtol=1e-6)
    assert saved["quantiles"].shape == (3, 7, TINY.z_dim)
    with pytest.raises(SystemExit, match=r"--index must be in 0\.\.2"):
        main(
            ["posterior", "--checkpoint", str(checkpoint), "--data", str(data_file), "--index", "3"]
        )


def test_impute_hides_a_gap_and_scores_it(checkpoint, data_file, tmp_path, capsys):
    args = [
        "impute",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data_file),
        "--gap",
        "2:4",
        "--iterations",
        "2",
        "--png",
        str(tmp_path),
        "--png-count",
        "1",
    ]
    assert main(args) == 0
    out = _last_json(capsys)
    assert out["num_hidden_entries"] == 3 * 2 * 88  # steps 2 and 3 of all three test sequences
    assert out["baseline_log_likelihood_per_entry"] < 0 < out["baseline_accuracy"] <= 1
    assert [p.split("/")[-1] for p in out["png"]] == ["impute_000.png"]
    with pytest.raises(SystemExit, match="give --fraction or --gap"):
        main(["impute", "--checkpoint", str(checkpoint)])
    with pytest.raises(SystemExit):
        main(["impute", "--checkpoint", str(checkpoint), "--gap", "5:2"])
    assert "0 <= START < STOP" in capsys.readouterr().err


def test_augmented_checkpoint_samples_and_refuses_impute(data_file, tmp_path, capsys):
    augmented = dataclasses.replace(TINY, augmented=True)
    directory = _untrained_checkpoint(tmp_path / "aug", augmented)
    assert load_run(directory).model_config.augmented
    assert main(["sample", "--checkpoint", str(directory), "--num", "1", "--length", "5"]) == 0
    assert _last_json(capsys)["num"] == 1
    args = ["impute", "--checkpoint", str(directory), "--data", str(data_file), "--gap", "1:2"]
    assert main(args) == 2
    assert "impute does not support DMM-Aug" in capsys.readouterr().err


def test_train_init_from_continues_a_checkpoint_under_another_objective(
    checkpoint, data_file, tmp_path, capsys
):
    tiny = ["--z-dim", "3", "--emission-dim", "8", "--transition-dim", "8", "--rnn-dim", "8"]
    # Seed 5: a fresh start would not be the saved (seed 0) parameters.
    args = ["train", "--data", str(data_file), "--epochs", "1", "--seed", "5", "--no-progress"]
    args += tiny
    further = tmp_path / "further"
    flags = ["--init-from", str(checkpoint), "--objective", "fivo", "--particles", "2"]
    assert main([*args, *flags, "--checkpoint-dir", str(further)]) == 0
    start, trained = load_run(checkpoint), load_run(further)
    assert trained.train_config.objective == "fivo" and int(trained.state.epoch) == 1
    # One update away from the saved parameters (Adam moves each by at most ~lr).
    for a, b in zip(jax.tree.leaves(start.params), jax.tree.leaves(trained.params), strict=True):
        assert (
            np.max(np.abs(np.asarray(a) - np.asarray(b))) <= 2 * trained.train_config.learning_rate
        )

    assert main([*args, "--z-dim", "4", "--init-from", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert f"--init-from {checkpoint}: trained with other model settings; changed: z_dim" in err
