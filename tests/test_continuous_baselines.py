"""The Latent ODE paper's baselines (ODE-RNN, RNN-dt, RNN-VAE) and the Poisson process of
observation times, against plain loops and closed forms."""

import dataclasses
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

from dmm_jax.config import LatentODEConfig, ODERNNConfig, RNNDtConfig, RNNVAEConfig
from dmm_jax.evaluate import elbo_per_sequence
from dmm_jax.models import family_of, latent_ode, rnn_vae
from dmm_jax.models.latent_ode.networks import poisson_log_likelihood, series_times, solve
from dmm_jax.models.ode_rnn.networks import MLPDecoder

SIZES = {"obs_dim": 2, "rnn_dim": 5, "units": 8, "use_dt": True}
CONFIGS = {
    "ode-rnn": ODERNNConfig(**SIZES),
    "rnn-dt": RNNDtConfig(**SIZES),
    "rnn-vae": RNNVAEConfig(**SIZES, z_dim=3, decoder_dim=4),
    "latent-ode-poisson": LatentODEConfig(**SIZES, z_dim=3, poisson=True),
}


def _batch(seed=0, batch=3, steps=6, lengths=(6, 4, 1)):
    """Irregular series: increasing times from dt (dt[:, 0] = t_0), NaN-missing entries (one
    point with nothing observed), padding past each length."""
    rng = np.random.default_rng(seed)
    dt = rng.uniform(0.05, 0.6, (batch, steps)).astype(np.float32)
    x = rng.normal(size=(batch, steps, 2)).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = np.nan
    x[:, 0, 0] = 1.0
    x[0, 2] = np.nan  # a point with nothing observed: a query inside the series
    lengths = np.asarray(lengths, np.int32)
    padding = np.arange(steps)[None] >= lengths[:, None]
    dt[padding], x[padding] = 0.0, 0.0
    return jnp.asarray(x), jnp.asarray(lengths), jnp.asarray(dt)


def _params(config, x, lengths, dt, seed=0):
    family = family_of(config)
    params = {}
    for i, fn in enumerate((family.model, family.guide)):
        tr = handlers.trace(handlers.seed(fn, seed + i)).get_trace(x, lengths, config=config, dt=dt)
        params.update({n: s["value"] for n, s in tr.items() if s["type"] == "param"})
    return params


def _gaussian_log_lik(x, loc, std):
    """log N(x | loc, std^2) summed over the observed (non-NaN) entries of one point."""
    total = 0.0
    for d in range(x.shape[-1]):
        if not np.isnan(x[d]):
            eps = (x[d] - loc[d]) / std
            total += -0.5 * eps**2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    return total


def _apply(params, name, module):
    return lambda *args: module.apply({"params": params[f"{name}$params"]}, *args)


@pytest.mark.parametrize("name", ["ode-rnn", "rnn-dt"])
def test_step_ahead_likelihood_equals_a_plain_loop(key, name):
    """Point by point: predict from the state before the point, then read it. The ODE-RNN's
    ODE set to zero makes its state the GRU's over the observations alone."""
    config = CONFIGS[name]
    x, lengths, dt = _batch()
    params = _params(config, x, lengths, dt)
    if name == "ode-rnn":
        params["ode$params"] = jax.tree.map(jnp.zeros_like, params["ode$params"])
    got = elbo_per_sequence(params, key, x, lengths, config, dt=dt)
    gru = _apply(params, "gru", nn.GRUCell(config.rnn_dim))
    decoder = _apply(params, "decoder", MLPDecoder(config.obs_dim, config.units))
    times = series_times(dt, *x.shape[:2])
    for b in range(x.shape[0]):
        h, last, clock, total = jnp.zeros((1, config.rnn_dim)), jnp.zeros(4), times[b, 0], 0.0
        for i in range(int(lengths[b])):
            if name == "rnn-dt":
                before, _ = gru(h, jnp.concatenate([last, jnp.array([times[b, i] - clock])])[None])
            else:
                before = h
            total += _gaussian_log_lik(x[b, i], decoder(before)[0], config.obs_std)
            present = ~np.isnan(x[b, i])
            if present.any():
                inp = jnp.concatenate([jnp.nan_to_num(x[b, i]), present.astype(np.float32)])
                if name == "rnn-dt":
                    h, last, clock = before, inp, times[b, i]
                else:
                    h, _ = gru(before, inp[None])
        np.testing.assert_allclose(got[b], total, rtol=1e-5)


def test_rnn_vae_elbo_equals_a_plain_loop(key):
    config = CONFIGS["rnn-vae"]
    x, lengths, dt = _batch()
    params = _params(config, x, lengths, dt)
    got = elbo_per_sequence(params, key, x, lengths, config, dt=dt)
    _, guide_key = jax.random.split(key)
    seeded = handlers.seed(handlers.substitute(rnn_vae.guide, data=params), guide_key)
    site = handlers.trace(seeded).get_trace(x, lengths, config=config, dt=dt)["z"]
    z0, q = site["value"], site["fn"]
    initial = _apply(params, "initial_state", nn.Dense(config.decoder_dim))
    gru = _apply(params, "decoder_gru", nn.GRUCell(config.decoder_dim))
    decoder = _apply(params, "decoder", MLPDecoder(config.obs_dim, config.units))
    times = series_times(dt, *x.shape[:2])
    for b in range(x.shape[0]):
        log_prior = -0.5 * jnp.sum(z0[b] ** 2) - 0.5 * config.z_dim * np.log(2 * np.pi)
        total = log_prior - q.log_prob(z0)[b]
        h, clock = jnp.tanh(initial(z0[b][None])), times[b, 0]
        for i in range(int(lengths[b])):
            h, _ = gru(h, jnp.concatenate([decoder(h)[0], jnp.array([times[b, i] - clock])])[None])
            clock = times[b, i]
            total += _gaussian_log_lik(x[b, i], decoder(h)[0], config.obs_std)
        np.testing.assert_allclose(got[b], total, rtol=1e-5)


def test_poisson_likelihood_with_a_constant_rate_is_n_log_rate_minus_rate_times_duration():
    """log lambda(z) = c for every z: per feature, n_d log lambda - lambda (t_end - t_0)."""
    rate = 1.7
    x, lengths, dt = _batch(lengths=(6, 4, 1))
    present = ~jnp.isnan(x)
    times = series_times(dt, *x.shape[:2])
    config = dataclasses.replace(CONFIGS["latent-ode-poisson"], rtol=1e-7, atol=1e-9)
    z0 = jnp.ones((3, config.z_dim))
    constant = lambda _, z: jnp.full((*z.shape[:-1], 2), np.log(rate))
    path, cumulative = solve(lambda _, z: -0.3 * z, (), z0, times, config, constant)
    mask = jnp.arange(6)[None] < lengths[:, None]
    got = poisson_log_likelihood(jnp.full(x.shape, np.log(rate)), cumulative, present, mask)
    for b in range(3):
        n = int((present[b] & mask[b][:, None]).sum())
        duration = float(times[b, lengths[b] - 1] - times[b, 0])
        np.testing.assert_allclose(got[b], n * np.log(rate) - 2 * rate * duration, atol=1e-4)
    np.testing.assert_allclose(path[0, 3], np.exp(-0.3 * (times[0, 3] - times[0, 0])), rtol=1e-5)


def test_poisson_latent_ode_adds_the_likelihood_of_the_observation_times(key):
    """The same draw of z_0 scores the values as without the Poisson process, plus the
    times' log-likelihood under lambda(z(t))."""
    config = CONFIGS["latent-ode-poisson"]
    x, lengths, dt = _batch()
    params = _params(config, x, lengths, dt)
    with_times = elbo_per_sequence(params, key, x, lengths, config, dt=dt)
    plain = dataclasses.replace(config, poisson=False)
    values_only = elbo_per_sequence(params, key, x, lengths, plain, dt=dt)
    _, guide_key = jax.random.split(key)
    seeded = handlers.seed(handlers.substitute(latent_ode.guide, data=params), guide_key)
    z0 = seeded(x, lengths, config=config, dt=dt)
    nets = latent_ode.networks
    weights = {"ode": params["ode$params"], "intensity": params["intensity$params"]}
    f = nets.module_field(nets.ode_function(config), "ode")
    log_rate = nets.module_field(nets.ODEFunction(2, config.units), "intensity")
    times = series_times(dt, *x.shape[:2])
    path, cumulative = solve(f, weights, z0, times, config, log_rate)
    mask = jnp.arange(6)[None] < lengths[:, None]
    log_rates = log_rate(weights, path)
    times_log_lik = poisson_log_likelihood(log_rates, cumulative, ~jnp.isnan(x), mask)
    np.testing.assert_allclose(with_times, values_only + times_log_lik, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_finite_and_padding_changes_nothing(key, name):
    config = CONFIGS[name]
    x, lengths, dt = _batch(seed=1, lengths=(6, 2, 3))
    params = _params(config, x, lengths, dt)

    def loss(p):
        return -jnp.sum(elbo_per_sequence(p, key, x, lengths, config, dt=dt))

    value, grads = jax.value_and_grad(loss)(params)
    assert np.isfinite(float(value))
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert all(float(jnp.abs(g).max()) > 0 for g in leaves)  # every network is used
    padded = elbo_per_sequence(
        params,
        key,
        jnp.pad(x, ((0, 0), (0, 3), (0, 0))),
        lengths,
        config,
        dt=jnp.pad(dt, ((0, 0), (0, 3))),
    )
    np.testing.assert_allclose(
        padded, elbo_per_sequence(params, key, x, lengths, config, dt=dt), rtol=1e-5
    )


@pytest.mark.parametrize("name", ["ode-rnn", "rnn-dt", "rnn-vae"])
def test_predict_at_the_observed_times_gives_the_models_means(key, name):
    """``predict`` at the series' own times reproduces the model's means (for the RNN-VAE at
    each of the guide's draws of z_0); for the RNN-dt and the ODE-RNN (its ODE at zero)
    extra queries between the points leave them unchanged."""
    config = CONFIGS[name]
    x, lengths, dt = _batch()
    params = _params(config, x, lengths, dt)
    if name == "ode-rnn":
        params["ode$params"] = jax.tree.map(jnp.zeros_like, params["ode$params"])
    family = family_of(config)
    times = series_times(dt, *x.shape[:2])
    query = jnp.concatenate([times[:, :1], times], axis=1)
    got = family.predict(params, key, config, x, lengths, dt, query, 2)[:, :, 1:]
    assert got.shape == (2, 3, 6, 2)
    real = np.asarray(jnp.arange(6)[None] < lengths[:, None])
    if name == "rnn-vae":  # the means given each draw of z_0, decoded at the same times
        z0 = latent_ode.prediction.posterior_z0(params, key, config, x, lengths, dt, 2)
        for s in range(2):
            means = handlers.substitute(
                handlers.condition(rnn_vae.model, {"z": z0[s]}), data=params
            )(x, lengths, config=config, dt=dt)
            np.testing.assert_allclose(got[s][real], means[real], rtol=1e-5, atol=1e-6)
        return
    means = handlers.substitute(family.model, data=params)(x, lengths, config=config, dt=dt)
    np.testing.assert_allclose(got[0][real], means[real], rtol=1e-5, atol=1e-6)
    midpoints = (times[:, :-1] + times[:, 1:]) / 2
    dense = jnp.sort(jnp.concatenate([query, midpoints], axis=1), axis=1)
    more = family.predict(params, key, config, x, lengths, dt, dense, 1)[0]
    at_times = jnp.stack([jnp.searchsorted(dense[b], times[b]) for b in range(3)])
    picked = jnp.take_along_axis(more, at_times[..., None], axis=1)
    np.testing.assert_allclose(picked[real], means[real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("config_class", "field", "value", "message"),
    [
        (ODERNNConfig, "euler_steps", 0, "ODERNNConfig.euler_steps must be a positive int"),
        (RNNDtConfig, "obs_std", 0.0, "RNNDtConfig.obs_std must be positive"),
        (RNNVAEConfig, "decoder_dim", -1, "RNNVAEConfig.decoder_dim must be a positive int"),
        (RNNVAEConfig, "input_dim", 1, "takes no control inputs"),
    ],
)
def test_bad_settings_are_refused_by_name(config_class, field, value, message):
    with pytest.raises(ValueError, match=message):
        config_class(**{field: value})


@pytest.mark.parametrize(
    "flags",
    [
        ["--model", "ode-rnn"],
        ["--model", "rnn-dt"],
        ["--model", "rnn-vae", "--z-dim", "2"],
        ["--model", "latent-ode", "--poisson", "--encoder", "rnn", "--z-dim", "2"],
    ],
)
def test_every_model_trains_and_forecasts_from_the_command_line(tmp_path, capsys, flags):
    from dmm_jax.cli import main
    from dmm_jax.data.irregular import periodic_dataset, save_irregular

    series = periodic_dataset(n=10, n_points=8, subsample=5)["train"].observed  # 8 series
    data = save_irregular(tmp_path / "series.npz", series)
    ckpt, log = tmp_path / "run", tmp_path / "log.jsonl"
    args = ["train", *flags, "--data", str(data), "--epochs", "2", "--batch-size", "4"]
    args += ["--rnn-dim", "3", "--units", "4", "--checkpoint-dir", str(ckpt)]
    assert main([*args, "--log-json", str(log), "--no-progress", "--quiet"]) == 0
    last = json.loads(log.read_text().splitlines()[-1])
    assert np.isfinite(last["test_mse"]) and np.isfinite(last["val_mse"])
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--split", "test"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["elbo_nll_per_step"])
    forecast = ["forecast", "--checkpoint", str(ckpt), "--samples", "2", "--png", str(tmp_path)]
    assert main(forecast) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "extrapolate" and np.isfinite(out["test_mse"])
    assert pathlib.Path(out["png"][0]).read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit, match="latent trajectory per step"):
        main(["posterior", "--checkpoint", str(ckpt), "--data", str(data)])
