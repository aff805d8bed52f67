"""The exact log-likelihood of a linear-Gaussian state-space model: the Kalman filter.

    z_0 ~ N(m_0, P_0)                                   (P_0 = 0: a fixed start, as the DMM's)
    z_t = A z_{t-1} + B u_t + b + w_t,   w_t ~ N(0, Q)
    x_t = H z_t + D u_t + d + v_t,       v_t ~ N(0, R)          t = 1..T

Array index t-1 holds step t, as in the model: ``inputs[:, t]`` acts between steps t-1 and t.
A baseline for real-valued data, and the exact reference the DMM's inference is checked
against (a DMM with ``transition="linear"``, ``emission_net="linear"`` and the parameters of
``dmm_params`` is this model when Q and R are diagonal).

Missing entries (NaN in x, or False in ``obs_mask``) are conditioned away: their rows of H
are zeroed and they get unit noise and zero residual, which leaves the observed entries'
likelihood times N(0; 0, 1) per missing entry, a constant removed again. Padded steps
(t >= lengths[b]) are all missing and contribute exactly zero.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_LOG_2PI = math.log(2.0 * math.pi)


class LinearGaussianSSM(NamedTuple):
    """Parameters of the model above (matrices act on column vectors: x_t = H z_t + ...)."""

    initial_mean: Array  # m_0 [Z]
    initial_cov: Array  # P_0 [Z, Z]
    transition_matrix: Array  # A [Z, Z]
    transition_bias: Array  # b [Z]
    transition_cov: Array  # Q [Z, Z]
    emission_matrix: Array  # H [X, Z]
    emission_bias: Array  # d [X]
    emission_cov: Array  # R [X, X]
    input_matrix: Array | None = None  # B [Z, U]
    emission_input_matrix: Array | None = None  # D [X, U]


def kalman_filter(
    params: LinearGaussianSSM,
    x: Array,
    inputs: Array | None = None,
    obs_mask: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Filters one sequence x [T, X] (inputs [T, U], obs_mask [T, X] optional).

    Returns (log p(x_t | x_{<t}) [T], filtered means [T, Z], filtered covariances [T, Z, Z]).
    """
    p = params
    present = ~jnp.isnan(x)
    if obs_mask is not None:
        present = present & obs_mask.astype(bool)
    x = jnp.where(present, x, 0.0)  # before any arithmetic: NaN never propagates
    num_steps = x.shape[0]
    if inputs is None:
        inputs = jnp.zeros((num_steps, 0), x.dtype)
    z_dim, obs_dim = p.transition_matrix.shape[0], p.emission_matrix.shape[0]
    input_dim = inputs.shape[-1]
    b_u = p.input_matrix if p.input_matrix is not None else jnp.zeros((z_dim, input_dim))
    d_u = (
        p.emission_input_matrix
        if p.emission_input_matrix is not None
        else jnp.zeros((obs_dim, input_dim))
    )

    def step(carry, step_inputs):
        mean, cov = carry
        x_t, u_t, present_t = step_inputs
        mean = p.transition_matrix @ mean + b_u @ u_t + p.transition_bias
        cov = p.transition_matrix @ cov @ p.transition_matrix.T + p.transition_cov
        keep = present_t.astype(x.dtype)
        h = keep[:, None] * p.emission_matrix
        innovation_cov = (
            h @ cov @ h.T + jnp.outer(keep, keep) * p.emission_cov + jnp.diag(1.0 - keep)
        )
        residual = keep * (x_t - p.emission_matrix @ mean - d_u @ u_t - p.emission_bias)
        chol = jnp.linalg.cholesky(innovation_cov)
        white = jax.scipy.linalg.solve_triangular(chol, residual, lower=True)
        log_lik = (
            -0.5 * white @ white
            - jnp.sum(jnp.log(jnp.diagonal(chol)))
            - 0.5 * jnp.sum(keep) * _LOG_2PI
        )
        # Kalman gain K = P H^T S^{-1}, through the Cholesky factor of S.
        gain = jax.scipy.linalg.cho_solve((chol, True), h @ cov).T
        mean = mean + gain @ residual
        cov = cov - gain @ innovation_cov @ gain.T
        cov = 0.5 * (cov + cov.T)
        return (mean, cov), (log_lik, mean, cov)

    start = (jnp.asarray(p.initial_mean, x.dtype), jnp.asarray(p.initial_cov, x.dtype))
    _, (log_liks, means, covs) = jax.lax.scan(step, start, (x, inputs, present))
    return log_liks, means, covs


@jax.jit
def kalman_log_likelihood(
    params: LinearGaussianSSM,
    x: Array,
    lengths: Array | None = None,
    inputs: Array | None = None,
    obs_mask: Array | None = None,
) -> Array:
    """log p(x_{1:T_b}) of each padded sequence, [B]: x [B, T, X], lengths [B] (default: all T),
    inputs [B, T, U] and obs_mask [B, T, X] optional."""
    num_steps = x.shape[1]
    keep = jnp.ones(x.shape, bool) if obs_mask is None else obs_mask.astype(bool)
    if lengths is not None:
        keep = keep & (jnp.arange(num_steps)[None, :, None] < lengths[:, None, None])

    def one(x_b, u_b, keep_b):
        return jnp.sum(kalman_filter(params, x_b, u_b, keep_b)[0])

    return jax.vmap(one)(x, inputs, keep)


def dmm_params(ssm: LinearGaussianSSM) -> dict[str, object]:
    """The model parameters of a DMM that is ``ssm`` exactly.

    For ``DMMConfig(transition="linear", emission="gaussian", emission_net="linear",
    emission_scale="learned", input_dim=U, inputs_to_emission=D is not None)``; needs a fixed
    start (P_0 = 0) and diagonal Q and R, since the DMM's noises are diagonal.
    """
    p = jax.tree.map(np.asarray, ssm)
    for name, cov in (("transition_cov", p.transition_cov), ("emission_cov", p.emission_cov)):
        if not np.array_equal(cov, np.diag(np.diag(cov))):
            raise ValueError(f"dmm_params: {name} must be diagonal for a DMM to hold it")
    if np.any(p.initial_cov != 0):
        raise ValueError("dmm_params: initial_cov must be 0 (the DMM starts from a fixed z_0)")
    transition = {
        "z_to_loc": {"kernel": p.transition_matrix.T, "bias": p.transition_bias},
        "log_scale": 0.5 * np.log(np.diag(p.transition_cov)),
    }
    if p.input_matrix is not None:
        transition["covariates_to_loc"] = p.input_matrix.T
    kernel = p.emission_matrix.T
    if p.emission_input_matrix is not None:
        kernel = np.concatenate([kernel, p.emission_input_matrix.T], axis=0)
    emitter = {
        "hidden_to_loc": {"kernel": kernel, "bias": p.emission_bias},
        "log_scale": 0.5 * np.log(np.diag(p.emission_cov)),
    }
    params = {"transition$params": transition, "emitter$params": emitter, "z_0": p.initial_mean}
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
