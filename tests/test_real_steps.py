"""Scoring on the real steps only (dmm_jax.real_steps): same loss and gradients as dense."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, random_binary_batch
from numpyro.infer import Trace_ELBO

from dmm_jax.data.batching import epoch_batches, group_real_steps, real_step_capacities
from dmm_jax.models.common import sequence_mask
from dmm_jax.models.dmm import guide, model
from dmm_jax.objectives import AnalyticKLTraceELBO
from dmm_jax.real_steps import (
    gather_rows,
    grouped_real_steps,
    per_real_step,
    real_steps,
    scatter_rows,
)

RTOL = 1e-5


def test_real_steps_lists_every_real_step_once_in_both_layouts():
    lengths, num_steps = np.array([3, 0, 5, 1]), 6
    steps = real_steps(lengths, num_steps, capacity=12)
    mask = np.arange(num_steps)[None, :] < lengths[:, None]
    real = steps.batch_major < mask.size
    np.testing.assert_array_equal(steps.batch_major[real], np.flatnonzero(mask))
    np.testing.assert_array_equal(steps.batch_major[~real], mask.size)  # 3 unused slots
    b, t = np.divmod(steps.batch_major[real], num_steps)
    np.testing.assert_array_equal(steps.time_major[real], t * len(lengths) + b)
    np.testing.assert_array_equal(steps.time_major[~real], mask.size)


def test_grouped_real_steps_are_each_groups_own_real_steps_stacked():
    lengths, num_steps = np.array([3, 0, 5, 1, 6, 2]), 6
    grouped = grouped_real_steps(lengths, num_steps, capacity=8, groups=3)
    assert grouped.batch_major.shape == (3, 8) and grouped.time_major_slots.shape == (3, 12)
    for g in range(3):
        own = real_steps(lengths[2 * g : 2 * g + 2], num_steps, capacity=8)
        for got, want in zip(grouped, own):
            np.testing.assert_array_equal(got[g], want)
    with pytest.raises(ValueError, match="4 groups do not split a batch of 6"):
        grouped_real_steps(lengths, num_steps, capacity=8, groups=4)
    with pytest.raises(ValueError, match="more than capacity=5"):
        grouped_real_steps(lengths, num_steps, capacity=5, groups=3)  # 7 in the third


def test_capacities_hold_every_planned_batch_or_micro_batch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 140, 61)
    for length_grouped in (False, True):
        whole = real_step_capacities(lengths, 8, length_grouped, epochs=4)
        split = real_step_capacities(lengths, 8, length_grouped, epochs=4, microbatch_steps=400)
        assert whole.keys() == split.keys() == {48, 96, 144}
        # At most 400 padded steps per micro-batch: 48-step batches whole, 96-step ones in
        # 2 micro-batches of 4 sequences, 144-step ones in 4 of 2.
        assert split[48] == whole[48]
        for bucket, groups in ((96, 2), (144, 4)):
            assert split[bucket] <= 8 // groups * bucket and split[bucket] < whole[bucket]
            for epoch in range(4):
                key = jax.random.fold_in(jax.random.PRNGKey(0), epoch)
                for indices in epoch_batches(key, lengths, 8, length_grouped):
                    if 48 * (bucket // 48 - 1) < lengths[indices].max() <= bucket:
                        most = group_real_steps(lengths[indices], 8, groups).max()
                        assert most <= split[bucket]
                        assert lengths[indices].sum() <= whole[bucket]


def test_slots_invert_the_row_indices_and_point_padding_at_the_fill_slot():
    lengths, num_steps, capacity = np.array([3, 0, 5, 1]), 6, 12
    steps = real_steps(lengths, num_steps, capacity)
    for index, slots in (
        (steps.batch_major, steps.batch_major_slots),
        (steps.time_major, steps.time_major_slots),
    ):
        real = index < slots.size
        np.testing.assert_array_equal(slots[index[real]], np.flatnonzero(real))
        padded = np.setdiff1d(np.arange(slots.size), index[real])
        assert padded.size == slots.size - lengths.sum()
        np.testing.assert_array_equal(slots[padded], capacity)


def test_row_moves_by_slot_give_the_scatters_values_and_gradients():
    # gather_rows/scatter_rows with slots avoid XLA's scatter; without, they are plain
    # indexing with autodiff's scatter-add: both must give the same numbers.
    lengths, num_steps = np.array([2, 4, 0]), 4
    steps = real_steps(lengths, num_steps, capacity=8)
    x = jax.random.normal(jax.random.PRNGKey(2), (3, num_steps, 5))
    w = jax.random.normal(jax.random.PRNGKey(3), (num_steps, 3, 5))

    def loss(x, use_slots):
        rows_slots = steps.batch_major_slots if use_slots else None
        dense_slots = steps.time_major_slots if use_slots else None
        rows = jnp.sin(gather_rows(x, steps.batch_major, rows_slots))  # filler rows: sin(0)
        dense = scatter_rows(rows, steps.time_major, (num_steps, 3), 0.5, dense_slots)
        return jnp.sum(w * dense**2), dense

    (value, dense), grad = jax.value_and_grad(loss, has_aux=True)(x, True)
    (expected, expected_dense), expected_grad = jax.value_and_grad(loss, has_aux=True)(x, False)
    np.testing.assert_allclose(dense, expected_dense, rtol=1e-6)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6)
    padded = ~np.asarray(sequence_mask(jnp.asarray(lengths), num_steps)).T
    np.testing.assert_array_equal(dense[padded], 0.5)
    assert np.all(np.asarray(grad)[np.asarray(lengths)[:, None] <= np.arange(num_steps)] == 0)


def test_the_training_step_on_real_steps_holds_no_scatter(tiny_config):
    # XLA's CPU backend runs a scatter as a loop with one iteration per row: the step on real
    # steps moves rows by gathers only, forward and backward.
    from dmm_jax.config import TrainConfig
    from dmm_jax.train import build_svi, init_train_state

    svi = build_svi(tiny_config, TrainConfig())
    # Lowering needs shapes only; eval_shape skips running the initialisation.
    state = jax.eval_shape(lambda: init_train_state(svi, 0, tiny_config.obs_dim).svi_state)
    x, lengths = random_binary_batch(4, 4, 12, tiny_config.obs_dim, lengths=[10, 7, 0, 9])
    steps = real_steps(lengths, 12, capacity=32)
    update = jax.jit(svi.update)
    with_steps = update.lower(state, x, lengths, 1.0, steps=steps).as_text()
    assert "stablehlo.gather" in with_steps
    assert "stablehlo.scatter" not in with_steps


def test_real_steps_refuses_a_batch_above_its_capacity():
    with pytest.raises(ValueError, match="9 real steps, more than capacity=8"):
        real_steps(np.array([4, 5]), 6, capacity=8)


def test_per_real_step_matches_dense_on_real_steps_and_fills_padding():
    lengths, num_steps = np.array([2, 4, 0]), 4
    x = jax.random.normal(jax.random.PRNGKey(1), (3, num_steps, 5))

    def net(a):
        return jnp.tanh(a) * 2.0, jnp.exp(a[..., :2])

    steps = real_steps(lengths, num_steps, capacity=8)
    loc, scale = per_real_step(net, steps, x, fill=(0.0, 1.0))
    dense_loc, dense_scale = net(x)
    mask = np.asarray(sequence_mask(jnp.asarray(lengths), num_steps))
    np.testing.assert_allclose(loc[mask], dense_loc[mask], rtol=1e-6)
    np.testing.assert_allclose(scale[mask], dense_scale[mask], rtol=1e-6)
    np.testing.assert_array_equal(loc[~mask], 0.0)
    np.testing.assert_array_equal(scale[~mask], 1.0)


def _assert_trees_close(actual, expected, rtol=RTOL):
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(actual), jax.tree_util.tree_leaves(expected)
    ):
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=str(path))


CASES = {  # (config changes, KL estimator)
    "st-r": ({}, "sampled"),
    "st-r-analytic-kl": ({}, "analytic"),
    "st-lr": ({"guide": "st-lr"}, "sampled"),
    "mf-lr": ({"guide": "mf-lr"}, "sampled"),
    "aug-gaussian-gru-analytic-kl": (
        {"augmented": True, "emission": "gaussian", "rnn_cell": "gru"},
        "analytic",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradients_on_real_steps_equal_the_dense_ones(tiny_config, key, case):
    changes, kl = CASES[case]
    config = dataclasses.replace(tiny_config, **changes)
    # 12 padded steps, longest 10, 26 real steps of 48; capacity leaves 6 unused slots.
    x, lengths = random_binary_batch(3, 4, 12, config.obs_dim, lengths=[10, 7, 0, 9])
    if config.emission == "gaussian":
        x = x + 0.1 * np.asarray(jax.random.normal(key, x.shape))
    params = init_params(config)
    elbo = AnalyticKLTraceELBO() if kl == "analytic" else Trace_ELBO()
    model_fn = functools.partial(model, config=config)
    guide_fn = functools.partial(guide, config=config)

    def loss(params, **kwargs):
        return elbo.loss(key, params, model_fn, guide_fn, x, lengths, 0.6, **kwargs)

    steps = real_steps(lengths, 12, capacity=32)
    dense_value, dense_grads = jax.jit(jax.value_and_grad(loss))(params)
    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(p, steps=steps)))(params)
    assert np.isfinite(dense_value)
    np.testing.assert_allclose(value, dense_value, rtol=RTOL)
    _assert_trees_close(grads, dense_grads)


def _epochs(config, train_config, data, epochs=2):
    from dmm_jax.train import UpdateStep, build_svi, init_train_state, train_epoch

    svi = build_svi(config, train_config)
    state = init_train_state(svi, 0, config.obs_dim)
    update = UpdateStep(svi, microbatch_steps=train_config.microbatch_steps)
    losses = []
    for _ in range(epochs):
        state, loss, _ = train_epoch(update, state, data, train_config)
        losses.append(loss)
    return losses, svi.get_params(state.svi_state), update.compiled_shapes


@pytest.mark.parametrize("length_bucketing", [False, True])
def test_training_on_real_steps_follows_the_dense_run(tiny_config, length_bucketing):
    from dmm_jax.config import TrainConfig
    from dmm_jax.data.batching import PaddedSequences

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 46, 30)  # one length bucket (48): one shape per run
    data = PaddedSequences([(rng.random((n, tiny_config.obs_dim)) < 0.3) for n in lengths])
    on = TrainConfig(batch_size=8, length_bucketing=length_bucketing, learning_rate=1e-2)
    off = dataclasses.replace(on, real_steps=False)
    losses, params, shapes = _epochs(tiny_config, on, data)
    dense_losses, dense_params, dense_shapes = _epochs(tiny_config, off, data)
    assert all(slots == 0 for *_, slots in dense_shapes)
    assert all(0 < slots < b * t for b, t, _, slots in shapes)  # every batch on its real steps
    np.testing.assert_allclose(losses, dense_losses, rtol=1e-4)
    _assert_trees_close(params, dense_params, rtol=1e-4)


@pytest.mark.parametrize("length_bucketing", [False, True])
def test_micro_batches_on_real_steps_follow_the_dense_micro_batches(tiny_config, length_bucketing):
    from dmm_jax.config import TrainConfig
    from dmm_jax.data.batching import PaddedSequences

    rng = np.random.default_rng(2)
    lengths = rng.integers(3, 30, 30)
    data = PaddedSequences([(rng.random((n, tiny_config.obs_dim)) < 0.3) for n in lengths])
    # 8 x 48 padded steps over a budget of 200: two micro-batches of 4 sequences each.
    on = TrainConfig(
        batch_size=8, length_bucketing=length_bucketing, learning_rate=1e-2, microbatch_steps=200
    )
    off = dataclasses.replace(on, real_steps=False)
    losses, params, shapes = _epochs(tiny_config, on, data)
    dense_losses, dense_params, dense_shapes = _epochs(tiny_config, off, data)
    assert all(slots == 0 for *_, slots in dense_shapes)
    assert all(0 < slots < 4 * t for _, t, _, slots in shapes)  # slots per micro-batch
    np.testing.assert_allclose(losses, dense_losses, rtol=1e-4)
    _assert_trees_close(params, dense_params, rtol=1e-4)


def test_a_batch_above_its_planned_capacity_is_scored_densely(tiny_config, monkeypatch):
    from dmm_jax import train
    from dmm_jax.config import TrainConfig
    from dmm_jax.data.batching import PaddedSequences

    monkeypatch.setattr(train, "real_step_plan", lambda data, config, *_: {48: 10})
    rng = np.random.default_rng(1)
    for lengths, slots in (((3, 4, 1, 2), 10), ((3, 4, 9, 2), 0)):  # 10 real steps, then 18
        data = PaddedSequences([(rng.random((n, tiny_config.obs_dim)) < 0.3) for n in lengths])
        losses, _, shapes = _epochs(tiny_config, TrainConfig(batch_size=4), data, epochs=1)
        assert np.isfinite(losses).all()
        assert shapes == [(4, 48, tiny_config.obs_dim, slots)]
