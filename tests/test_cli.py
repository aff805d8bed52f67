"""The ``dmm-jax`` command line on JSB: train writes falling JSON lines; evaluate reads them back."""

import json

import pytest

from dmm_jax.cli import compile_cache_dir, main


def test_train_two_epochs_on_jsb_then_evaluate(jsb_path, tmp_path, capsys):
    log, ckpt = tmp_path / "log.jsonl", tmp_path / "ckpt"
    code = main(
        [
            "train",
            "--dataset",
            "jsb",
            "--data",
            str(jsb_path),
            "--epochs",
            "2",
            "--checkpoint-dir",
            str(ckpt),
            "--log-json",
            str(log),
            "--no-progress",
        ]
    )
    assert code == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert {"epoch", "train_loss_per_step", "seconds"} <= set(r)
    assert records[1]["train_loss_per_step"] < records[0]["train_loss_per_step"]
    assert 50 < records[0]["train_loss_per_step"] < 80  # the reference starts near 63
    assert "val_loss_per_step" in records[1] and "test_loss_per_step" in records[1]
    out = capsys.readouterr().out
    assert "[training epoch 0001]" in out and "compiled" in out

    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(jsb_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["dataset"] == "jsb_chorales" and result["split"] == "test"
    assert result["num_steps"] == 4725 and result["epochs_trained"] == 2
    # Same parameters, same split; different guide draws than the training run's evaluation.
    assert result["loss_per_step"] == pytest.approx(records[1]["test_loss_per_step"], rel=0.05)

    args = [
        "evaluate",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(jsb_path),
        "--split",
        "valid",
        "--estimator",
        "is",
        "--samples",
        "3",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "valid" and result["num_samples"] == 3
    assert result["is_nll_per_step"] <= result["elbo_nll_per_step"]


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["train", "--data", str(missing), "--epochs", "1"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_resume_without_a_checkpoint_dir_is_refused():
    with pytest.raises(SystemExit, match="--resume needs --checkpoint-dir"):
        main(["train", "--resume"])


def test_compile_cache_directory_comes_from_flag_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DMM_JAX_COMPILE_CACHE", str(tmp_path / "env"))
    assert compile_cache_dir(None) == tmp_path / "env"
    assert compile_cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert compile_cache_dir("none") is None
    monkeypatch.setenv("DMM_JAX_COMPILE_CACHE", "none")
    assert compile_cache_dir(None) is None
    monkeypatch.delenv("DMM_JAX_COMPILE_CACHE")
    assert compile_cache_dir(None).parts[-3:] == (".cache", "dmm_jax", "xla")


def test_guide_flow_kl_and_schedule_flags_reach_the_configs():
    from dmm_jax.cli import build_parser

    args = build_parser().parse_args(
        ["train", "--guide", "st-lr", "--num-iafs", "2", "--iaf-dim", "30", "--kl", "sampled"]
        + ["--lr-schedule", "cosine", "--annealing-schedule", "cosine"]
        + ["--early-stopping-patience", "3", "--eval-every", "5"]
    )
    assert (args.guide, args.num_iafs, args.iaf_dim) == ("st-lr", 2, 30)
    assert (args.lr_schedule, args.annealing_schedule, args.early_stopping_patience) == (
        "cosine",
        "cosine",
        3,
    )
    assert build_parser().parse_args(["evaluate", "--checkpoint", "c", "--best"]).best


def test_analytic_kl_with_flows_is_refused_before_loading_data():
    with pytest.raises(SystemExit, match="--kl analytic is not available with --num-iafs"):
        main(["train", "--kl", "analytic", "--num-iafs", "1", "--data", "/nonexistent"])
    with pytest.raises(SystemExit, match="early_stopping_patience needs eval_every"):
        main(["train", "--early-stopping-patience", "2", "--data", "/nonexistent"])
    with pytest.raises(SystemExit, match="dropout must be in"):
        main(["train", "--dropout", "1.5", "--data", "/nonexistent"])
    with pytest.raises(SystemExit, match="transpose must be >= 0"):
        main(["train", "--transpose", "-3", "--data", "/nonexistent"])
