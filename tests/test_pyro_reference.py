"""The PyTorch/Pyro reference DMM in ``benchmarks/pyro_reference.py``: a smoke test of its
training code, and dmm_jax against it number for number: with the reference's weights copied
in, the model's and the guide's log densities of the same latent trajectories agree,
ClippedAdam takes the same steps, and given the same guide noise both take the same
gradients and the same training steps.

Skips unless the ``bench`` extra (torch, pyro-ppl) is installed.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density

torch = pytest.importorskip("torch", reason="needs the bench extra (torch)")
pyro = pytest.importorskip("pyro", reason="needs the bench extra (pyro-ppl)")

from conftest import load_benchmark

from dmm_jax.config import DMMConfig, TrainConfig
from dmm_jax.models.dmm import guide, model
from dmm_jax.optim import clipped_adam

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "pyro_reference.py"
SIZES = {"z_dim": 3, "emission_dim": 5, "transition_dim": 7, "rnn_dim": 8}
OBS_DIM = 6


@pytest.fixture(scope="module")
def ref():
    spec = importlib.util.spec_from_file_location("pyro_reference", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_one_epoch_finite_and_seeded(ref):
    rng = np.random.default_rng(0)
    seqs = [(rng.random((n, OBS_DIM)) < 0.3).astype(np.uint8) for n in (3, 5, 4, 2)]

    def one_epoch():
        trainer = ref.ReferenceTrainer(seqs, seed=1, batch_size=3, **SIZES)
        row = trainer.run_epoch()
        return row, trainer.evaluate(seqs[:2])

    (row_a, eval_a), (row_b, eval_b) = one_epoch(), one_epoch()
    assert row_a["epoch"] == 0
    assert math.isfinite(row_a["train_loss_per_step"]) and math.isfinite(eval_a)
    assert row_a["annealing_factor"] == pytest.approx(0.2 + 0.8 * 2 / 2000)
    assert row_a["train_loss_per_step"] == row_b["train_loss_per_step"]
    assert eval_a == eval_b


def _jax_params(ref, net) -> dict:
    """dmm_jax's parameter tree holding the reference network's weights."""
    import jax

    return jax.tree.map(jnp.asarray, ref.dmm_jax_weights(net))


def _log_densities_jax(params, x, lengths, z, annealing):
    """log p(x, z) and log q(z | x) of dmm_jax, with its z site set to ``z``."""
    args = (jnp.asarray(x), jnp.asarray(lengths), jnp.float32(annealing))
    kwargs = {"config": DMMConfig(obs_dim=OBS_DIM, numerics="reference", **SIZES)}
    return [float(log_density(fn, args, kwargs, {**params, "z": z})[0]) for fn in (model, guide)]


def _log_densities_torch(ref, net, x, lengths, z, annealing):
    """log p(x, z) and log q(z | x) of the reference, its z_t sites conditioned on z[:, t-1]."""
    order = np.argsort(-lengths, kind="stable")  # the reference wants decreasing lengths
    sequences = torch.as_tensor(x[order])
    seq_lengths = torch.as_tensor(lengths[order])
    batch = ref.get_mini_batch(torch.arange(len(order)), sequences, seq_lengths)
    z_sorted = torch.as_tensor(np.asarray(z)[order])
    values = {f"z_{t}": z_sorted[:, t - 1] for t in range(1, x.shape[1] + 1)}
    totals = []
    for fn in (net.model, net.guide):
        conditioned = pyro.poutine.condition(fn, data=values)
        trace = pyro.poutine.trace(conditioned).get_trace(*batch, annealing_factor=annealing)
        totals.append(float(trace.log_prob_sum().detach()))
    return totals


@pytest.mark.parametrize("annealing", [1.0, 0.3])
def test_model_and_guide_densities_match_the_reference(ref, annealing):
    torch.manual_seed(0)
    net = ref.DMM(input_dim=OBS_DIM, **SIZES)
    with torch.no_grad():  # move the learned starts off zero so that they are tested too
        for p in (net.z_0, net.z_q_0, net.h_0):
            p.normal_()
    rng = np.random.default_rng(0)
    lengths = np.array([4, 7, 2], dtype=np.int64)
    x = (rng.random((3, 7, OBS_DIM)) < 0.4).astype(np.float32)
    x[np.arange(7)[None, :] >= lengths[:, None]] = 0.0  # padding is zeros, as in both loaders
    z = jnp.asarray(rng.normal(size=(3, 7, SIZES["z_dim"])).astype(np.float32))

    expected = _log_densities_torch(ref, net, x, lengths, z, annealing)
    got = _log_densities_jax(_jax_params(ref, net), x, lengths, z, annealing)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # the comparison can fail: a wrong mask or time alignment moves it
    shifted = _log_densities_jax(_jax_params(ref, net), x, lengths + 1, z, annealing)
    assert abs(shifted[0] - expected[0]) > 1e-2 * abs(expected[0])


def test_clipped_adam_takes_the_reference_steps():
    from pyro.optim.clipped_adam import ClippedAdam  # the torch optimizer pyro.optim wraps

    # A fast decay and a small clip make an off-by-one step in the decay or clipping show.
    config = TrainConfig(learning_rate=0.05, lr_decay=0.9, clip_norm=1.5, weight_decay=2.0)
    rng = np.random.default_rng(1)
    start = rng.normal(size=5).astype(np.float32)
    grads = [3.0 * rng.normal(size=5).astype(np.float32) for _ in range(6)]

    weight = torch.nn.Parameter(torch.as_tensor(start.copy()))
    optimizer = ClippedAdam(
        [weight],
        lr=config.learning_rate,
        betas=(config.beta1, config.beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm,
        lrd=config.lr_decay,
    )
    for g in grads:
        weight.grad = torch.as_tensor(g)
        optimizer.step()

    transform = clipped_adam(config)
    params = jnp.asarray(start)
    state = transform.init(params)
    for g in grads:
        updates, state = transform.update(jnp.asarray(g), state, params)
        params = params + updates
    np.testing.assert_allclose(np.asarray(params), weight.detach().numpy(), rtol=1e-5, atol=1e-6)


def _lockstep_data(ref, rng, num_steps: int = 8):
    """Five sequences in the reference's sorted mini-batch, and the same as dmm_jax arrays
    padded to ``num_steps`` (longer than the longest, so padding is exercised), with the
    real-step rows dmm_jax trains on."""
    from dmm_jax.real_steps import real_steps

    lengths = np.array([6, 5, 4, 3, 2], dtype=np.int64)  # already in decreasing order
    x = (rng.random((5, num_steps, OBS_DIM)) < 0.4).astype(np.float32)
    x[np.arange(num_steps)[None, :] >= lengths[:, None]] = 0.0
    batch = ref.get_mini_batch(
        torch.arange(5), torch.as_tensor(x[:, : lengths.max()]), torch.as_tensor(lengths)
    )
    steps = real_steps(lengths.astype(np.int32), num_steps, 64)
    return batch, jnp.asarray(x), jnp.asarray(lengths, jnp.int32), steps


def test_training_steps_match_the_reference_in_lockstep(ref):
    """Same weights, batch and guide noise: the reference's ``svi.step`` (Trace_ELBO, ClippedAdam)
    and dmm_jax's loss and gradient (real-step fast path) with ``clipped_adam`` give the same
    gradients and the same losses and weights after several steps. A large learning rate makes
    the later losses depend on the gradients' directions, not only on Adam's normalisation."""
    import jax

    from dmm_jax.train import build_svi

    lockstep = load_benchmark("lockstep")  # its noise hook and jitted step
    lr, annealing, updates = 0.05, 0.3, 5
    trainer = ref.ReferenceTrainer(
        [np.zeros((2, OBS_DIM), np.uint8)], seed=3, batch_size=5, optim_args={"lr": lr}, **SIZES
    )
    net = trainer.dmm
    params = _jax_params(ref, net)
    rng = np.random.default_rng(4)
    batch, x, lengths, steps = _lockstep_data(ref, rng)
    noises = [rng.normal(size=(8, 5, SIZES["z_dim"])).astype(np.float32) for _ in range(updates)]

    queue: list = []
    config = TrainConfig(learning_rate=lr)
    svi = build_svi(DMMConfig(obs_dim=OBS_DIM, numerics="reference", **SIZES), config)
    transform = clipped_adam(config)
    with lockstep.given_dmm_jax_noise() as holder:
        step = lockstep.training_step(svi, transform, holder)

        def jax_step(p, opt_state, noise):
            return step(p, opt_state, x, lengths, annealing, jnp.asarray(noise), steps=steps)

        # The first gradient, parameter by parameter.
        queue[:] = list(noises[0][: int(lengths.max())])
        with trainer._activate(), ref.given_guide_noise(queue):
            expected = pyro.infer.Trace_ELBO().differentiable_loss(
                net.model, net.guide, *batch, annealing_factor=annealing
            )
        net.zero_grad()
        expected.backward()
        grad_params = _jax_params(ref, _GradView(net))
        _, _, loss, grads = jax_step(params, transform.init(params), noises[0])
        assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-5)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grad_params)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
        net.zero_grad()

        # Several optimizer steps in lockstep.
        opt_state, ref_losses, jax_losses = transform.init(params), [], []
        for noise in noises:
            queue[:] = list(noise[: int(lengths.max())])
            with trainer._activate(), ref.given_guide_noise(queue):
                ref_losses.append(trainer.svi.step(*batch, annealing))
            params, opt_state, loss, _ = jax_step(params, opt_state, noise)
            jax_losses.append(float(loss))
    assert not queue
    np.testing.assert_allclose(jax_losses, ref_losses, rtol=1e-4)
    assert abs(ref_losses[-1] - ref_losses[0]) > 1e-2 * abs(ref_losses[0])  # it did train
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(_jax_params(ref, net))):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


class _GradView:
    """The reference network with every parameter replaced by its gradient (for _jax_params)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if isinstance(value, torch.nn.Parameter):
            return value.grad
        if isinstance(value, torch.nn.Module):
            return _GradView(value)
        return value
