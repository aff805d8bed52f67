"""The VRNN's networks (Flax) and the recurrence over them, shared by its model, guide and
generation. Shapes as in ``dmm_jax.models.common``; S is the RNN state ([B, H] for the GRU, a
pair of them for the LSTM)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmm_jax.config import VRNNConfig
from dmm_jax.emissions import EmissionHead, NADEWeights, with_nade_weights
from dmm_jax.nn import Linear, LinearWeights, gru_step, lstm_step
from dmm_jax.scans import scan_up_to

Array = jax.Array
State = Any  # [B, H] (GRU) or ([B, H], [B, H]) (LSTM)


LATENT_SCALE_FLOOR = 1e-4


# ----------------------------------------------------------------------------- networks


class MLP(nn.Module):
    """ReLU layers of the given widths."""

    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i, width in enumerate(self.widths):
            x = nn.relu(Linear(width, name=f"layer_{i}")(x))
        return x


class GaussianStep(nn.Module):
    """inputs [..., I] -> (loc, scale) [..., Z] of a diagonal Gaussian, through one hidden
    layer; scale = softplus(.) + a floor, so it never collapses to zero.

    ``project`` and ``from_projection`` split the first layer over the leading and trailing
    parts of the inputs, so the part known for every step (phi_x(x_t)) is multiplied once for
    all steps, outside the step-by-step loop.
    """

    z_dim: int
    hidden_dim: int
    in_features: int

    def setup(self):
        self.hidden = LinearWeights(self.hidden_dim)
        self.to_params = Linear(2 * self.z_dim)

    def __call__(self, inputs: Array) -> tuple[Array, Array]:
        kernel, bias = self.hidden(self.in_features)
        return self._heads(inputs @ kernel + bias)

    def project(self, leading: Array) -> Array:
        """The first layer's product with the leading inputs [..., L] (no bias)."""
        kernel, _ = self.hidden(self.in_features)
        return leading @ kernel[: leading.shape[-1]]

    def from_projection(self, projected: Array, trailing: Array) -> tuple[Array, Array]:
        """``__call__`` of [leading, trailing] given ``project(leading)``."""
        kernel, bias = self.hidden(self.in_features)
        return self._heads(projected + trailing @ kernel[-trailing.shape[-1] :] + bias)

    def _heads(self, pre_activation: Array) -> tuple[Array, Array]:
        loc, raw_scale = jnp.split(self.to_params(nn.relu(pre_activation)), 2, axis=-1)
        return loc, nn.softplus(raw_scale) + LATENT_SCALE_FLOOR


class Decoder(nn.Module):
    """[phi_z(z_t), g_t] -> the emission's parameters (``dmm_jax.emissions``)."""

    config: VRNNConfig

    @nn.compact
    def __call__(self, inputs: Array) -> tuple[Array, ...]:
        c = self.config
        h = MLP((c.hidden_dim, c.hidden_dim), name="hidden")(inputs)
        head = EmissionHead(c.emission, c.obs_dim, c.mixture_components, c.nade_hidden, name="head")
        return head(h)


class RecurrentCell(nn.Module):
    """One step of the VRNN's recurrence, GRU or LSTM (PyTorch's gate layout and init), on
    inputs [..., I]; ``project`` / ``advance`` split it into the input's product (batched over
    all steps where the inputs are known) and the step proper."""

    rnn_dim: int
    in_features: int
    cell: str = "gru"

    def setup(self):
        gates = 3 if self.cell == "gru" else 4
        self.input = LinearWeights(gates * self.rnn_dim)
        self.hidden = LinearWeights(gates * self.rnn_dim)

    def __call__(self, state: State, inputs: Array) -> State:
        return self.advance(state, self.project(inputs))

    def project(self, inputs: Array, bias: bool = True) -> Array:
        """inputs [..., L] (the leading L of the I inputs) times their part of the input
        weights, plus the bias unless ``bias`` is False."""
        kernel, b = self.input(self.in_features)
        projected = inputs @ kernel[: inputs.shape[-1]]
        return projected + b if bias else projected

    def project_trailing(self, inputs: Array) -> Array:
        """The trailing inputs [..., I - L]' part, with the bias."""
        kernel, b = self.input(self.in_features)
        return inputs @ kernel[-inputs.shape[-1] :] + b

    def advance(self, state: State, projected: Array) -> State:
        w_hh, b_hh = self.hidden(self.rnn_dim)
        if self.cell == "gru":
            return gru_step(state, projected, w_hh, b_hh)
        return lstm_step(state, projected, w_hh, b_hh)


def initial_state(config: VRNNConfig, batch: int) -> State:
    h = jnp.zeros((batch, config.rnn_dim), jnp.float32)
    return h if config.rnn_cell == "gru" else (h, h)


def hidden_of(state: State) -> Array:
    return state[0] if isinstance(state, tuple) else state


def modules(config: VRNNConfig) -> dict[str, tuple[nn.Module, tuple]]:
    """Every network with the example inputs it is initialised with: one place for names."""
    c = config
    zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
    nets = {
        "phi_x": (MLP((c.feature_dim, c.feature_dim)), (zeros((1, c.obs_dim)),)),
        "phi_z": (MLP((c.feature_dim,)), (zeros((1, c.z_dim)),)),
        "rnn": (
            RecurrentCell(c.rnn_dim, 2 * c.feature_dim, c.rnn_cell),
            (initial_state(c, 1), zeros((1, 2 * c.feature_dim))),
        ),
        "prior": (GaussianStep(c.z_dim, c.hidden_dim, c.state_dim), (zeros((1, c.state_dim)),)),
        "encoder": (
            GaussianStep(c.z_dim, c.hidden_dim, c.feature_dim + c.state_dim),
            (zeros((1, c.feature_dim + c.state_dim)),),
        ),
        "decoder": (Decoder(c), (zeros((1, c.feature_dim + c.state_dim)),)),
    }
    if c.emission == "nade":  # the NADE's weights, shared by all steps
        nets["nade"] = (NADEWeights(c.obs_dim, c.nade_hidden), ())
    return nets


def decoded_with_weights(nets: dict, config: VRNNConfig, decoded: tuple) -> tuple:
    """The decoder's per-step parameters, completed with a NADE's shared weights."""
    if config.emission != "nade":
        return decoded
    return with_nade_weights(decoded, nets["nade"]())


def networks(params: dict, config: VRNNConfig) -> dict[str, Any]:
    """The trained networks as plain functions, for rolling the model out of NumPyro."""
    return {
        name: functools.partial(module.apply, {"params": params[f"{name}$params"]})
        for name, (module, _) in modules(config).items()
        if f"{name}$params" in params
    }


def with_covariates(h: Array, c: Array | None) -> Array:
    return h if c is None else jnp.concatenate([h, c], axis=-1)


def time_major(a):
    return None if a is None else jnp.swapaxes(a, 0, 1)


def prior_params(nets: dict, config: VRNNConfig, g: Array) -> tuple[Array, Array]:
    if config.standard_prior:
        shape = g.shape[:-1] + (config.z_dim,)
        return jnp.zeros(shape, g.dtype), jnp.ones(shape, g.dtype)
    return nets["prior"](g)


def run_rnn(
    nets: dict,
    config: VRNNConfig,
    features_x: Array,
    features_z: Array,
    num_steps: Array | None = None,
) -> State:
    """The RNN over given features, [B, T, F] each: the state after every step, [B, T, ...]
    (zeros past ``num_steps``). The input products run for all steps at once."""
    projected = nets["rnn"](jnp.concatenate([features_x, features_z], -1), method="project")

    def step(state, projected_t):
        state = nets["rnn"](state, projected_t, method="advance")
        return state, state

    start = initial_state(config, features_x.shape[0])
    _, states = scan_up_to(step, start, time_major(projected), num_steps)
    return jax.tree.map(time_major, states)


def hidden_before(states: State) -> Array:
    """h_{t-1} at every step, [B, T, H], from the states after every step (h_0 = 0)."""
    h = hidden_of(states)
    return jnp.concatenate([jnp.zeros_like(h[:, :1]), h[:, :-1]], axis=1)
