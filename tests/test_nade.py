"""The NADE emission (dmm_jax.emissions.NADE): a distribution over 0/1 vectors that sums to
one, the factorised Bernoulli when its notes are uncoupled, its log density against a plain
loop over notes, sampling frequencies against its probabilities; and the emission inside the
DMM and the VRNN: the ELBO against the Bernoulli model's where they coincide, finite gradients
under padding, generation, and the CLI from training (by the IWAE bound) to forecasts."""

import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, random_binary_batch, write_tiny_chorales
from numpyro.infer import Trace_ELBO
from scipy import stats

from dmm_jax import emissions
from dmm_jax.cli import main
from dmm_jax.config import DMMConfig, VRNNConfig
from dmm_jax.emissions import NADE, note_logits
from dmm_jax.evaluate import elbo_per_sequence
from dmm_jax.generate import forecast, forecast_split, impute, sample_prior
from dmm_jax.models import dmm, vrnn
from dmm_jax.train import load_run

NOTES = 6
HIDDEN = 4


def _nade(seed=0, batch=(), zero_weights=False):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    hidden_bias = jax.random.normal(keys[0], (*batch, HIDDEN))
    visible_bias = jax.random.normal(keys[1], (*batch, NOTES))
    weights = 1.5 * jax.random.normal(keys[2], (HIDDEN, NOTES))
    readout = 1.5 * jax.random.normal(keys[3], (NOTES, HIDDEN))
    if zero_weights:
        weights = jnp.zeros_like(weights)
    return NADE(hidden_bias, visible_bias, weights, readout)


def _all_vectors(num_notes=NOTES):
    return jnp.asarray(list(itertools.product((0.0, 1.0), repeat=num_notes)), jnp.float32)


def _loop_log_prob(nade, x):
    """log p(x) note by note, in float64, exactly as the definition reads."""
    a = np.asarray(nade.hidden_bias, np.float64)
    b = np.asarray(nade.visible_bias, np.float64)
    w = np.asarray(nade.weights, np.float64)
    v = np.asarray(nade.readout, np.float64)
    x = np.asarray(x, np.float64)
    total = 0.0
    for d in range(x.shape[-1]):
        h = 1.0 / (1.0 + np.exp(-(a + w[:, :d] @ x[:d])))
        p = 1.0 / (1.0 + np.exp(-(b[d] + v[d] @ h)))
        total += np.log(p if x[d] else 1.0 - p)
    return total


def test_probabilities_of_every_vector_sum_to_one():
    nade = _nade(batch=(3,))
    vectors = _all_vectors()[:, None, :]  # [2^D, 1, D] against the batch of 3
    log_p = nade.log_prob(vectors)
    assert log_p.shape == (2**NOTES, 3)
    np.testing.assert_allclose(jnp.exp(log_p).sum(0), np.ones(3), rtol=1e-5)


def test_log_prob_equals_a_loop_over_notes():
    nade = _nade(seed=1)
    vectors = _all_vectors()
    log_p = nade.log_prob(vectors)
    expected = [_loop_log_prob(nade, x) for x in vectors]
    np.testing.assert_allclose(log_p, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_notes", [8, 13, 88])
def test_log_prob_equals_a_loop_over_notes_across_blocks_of_notes(num_notes):
    # More notes than one block of the cumulative sum (8): whole blocks, a padded last block,
    # and the 88 keys of a piano roll; random vectors, the sparsity of music and dense ones.
    keys = jax.random.split(jax.random.PRNGKey(num_notes), 5)
    nade = NADE(
        jax.random.normal(keys[0], (HIDDEN,)),
        jax.random.normal(keys[1], (num_notes,)),
        jax.random.normal(keys[2], (HIDDEN, num_notes)),
        jax.random.normal(keys[3], (num_notes, HIDDEN)),
    )
    density = jnp.asarray([0.1, 0.5])[:, None, None]
    vectors = (jax.random.uniform(keys[4], (2, 5, num_notes)) < density).astype(jnp.float32)
    vectors = vectors.reshape(10, num_notes)
    expected = [_loop_log_prob(nade, x) for x in vectors]
    np.testing.assert_allclose(nade.log_prob(vectors), expected, rtol=1e-5, atol=1e-5)


def test_with_uncoupled_notes_it_is_the_factorised_bernoulli():
    nade = _nade(seed=2, batch=(2,), zero_weights=True)
    logits = nade.visible_bias + jax.nn.sigmoid(nade.hidden_bias) @ nade.readout.T
    x = _all_vectors()[:, None, :]
    bernoulli = jnp.sum(x * jax.nn.log_sigmoid(logits) + (1 - x) * jax.nn.log_sigmoid(-logits), -1)
    np.testing.assert_allclose(nade.log_prob(x), bernoulli, rtol=1e-5)
    expected = jnp.broadcast_to(logits, (2**NOTES, 2, NOTES))
    np.testing.assert_allclose(note_logits("nade", _params(nade), x), expected, atol=1e-6)


def _params(nade):
    return (nade.hidden_bias, nade.visible_bias, nade.weights, nade.readout)


def test_sample_frequencies_match_the_probabilities():
    nade = _nade(seed=3)
    draws = nade.sample(jax.random.PRNGKey(7), (20000,))
    assert draws.shape == (20000, NOTES)
    codes = np.asarray(draws @ (2.0 ** jnp.arange(NOTES - 1, -1, -1))).astype(int)
    observed = np.bincount(codes, minlength=2**NOTES)
    expected = 20000 * np.exp(np.asarray(nade.log_prob(_all_vectors()), np.float64))
    expected *= 20000 / expected.sum()
    common = expected >= 5  # chi-square's rule of thumb; the rare vectors pooled into one cell
    observed = np.append(observed[common], observed[~common].sum())
    expected = np.append(expected[common], expected[~common].sum())
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_missing_notes_are_not_scored_and_read_as_given():
    nade = _nade(seed=4)
    x = _all_vectors()[37]
    present = jnp.asarray([True, False, True, True, False, True])
    masked = NADE(*_params(nade), present=present).log_prob(x)
    logits = nade.conditional_logits(x)
    per_note = x * jax.nn.log_sigmoid(logits) + (1 - x) * jax.nn.log_sigmoid(-logits)
    np.testing.assert_allclose(masked, jnp.sum(jnp.where(present, per_note, 0.0)), rtol=1e-6)


def test_many_steps_are_scored_in_chunks_with_the_same_values_and_gradients(monkeypatch):
    # More steps than NADE_CHUNK_ROWS: the chunked path (rows padded to whole chunks, each
    # recomputed in the backward pass) against the whole batch at once, with missing notes,
    # biases broadcast over a leading axis, and the weights' leading unit axes of the models.
    keys = jax.random.split(jax.random.PRNGKey(5), 6)
    hidden_bias = jax.random.normal(keys[0], (1, 37, HIDDEN))
    visible_bias = jax.random.normal(keys[1], (3, 37, NOTES))
    weights = jax.random.normal(keys[2], (1, 1, HIDDEN, NOTES))
    readout = jax.random.normal(keys[3], (1, 1, NOTES, HIDDEN))
    x = (jax.random.uniform(keys[4], (3, 37, NOTES)) < 0.3).astype(jnp.float32)
    present = jax.random.uniform(keys[5], (3, 37, NOTES)) < 0.8

    def total(chunk, *params):
        monkeypatch.setattr(emissions, "NADE_CHUNK_ROWS", chunk)
        log_p = NADE(*params, present=present).log_prob(x)
        return jnp.sum(jnp.cos(log_p)), log_p

    params = (hidden_bias, visible_bias, weights, readout)
    grad = jax.grad(total, argnums=(1, 2, 3, 4), has_aux=True)
    whole, whole_log_p = grad(10**6, *params)
    chunked, chunked_log_p = grad(16, *params)  # 111 steps: 7 chunks, the last one padded
    assert chunked_log_p.shape == (3, 37)
    np.testing.assert_allclose(chunked_log_p, whole_log_p, rtol=1e-6)
    for got, want in zip(chunked, whole):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_chunks_bound_the_memory_of_the_gradient(monkeypatch):
    # A Nottingham-sized batch (20 pieces of 1,792 steps, 88 notes, 100 hidden units): XLA's
    # temporary buffers for the log density's gradient, whole batch against chunks.
    rows, notes, hidden = 20 * 1792, 88, 100
    shapes = [(rows, hidden), (rows, notes), (hidden, notes), (notes, hidden), (rows, notes)]
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]

    def temp_mib(chunk):
        monkeypatch.setattr(emissions, "NADE_CHUNK_ROWS", chunk)

        def loss(hidden_bias, visible_bias, weights, readout, x):
            return jnp.sum(NADE(hidden_bias, visible_bias, weights, readout).log_prob(x))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**20

    chunked, whole = temp_mib(emissions.NADE_CHUNK_ROWS), temp_mib(rows)
    one_array = rows * notes * hidden * 4 / 2**20  # 1203 MiB: [steps, notes, hidden] floats
    assert whole > 2 * one_array
    assert chunked < one_array / 2


# ----------------------------------------------------------------------------- in the models

DMM_NADE = DMMConfig(
    obs_dim=NOTES, z_dim=3, emission_dim=8, transition_dim=8, rnn_dim=10, emission="nade",
    nade_hidden=HIDDEN,
)  # fmt: skip


def test_dmm_with_an_uncoupled_nade_has_the_bernoulli_models_elbo(key):
    """W = 0 and V = 0: each note is Bernoulli(sigmoid(b(z))), the Bernoulli DMM whose
    emitter's last layer is the NADE's visible bias: the same ELBO from the same draws."""
    params = init_params(DMM_NADE)
    params["nade$params"] = jax.tree.map(jnp.zeros_like, params["nade$params"])
    bernoulli = dataclasses.replace(DMM_NADE, emission="bernoulli")
    emitter = {k: v for k, v in params["emitter$params"].items() if "nade" not in k}
    same = {k: v for k, v in params.items() if k not in ("nade$params", "emitter$params")}
    same["emitter$params"] = emitter
    x, lengths = random_binary_batch(0, 4, 7, NOTES)
    np.testing.assert_allclose(
        elbo_per_sequence(params, key, x, lengths, DMM_NADE),
        elbo_per_sequence(same, key, x, lengths, bernoulli),
        rtol=1e-5,
    )


@pytest.mark.parametrize("family", ["dmm", "vrnn"])
def test_gradients_are_finite_and_padding_contributes_nothing(family, key):
    config = DMM_NADE if family == "dmm" else _vrnn_config()
    params = init_params(config) if family == "dmm" else _vrnn_params(config)
    module = dmm if family == "dmm" else vrnn
    x, lengths = random_binary_batch(1, 3, 6, NOTES, lengths=[6, 2, 4])
    loss = Trace_ELBO()

    def value(p, x):
        return loss.loss(key, p, module.model, module.guide, x, lengths, config=config)

    grads = jax.grad(value)(params, x)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["nade$params"]["W"]).sum()) > 0
    padded = np.concatenate([x, np.ones((3, 4, NOTES), np.float32)], axis=1)
    np.testing.assert_allclose(value(params, x), value(params, padded), rtol=1e-5)


def _vrnn_config():
    sizes = {"z_dim": 3, "rnn_dim": 8, "feature_dim": 8, "hidden_dim": 8}
    return VRNNConfig(obs_dim=NOTES, emission="nade", nade_hidden=HIDDEN, **sizes)


def _vrnn_params(config):
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))
    return {
        f"{name}$params": module.init(next(keys), *example)["params"]
        for name, (module, example) in vrnn.modules(config).items()
    }


@pytest.mark.parametrize("family", ["dmm", "dmm-aug", "vrnn"])
def test_generation_draws_notes_and_scores_forecasts(family, key):
    if family == "vrnn":
        config = _vrnn_config()
        params = _vrnn_params(config)
    else:
        config = dataclasses.replace(DMM_NADE, augmented=family == "dmm-aug")
        params = init_params(config)
    out = sample_prior(params, key, config, 3, 5)
    assert out["x"].shape == (3, 5, NOTES) and out["x"].dtype == jnp.uint8
    # probs are each note's conditional at the drawn notes below it
    emission = out["emission"]
    expected = NADE(*emission).conditional_logits(out["x"].astype(jnp.float32))
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-5, atol=1e-6)
    x, lengths = random_binary_batch(2, 2, 4, NOTES, lengths=[4, 3])
    ahead = forecast(params, key, jnp.asarray(x), jnp.asarray(lengths), config, 3, 4)
    assert ahead["x"].shape == (4, 2, 3, NOTES)
    assert bool(jnp.all((ahead["mean_probs"] >= 0) & (ahead["mean_probs"] <= 1)))
    sequences = [np.asarray(s) for s in random_binary_batch(3, 4, 9, NOTES, [9] * 4)[0]]
    scores = forecast_split(
        params, key, sequences, config, prefix_length=4, horizon=3, num_samples=2,
        frequencies=np.full(NOTES, 0.3), batch_size=4,
    )  # fmt: skip
    for name in ("model_log_likelihood_per_step", "model_marginal_log_likelihood_per_step"):
        assert np.isfinite(scores[name]) and scores[name] < 0


def test_impute_refuses_a_nade_emission(key):
    params = init_params(DMM_NADE)
    x, lengths = random_binary_batch(0, 2, 4, NOTES)
    with pytest.raises(NotImplementedError, match="Bernoulli emission only"):
        impute(params, key, x, lengths, jnp.ones_like(x, bool), DMM_NADE)


def test_cli_trains_a_nade_dmm_by_iwae_and_uses_its_checkpoint(tmp_path, capsys):
    """``dmm-jax train --emission nade --objective iwae``, then evaluate, sample to MIDI and
    forecast from the checkpoint."""
    data = write_tiny_chorales(
        tmp_path / "tiny.json", {"train": [9, 6, 8], "valid": [5], "test": [7, 4]}
    )
    run_dir, log = tmp_path / "run", tmp_path / "log.jsonl"
    tiny = ["--z-dim", "3", "--emission-dim", "8", "--transition-dim", "8", "--rnn-dim", "8"]
    args = ["train", "--data", str(data), *tiny, "--emission", "nade", "--nade-hidden", "5"]
    args += ["--objective", "iwae", "--particles", "3", "--epochs", "2", "--batch-size", "3"]
    assert main([*args, "--checkpoint-dir", str(run_dir), "--log-json", str(log), "--quiet"]) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 2 and np.isfinite(records[-1]["test_loss_per_step"])
    run = load_run(run_dir)
    assert run.model_config.emission == "nade" and run.train_config.objective == "iwae"
    assert run.params["nade$params"]["W"].shape == (5, 88)
    common = ["--checkpoint", str(run_dir), "--data", str(data)]
    assert main(["evaluate", *common, "--estimator", "is", "--samples", "3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["is_nll_per_step"] <= out["elbo_nll_per_step"]
    midi = tmp_path / "midi"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run_dir),
                "--num",
                "2",
                "--length",
                "4",
                "--midi",
                str(midi),
            ]
        )
        == 0
    )
    assert len(list(midi.glob("*.mid"))) == 2
    capsys.readouterr()
    assert main(["forecast", *common, "--prefix", "3", "--horizon", "2", "--samples", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.isfinite(out["model_log_likelihood_per_step"])
