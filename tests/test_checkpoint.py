"""Checkpoints: exact round trips, exact resumption, atomic writes, clear errors."""

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from test_train import _structured_binary_data

from dmm_jax import checkpoint
from dmm_jax.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from dmm_jax.config import DMMConfig, TrainConfig
from dmm_jax.evaluate import evaluate_split
from dmm_jax.train import fit, load_run

CFG = TrainConfig(epochs=3, batch_size=5, learning_rate=1e-2, annealing_epochs=2, seed=7)


def _trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b)
    )


def test_checkpoint_with_per_array_adam_moments_still_loads(tiny_config, tmp_path):
    # Checkpoints written before the optimizer ran on one raveled vector hold Adam's moments
    # as trees shaped like the parameters; load_run ravels them in optax.flatten's order.
    import optax
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.optim import optax_to_numpyro

    from dmm_jax.models.dmm import guide, model
    from dmm_jax.optim import learning_rate_schedule, scale_by_pyro_adam
    from dmm_jax.step import TrainState

    per_array = optax.chain(
        optax.clip(CFG.clip_norm),
        optax.add_decayed_weights(CFG.weight_decay),
        scale_by_pyro_adam(CFG.beta1, CFG.beta2, CFG.adam_eps),
        optax.scale_by_learning_rate(learning_rate_schedule(CFG)),
    )
    svi = SVI(
        lambda *a, **k: model(*a, config=tiny_config, **k),
        lambda *a, **k: guide(*a, config=tiny_config, **k),
        optax_to_numpyro(per_array),
        Trace_ELBO(),
    )
    x, lengths = np.ones((2, 3, tiny_config.obs_dim), np.float32), np.array([3, 2], np.int32)
    svi_state = svi.init(jax.random.PRNGKey(0), x, lengths, 1.0)
    svi_state, _ = jax.jit(svi.update)(svi_state, x, lengths, 1.0)  # moments no longer zero
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    old = TrainState(svi_state, np.int32(1), keys[0], keys[1])
    save_checkpoint(tmp_path, old, model_config=tiny_config, train_config=CFG, history=[])

    run = load_run(tmp_path)
    moments = svi_state.optim_state[1][1][2]
    restored = run.state.svi_state.optim_state[1][1][2]
    for name in ("mu", "nu"):
        want = np.concatenate([np.ravel(a) for a in jax.tree.leaves(getattr(moments, name))])
        np.testing.assert_array_equal(getattr(restored, name), want)
    assert int(restored.count) == 1
    assert _trees_equal(run.params, svi.get_params(svi_state))


def test_round_trip_restores_identical_state(tiny_config, tmp_path):
    data = _structured_binary_data(8)
    result = fit(
        data,
        model_config=tiny_config,
        train_config=CFG,
        checkpoint_dir=tmp_path,
        metadata={"dataset": "toy"},
    )
    run = load_run(tmp_path)
    assert _trees_equal(run.state, result.state)  # params, Adam moments, step, keys, epoch
    assert _trees_equal(run.params, result.params)
    assert run.model_config == tiny_config and run.train_config == CFG
    assert run.history == result.history and run.metadata == {"dataset": "toy"}
    assert int(run.state.epoch) == 3


def test_resumed_run_repeats_an_uninterrupted_one(tiny_config, tmp_path):
    data = _structured_binary_data(11)
    straight = fit(data, model_config=tiny_config, train_config=CFG)
    first = fit(
        data,
        model_config=tiny_config,
        train_config=TrainConfig(**{**CFG.__dict__, "epochs": 1}),
        checkpoint_dir=tmp_path,
    )
    assert len(first.history) == 1
    log = tmp_path / "log.jsonl"
    resumed = fit(
        data,
        model_config=tiny_config,
        train_config=CFG,
        checkpoint_dir=tmp_path,
        resume=True,
        log_json=log,
    )
    straight_losses = [r["train_loss_per_step"] for r in straight.history]
    resumed_losses = [r["train_loss_per_step"] for r in resumed.history]
    np.testing.assert_allclose(resumed_losses, straight_losses, rtol=1e-6)
    assert _trees_equal(resumed.params, straight.params) or all(
        np.allclose(a, b, rtol=1e-5, atol=1e-7)
        for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params))
    )
    assert len(log.read_text().splitlines()) == 2  # only the epochs run after resuming


def test_resume_refuses_a_different_model(tiny_config, tmp_path):
    data = _structured_binary_data(6)
    fit(
        data,
        model_config=tiny_config,
        train_config=TrainConfig(epochs=1, batch_size=5),
        checkpoint_dir=tmp_path,
    )
    other = DMMConfig(obs_dim=6, z_dim=4, emission_dim=8, transition_dim=8, rnn_dim=10)
    with pytest.raises(CheckpointError, match="changed: z_dim$"):
        fit(
            data,
            model_config=other,
            train_config=TrainConfig(epochs=2, batch_size=5),
            checkpoint_dir=tmp_path,
            resume=True,
        )


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    state = {"w": np.arange(4.0)}
    kwargs = {"model_config": DMMConfig(), "train_config": TrainConfig(), "history": [{"epoch": 0}]}
    save_checkpoint(tmp_path, state, **kwargs)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, {"w": np.zeros(4)}, **{**kwargs, "history": []})
    monkeypatch.undo()
    saved = read_checkpoint(tmp_path)
    np.testing.assert_array_equal(saved["state"]["w"], np.arange(4.0))
    assert saved["history"] == [{"epoch": 0}]
    assert os.listdir(tmp_path) == [checkpoint.CHECKPOINT_FILE]  # no temp file left behind


def test_unreadable_or_missing_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        read_checkpoint(tmp_path)
    (tmp_path / checkpoint.CHECKPOINT_FILE).write_bytes(b"\x85\xa1not a checkpoint")
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        read_checkpoint(tmp_path)


def test_resume_names_a_changed_training_setting_and_allows_more_epochs(tiny_config, tmp_path):
    data = _structured_binary_data(6)
    first = TrainConfig(epochs=1, batch_size=5)
    fit(data, model_config=tiny_config, train_config=first, checkpoint_dir=tmp_path)
    changed = dataclasses.replace(first, epochs=2, learning_rate=1e-2, seed=3)
    with pytest.raises(CheckpointError, match=r"train_config\.learning_rate, train_config\.seed"):
        fit(
            data,
            model_config=tiny_config,
            train_config=changed,
            checkpoint_dir=tmp_path,
            resume=True,
        )
    longer = dataclasses.replace(first, epochs=2, eval_every=1)
    result = fit(
        data, model_config=tiny_config, train_config=longer, checkpoint_dir=tmp_path, resume=True
    )
    assert [r["epoch"] for r in result.history] == [0, 1]


def test_a_checkpoint_of_the_first_format_still_loads_and_resumes(tmp_path):
    # Written by the library before there were several model families (no "model" key).
    fixture = Path(__file__).parent / "fixtures" / "dmm_checkpoint_v1"
    expected = json.loads((fixture / "expected.json").read_text())
    run = load_run(fixture)
    assert isinstance(run.model_config, DMMConfig) and int(run.state.epoch) == 2
    sequences = [np.asarray(s, np.float32) for s in expected["sequences"]]
    result = evaluate_split(
        run.params, jax.random.PRNGKey(0), sequences, run.model_config, num_samples=3
    )
    np.testing.assert_allclose(result["elbo_nll_per_step"], expected["elbo_nll_per_step"], 1e-6)
    shutil.copytree(fixture, tmp_path / "run")
    resumed = fit(
        sequences,
        model_config=run.model_config,
        train_config=dataclasses.replace(run.train_config, epochs=3),
        checkpoint_dir=tmp_path / "run",
        resume=True,
    )
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2]
    np.testing.assert_allclose(
        [r["train_loss_per_step"] for r in resumed.history[:2]], expected["train_loss_per_step"]
    )


def test_init_params_start_a_new_run_from_a_trained_one(tiny_config, tmp_path):
    # Trained further under another objective: the new run starts at the saved parameters
    # with epoch 0 and a fresh optimizer, and leaves the saved run as it was.
    from dmm_jax.models.common import example_covariates
    from dmm_jax.step import build_svi, init_train_state

    data = _structured_binary_data(8)
    fit(data, model_config=tiny_config, train_config=CFG, checkpoint_dir=tmp_path / "elbo")
    saved = load_run(tmp_path / "elbo" / checkpoint.CHECKPOINT_FILE)  # a file names itself
    further = dataclasses.replace(CFG, epochs=1, objective="iwae", particles=2)
    svi = build_svi(tiny_config, further)
    covariates = example_covariates(tiny_config)
    start = init_train_state(svi, 0, tiny_config.obs_dim, covariates, saved.params)
    assert _trees_equal(svi.get_params(start.svi_state), saved.params)
    assert int(start.svi_state.optim_state[0]) == 0 and int(start.epoch) == 0

    trained = fit(
        data,
        model_config=tiny_config,
        train_config=further,
        init_params=saved.params,
        checkpoint_dir=tmp_path / "iwae",
    )
    fresh = fit(data, model_config=tiny_config, train_config=further)
    assert not _trees_equal(trained.params, saved.params)
    assert int(load_run(tmp_path / "iwae").state.svi_state.optim_state[0]) == 2  # 2 updates
    first_loss = trained.history[0]["train_loss_per_step"]
    assert first_loss < fresh.history[0]["train_loss_per_step"]  # it began where ELBO ended
    assert _trees_equal(load_run(tmp_path / "elbo").params, saved.params)


def test_init_params_of_another_model_are_refused(tiny_config, tmp_path):
    data = _structured_binary_data(6)
    small = fit(data, model_config=tiny_config, train_config=TrainConfig(epochs=1, batch_size=5))
    wider = dataclasses.replace(tiny_config, z_dim=4)
    with pytest.raises(ValueError, match="does not match this model's shapes"):
        fit(data, model_config=wider, train_config=CFG, init_params=small.params)
    name = min(small.params)
    fewer = {k: v for k, v in small.params.items() if k != name}
    with pytest.raises(ValueError, match=f"init_params has no parameter '{re.escape(name)}'"):
        fit(data, model_config=tiny_config, train_config=CFG, init_params=fewer)
    more = {**small.params, "extra": np.zeros(2)}
    with pytest.raises(ValueError, match="parameters this model lacks: extra"):
        fit(data, model_config=tiny_config, train_config=CFG, init_params=more)


def test_atomic_writes_give_the_file_the_permissions_open_would(tmp_path):
    from dmm_jax.files import atomic_write_bytes

    old = os.umask(0o027)
    try:
        path = atomic_write_bytes(tmp_path / "sub" / "f.png", b"data")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"data"
    assert path.stat().st_mode & 0o777 == 0o640  # 0o666 less the umask, not mkstemp's 0o600
    assert os.listdir(tmp_path / "sub") == ["f.png"]
