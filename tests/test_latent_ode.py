"""The Latent ODE against exact references: the matrix exponential, a plain GRU, and its ELBO
recomputed with one solve per time point and a Python loop over them."""

import dataclasses
import functools
import pathlib

import diffrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import expm
from numpyro import handlers

from dmm_jax.config import LatentODEConfig
from dmm_jax.evaluate import elbo_per_sequence
from dmm_jax.models.latent_ode import encode, guide, model, series_times, solve
from dmm_jax.models.latent_ode.networks import ODEFunction

CONFIG = LatentODEConfig(obs_dim=2, z_dim=3, rnn_dim=5, units=8, use_dt=True)


def _batch(seed=0, batch=3, steps=6, lengths=(6, 4, 1)):
    """Irregular series: increasing times from dt (dt[:, 0] = t_0), NaN-missing entries,
    padding past each length."""
    rng = np.random.default_rng(seed)
    dt = rng.uniform(0.05, 0.6, (batch, steps)).astype(np.float32)
    x = rng.normal(size=(batch, steps, CONFIG.obs_dim)).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = np.nan
    x[:, 0, 0] = 1.0  # every series has something observed
    lengths = np.asarray(lengths, np.int32)
    padding = np.arange(steps)[None] >= lengths[:, None]
    dt[padding], x[padding] = 0.0, 0.0
    return jnp.asarray(x), jnp.asarray(lengths), jnp.asarray(dt)


def _params(config, x, lengths, dt, seed=0):
    params = {}
    for i, fn in enumerate((model, guide)):
        tr = handlers.trace(handlers.seed(fn, seed + i)).get_trace(x, lengths, config=config, dt=dt)
        params.update({n: s["value"] for n, s in tr.items() if s["type"] == "param"})
    return params


def test_series_times_are_the_cumulative_gaps():
    dt = jnp.array([[0.5, 1.0, 0.25, 0.0]])
    np.testing.assert_allclose(series_times(dt, 1, 4), [[0.5, 1.5, 1.75, 1.75]])
    np.testing.assert_allclose(series_times(None, 2, 3), [[0, 1, 2], [0, 1, 2]])


def test_solve_of_a_linear_ode_equals_the_matrix_exponential():
    a = jnp.array([[-0.3, 1.0, 0.0], [-1.0, -0.1, 0.2], [0.0, 0.3, -0.5]])
    config = dataclasses.replace(CONFIG, rtol=1e-7, atol=1e-9)
    times = jnp.array([[0.0, 0.4, 1.3, 2.0, 2.0], [0.5, 0.6, 0.7, 3.0, 4.5]])
    z0 = jnp.array([[1.0, 0.0, -1.0], [0.3, 2.0, 0.5]])
    got = solve(lambda _, z: z @ a.T, (), z0, times, config)
    for b in range(2):
        for i, t in enumerate(times[b]):
            want = expm(a * (t - times[b, 0])) @ z0[b]
            np.testing.assert_allclose(got[b, i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder", ["ode-rnn", "rnn"])
def test_encoder_with_a_zero_ode_is_a_gru_run_backward_over_the_observations(key, encoder):
    x, lengths, dt = _batch()
    present = ~jnp.isnan(x)
    x = jnp.where(present, x, 0.0)
    times = series_times(dt, *x.shape[:2])
    mask = jnp.arange(x.shape[1])[None] < lengths[:, None]
    gru = nn.GRUCell(CONFIG.rnn_dim)
    in_dim = 2 * CONFIG.obs_dim + (encoder == "rnn")
    gru_params = gru.init(key, jnp.zeros((1, CONFIG.rnn_dim)), jnp.zeros((1, in_dim)))
    cell = lambda h, inp: gru.apply(gru_params, h, inp)
    nets = {"gru": cell, "encoder_ode": jnp.zeros_like}
    config = dataclasses.replace(CONFIG, encoder=encoder)
    got = encode(nets, x, present, times, mask, config)
    for b in range(x.shape[0]):
        h, clock = jnp.zeros((1, CONFIG.rnn_dim)), times[b, lengths[b] - 1]
        for t in reversed(range(int(lengths[b]))):
            inp = jnp.concatenate([x[b, t], present[b, t].astype(jnp.float32)])
            if encoder == "rnn":
                inp = jnp.concatenate([inp, jnp.array([clock - times[b, t]])])
            if present[b, t].any():
                h, _ = cell(h, inp[None])
            clock = times[b, t]
        np.testing.assert_allclose(got[b], h[0], rtol=1e-5, atol=1e-6)


def test_elbo_from_the_trace_equals_a_plain_loop_over_time_points(key):
    x, lengths, dt = _batch()
    config = dataclasses.replace(CONFIG, rtol=1e-7, atol=1e-9)
    params = _params(config, x, lengths, dt)
    got = elbo_per_sequence(params, key, x, lengths, config, dt=dt)

    # The same guide draw, then every term by hand: one solve from t_0 per time point.
    _, guide_key = jax.random.split(key)
    seeded = handlers.seed(handlers.substitute(guide, data=params), guide_key)
    site = handlers.trace(seeded).get_trace(x, lengths, config=config, dt=dt)["z"]
    z0, q = site["value"], site["fn"]
    f = ODEFunction(CONFIG.z_dim, CONFIG.units)
    decoder = nn.Dense(CONFIG.obs_dim)
    times = series_times(dt, *x.shape[:2])
    for b in range(x.shape[0]):
        total = -0.5 * jnp.sum(z0[b] ** 2) - 1.5 * np.log(2 * np.pi) - q.log_prob(z0)[b]
        for i in range(int(lengths[b])):
            z_t = z0[b]
            if times[b, i] > times[b, 0]:
                z_t = diffrax.diffeqsolve(
                    diffrax.ODETerm(lambda t, z, _: f.apply({"params": params["ode$params"]}, z)),
                    diffrax.Dopri5(),
                    times[b, 0],
                    times[b, i],
                    None,
                    z0[b],
                    stepsize_controller=diffrax.PIDController(rtol=1e-7, atol=1e-9),
                ).ys[-1]
            loc = decoder.apply({"params": params["decoder$params"]}, z_t)
            for d in range(CONFIG.obs_dim):
                if not np.isnan(x[b, i, d]):
                    eps = (x[b, i, d] - loc[d]) / CONFIG.obs_std
                    total += -0.5 * eps**2 - np.log(CONFIG.obs_std) - 0.5 * np.log(2 * np.pi)
        np.testing.assert_allclose(got[b], total, rtol=1e-4)


def test_gradients_are_finite_with_missing_entries_and_padding(key):
    x, lengths, dt = _batch(seed=1, lengths=(6, 2, 3))

    def loss(p):
        return -jnp.sum(elbo_per_sequence(p, key, x, lengths, CONFIG, dt=dt))

    value, grads = jax.value_and_grad(loss)(_params(CONFIG, x, lengths, dt))
    assert np.isfinite(float(value))
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_padding_leaves_the_elbo_unchanged(key):
    x, lengths, dt = _batch(lengths=(6, 4, 1))
    params = _params(CONFIG, x, lengths, dt)
    short = elbo_per_sequence(params, key, x[:, :6], lengths, CONFIG, dt=dt[:, :6])
    padded = elbo_per_sequence(
        params,
        key,
        jnp.pad(x, ((0, 0), (0, 3), (0, 0))),
        lengths,
        CONFIG,
        dt=jnp.pad(dt, ((0, 0), (0, 3))),
    )
    np.testing.assert_allclose(short, padded, rtol=1e-5)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("encoder", "lstm", "encoder must be one of"),
        ("z_dim", 0, "z_dim must be a positive int"),
        ("rtol", 0.0, "rtol must be positive"),
        ("input_dim", 2, "takes no control inputs"),
    ],
)
def test_bad_settings_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        LatentODEConfig(**{field: value})


def test_task_mse_is_the_squared_error_of_the_decoded_path_at_the_targets(key):
    """With f = 0 the path stays at z_0, so every prediction is W z_0 + b; with W = 0 it is
    b: the MSE is then the mean squared distance of the targets from b, for either task."""
    from dmm_jax.data.irregular import periodic_dataset
    from dmm_jax.models.latent_ode import predict
    from dmm_jax.models.series_tasks import task_mse

    config = LatentODEConfig(obs_dim=1, z_dim=3, rnn_dim=5, units=8, use_dt=True)
    for extrapolate in (False, True):
        task = periodic_dataset(n=10, n_points=12, subsample=6, extrapolate=extrapolate)["test"]
        x = jnp.zeros((1, 2, 1))
        params = _params(config, x, jnp.array([2]), jnp.ones((1, 2)))
        params["ode$params"] = jax.tree.map(jnp.zeros_like, params["ode$params"])
        params["decoder$params"] = {"kernel": jnp.zeros((3, 1)), "bias": jnp.array([1.25])}
        got = task_mse(predict, params, key, config, task)
        targets = task.targets.x[task.targets.mask]
        np.testing.assert_allclose(got, np.mean((targets - 1.25) ** 2), rtol=1e-5)


def test_irregular_series_become_the_padded_batches_with_their_times(key):
    from dmm_jax.data.irregular import IrregularSeries, as_sequence_arrays

    t = np.array([[0.5, 1.0, 2.5], [0.0, 0.25, 0.0]], np.float32)
    x = np.array([[[1.0], [np.nan], [3.0]], [[4.0], [5.0], [0.0]]], np.float32)
    arrays = as_sequence_arrays(IrregularSeries(t, x, np.array([3, 2], np.int32)))
    np.testing.assert_allclose(arrays.dt, [[0.5, 0.5, 1.5], [0.0, 0.25, 0.0]])
    np.testing.assert_allclose(series_times(jnp.asarray(arrays.dt), 2, 3)[0], t[0])
    assert np.isnan(arrays.x[0, 1, 0]) and arrays.x[1, 2, 0] == 0.0  # missing; padding


def test_an_irregular_npz_trains_and_evaluates_from_the_command_line(tmp_path, capsys):
    import json

    from dmm_jax.cli import main
    from dmm_jax.data.irregular import periodic_dataset, save_irregular

    series = periodic_dataset(n=10, n_points=8, subsample=5)["train"].observed  # 8 series
    data = save_irregular(tmp_path / "series.npz", series)
    ckpt = tmp_path / "run"
    args = ["train", "--model", "latent-ode", "--data", str(data), "--epochs", "2"]
    args += ["--z-dim", "2", "--rnn-dim", "3", "--units", "4", "--batch-size", "4"]
    log = tmp_path / "log.jsonl"
    args += ["--checkpoint-dir", str(ckpt), "--log-json", str(log)]
    assert main([*args, "--no-progress", "--quiet"]) == 0
    last = json.loads(log.read_text().splitlines()[-1])  # evaluated at the end: MSE logged
    assert np.isfinite(last["test_mse"]) and np.isfinite(last["val_mse"])
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    # 8 series: 6 train, 1 valid, 1 test (file order), every figure finite
    assert result["num_sequences"] == 1 and np.isfinite(result["elbo_nll_per_step"])
    # forecast: the test series observed before the midpoint of its times, predicted after it
    assert (
        main(["forecast", "--checkpoint", str(ckpt), "--samples", "2", "--png", str(tmp_path)]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "extrapolate" and out["num_series"] == 1
    from dmm_jax.data.irregular import split_observed_targets
    from dmm_jax.models.latent_ode import predict
    from dmm_jax.models.series_tasks import task_mse
    from dmm_jax.train import load_run

    run = load_run(ckpt)
    test = series.subset([7])
    task = split_observed_targets(test, "extrapolate")
    expected = task_mse(predict, run.params, jax.random.PRNGKey(0), run.model_config, task, 2)
    assert out["num_targets"] == int(task.targets.mask.sum()) > 0
    np.testing.assert_allclose(out["test_mse"], expected, rtol=1e-5)
    [png] = out["png"]
    assert pathlib.Path(png).read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("poisson", [False, True])
def test_draws_in_one_trace_are_the_elbo_averaged_over_those_draws(key, poisson):
    """``draws`` = K: the trace's log density (model minus guide) equals the mean over k of
    the one-draw ELBO at the same z_0[k]; one encoder run, one solve of the K x B paths."""
    from numpyro.infer.util import log_density

    x, lengths, dt = _batch()
    config = dataclasses.replace(CONFIG, rtol=1e-6, atol=1e-8, poisson=poisson)
    params = _params(config, x, lengths, dt)
    args, draws = (x, lengths), 4
    seeded = handlers.seed(handlers.substitute(guide, data=params), key)
    z0 = seeded(*args, config=config, dt=dt, draws=draws)
    assert z0.shape == (draws, x.shape[0], CONFIG.z_dim)

    @functools.partial(jax.jit, static_argnames="draws")
    def elbo(z, draws=1):
        data, kwargs = {**params, "z": z}, {"config": config, "dt": dt, "draws": draws}
        return log_density(model, args, kwargs, data)[0] - log_density(guide, args, kwargs, data)[0]

    want = np.mean([elbo(z0[k]) for k in range(draws)])
    np.testing.assert_allclose(elbo(z0, draws=draws), want, rtol=1e-5)


def test_solve_takes_draws_of_z0_as_leading_dims(key):
    config = dataclasses.replace(CONFIG, rtol=1e-7, atol=1e-9)
    _, _, dt = _batch()
    times = series_times(dt, *dt.shape)
    f = ODEFunction(CONFIG.z_dim, CONFIG.units)
    params = {"ode": f.init(key, jnp.zeros((1, CONFIG.z_dim)))["params"]}
    field = lambda p, z: f.apply({"params": p["ode"]}, z)
    z0 = jax.random.normal(key, (2, dt.shape[0], CONFIG.z_dim))
    got = solve(field, params, z0, times, config)
    assert got.shape == (2, *times.shape, CONFIG.z_dim)
    for k in range(2):
        want = solve(field, params, z0[k], times, config)
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-5)


def test_a_context_is_that_many_observed_points_uniformly_at_random(key):
    from dmm_jax.models.latent_ode.model_guide import context_choice

    present = jnp.zeros((2, 8, 2), bool).at[0, :6, 0].set(True).at[1, :3, 1].set(True)
    mask = jnp.arange(8)[None] < jnp.array([[5], [8]])  # series 0: its 6th point is padding
    choose = jax.jit(jax.vmap(lambda k: context_choice(k, present, mask, 3)))
    chosen = np.asarray(choose(jax.random.split(key, 4000)))
    np.testing.assert_array_equal(chosen.sum(-1), 3)  # 3 of 5, and all 3 of series 1's 3
    assert not chosen[:, 0, 5:].any() and not chosen[:, 1, 3:].any()
    np.testing.assert_allclose(chosen[:, 0, :5].mean(0), 3 / 5, atol=0.03)
    assert chosen[:, 1, :3].all()


def test_a_guide_with_a_context_reads_only_the_chosen_points(key):
    """Given a series with no more points than the context, q(z_0) is as without one; with
    fewer, it is q given the points the context chose (recomputed by hiding the others)."""
    from dmm_jax.models.latent_ode.model_guide import context_choice

    x, lengths, dt = _batch(lengths=(6, 6, 6))
    params = _params(CONFIG, x, lengths, dt)

    def q(config, x, k=key):
        seeded = handlers.seed(handlers.substitute(guide, data=params), k)
        site = handlers.trace(seeded).get_trace(x, lengths, config=config, dt=dt)["z"]
        return site["fn"].base_dist.loc

    whole = q(CONFIG, x)
    np.testing.assert_allclose(q(dataclasses.replace(CONFIG, context_points=6), x), whole)
    small = dataclasses.replace(CONFIG, context_points=2)
    got = q(small, x)
    assert not np.allclose(got, whole)
    # the guide's first use of its key is the context (the seed handler splits it once)
    _, context_key = jax.random.split(key)
    present = ~jnp.isnan(x)
    chosen = context_choice(context_key, present, jnp.ones(x.shape[:2], bool), 2)
    np.testing.assert_allclose(got, q(CONFIG, jnp.where(chosen[..., None], x, jnp.nan)), rtol=1e-5)


def test_training_with_several_particles_puts_the_draws_in_one_trace():
    from numpyro.infer import Trace_ELBO

    from dmm_jax.config import TrainConfig
    from dmm_jax.objectives import ImportanceWeightedELBO
    from dmm_jax.step import build_svi

    svi = build_svi(CONFIG, TrainConfig(particles=3))
    assert isinstance(svi.loss, Trace_ELBO) and svi.loss.num_particles == 1
    assert svi.model.keywords["draws"] == svi.guide.keywords["draws"] == 3
    iwae = build_svi(CONFIG, TrainConfig(particles=3, objective="iwae"))  # needs each draw's weight
    assert isinstance(iwae.loss, ImportanceWeightedELBO) and "draws" not in iwae.model.keywords
    assert "draws" not in build_svi(CONFIG, TrainConfig(particles=1)).model.keywords


def test_prior_samples_follow_the_model(key):
    """With f = 0 the path stays at z_0 ~ N(0, I), so the mean W z_0 + b has mean b and
    variance |W_d|^2 per feature, and x scatters around it with obs_std."""
    from dmm_jax.models.latent_ode import sample_prior

    config = LatentODEConfig(obs_dim=2, z_dim=3, rnn_dim=5, units=8, use_dt=True)
    x, lengths, dt = jnp.zeros((1, 2, 2)), jnp.array([2]), jnp.ones((1, 2))
    params = _params(config, x, lengths, dt)
    params["ode$params"] = jax.tree.map(jnp.zeros_like, params["ode$params"])
    kernel = jnp.array([[1.0, 0.0], [0.5, 2.0], [0.0, -1.0]])
    params["decoder$params"] = {"kernel": kernel, "bias": jnp.array([0.3, -0.2])}
    times = jnp.array([[0.0, 0.5, 2.0], [1.0, 1.0, 4.0]])
    out = sample_prior(params, key, config, times, samples=4000)
    assert out["x"].shape == out["mean"].shape == (4000, 2, 3, 2)
    want = jnp.broadcast_to(
        (out["z0"] @ kernel + jnp.array([0.3, -0.2]))[:, :, None], (4000, 2, 3, 2)
    )
    np.testing.assert_allclose(out["mean"], want, atol=1e-5)  # the path stays at z_0
    mean = out["mean"][:, :, 0]
    np.testing.assert_allclose(mean.mean((0, 1)), [0.3, -0.2], atol=0.05)
    np.testing.assert_allclose(mean.var((0, 1)), (kernel**2).sum(0), rtol=0.06)
    np.testing.assert_allclose((out["x"] - out["mean"]).std(), config.obs_std, rtol=0.03)
