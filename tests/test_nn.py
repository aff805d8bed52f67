"""The Flax networks: shapes, the identity initialisation, and the backward encoder against a
plain per-sequence Python loop over reversed sequences (the reference's packed RNN)."""

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_binary_batch

from dmm_jax.nn import BackwardEncoder, BernoulliEmitter, Combiner, GatedTransition, Linear

RTOL = 1e-5


def test_output_shapes(key):
    z = jnp.ones((4, 7, 3))
    trans = GatedTransition(z_dim=3, transition_dim=5)
    loc, scale = trans.apply(trans.init(key, z), z)
    assert loc.shape == scale.shape == (4, 7, 3)
    assert bool(jnp.all(scale > 0))

    emitter = BernoulliEmitter(obs_dim=6, emission_dim=5)
    assert emitter.apply(emitter.init(key, z), z).shape == (4, 7, 6)

    combiner = Combiner(z_dim=3, rnn_dim=10)
    h = jnp.ones((4, 7, 10))
    loc, scale = combiner.apply(combiner.init(key, z, h), z, h)
    assert loc.shape == scale.shape == (4, 7, 3)

    x, lengths = random_binary_batch(0, 4, 7, 6)
    mask = jnp.arange(7)[None] < lengths[:, None]
    for cell in ("rnn", "gru", "lstm"):
        enc = BackwardEncoder(rnn_dim=10, cell=cell)
        assert enc.apply(enc.init(key, x, mask), x, mask).shape == (4, 7, 10)


def test_transition_linear_part_starts_as_identity(key):
    trans = GatedTransition(z_dim=4, transition_dim=6)
    params = trans.init(key, jnp.zeros((1, 4)))["params"]
    np.testing.assert_array_equal(params["z_to_loc"]["kernel"], np.eye(4))
    np.testing.assert_array_equal(params["z_to_loc"]["bias"], np.zeros(4))


class _LayerByLayerTransition(flax_nn.Module):
    """GatedTransition as the docstring writes it, one Linear per layer (the code before the
    layers sharing an input ran as one matmul)."""

    @flax_nn.compact
    def __call__(self, z_prev, covariates=None):
        net_in = z_prev if covariates is None else jnp.concatenate([z_prev, covariates], -1)
        relu = flax_nn.relu
        gate = flax_nn.sigmoid(
            Linear(4, name="gate_hidden_to_z")(relu(Linear(5, name="gate_z_to_hidden")(net_in)))
        )
        mean_hidden = relu(Linear(5, name="proposed_z_to_hidden")(net_in))
        proposed = Linear(4, name="proposed_hidden_to_z")(mean_hidden)
        identity = lambda key, shape, dtype=jnp.float32: jnp.eye(*shape, dtype=dtype)
        zeros = flax_nn.initializers.zeros
        linear_loc = Linear(4, kernel_init=identity, bias_init=zeros, name="z_to_loc")(z_prev)
        scale = flax_nn.softplus(Linear(4, name="proposed_to_scale")(relu(proposed)))
        return (1.0 - gate) * linear_loc + gate * proposed, scale


@pytest.mark.parametrize("num_covariates", [0, 2])
def test_transition_equals_its_layer_by_layer_form(key, num_covariates):
    """Same parameters from the same key (names, shapes, values: checkpoints and seeds still
    hold) and the same loc and scale, with the layers that share an input fused."""
    z_prev = jax.random.normal(key, (6, 4))
    covariates = jax.random.normal(jax.random.fold_in(key, 1), (6, num_covariates))
    args = (z_prev,) if num_covariates == 0 else (z_prev, covariates)
    fused, reference = GatedTransition(z_dim=4, transition_dim=5), _LayerByLayerTransition()
    params = fused.init(key, *args)
    reference_params = reference.init(key, *args)
    assert jax.tree.structure(params) == jax.tree.structure(reference_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(fused.apply(params, *args), reference.apply(params, *args)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-6)


def test_linear_uses_pytorch_default_init(key):
    layer = Linear(50)
    params = layer.init(key, jnp.zeros((1, 400)))["params"]
    bound = 1 / np.sqrt(400)
    for name in ("kernel", "bias"):
        values = np.asarray(params[name])
        assert values.min() >= -bound and values.max() <= bound
        assert values.max() > 0.9 * bound  # actually spread over the interval, not zeros


def test_unknown_cell_is_rejected(key):
    with pytest.raises(ValueError, match="rnn cell"):
        BackwardEncoder(rnn_dim=4, cell="tcn").init(key, jnp.zeros((1, 2, 3)), jnp.ones((1, 2)))


def _loop_encoder(params, x, lengths, cell):
    """Each sequence reversed within its length, run forward from h_0, outputs re-reversed."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    sig = lambda a: 1 / (1 + np.exp(-a))
    out = np.zeros(x.shape[:2] + (p["w_hh"].shape[0],))
    for b, length in enumerate(lengths):
        h, c = p["h_0"].copy(), p.get("c_0")
        for t in reversed(range(length)):
            xp = x[b, t] @ p["w_ih"] + p["b_ih"]
            hp = h @ p["w_hh"] + p["b_hh"]
            if cell == "rnn":
                h = np.maximum(xp + hp, 0)
            elif cell == "gru":
                (xr, xz, xn), (hr, hz, hn) = np.split(xp, 3), np.split(hp, 3)
                r, u = sig(xr + hr), sig(xz + hz)
                h = (1 - u) * np.tanh(xn + r * hn) + u * h
            else:
                i, f, g, o = np.split(xp + hp, 4)
                c = sig(f) * c + sig(i) * np.tanh(g)
                h = sig(o) * np.tanh(c)
            out[b, t] = h
    return out


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_backward_encoder_matches_packed_reversed_loop(key, cell):
    x, lengths = random_binary_batch(1, 5, 9, 6, lengths=[9, 4, 1, 7, 9])
    mask = jnp.arange(9)[None] < lengths[:, None]
    enc = BackwardEncoder(rnn_dim=10, cell=cell)
    variables = enc.init(key, x, mask)
    # A non-zero learnable start state, so that the test sees where h_0 enters.
    params = dict(variables["params"])
    params["h_0"] = jax.random.normal(jax.random.PRNGKey(3), (10,))
    if cell == "lstm":
        params["c_0"] = jax.random.normal(jax.random.PRNGKey(4), (10,))
    got = np.asarray(enc.apply({"params": params}, x, mask))
    want = _loop_encoder(params, x, lengths, cell)
    real = np.asarray(mask)
    np.testing.assert_allclose(got[real], want[real], rtol=RTOL, atol=1e-6)
