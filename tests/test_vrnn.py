"""The VRNN (dmm_jax.models.vrnn): its ELBO, closed-form-KL ELBO and generation hooks against a
Python loop over time; the mixture emission against NumPyro; padding and missing entries;
training, checkpoints and generation through the shared machinery. The CLI is in
test_vrnn_cli.py."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from conftest import random_binary_batch
from numpyro.infer import Trace_ELBO
from scipy import special, stats

from dmm_jax.checkpoint import CheckpointError
from dmm_jax.config import TrainConfig, VRNNConfig
from dmm_jax.emissions import DiagonalGaussianMixture
from dmm_jax.evaluate import elbo_per_sequence, evaluate_split
from dmm_jax.generate import forecast, hide_entries, impute, posterior_latents, sample_prior
from dmm_jax.models import vrnn
from dmm_jax.models.vrnn import guide, hidden_of, initial_state, model, networks, state_after
from dmm_jax.objectives import analytic_kl_elbo, trace_guide_and_model
from dmm_jax.train import fit, load_run

RTOL = 1e-5  # the library's ELBO against the Python loop, and float-only differences
LOSS_RTOL = 1e-4  # training losses computed two ways (summation order over a whole epoch)
OBS_DIM = 5


def _config(**changes):
    sizes = {"obs_dim": OBS_DIM, "z_dim": 3, "rnn_dim": 8, "feature_dim": 8, "hidden_dim": 8}
    return VRNNConfig(**{**sizes, **changes})


# One config per emission, shared by the tests (their parameters are initialised once).
BERNOULLI = _config()
GAUSSIAN = _config(emission="gaussian", rnn_cell="lstm")
GMM = _config(emission="gmm", mixture_components=2)


@functools.lru_cache
def _params(config, seed=0):
    """Parameters of every network the model and guide register (as ``fit`` names them; see
    test_fit_lowers_the_loss_and_checkpoints_the_vrnn), shifted randomly so that every bias
    matters; cached per config. Initialised by Flax directly: tracing the model and guide as
    the SVI does costs several times as much compiling."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
    params = {
        f"{name}$params": module.init(next(keys), *example)["params"]
        for name, (module, example) in vrnn.modules(config).items()
        if not (name == "prior" and config.standard_prior)
    }
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    leaves = [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, leaves)


def _data(config, seed=0, batch=3, num_steps=7, lengths=(6, 4, 1), missing=0.0):
    """x [B, T, X] (0/1 for bernoulli, real otherwise; NaN where missing), lengths [B]."""
    if config.emission == "bernoulli":
        return random_binary_batch(seed, batch, num_steps, config.obs_dim, lengths)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, num_steps, config.obs_dim)).astype(np.float32)
    x[rng.random(x.shape) < missing] = np.nan
    lengths = np.asarray(lengths, np.int32)
    x[np.arange(num_steps)[None, :] >= lengths[:, None]] = 0.0
    return x, lengths


def _emission_log_prob(kind, decoded, x_t):
    """log p(x_t | ...) of one step on its observed entries, in float64."""
    present = ~np.isnan(x_t)
    decoded = [np.asarray(d[0], np.float64) for d in decoded]
    if kind == "bernoulli":
        return stats.bernoulli.logpmf(x_t, special.expit(decoded[0])).sum()
    if kind == "gaussian":
        loc, scale = decoded
        return stats.norm.logpdf(x_t[present], loc[present], scale[present]).sum()
    logits, loc, scale = decoded
    per_component = [
        stats.norm.logpdf(x_t[present], loc[k, present], scale[k, present]).sum()
        for k in range(len(logits))
    ]
    return special.logsumexp(np.asarray(per_component) + special.log_softmax(logits))


def _normal_kl(loc_q, scale_q, loc_p, scale_p):
    return np.sum(
        np.log(scale_p / scale_q) + (scale_q**2 + (loc_q - loc_p) ** 2) / (2 * scale_p**2) - 0.5
    )


def _reference(params, config, x, length, eps, covariates=None):
    """One sequence, step by step with the networks called one step at a time: the draw
    z_t = loc + scale * eps_t, the encoder's scales, the decoder's parameters, and the sums of
    log p(x_t | .), log p(z_t | .), log q(z_t | .) and KL(q_t || p_t) over the real steps.
    ``covariates`` [T, C]: c_t, read with h_{t-1} as g_t = [h_{t-1}, c_t]."""
    nets = networks(params, config)
    state = initial_state(config, 1)
    out = {"z": [], "scale_q": [], "decoded": [], "log_px": 0.0, "log_pz": 0.0}
    out.update(log_qz=0.0, kl=0.0)
    for t in range(length):
        g = hidden_of(state)  # h_{t-1}
        if covariates is not None:
            g = jnp.concatenate([g, covariates[None, t]], -1)  # g_t = [h_{t-1}, c_t]
        features_x = nets["phi_x"](jnp.asarray(np.nan_to_num(x[None, t])))
        loc_q, scale_q = nets["encoder"](jnp.concatenate([features_x, g], -1))
        z_t = loc_q + scale_q * eps[None, t]
        if config.standard_prior:
            loc_p, scale_p = jnp.zeros_like(z_t), jnp.ones_like(z_t)
        else:
            loc_p, scale_p = nets["prior"](g)
        features_z = nets["phi_z"](z_t)
        decoded = nets["decoder"](jnp.concatenate([features_z, g], -1))
        state = nets["rnn"](state, jnp.concatenate([features_x, features_z], -1))

        z, lq, sq, lp, sp = (
            np.asarray(a[0], np.float64) for a in (z_t, loc_q, scale_q, *(loc_p, scale_p))
        )
        out["z"].append(z)
        out["scale_q"].append(sq)
        out["decoded"].append([np.asarray(d[0]) for d in decoded])
        out["log_px"] += _emission_log_prob(config.emission, decoded, x[t])
        out["log_pz"] += stats.norm.logpdf(z, lp, sp).sum()
        out["log_qz"] += stats.norm.logpdf(z, lq, sq).sum()
        out["kl"] += _normal_kl(lq, sq, lp, sp)
    return out


CASES = {  # real-valued data has missing (NaN) entries
    "bernoulli-gru": BERNOULLI,
    "gaussian-lstm": GAUSSIAN,
    "bernoulli-gru-standard-prior": _config(standard_prior=True),
    "gmm-gru-inputs-dt": dataclasses.replace(GMM, input_dim=2, use_dt=True),
}


def _covariates(config, batch, num_steps, seed=0):
    """Random ``inputs`` and ``dt`` as the config takes them (possibly none)."""
    rng = np.random.default_rng(seed)
    covariates = {}
    if config.input_dim:
        covariates["inputs"] = rng.normal(size=(batch, num_steps, config.input_dim))
    if config.use_dt:
        covariates["dt"] = rng.uniform(0.5, 2.0, (batch, num_steps))
    return {k: v.astype(np.float32) for k, v in covariates.items()}


def _joined(covariates, batch):
    """Per sequence, [T, C] = [inputs, dt] as the model joins them, or None."""
    parts = [covariates["inputs"]] if "inputs" in covariates else []
    parts += [covariates["dt"][..., None]] if "dt" in covariates else []
    return list(np.concatenate(parts, -1)) if parts else [None] * batch


@pytest.fixture(scope="module", params=list(CASES))
def loop_case(request):
    """Traces, library ELBOs and the Python loop's terms for one case, computed once."""
    config = CASES[request.param]
    x, lengths = _data(config, seed=7, missing=0.2)  # padded to 7 steps, longest 6
    covariates = _covariates(config, *x.shape[:2])
    params = _params(config)
    key = jax.random.PRNGKey(3)
    guide_trace, model_trace = trace_guide_and_model(
        params, key, model, guide, x, lengths, config=config, **covariates
    )
    site = guide_trace["z"]
    eps, scale = (np.asarray(a) for a in site["intermediates"])
    joined = _joined(covariates, len(x))
    refs = [_reference(params, config, x[b], n, eps[b], joined[b]) for b, n in enumerate(lengths)]
    return {
        "covariates": covariates,
        "config": config,
        "params": params,
        "key": key,
        "x": x,
        "lengths": lengths,
        "guide_trace": guide_trace,
        "model_trace": model_trace,
        "scale": scale,
        "refs": refs,
    }


def test_elbo_equals_a_python_loop_over_time(loop_case):
    c = loop_case
    config, x, lengths, refs = c["config"], c["x"], c["lengths"], c["refs"]
    z = np.asarray(c["guide_trace"]["z"]["value"])
    for b, (length, ref) in enumerate(zip(lengths, refs, strict=True)):
        np.testing.assert_allclose(z[b, :length], np.stack(ref["z"]), rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(c["scale"][b, :length], np.stack(ref["scale_q"]), rtol=RTOL)
    model_sites, guide_site = c["model_trace"], c["guide_trace"]["z"]
    log_px = model_sites["x"]["fn"].log_prob(model_sites["x"]["value"])
    log_pz = model_sites["z"]["fn"].log_prob(model_sites["z"]["value"])
    log_qz = guide_site["fn"].log_prob(guide_site["value"], guide_site["intermediates"])
    # Scored from the trajectory alone, q recomputes loc and scale by rerunning the filter.
    rescored = guide_site["fn"].log_prob(guide_site["value"])
    for got, name in ((log_px, "log_px"), (log_pz, "log_pz"), (log_qz, "log_qz")):
        np.testing.assert_allclose(got, [r[name] for r in refs], rtol=RTOL, err_msg=name)
    np.testing.assert_allclose(rescored, log_qz, rtol=RTOL)

    want = np.array([r["log_px"] + r["log_pz"] - r["log_qz"] for r in refs])
    elbo = elbo_per_sequence(c["params"], c["key"], x, lengths, config, **c["covariates"])
    np.testing.assert_allclose(elbo, want, rtol=RTOL)
    # KL annealing scales the latent terms only.
    annealed = elbo_per_sequence(c["params"], c["key"], x, lengths, config, 0.25, **c["covariates"])
    want = np.array([r["log_px"] + 0.25 * (r["log_pz"] - r["log_qz"]) for r in refs])
    np.testing.assert_allclose(annealed, want, rtol=RTOL)
    # Training minimises NumPyro's Trace_ELBO loss: the same bound, summed.
    loss = Trace_ELBO().loss(
        c["key"],
        c["params"],
        functools.partial(model, config=config),
        functools.partial(guide, config=config),
        x,
        lengths,
        **c["covariates"],
    )
    np.testing.assert_allclose(loss, -np.sum(elbo), rtol=RTOL)


def test_analytic_kl_elbo_equals_a_python_loop_over_time(loop_case):
    c = loop_case
    got = analytic_kl_elbo(c["guide_trace"], c["model_trace"])
    want = [r["log_px"] - r["kl"] for r in c["refs"]]
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_emission_params_and_state_after_equal_the_python_loop(loop_case):
    """The generation hooks, given the guide's draw, see the same h_{t-1} as the ELBO."""
    c = loop_case
    config, x, lengths = c["config"], c["x"], c["lengths"]
    z = c["guide_trace"]["z"]["value"]
    if not config.covariate_dim:  # the decoder reads c_t, which emission_params is not given
        decoded = vrnn.emission_params(c["params"], z, x, lengths, config)
        for b, (length, ref) in enumerate(zip(lengths, c["refs"], strict=True)):
            for i, param in enumerate(decoded):
                want = np.stack([step[i] for step in ref["decoded"]])
                np.testing.assert_allclose(param[b, :length], want, rtol=RTOL, atol=1e-6)
    # The RNN state after each sequence's last real step, h_0 for an empty one.
    nets = networks(c["params"], config)
    lengths = np.array([lengths[0], lengths[1], 0])
    after = state_after(c["params"], z, x, lengths, config)
    for b, length in enumerate(lengths):
        state = initial_state(config, 1)
        for t in range(length):
            x_t = jnp.asarray(np.nan_to_num(x[None, b, t]))
            inputs = [nets["phi_x"](x_t), nets["phi_z"](z[None, b, t])]
            state = nets["rnn"](state, jnp.concatenate(inputs, -1))
        for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(state), strict=True):
            np.testing.assert_allclose(got[b], want[0], rtol=RTOL, atol=1e-6)


def test_importance_sampling_is_never_above_the_bound():
    config = BERNOULLI
    x, lengths = _data(config, seed=1, batch=4, num_steps=8, lengths=(8, 5, 3, 6))
    params = _params(config)
    sequences = [x[b, :n] for b, n in enumerate(lengths)]
    result = evaluate_split(
        params, jax.random.PRNGKey(0), sequences, config, num_samples=8, estimator="is"
    )
    bound, is_nll = result["elbo_nll_per_step"], result["is_nll_per_step"]
    assert np.isfinite(bound) and np.isfinite(is_nll)
    assert is_nll <= bound
    assert result["num_steps"] == lengths.sum()


def test_diagonal_gaussian_mixture_against_numpyro():
    rng = np.random.default_rng(0)
    batch, x_dim = (4, 2), 3
    value = rng.normal(size=(*batch, x_dim)).astype(np.float32)
    present = rng.random((*batch, x_dim)) < 0.6
    assert not np.any(present[0, 1])  # a step with nothing observed: log 1 = 0 below

    def params(k):
        logits = rng.normal(size=(*batch, k))
        loc = rng.normal(size=(*batch, k, x_dim))
        scale = rng.uniform(0.3, 2.0, (*batch, k, x_dim))
        return tuple(a.astype(np.float32) for a in (logits, loc, scale))

    @jax.jit  # one program instead of one per operation
    def log_probs(one, three):
        normal = dist.Normal(one[1][..., 0, :], one[2][..., 0, :])
        mixture = DiagonalGaussianMixture(*three)
        reference = dist.MixtureSameFamily(
            dist.CategoricalLogits(three[0]), dist.Normal(three[1], three[2]).to_event(1)
        )
        return {
            # One component: a diagonal Gaussian, with or without missing entries.
            "one": DiagonalGaussianMixture(*one).log_prob(value),
            "normal": normal.to_event(1).log_prob(value),
            "one_masked": DiagonalGaussianMixture(*one, present=present).log_prob(value),
            "normal_masked": normal.mask(present).to_event(1).log_prob(value),
            # Three components, everything observed: NumPyro's mixture, and its mean.
            "three": mixture.log_prob(value),
            "reference": reference.log_prob(value),
            "mean": mixture.mean,
            "reference_mean": reference.mean,
            "three_masked": DiagonalGaussianMixture(*three, present=present).log_prob(value),
        }

    one, three = params(1), params(3)
    assert DiagonalGaussianMixture(*three).batch_shape == batch
    assert DiagonalGaussianMixture(*three).event_shape == (x_dim,)
    got = log_probs(one, three)
    np.testing.assert_allclose(got["one"], got["normal"], rtol=RTOL)
    np.testing.assert_allclose(got["one_masked"], got["normal_masked"], rtol=RTOL)
    np.testing.assert_allclose(got["three"], got["reference"], rtol=RTOL)
    np.testing.assert_allclose(got["mean"], got["reference_mean"], rtol=RTOL, atol=1e-6)
    # With missing entries: every component scored on the observed entries only.
    logits, loc, scale = (a.astype(np.float64) for a in three)
    per_entry = stats.norm.logpdf(value[..., None, :].astype(np.float64), loc, scale)
    per_component = np.where(present[..., None, :], per_entry, 0.0).sum(-1)
    want = special.logsumexp(per_component + special.log_softmax(logits, -1), -1)
    np.testing.assert_allclose(got["three_masked"], want, rtol=RTOL, atol=1e-6)


def test_padding_leaves_the_elbo_of_real_sequences_unchanged():
    config = BERNOULLI
    x, lengths = _data(config, seed=2, batch=3, num_steps=6, lengths=(6, 4, 2))
    params = _params(config)
    key = jax.random.PRNGKey(4)
    elbo_of = jax.jit(elbo_per_sequence, static_argnames="config")
    elbo = elbo_of(params, key, x, lengths, config)
    assert np.all(np.asarray(elbo) < 0)

    def padded(batch, num_steps):
        """x in a larger batch; padded steps and rows hold 1s, which must not matter."""
        out = np.ones((batch, num_steps, OBS_DIM), np.float32)
        out[:3, :6] = np.where(np.arange(6)[None, :, None] < lengths[:, None, None], x, 1.0)
        return out, np.array([*lengths, *[0] * (batch - 3)], np.int32)

    longer = elbo_of(params, key, *padded(3, 10), config)  # 4 more steps
    np.testing.assert_allclose(longer, elbo, rtol=RTOL)
    wider = elbo_of(params, key, *padded(4, 6), config)  # an empty sequence
    np.testing.assert_allclose(wider[:3], elbo, rtol=RTOL)
    assert float(wider[3]) == 0.0


@pytest.mark.parametrize("config", [GMM, GAUSSIAN], ids=["gmm", "gaussian"])
def test_missing_entries_are_not_scored_and_gradients_stay_finite(config):
    x, lengths = _data(config, seed=3, batch=3, num_steps=6, lengths=(6, 5, 3))
    missing = np.random.default_rng(4).random(x.shape) < 0.3
    params = _params(config)
    key = jax.random.PRNGKey(5)

    def loss(params, x, obs_mask):
        return -jnp.sum(elbo_per_sequence(params, key, x, lengths, config, obs_mask=obs_mask))

    value_and_grad = jax.jit(jax.value_and_grad(loss))  # one program for every call below
    observed = np.ones(x.shape, bool)
    with_nan = np.where(missing, np.nan, x)
    value, grads = value_and_grad(params, with_nan, observed)
    assert np.isfinite(float(value))
    for name in params:
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(grads[name]))
    # What a missing entry holds does not matter, NaN or an obs_mask=False value...
    for junk in (1e4, -3.0):
        got, _ = value_and_grad(params, np.where(missing, junk, x), ~missing)
        np.testing.assert_allclose(got, value, rtol=RTOL)
    # ...and observing it does change the loss.
    assert abs(float(value_and_grad(params, x, observed)[0]) - float(value)) > 1e-3


# ----------------------------------------------------------------------------- training


def _binary_sequences(seed, num, min_length=3, max_length=9):
    rng = np.random.default_rng(seed)
    return [
        (rng.random((int(n), OBS_DIM)) < 0.3).astype(np.float32)
        for n in rng.integers(min_length, max_length + 1, num)
    ]


TRAIN = TrainConfig(
    epochs=4, batch_size=4, learning_rate=1e-2, weight_decay=0.0, annealing_epochs=2
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vrnn_ckpt")
    config = BERNOULLI
    data = _binary_sequences(0, 8)
    result = fit(
        data,
        model_config=config,
        train_config=TRAIN,
        checkpoint_dir=directory,
    )
    return config, data, directory, result


def test_fit_lowers_the_loss_and_checkpoints_the_vrnn(trained):
    config, _, directory, result = trained
    losses = [r["train_loss_per_step"] for r in result.history]
    assert len(losses) == TRAIN.epochs and np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    run = load_run(directory)
    assert type(run.model_config) is VRNNConfig and run.model_config == config
    # The tests' parameters (_params) are the ones the SVI trains.
    shapes = jax.tree.map(jnp.shape, result.params)
    assert jax.tree.map(jnp.shape, _params(config)) == shapes
    assert set(run.params) == set(result.params)
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(result.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_real_steps_do_not_change_the_training_losses(trained):
    config, data, _, result = trained
    dense = fit(
        data, model_config=config, train_config=dataclasses.replace(TRAIN, real_steps=False)
    )
    assert [s[-1] for s in dense.compiled_shapes] == [0]  # scored on every padded step
    assert all(s[-1] > 0 for s in result.compiled_shapes)  # scored on the real steps only
    np.testing.assert_allclose(
        [r["train_loss_per_step"] for r in dense.history],
        [r["train_loss_per_step"] for r in result.history],
        rtol=LOSS_RTOL,
    )


def test_analytic_kl_trains_the_vrnn():
    train = dataclasses.replace(TRAIN, epochs=2, kl="analytic")
    result = fit(_binary_sequences(1, 6), model_config=BERNOULLI, train_config=train)
    assert np.all(np.isfinite([r["train_loss_per_step"] for r in result.history]))


def test_resuming_with_another_model_is_refused(trained):
    config, data, directory, _ = trained
    with pytest.raises(CheckpointError, match="z_dim"):
        fit(
            data,
            model_config=dataclasses.replace(config, z_dim=4),
            train_config=dataclasses.replace(TRAIN, epochs=TRAIN.epochs + 1),
            checkpoint_dir=directory,
            resume=True,
        )


# ----------------------------------------------------------------------------- generation


def test_generation_on_a_bernoulli_vrnn(trained):
    config, _, _, result = trained
    params = result.params
    key = jax.random.PRNGKey(2)
    n, t, z_dim = 3, 6, config.z_dim  # forecasts below: the same horizon, one compile

    prior = sample_prior(params, key, config, n, t)
    assert prior["z"].shape == (n, t, z_dim) and prior["x"].shape == (n, t, OBS_DIM)
    assert prior["x"].dtype == jnp.uint8 and set(np.unique(prior["x"])) <= {0, 1}
    assert prior["logits"].shape == prior["probs"].shape == (n, t, OBS_DIM)
    again = sample_prior(params, key, config, n, t)
    for name in ("z", "x", "logits"):
        np.testing.assert_array_equal(again[name], prior[name])
    other = sample_prior(params, jax.random.PRNGKey(9), config, n, t)
    assert not np.array_equal(other["z"], prior["z"])
    # The draws follow the model's recurrence: rescoring them gives the logits they used.
    x_drawn = jnp.asarray(prior["x"], jnp.float32)
    (logits,) = vrnn.emission_params(params, prior["z"], x_drawn, jnp.full(n, t), config)
    np.testing.assert_allclose(logits, prior["logits"], rtol=RTOL, atol=1e-6)

    x, lengths = _data(config, seed=5, batch=n, num_steps=4, lengths=(4, 2, 3))
    out = forecast(params, key, x, lengths, config, 6, 2)
    assert out["x"].shape == out["logits"].shape == (2, n, 6, OBS_DIM)
    assert out["mean_probs"].shape == (n, 6, OBS_DIM) and "z" not in out
    np.testing.assert_array_equal(forecast(params, key, x, lengths, config, 6, 2)["x"], out["x"])
    # An empty prefix starts from h_0: the prior draw with the key forecast rolls out with.
    empty = forecast(params, key, x, jnp.zeros(n, jnp.int32), config, 6, 2)
    roll_key = jax.random.split(jax.random.split(key, 2)[0])[1]
    fresh = sample_prior(params, roll_key, config, n, 6)
    np.testing.assert_allclose(empty["logits"][0], fresh["logits"], rtol=RTOL, atol=1e-6)
    np.testing.assert_array_equal(empty["x"][0], fresh["x"])

    post = posterior_latents(params, key, x, lengths, config, 7, (0.1, 0.5, 0.9))
    assert post["mean"].shape == (n, 4, z_dim) and post["quantiles"].shape == (3, n, 4, z_dim)
    padded = np.arange(4)[None, :] >= lengths[:, None]
    assert np.all(np.asarray(post["mean"])[padded] == 0) and np.any(post["mean"][0] != 0)
    levels = np.asarray(post["quantiles"])
    assert np.all(levels[0] <= levels[1]) and np.all(levels[1] <= levels[2])
    again = posterior_latents(params, key, x, lengths, config, 7, (0.1, 0.5, 0.9))
    np.testing.assert_array_equal(again["mean"], post["mean"])

    missing = hide_entries(jax.random.PRNGKey(6), x, lengths, 0.4)
    filled = impute(params, key, x, lengths, missing, config, 3)
    missing = np.asarray(missing)
    for name in ("x", "probs", "log_prob"):
        assert filled[name].shape == x.shape
    np.testing.assert_array_equal(np.asarray(filled["x"])[~missing], x[~missing])
    assert set(np.unique(filled["x"])) <= {0.0, 1.0}
    assert np.all(np.asarray(filled["log_prob"])[missing] <= 0)
    assert np.all(np.asarray(filled["log_prob"])[~missing] == 0)
    # The values hidden are never read to fill them.
    flipped = impute(params, key, np.where(missing, 1.0 - x, x), lengths, missing, config, 3)
    np.testing.assert_array_equal(flipped["x"], filled["x"])
    np.testing.assert_allclose(flipped["probs"], filled["probs"], rtol=RTOL)


@pytest.mark.parametrize("config", [GMM, GAUSSIAN], ids=["gmm", "gaussian"])
def test_generation_on_a_real_valued_vrnn(config):
    x, lengths = _data(config, seed=6, batch=2, num_steps=4, lengths=(4, 3), missing=0.2)
    params = _params(config)
    key = jax.random.PRNGKey(8)
    out = sample_prior(params, key, config, 2, 5)
    assert out["x"].shape == out["mean"].shape == (2, 5, OBS_DIM)
    assert out["x"].dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out["x"])))
    assert "probs" not in out and "logits" not in out
    if config.emission == "gaussian":
        loc, scale = out["emission"]
        np.testing.assert_array_equal(out["mean"], loc)
    else:
        logits, loc, scale = out["emission"]
        assert logits.shape == (2, 5, 2) and loc.shape == (2, 5, 2, OBS_DIM)
        want = jnp.sum(jax.nn.softmax(logits)[..., None] * loc, -2)
        np.testing.assert_allclose(out["mean"], want, rtol=RTOL, atol=1e-6)
    assert bool(jnp.all(scale > 0))
    rescored = vrnn.emission_params(params, out["z"], out["x"], jnp.full(2, 5), config)
    for got, want in zip(rescored, out["emission"], strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)
    np.testing.assert_array_equal(sample_prior(params, key, config, 2, 5)["x"], out["x"])
    ahead = forecast(params, key, x, lengths, config, 3, 2)
    assert ahead["x"].shape == ahead["mean"].shape == (2, 2, 3, OBS_DIM)
    assert ahead["mean_of_draws"].shape == (2, 3, OBS_DIM)
    missing = jnp.zeros(x.shape, bool)
    with pytest.raises(NotImplementedError, match="Bernoulli"):
        impute(params, key, x, lengths, missing, config, 2)
