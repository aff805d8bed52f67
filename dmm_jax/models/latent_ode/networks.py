"""The Latent ODE's networks and the two recurrences over observation times.

    ODE function   dz/dt = f(z): two tanh layers of ``units`` (autonomous, as the paper's)
    ODE-RNN        between observations h evolves by dh/dt = f_h(h) (fixed Euler sub-steps);
                   at an observation, h = GRU(h, [x_t, m_t]) (m_t: which entries are observed)
    RNN            h = GRU(h, [x_t, m_t, gap_t]): the time gap is an input (RNN-dt)
    intensity      log lambda(z): an ``ODEFunction`` of the same shape from z to one log rate
                   per feature (the Poisson process of the observation times; its integral
                   is solved with z)

Both encoders read the series backward in time, so their last state summarises x_{0:T}
at t_0 and gives q(z_0). Weights start as the reference's: N(0, 0.1^2), zero biases.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmm_jax.continuous_config import LatentODEConfig
from dmm_jax.models.common import observed_entries
from dmm_jax.odeint import odeint

Array = jax.Array

_INIT = {"kernel_init": nn.initializers.normal(0.1), "bias_init": nn.initializers.zeros}


class ODEFunction(nn.Module):
    """f(z) = W_3 tanh(W_2 tanh(W_1 z + b_1) + b_2) + b_3."""

    dim: int
    units: int

    @nn.compact
    def __call__(self, z: Array) -> Array:
        h = jnp.tanh(nn.Dense(self.units, **_INIT)(z))
        h = jnp.tanh(nn.Dense(self.units, **_INIT)(h))
        return nn.Dense(self.dim, **_INIT)(h)


class GaussianHead(nn.Module):
    """[..., H] -> (loc, scale) of a diagonal Gaussian over ``dim`` entries."""

    dim: int
    units: int

    @nn.compact
    def __call__(self, h: Array) -> tuple[Array, Array]:
        out = nn.Dense(2 * self.dim, **_INIT)(jnp.tanh(nn.Dense(self.units, **_INIT)(h)))
        return out[..., : self.dim], nn.softplus(out[..., self.dim :]) + 1e-4


def poisson_log_likelihood(
    log_rate: Array, cumulative_rate: Array, present: Array, mask: Array
) -> Array:
    """log p(observation times) of each series, [B]: for each feature d, an inhomogeneous
    Poisson process on [t_0, t_last] whose events are the times d was observed,

        sum_{i: d observed at t_i} log lambda_d(t_i)  -  integral_{t_0}^{t_last} lambda_d dt,

    summed over features. ``log_rate`` [B, T, D] at the series' times, ``cumulative_rate``
    [B, T, D] the integral from t_0 to each time (padding repeats the last time, so the last
    column is the whole integral), ``present`` [B, T, D], ``mask`` [B, T]; leading dims of
    ``log_rate`` and ``cumulative_rate`` (draws) carry through."""
    events = present & mask[..., None]
    return jnp.sum(jnp.where(events, log_rate, 0.0), axis=(-2, -1)) - jnp.sum(
        cumulative_rate[..., -1, :], axis=-1
    )


def ode_function(config: LatentODEConfig) -> ODEFunction:
    """The generative ODE's f (registered by the model as "ode")."""
    return ODEFunction(config.z_dim, config.units)


def decoder(config: LatentODEConfig) -> nn.Dense:
    """The decoder's mean W z(t) + b (registered by the model as "decoder")."""
    return nn.Dense(config.obs_dim, kernel_init=_INIT["kernel_init"])


def series_inputs(x: Array, dt: Array | None, obs_mask: Array | None):
    """(times [B, T], x with missing entries as 0, which entries are present) of a batch."""
    x, present = observed_entries(x, obs_mask)
    return series_times(dt, *x.shape[:2]), x, present


def series_times(dt: Array | None, batch: int, num_steps: int) -> Array:
    """Observation times [B, T]: the cumulative sum of dt (dt[:, 0] is t_0, the time from the
    origin), or 0, 1, 2, ... without dt. Padding has dt = 0, so it repeats the last time."""
    if dt is None:
        return jnp.broadcast_to(jnp.arange(num_steps, dtype=jnp.float32), (batch, num_steps))
    return jnp.cumsum(dt, axis=1)


def solve(f, params, z0: Array, times: Array, config: LatentODEConfig, log_rate=None):
    """z(t) [..., B, T, Z] at every series' own times from z(times[:, 0]) = z0 [..., B, Z],
    for dz/dt = f(params, z): adaptive Dormand-Prince at the config's rtol and atol, all
    series in one solve, differentiated through the solver's steps (``dmm_jax.odeint``).
    Repeated times (padding) are allowed. Leading dims of ``z0`` (draws of z_0) share the
    series' ``times`` [B, T] and join the one solve.

    Given ``log_rate`` ((params, z) -> log lambda(z) [D]), the state carries the integral of
    lambda from t_0 as well, and the result is (z(t), that integral [..., B, T, D]).
    """
    if z0.ndim > 2:  # one solve of every draw's series: one step size, batched arithmetic
        leading = z0.shape[:-2]
        flat_times = jnp.broadcast_to(times, (*leading, *times.shape)).reshape(-1, times.shape[1])
        out = solve(f, params, z0.reshape(-1, z0.shape[-1]), flat_times, config, log_rate)
        unflat = lambda a: a.reshape(*leading, *times.shape, a.shape[-1])
        return jax.tree.map(unflat, out)
    settings = {"rtol": config.rtol, "atol": config.atol, "max_steps": config.max_solver_steps}
    if log_rate is None:
        return odeint(f, params, z0, times, **settings)
    z_dim = z0.shape[-1]

    def field(p, y):
        z = y[..., :z_dim]
        return jnp.concatenate([f(p, z), jnp.exp(log_rate(p, z))], axis=-1)

    y0 = jnp.concatenate([z0, jnp.zeros((*z0.shape[:-1], config.obs_dim), z0.dtype)], axis=-1)
    path = odeint(field, params, y0, times, **settings)
    return path[..., :z_dim], path[..., z_dim:]


def module_field(module: nn.Module, name: str):
    """(params, z) -> ``module``(z) with the weights ``params[name]``: an ``f`` or ``log_rate``
    of :func:`solve`."""
    return lambda params, z: module.apply({"params": params[name]}, z)


def euler(f, h: Array, gap: Array, steps: int) -> Array:
    """h [B, H] carried over ``gap`` [B] (negative: backward in time) by ``steps`` Euler
    steps of dh/dt = f(h)."""
    step = (gap / steps)[:, None]
    return jax.lax.fori_loop(0, steps, lambda _, h: h + step * f(h), h)


def encode(nets: dict, x: Array, present: Array, times: Array, mask: Array, config) -> Array:
    """The encoder's state at each series' first time, [B, H], reading x backward in time.

    ``nets``: "gru" (a bound GRU cell) and, for the ODE-RNN, "encoder_ode" (f_h). A padded
    step leaves the state and the clock as they are; a step with nothing observed only
    evolves the state (ODE-RNN) to its time.
    """
    batch = x.shape[0]
    observed = present.astype(x.dtype)
    last = jnp.take_along_axis(times, jnp.maximum(mask.sum(1) - 1, 0)[:, None], axis=1)[:, 0]
    step_inputs = jnp.concatenate([jnp.where(present, x, 0.0), observed], axis=-1)
    h0 = jnp.zeros((batch, config.rnn_dim), x.dtype)

    def step(carry, inputs):
        h, clock = carry
        inp, t, real, any_observed = inputs
        gap = t - clock  # <= 0
        if config.encoder == "ode-rnn":
            h_ode = euler(nets["encoder_ode"], h, gap, config.euler_steps)
        else:
            h_ode, inp = h, jnp.concatenate([inp, -gap[:, None]], axis=-1)
        h_new, _ = nets["gru"](h_ode, inp)
        h_new = jnp.where(any_observed[:, None], h_new, h_ode)
        h = jnp.where(real[:, None], h_new, h)
        clock = jnp.where(real, t, clock)
        return (h, clock), None

    # Every step runs (a padded one keeps the state): skipping the steps past the batch's
    # longest series with a lax.cond made each step a third slower on the periodic data.
    inputs = (
        jnp.swapaxes(step_inputs, 0, 1),
        times.T,
        mask.T,
        jnp.any(present, axis=-1).T,
    )
    (h, _), _ = jax.lax.scan(step, (h0, last), inputs, reverse=True)
    return h
