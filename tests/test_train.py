"""Optimizer, annealing, the jitted SVI update and the training loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_binary_batch
from numpyro.infer.svi import SVIState

import dmm_jax.step
import dmm_jax.train
from dmm_jax.config import TrainConfig
from dmm_jax.data.batching import microbatch_count
from dmm_jax.models.dmm import guide, model
from dmm_jax.optim import annealing_factor, clipped_adam
from dmm_jax.step import (
    UpdateStep,
    build_svi,
    init_train_state,
    microbatched_update,
    skipping_nonfinite,
)
from dmm_jax.train import fit


def test_clipped_adam_matches_a_hand_computed_pyro_step():
    cfg = TrainConfig(
        learning_rate=0.1,
        beta1=0.9,
        beta2=0.99,
        adam_eps=1e-3,
        clip_norm=1.5,
        weight_decay=0.5,
        lr_decay=0.8,
    )
    params = {"a": jnp.array([1.0, -2.0, 3.0]), "b": {"c": jnp.array([[0.5]])}}
    grads = [
        {"a": jnp.array([4.0, -0.5, 0.1]), "b": {"c": jnp.array([[-7.0]])}},
        {"a": jnp.array([-3.0, 0.2, 2.0]), "b": {"c": jnp.array([[0.3]])}},
    ]
    opt = clipped_adam(cfg)
    state = opt.init(params)
    got = params
    for g in grads:
        updates, state = opt.update(g, state, got)
        got = jax.tree.map(lambda p, u: p + u, got, updates)

    # torch/Pyro ClippedAdam, written out element by element.
    def pyro_steps(p, gs):
        p, m, v, lr = np.array(p, np.float64), 0.0, 0.0, cfg.learning_rate
        for step, g in enumerate(gs, start=1):
            lr *= cfg.lr_decay  # before the step, the first one included
            g = (
                np.clip(np.array(g, np.float64), -cfg.clip_norm, cfg.clip_norm)
                + cfg.weight_decay * p
            )
            m = cfg.beta1 * m + (1 - cfg.beta1) * g
            v = cfg.beta2 * v + (1 - cfg.beta2) * g * g
            step_size = lr * np.sqrt(1 - cfg.beta2**step) / (1 - cfg.beta1**step)
            p = p - step_size * m / (np.sqrt(v) + cfg.adam_eps)
        return p

    np.testing.assert_allclose(
        got["a"], pyro_steps(params["a"], [g["a"] for g in grads]), rtol=1e-6
    )
    np.testing.assert_allclose(
        got["b"]["c"], pyro_steps(params["b"]["c"], [g["b"]["c"] for g in grads]), rtol=1e-6
    )


def test_annealing_schedule_is_the_references():
    cfg = TrainConfig(annealing_epochs=10, minimum_annealing_factor=0.2)
    assert annealing_factor(0, 0, 4, cfg) == pytest.approx(0.2 + 0.8 / 40)
    assert annealing_factor(9, 3, 4, cfg) == pytest.approx(1.0)
    assert annealing_factor(10, 0, 4, cfg) == 1.0
    assert annealing_factor(0, 0, 4, dataclasses.replace(cfg, annealing_epochs=0)) == 1.0
    factors = [annealing_factor(e, b, 4, cfg) for e in range(10) for b in range(4)]
    assert np.all(np.diff(factors) > 0)


def _structured_binary_data(num_sequences=16, num_steps=12, obs_dim=6, seed=0):
    """Sequences whose active note walks up and down: learnable temporal structure."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(num_sequences):
        length = int(rng.integers(num_steps // 2, num_steps + 1))
        start, direction = int(rng.integers(obs_dim)), int(rng.choice([-1, 1]))
        roll = np.zeros((length, obs_dim), np.uint8)
        for t in range(length):
            roll[t, (start + direction * t) % obs_dim] = 1
        seqs.append(roll)
    return seqs


def test_jitted_update_lowers_the_loss_and_annealing_never_recompiles(tiny_config):
    cfg = TrainConfig(learning_rate=1e-2, weight_decay=0.0, lr_decay=1.0)
    svi = build_svi(tiny_config, cfg)
    state = init_train_state(svi, 0, tiny_config.obs_dim).svi_state
    update = UpdateStep(svi)
    x, lengths = random_binary_batch(0, 8, 10, tiny_config.obs_dim)
    x = np.zeros_like(x)
    x[:, :, 0] = 1.0  # a constant pattern, quickly learnt
    losses = []
    for i in range(40):
        state, loss = update(state, x, lengths, 0.2 + 0.02 * i)  # a new factor every step
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert update.compiled_shapes == [(8, 10, tiny_config.obs_dim, 0)]  # 0: no real steps
    x2, lengths2 = random_binary_batch(1, 8, 16, tiny_config.obs_dim)
    update(state, x2, lengths2, 1.0)
    assert len(update.compiled_shapes) == 2


def test_microbatch_count_picks_the_fewest_dividing_groups_under_the_budget():
    assert microbatch_count(20, 4300, 0) == 1  # off
    assert microbatch_count(20, 100, 2000) == 1
    assert microbatch_count(20, 4300, 25_000) == 4  # 5 sequences x 4300 steps each
    assert microbatch_count(20, 4300, 1000) == 20  # never below one sequence
    assert microbatch_count(7, 10, 30) == 7  # 7 is prime: 1 or 7 groups


def test_microbatched_update_sums_the_numpyro_gradients_of_each_group(tiny_config):
    from functools import partial

    from numpyro.infer import Trace_ELBO

    svi = build_svi(tiny_config, TrainConfig(learning_rate=1e-2))
    state = init_train_state(svi, 0, tiny_config.obs_dim).svi_state
    x, lengths = random_binary_batch(3, 6, 9, tiny_config.obs_dim, lengths=[9, 2, 5, 0, 7, 3])

    # The expected step, written out: three groups of two sequences, each scored by NumPyro's
    # Trace_ELBO with key fold_in(step_key, group), gradients summed, one optimizer update.
    _, step_key = jax.random.split(state.rng_key)
    params = svi.optim.get_params(state.optim_state)
    model_fn, guide_fn = partial(model, config=tiny_config), partial(guide, config=tiny_config)
    loss, grads = 0.0, jax.tree.map(jnp.zeros_like, params)

    @jax.jit
    def group_loss_and_grads(p, key, x_group, lengths_group):
        elbo = Trace_ELBO()
        return jax.value_and_grad(
            lambda q: elbo.loss(key, q, model_fn, guide_fn, x_group, lengths_group, 0.5)
        )(p)

    for group in range(3):
        rows = slice(2 * group, 2 * group + 2)
        key = jax.random.fold_in(step_key, group)
        value, g = group_loss_and_grads(params, key, x[rows], lengths[rows])
        loss, grads = loss + value, jax.tree.map(jnp.add, grads, g)
    expected = svi.optim.get_params(svi.optim.update(grads, state.optim_state, value=loss))

    new_state, got_loss = jax.jit(partial(microbatched_update, svi, 3))(state, x, lengths, 0.5)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    got = svi.optim.get_params(new_state.optim_state)
    for name in expected:
        for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(expected[name])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_microbatched_update_refuses_real_steps_not_grouped_per_micro_batch(tiny_config):
    from functools import partial

    from dmm_jax.real_steps import grouped_real_steps, real_steps

    svi = build_svi(tiny_config, TrainConfig(learning_rate=1e-2))
    state = init_train_state(svi, 0, tiny_config.obs_dim).svi_state
    x, lengths = random_binary_batch(3, 6, 9, tiny_config.obs_dim, lengths=[9, 2, 5, 0, 7, 3])
    update = jax.jit(partial(microbatched_update, svi, 3))
    with pytest.raises(ValueError, match="real steps of each of the 3 micro-batches"):
        update(state, x, lengths, 0.5, steps=real_steps(lengths, 9, 32))  # the whole batch's
    grouped = grouped_real_steps(lengths, 9, 12, 3)
    _, loss = update(state, x, lengths, 0.5, steps=grouped)
    _, dense_loss = update(state, x, lengths, 0.5)
    np.testing.assert_allclose(loss, dense_loss, rtol=1e-5)


def test_update_step_passes_its_compiler_options_to_xla(tiny_config):
    # Every other UpdateStep test runs with dmm_jax's default options; here an unknown option
    # is refused by XLA's compiler, so the options do reach it.
    svi = build_svi(tiny_config, TrainConfig())
    x, lengths = random_binary_batch(0, 4, 10, tiny_config.obs_dim)
    # Shapes are all compiling needs; eval_shape skips running the initialisation.
    state = jax.eval_shape(lambda: init_train_state(svi, 0, tiny_config.obs_dim).svi_state)
    unknown = UpdateStep(svi, compiler_options={"xla_cpu_no_such_option": True})
    with pytest.raises(Exception, match="xla_cpu_no_such_option"):
        unknown.compile(state, [(x, lengths, {})])
    assert unknown.compiled_shapes == []


def test_update_step_splits_only_shapes_over_the_microbatch_budget(tiny_config):
    svi = build_svi(tiny_config, TrainConfig())
    state = init_train_state(svi, 0, tiny_config.obs_dim).svi_state
    update = UpdateStep(svi, microbatch_steps=40)
    x, lengths = random_binary_batch(0, 8, 20, tiny_config.obs_dim)  # 160 steps: 4 groups
    state, loss = update(state, x, lengths, 1.0)
    assert np.isfinite(float(loss)) and 0.0 < float(loss)
    assert update.compiled_shapes == [(8, 20, tiny_config.obs_dim, 0)]
    assert set(update._jitted) == {1, 4}


def test_fit_lowers_the_loss_and_evaluates_at_the_end(tiny_config):
    train = _structured_binary_data()
    valid = _structured_binary_data(6, seed=1)
    cfg = TrainConfig(
        epochs=25, batch_size=5, learning_rate=1e-2, annealing_epochs=5, weight_decay=0.0
    )
    result = fit(train, valid, model_config=tiny_config, train_config=cfg)
    losses = [r["train_loss_per_step"] for r in result.history]
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * losses[0]
    assert "val_loss_per_step" in result.history[-1] and np.isfinite(
        result.history[-1]["val_loss_per_step"]
    )
    assert "val_loss_per_step" not in result.history[0]  # eval_every=0: only at the end
    # 16 sequences of <= 12 steps in batches of 5 padded to one bucket: one shape, scored on
    # its real steps (at most 60 of the 240 padded ones).
    [(*shape, slots)] = result.compiled_shapes
    assert tuple(shape) == (5, 48, tiny_config.obs_dim) and 60 <= slots < 240


def test_train_config_rejects_nonsense():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="minimum_annealing_factor"):
        TrainConfig(minimum_annealing_factor=0.0)


def test_learning_rate_schedules():
    from dmm_jax.optim import learning_rate_schedule

    cfg = TrainConfig(learning_rate=0.1, lr_decay=0.5, epochs=4)
    assert float(learning_rate_schedule(cfg)(3)) == pytest.approx(0.1 * 0.5**4)
    constant = dataclasses.replace(cfg, lr_schedule="constant")
    assert float(learning_rate_schedule(constant)(1000)) == pytest.approx(0.1)
    cosine = learning_rate_schedule(dataclasses.replace(cfg, lr_schedule="cosine"), 5)
    assert float(cosine(0)) == pytest.approx(0.1)
    assert float(cosine(10)) == pytest.approx(0.05)  # halfway through 4 epochs x 5 steps
    assert float(cosine(20)) == pytest.approx(0.0, abs=1e-9)
    # Every schedule keeps the same optimizer-state structure (checkpoints stay loadable).
    params = {"a": jnp.zeros(3)}
    structures = {
        jax.tree.structure(clipped_adam(dataclasses.replace(cfg, lr_schedule=s)).init(params))
        for s in ("exponential", "constant", "cosine")
    }
    assert len(structures) == 1


def test_cosine_annealing_runs_from_the_minimum_to_one():
    cfg = TrainConfig(
        annealing_epochs=10, minimum_annealing_factor=0.2, annealing_schedule="cosine"
    )
    assert annealing_factor(4, 3, 4, cfg) == pytest.approx(0.2 + 0.8 * 0.5)  # halfway
    assert annealing_factor(9, 3, 4, cfg) == pytest.approx(1.0)
    factors = [annealing_factor(e, b, 4, cfg) for e in range(10) for b in range(4)]
    assert np.all(np.diff(factors) > 0) and factors[0] > 0.2


def test_early_stopping_counts_evaluations_since_the_best():
    from dmm_jax.train import EarlyStopping

    values = [5.0, 4.0, 4.5, 3.9, 4.0, 4.1]
    records = [{"epoch": 2 * i + 1, "val_loss_per_step": v} for i, v in enumerate(values)]
    records.insert(2, {"epoch": 2})  # an epoch without evaluation does not count
    stopper = EarlyStopping(2)
    improved = [stopper.update(r) for r in records]
    assert improved == [True, True, False, False, True, False, False]
    assert stopper.stopped and stopper.best == 3.9 and stopper.best_epoch == 7
    assert not EarlyStopping(0, records).stopped
    # Rebuilt from a history, it is where it was.
    rebuilt = EarlyStopping(2, records)
    assert rebuilt.stopped and rebuilt.best_epoch == 7


def test_fit_stops_early_and_keeps_the_best_checkpoint(tiny_config, tmp_path):
    from dmm_jax.train import load_run

    train = _structured_binary_data(8)
    valid = _structured_binary_data(4, seed=1)
    # No learning at all: the validation bound only wanders with the evaluation draws, so a
    # patience of 1 stops the run long before its 30 epochs.
    cfg = TrainConfig(
        epochs=30, batch_size=8, learning_rate=1e-12, eval_every=1, early_stopping_patience=1
    )
    result = fit(train, valid, model_config=tiny_config, train_config=cfg, checkpoint_dir=tmp_path)
    history = result.history
    assert len(history) < 30 and history[-1].get("early_stopped")
    vals = [r["val_loss_per_step"] for r in history]
    assert vals[-1] >= min(vals[:-1])
    best_epoch = int(np.argmin(vals))
    best = load_run(tmp_path, best=True)
    assert int(best.state.epoch) == best_epoch + 1
    assert int(load_run(tmp_path).state.epoch) == len(history)
    # Resuming a stopped run trains no further.
    again = fit(
        train,
        valid,
        model_config=tiny_config,
        train_config=cfg,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert len(again.history) == len(history)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_the_guard_drops_an_update_that_makes_any_array_of_the_state_non_finite(bad):
    # A state with a large array (checked by its sum), small ones and a scalar (checked
    # together) and an integer count, as an optimizer's state holds.
    state = SVIState(
        (jnp.int32(3), {"w": jnp.ones((200, 100)), "b": jnp.ones(7), "s": jnp.float32(2.0)}),
        None,
        jax.random.PRNGKey(0),
    )
    leaves, tree = jax.tree.flatten(state.optim_state)
    floats = [i for i, a in enumerate(leaves) if jnp.issubdtype(a.dtype, jnp.floating)]
    assert len(floats) == 3 and max(a.size for a in leaves) >= dmm_jax.step._LARGE_ARRAY > 7

    @jax.jit
    def guarded(state, index):  # leaf `index` of the new state gets one non-finite entry
        def update(svi_state):
            new = [a + 1 for a in jax.tree.leaves(svi_state.optim_state)]
            new = [
                jnp.where((i == index) & (jnp.arange(a.size) == 0).reshape(a.shape), bad, a)
                if jnp.issubdtype(a.dtype, jnp.floating)
                else a
                for i, a in enumerate(new)
            ]
            return svi_state._replace(optim_state=jax.tree.unflatten(tree, new)), 0.0

        return skipping_nonfinite(update)(state)[0].optim_state

    for index in floats:  # a non-finite entry in any of them: the update is dropped
        for a, b in zip(jax.tree.leaves(guarded(state, index)), leaves):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(guarded(state, -1)), leaves):  # all finite: it goes through
        np.testing.assert_array_equal(a, b + 1)


def test_update_step_drops_an_update_whose_loss_is_not_finite(tiny_config):
    svi = build_svi(tiny_config, TrainConfig(learning_rate=1e-2))
    state = init_train_state(svi, 0, tiny_config.obs_dim).svi_state
    before = jax.tree.map(np.asarray, svi.get_params(state))
    update = UpdateStep(svi)
    x, lengths = random_binary_batch(0, 4, 8, tiny_config.obs_dim, lengths=[8, 8, 8, 8])
    state, loss = update(state, x, lengths, np.inf)  # an infinite KL weight: loss not finite
    assert not np.isfinite(float(loss))
    after = svi.get_params(state)
    for name in before:
        for a, b in zip(jax.tree.leaves(after[name]), jax.tree.leaves(before[name])):
            np.testing.assert_array_equal(a, b)
    state, loss = update(state, x, lengths, 1.0)  # a finite batch updates as usual
    assert np.isfinite(float(loss))
    moved = svi.get_params(state)
    assert any(
        not np.allclose(a, b) for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(before))
    )
