"""The Variational RNN (Chung et al., "A Recurrent Latent Variable Model for Sequential Data",
NeurIPS 2015): a latent variable at every step of an RNN.

    h_t = RNN([phi_x(x_t), phi_z(z_t)], h_{t-1}),  h_0 = 0,  g_t = [h_{t-1}, c_t]
    prior:      p(z_t | z_{<t}, x_{<t}) = N(mu_0(g_t), diag sigma_0(g_t)^2)      (VRNN-I: N(0, I))
    emission:   p(x_t | z_{<=t}, x_{<t}) = Emission(dec([phi_z(z_t), g_t]))     (dmm_jax.emissions)
    inference:  q(z_t | x_{<=t}, z_{<t}) = N(mu(enc([phi_x(x_t), g_t])), diag sigma(...)^2)

c_t are the covariates (control inputs u_t, time gaps dt_t) when the config takes them. The
guide draws z_{1:T} step by step (its h_{t-1} depends on the drawn z_{<t}); the model, given
a trajectory z_{1:T}, runs only the RNN step by step and scores every step's prior and
emission in one batched op. Shapes as in ``dmm_jax.models.common``; S is the RNN state
([B, H] for the GRU, a pair of them for the LSTM).

The networks live in this module; the model and guide register the shared ones (phi_x, phi_z,
rnn) under the same names, so both use one set of parameters.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpyro
from numpyro import handlers
from numpyro.contrib.module import flax_module
from numpyro.distributions import Distribution, constraints

from dmm_jax.config import VRNNConfig
from dmm_jax.distributions import (
    gaussian_kl,
    normal_log_prob,
    standardized_normal_log_prob,
    step_noise,
)
from dmm_jax.emissions import (
    PADDING_FILL,
    EmissionHead,
    emission_distribution,
    emission_sample,
)
from dmm_jax.models.common import observed_entries, sequence_mask, transition_covariates
from dmm_jax.nn import Linear, LinearWeights, gru_step, lstm_step
from dmm_jax.real_steps import RealSteps, per_real_step
from dmm_jax.scans import active_steps

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
        return EmissionHead(c.emission, c.obs_dim, c.mixture_components, name="head")(h)


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


def _modules(config: VRNNConfig) -> dict[str, tuple[nn.Module, tuple]]:
    """Every network with the example inputs it is initialised with: one place for names."""
    c = config
    zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
    return {
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


def _register(config: VRNNConfig, names: tuple[str, ...]) -> dict[str, Any]:
    modules = _modules(config)
    if config.standard_prior:
        names = tuple(n for n in names if n != "prior")
    return {n: flax_module(n, modules[n][0], *modules[n][1]) for n in names}


def networks(params: dict, config: VRNNConfig) -> dict[str, Any]:
    """The trained networks as plain functions, for rolling the model out of NumPyro."""
    return {
        name: functools.partial(module.apply, {"params": params[f"{name}$params"]})
        for name, (module, _) in _modules(config).items()
        if f"{name}$params" in params
    }


def _with_covariates(h: Array, c: Array | None) -> Array:
    return h if c is None else jnp.concatenate([h, c], axis=-1)


def _time_major(a):
    return None if a is None else jnp.swapaxes(a, 0, 1)


def _prior_params(nets: dict, config: VRNNConfig, g: Array) -> tuple[Array, Array]:
    if config.standard_prior:
        shape = g.shape[:-1] + (config.z_dim,)
        return jnp.zeros(shape, g.dtype), jnp.ones(shape, g.dtype)
    return nets["prior"](g)


def scan_up_to(step, carry, inputs, num_steps: Array | None, fill=0.0):
    """``lax.scan(step, carry, inputs)`` over time-major ``inputs`` that runs ``step`` only
    for t < ``num_steps`` (the batch's longest sequence; None: every step). Past it, where
    every sequence is padding, the carry is kept and the outputs are the constants ``fill``
    (one per output, or one for all)."""
    if num_steps is None:
        return jax.lax.scan(step, carry, inputs)
    total = jax.tree.leaves(inputs)[0].shape[0]
    example = jax.eval_shape(step, carry, jax.tree.map(lambda a: a[0], inputs))[1]
    fills = fill if isinstance(fill, tuple) else (fill,) * len(jax.tree.leaves(example))
    filled = jax.tree.unflatten(
        jax.tree.structure(example),
        [jnp.full(o.shape, v, o.dtype) for o, v in zip(jax.tree.leaves(example), fills)],
    )

    def body(carry, indexed):
        t, x = indexed
        return jax.lax.cond(t < num_steps, step, lambda c, _: (c, filled), carry, x)

    return jax.lax.scan(body, carry, (jnp.arange(total), inputs))


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
    _, states = scan_up_to(step, start, _time_major(projected), num_steps)
    return jax.tree.map(_time_major, states)


def _hidden_before(states: State) -> Array:
    """h_{t-1} at every step, [B, T, H], from the states after every step (h_0 = 0)."""
    h = hidden_of(states)
    return jnp.concatenate([jnp.zeros_like(h[:, :1]), h[:, :-1]], axis=1)


# ----------------------------------------------------------------------------- distributions


class VRNNPrior(Distribution):
    """p(z_{1:T} | x) = prod_t N(z_t; mu_0(g_t), sigma_0(g_t)) given the observed x, one event
    [T, Z] per sequence. g_t depends on z_{<t}, so scoring a trajectory runs the RNN over it
    once; ``conditioning(z)`` returns that pass ([phi_z(z_t), g_t] per step), which the model's
    emission reuses (cached for the value the model was given)."""

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector
    reparametrized_params: ClassVar[list] = []

    def __init__(self, nets, config, features_x, covariates, mask, steps=None):
        self.nets, self.config, self.features_x = nets, config, features_x
        self.covariates, self.mask, self.steps = covariates, mask, steps
        self._cache: tuple[Array, tuple[Array, Array]] | None = None
        batch, num_steps = features_x.shape[:2]
        super().__init__(batch_shape=(batch,), event_shape=(num_steps, config.z_dim))

    def conditioning(self, value: Array) -> tuple[Array, Array]:
        """(phi_z(z_t), g_t), [B, T, F] and [B, T, H + C], for the trajectory ``value``."""
        if self._cache is not None and self._cache[0] is value:
            return self._cache[1]
        features_z = per_real_step(self.nets["phi_z"], self.steps, value)
        states = run_rnn(
            self.nets, self.config, self.features_x, features_z, active_steps(self.mask)
        )
        result = features_z, _with_covariates(_hidden_before(states), self.covariates)
        self._cache = (value, result)
        return result

    def step_params(self, value: Array) -> tuple[Array, Array]:
        g = self.conditioning(value)[1]
        fill = PADDING_FILL["gaussian"]
        return per_real_step(
            functools.partial(_prior_params, self.nets, self.config), self.steps, g, fill=fill
        )

    def sample(self, key, sample_shape=()):
        raise NotImplementedError("the VRNN prior is drawn with x: use dmm_jax.generate")

    def log_prob(self, value: Array) -> Array:
        loc, scale = self.step_params(value)
        return jnp.sum(jnp.where(self.mask, normal_log_prob(value, loc, scale), 0.0), -1)

    def kl_from(self, posterior, value: Array, intermediates: list[Array]) -> Array:
        """sum_t KL(q(z_t | ...) || p(z_t | g_t)) at the drawn trajectory, [B]."""
        loc_q, scale_q = posterior.step_params(value, intermediates)
        loc_p, scale_p = self.step_params(value)
        kl = gaussian_kl(loc_q, scale_q, loc_p, scale_p)
        return jnp.sum(jnp.where(self.mask, kl, 0.0), -1)


class VRNNPosterior(Distribution):
    """q(z_{1:T} | x) = prod_t N(z_t; enc([phi_x(x_t), g_t])), drawn with a scan that carries
    the RNN state. Intermediates: the standardized noise and the scales, [B, T, Z] each."""

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector
    reparametrized_params: ClassVar[list] = []

    def __init__(self, nets, config, features_x, covariates, mask):
        self.nets, self.config, self.features_x = nets, config, features_x
        self.covariates, self.mask = covariates, mask
        batch, num_steps = features_x.shape[:2]
        super().__init__(batch_shape=(batch,), event_shape=(num_steps, config.z_dim))

    def _scan(self, noise: Array | None, given: Array | None):
        """Steps the guide over time, drawing z_t = loc + scale * eps_t or taking ``given``;
        (z, loc, scale), each [B, T, Z] (0, 0, 1 past the batch's longest sequence)."""
        nets = self.nets
        batch = self.features_x.shape[0]
        # The products with phi_x(x_t), known for every step, run once outside the loop.
        encoder_x = nets["encoder"](self.features_x, method="project")
        rnn_x = nets["rnn"](self.features_x, bias=False, method="project")

        def step(state, inputs):
            encoder_x_t, rnn_x_t, c_t, eps_t, given_t = inputs
            g = _with_covariates(hidden_of(state), c_t)
            loc, scale = nets["encoder"](encoder_x_t, g, method="from_projection")
            z_t = loc + scale * eps_t if given_t is None else given_t
            features_z = nets["phi_z"](z_t)
            projected = rnn_x_t + nets["rnn"](features_z, method="project_trailing")
            state = nets["rnn"](state, projected, method="advance")
            return state, (z_t, loc, scale)

        inputs = (encoder_x, rnn_x, self.covariates, noise, given)
        _, outputs = scan_up_to(
            step,
            initial_state(self.config, batch),
            tuple(_time_major(a) for a in inputs),
            active_steps(self.mask),
            fill=(0.0, 0.0, 1.0),
        )
        return tuple(_time_major(o) for o in outputs)

    def sample_with_intermediates(self, key, sample_shape=()):
        if sample_shape:
            raise NotImplementedError("sample_shape is not supported; vmap over keys instead")
        (batch,), (num_steps, z_dim) = self.batch_shape, self.event_shape
        noise = _time_major(step_noise(key, num_steps, (batch, z_dim)))
        z, _, scale = self._scan(noise, None)
        return z, [noise, scale]

    def sample(self, key, sample_shape=()):
        return self.sample_with_intermediates(key, sample_shape)[0]

    def log_prob(self, value: Array, intermediates: list[Array] | None = None) -> Array:
        if intermediates:
            eps, scale = intermediates
            per_step = standardized_normal_log_prob(eps, scale)
        else:
            _, loc, scale = self._scan(None, value)
            per_step = normal_log_prob(value, loc, scale)
        return jnp.sum(jnp.where(self.mask, per_step, 0.0), -1)

    def step_params(self, value: Array, intermediates: list[Array]) -> tuple[Array, Array]:
        eps, scale = intermediates
        return value - scale * eps, scale  # loc, in value and in gradient


# ----------------------------------------------------------------------------- model, guide


def model(
    x: Array,
    lengths: Array,
    annealing_factor: Array | float = 1.0,
    *,
    config: VRNNConfig,
    inputs: Array | None = None,
    dt: Array | None = None,
    obs_mask: Array | None = None,
    steps: RealSteps | None = None,
):
    """p(x_{1:T}, z_{1:T}) per sequence; returns z [B, T, Z]. Arguments as the DMM's model
    (``dmm_jax.models.dmm``); missing entries (NaN or ``obs_mask`` False) are not scored and
    are read as 0 by phi_x."""
    batch, num_steps, _ = x.shape
    covariates = transition_covariates(config, batch, num_steps, inputs, dt)
    x, present = observed_entries(x, obs_mask)
    nets = _register(config, ("phi_x", "phi_z", "rnn", "prior", "decoder"))
    mask = sequence_mask(lengths, num_steps)
    features_x = per_real_step(nets["phi_x"], steps, x)
    prior = VRNNPrior(nets, config, features_x, covariates, mask, steps)
    with numpyro.plate("sequences", batch):
        with handlers.scale(scale=annealing_factor):
            z = numpyro.sample("z", prior)
        features_z, g = prior.conditioning(z)
        decoded = per_real_step(
            nets["decoder"],
            steps,
            jnp.concatenate([features_z, g], axis=-1),
            fill=PADDING_FILL[config.emission],
        )
        emission = emission_distribution(config.emission, decoded, present)
        numpyro.sample("x", emission.mask(mask).to_event(1), obs=x)
    return z


def guide(
    x: Array,
    lengths: Array,
    annealing_factor: Array | float = 1.0,
    *,
    config: VRNNConfig,
    inputs: Array | None = None,
    dt: Array | None = None,
    obs_mask: Array | None = None,
    steps: RealSteps | None = None,
):
    """q(z_{1:T} | x_{1:T}), a filter: z_t sees x_{<=t} only. Returns z [B, T, Z]."""
    batch, num_steps, _ = x.shape
    covariates = transition_covariates(config, batch, num_steps, inputs, dt)
    x, _ = observed_entries(x, obs_mask)
    nets = _register(config, ("phi_x", "phi_z", "rnn", "encoder"))
    features_x = per_real_step(nets["phi_x"], steps, x)
    posterior = VRNNPosterior(
        nets, config, features_x, covariates, sequence_mask(lengths, num_steps)
    )
    with numpyro.plate("sequences", batch), handlers.scale(scale=annealing_factor):
        return numpyro.sample("z", posterior)


# ----------------------------------------------------------------------------- generation


def roll_out(
    params: dict, key: Array, config: VRNNConfig, state: State, num_steps: int
) -> dict[str, Array]:
    """Draws z_t ~ p(z_t | g_t) and x_t ~ p(x_t | z_t, g_t) for ``num_steps`` steps from the
    RNN ``state`` (no covariates). Returns z [N, T, Z], x [N, T, X] and the emission's
    parameters ``emission`` (a tuple, each [N, T, ...])."""
    if config.covariate_dim:
        raise NotImplementedError("sampling a VRNN with inputs or time gaps is not supported")
    nets = networks(params, config)

    def step(state, key):
        z_key, x_key = jax.random.split(key)
        g = hidden_of(state)
        loc, scale = _prior_params(nets, config, g)
        z = loc + scale * jax.random.normal(z_key, loc.shape, loc.dtype)
        features_z = nets["phi_z"](z)
        decoded = nets["decoder"](jnp.concatenate([features_z, g], axis=-1))
        x = emission_sample(config.emission, x_key, decoded)
        state = nets["rnn"](state, jnp.concatenate([nets["phi_x"](x), features_z], axis=-1))
        return state, (z, x, decoded)

    _, (z, x, decoded) = jax.lax.scan(step, state, jax.random.split(key, num_steps))
    return {
        "z": _time_major(z),
        "x": _time_major(x),
        "emission": jax.tree.map(_time_major, decoded),
    }


def state_after(params: dict, z: Array, x: Array, lengths: Array, config: VRNNConfig) -> State:
    """The RNN state after each sequence's last real step of (x, z), [N, ...]; h_0 for empty."""
    nets = networks(params, config)
    x, _ = observed_entries(x)
    states = run_rnn(nets, config, nets["phi_x"](x), nets["phi_z"](z))
    last = jnp.maximum(lengths - 1, 0)

    def pick(s, s0):
        chosen = jnp.take_along_axis(s, last[:, None, None], axis=1)[:, 0]
        return jnp.where((lengths > 0)[:, None], chosen, s0)

    return jax.tree.map(pick, states, initial_state(config, x.shape[0]))


def emission_params(
    params: dict, z: Array, x: Array, lengths: Array, config: VRNNConfig
) -> tuple[Array, ...]:
    """p(x_t | z_{<=t}, x_{<t})'s parameters at every step of (x, z), [N, T, ...]."""
    del lengths
    nets = networks(params, config)
    x, _ = observed_entries(x)
    features_z = nets["phi_z"](z)
    g = _hidden_before(run_rnn(nets, config, nets["phi_x"](x), features_z))
    return nets["decoder"](jnp.concatenate([features_z, g], axis=-1))


def start(params: dict, config: VRNNConfig, num_sequences: int) -> State:
    del params
    return initial_state(config, num_sequences)


def emission(config: VRNNConfig) -> str:
    return config.emission
