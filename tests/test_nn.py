"""The Flax networks: shapes, the identity initialisation, and the backward encoder against a
plain per-sequence Python loop over reversed sequences (the reference's packed RNN)."""

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
