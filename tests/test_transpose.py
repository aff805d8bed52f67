"""Random transposition of training pieces (``TrainConfig.transpose``): exact shifts, never off
the keyboard, uniform over the allowed shifts, and the training loop applying it to every
training batch and nothing else."""

import jax
import numpy as np
import pytest
from conftest import random_binary_batch

import dmm_jax.train
from dmm_jax.config import DMMConfig, TrainConfig
from dmm_jax.data.arrays import SequenceArrays
from dmm_jax.data.transpose import shift_keys, shift_range, transpose_rolls
from dmm_jax.train import fit


def shifted_by_loop(x: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    for b, k in enumerate(shifts):
        for d in range(x.shape[-1]):
            if 0 <= d - k < x.shape[-1]:
                out[b, :, d] = x[b, :, d - k]
    return out


def test_shift_keys_matches_a_loop_over_keys():
    x, _ = random_binary_batch(0, 5, 7, 12)
    shifts = np.array([0, 3, -2, 11, -12], np.int32)
    np.testing.assert_array_equal(np.asarray(shift_keys(x, shifts)), shifted_by_loop(x, shifts))


def test_shift_range_keeps_every_note_on_the_keys():
    x = np.zeros((4, 3, 10), np.float32)
    x[0, 1, [2, 5]] = 1  # lowest key 2, highest 5
    x[1, 0, [0, 9]] = 1  # spans the keyboard: no shift
    x[2, 2, 8] = 1  # one key from the top
    low, high = shift_range(x, 4)  # x[3] silent
    np.testing.assert_array_equal(np.asarray(low), [-2, 0, -4, 0])
    np.testing.assert_array_equal(np.asarray(high), [4, 0, 1, 0])


def test_transposition_is_uniform_over_the_allowed_shifts_and_loses_no_note():
    x = np.zeros((2000, 4, 12), np.float32)
    x[:, 1, [3, 6]] = 1  # allowed shifts with K = 2: -2..2; upward room 5
    x[:, 2, 4] = 1
    out = np.asarray(transpose_rolls(jax.random.PRNGKey(0), x, 2))
    np.testing.assert_array_equal(out.sum(axis=(1, 2)), x.sum(axis=(1, 2)))
    shifts = np.argmax(out[:, 2], axis=-1) - 4  # where the lone note of step 2 went
    np.testing.assert_array_equal(out, shifted_by_loop(x, shifts))
    counts = np.bincount(shifts + 2, minlength=5)
    assert counts.sum() == 2000 and len(counts) == 5
    chi_square = ((counts - 400.0) ** 2 / 400.0).sum()
    assert chi_square < 18.5  # 4 degrees of freedom, p = 0.001
    np.testing.assert_array_equal(np.asarray(transpose_rolls(jax.random.PRNGKey(1), x, 0)), x)


GAUSSIAN = DMMConfig(
    obs_dim=6, z_dim=3, emission_dim=8, transition_dim=8, rnn_dim=10, emission="gaussian"
)


def _pieces(num: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    pieces = []
    for _ in range(num):
        piece = np.zeros((int(rng.integers(4, 10)), 6), np.float32)
        piece[np.arange(len(piece)), rng.integers(1, 5, len(piece))] = 1
        pieces.append(piece)
    return pieces


def test_fit_transposes_every_training_batch_and_nothing_else(tiny_config, monkeypatch):
    calls = []

    def recorded(key, x, max_shift):
        calls.append((x.shape, max_shift))
        return transpose_rolls(key, x, max_shift)

    monkeypatch.setattr(dmm_jax.train, "transpose_rolls", recorded)
    train, valid = _pieces(12, 0), _pieces(4, 1)
    settings = {"epochs": 1, "batch_size": 4, "weight_decay": 0.0, "learning_rate": 1e-2}
    runs = {
        k: fit(
            train,
            valid,
            model_config=tiny_config,
            train_config=TrainConfig(transpose=k, **settings),
        )
        for k in (0, 2)
    }
    assert [max_shift for _, max_shift in calls] == [2] * 3  # the epoch's 3 batches only
    losses = {k: [r["train_loss_per_step"] for r in run.history] for k, run in runs.items()}
    assert np.all(np.isfinite(losses[2])) and losses[2][0] != losses[0][0]
    assert np.isfinite(runs[2].history[-1]["val_loss_per_step"])


def test_transposition_is_refused_for_real_valued_data_and_negative_ranges():
    with pytest.raises(ValueError, match="transpose must be >= 0"):
        TrainConfig(transpose=-1)
    arrays = SequenceArrays(np.zeros((3, 5, 6), np.float32) + 0.5, np.array([5, 4, 3]))
    with pytest.raises(ValueError, match="transpose shifts piano rolls"):
        fit(arrays, model_config=GAUSSIAN, train_config=TrainConfig(epochs=1, transpose=2))
