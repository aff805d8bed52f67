"""A moving average of the parameters (``TrainConfig.weight_average``): the closed-form
average of the parameters each update produced, used for evaluation and early stopping,
returned by ``fit`` and restored by ``load_run``."""

import jax
import numpy as np
import optax
import pytest
from conftest import random_binary_batch
from test_train import _structured_binary_data

from dmm_jax.config import TrainConfig
from dmm_jax.evaluate import evaluate_split
from dmm_jax.optim import average_weights, averaged_params, clipped_adam
from dmm_jax.step import build_svi, init_train_state, trained_params
from dmm_jax.train import fit, load_run


def test_average_is_the_bias_corrected_moving_average_of_every_update():
    decay, params = 0.8, {"w": np.zeros(3, np.float32), "b": np.float32(1.0)}
    transform = average_weights(decay)
    state = transform.init(params)
    rng = np.random.default_rng(0)
    history = []
    for _ in range(6):
        updates = jax.tree.map(lambda p: rng.normal(size=np.shape(p)).astype(np.float32), params)
        passed, state = transform.update(updates, state, params)
        assert all(
            np.array_equal(a, b) for a, b in zip(jax.tree.leaves(passed), jax.tree.leaves(updates))
        )
        params = optax.apply_updates(params, updates)
        history.append(params)
    expected = closed_form_average(history, decay)
    for name in params:
        np.testing.assert_allclose(averaged_params(state, params)[name], expected[name], rtol=1e-5)


def test_before_any_update_and_without_an_average_the_parameters_are_returned():
    params = {"w": np.arange(3.0, dtype=np.float32)}
    state = average_weights(0.9).init(params)
    np.testing.assert_array_equal(averaged_params(state, params)["w"], params["w"])
    plain = clipped_adam(TrainConfig()).init(params)
    assert averaged_params(plain, params) is params


def closed_form_average(history, decay):
    """sum_k (1 - d) d^(n-1-k) p_k / (1 - d^n) over the parameters p_k after each update."""
    weights = np.array([(1 - decay) * decay ** (len(history) - 1 - k) for k in range(len(history))])
    weights /= weights.sum()
    return jax.tree.map(lambda *ps: sum(w * np.asarray(p) for w, p in zip(weights, ps)), *history)


def test_svi_updates_average_the_parameters_adam_produced(tiny_config):
    # Through build_svi's optimizer: the average is of the parameters after each Adam step
    # (not of the gradients, and bias-corrected), as trained_params reads it.
    decay = 0.8
    svi = build_svi(tiny_config, TrainConfig(learning_rate=1e-2, weight_average=decay))
    state = init_train_state(svi, 0, tiny_config.obs_dim).svi_state
    x, lengths = random_binary_batch(1, 4, 7, tiny_config.obs_dim, lengths=[7, 3, 5, 1])
    update = jax.jit(svi.update)
    history = []
    for _ in range(4):
        state, _ = update(state, x, lengths, 1.0)
        history.append(svi.get_params(state))
    expected = closed_form_average(history, decay)
    got = trained_params(svi, state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_weight_average_must_be_below_one():
    with pytest.raises(ValueError, match="TrainConfig.weight_average must be in"):
        TrainConfig(weight_average=1.0)
    with pytest.raises(ValueError, match="TrainConfig.weight_average must be in"):
        TrainConfig(weight_average=-0.1)


@pytest.fixture(scope="module")
def averaged_run(tiny_config, tmp_path_factory):
    directory = tmp_path_factory.mktemp("averaged")
    config = TrainConfig(
        epochs=3, batch_size=4, learning_rate=1e-2, annealing_epochs=0, eval_every=1,
        early_stopping_patience=5, weight_decay=0.0, weight_average=0.7, seed=3,
    )  # fmt: skip
    data = _structured_binary_data(num_sequences=8)
    result = fit(
        data, data[:3], model_config=tiny_config, train_config=config, checkpoint_dir=directory
    )
    return result, data, config, directory


def test_fit_evaluates_returns_and_saves_the_average(averaged_run, tiny_config):
    result, data, config, directory = averaged_run
    svi_params = result.state.svi_state.optim_state[1][0]  # the last update's, unconstrained
    last = jax.tree.leaves(svi_params)
    averaged = jax.tree.leaves(result.params)
    assert any(not np.allclose(a, b) for a, b in zip(averaged, last))  # not the last update's
    # The history's validation bound is the average's: recomputed from result.params.
    epoch = config.epochs - 1
    key = jax.random.fold_in(result.state.eval_key, epoch)
    bound = evaluate_split(result.params, key, data[:3], tiny_config)["loss_per_step"]
    assert result.history[-1]["val_loss_per_step"] == pytest.approx(bound, rel=1e-5)
    loaded = load_run(directory)
    for a, b in zip(jax.tree.leaves(loaded.params), averaged):
        np.testing.assert_array_equal(a, b)


def test_trained_params_without_an_average_are_svi_params(tiny_config):
    svi = build_svi(tiny_config, TrainConfig())
    state = init_train_state(svi, 0, tiny_config.obs_dim)
    got, expected = trained_params(svi, state.svi_state), svi.get_params(state.svi_state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
