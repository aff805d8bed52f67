"""Synthetic state-space data whose true model is known.

``linear_gaussian_ssm`` draws a stable linear-Gaussian SSM (diagonal noises, fixed start, so a
DMM with linear transition and emission can hold it exactly; see ``dmm_jax.kalman``) and
``sample_linear_gaussian`` samples sequences from it; ``nonlinear_ssm_data`` samples a 1-D
nonlinear SSM in the style of the paper's synthetic experiments. Every generator takes an
explicit seed and returns the true parameters beside the data.
"""

from __future__ import annotations

import numpy as np

from dmm_jax.data.arrays import SequenceArrays
from dmm_jax.kalman import LinearGaussianSSM


def linear_gaussian_ssm(
    seed: int,
    z_dim: int,
    obs_dim: int,
    input_dim: int = 0,
    inputs_to_emission: bool = False,
    spectral_radius: float = 0.9,
) -> LinearGaussianSSM:
    """A random stable SSM: A a scaled random rotation (|eigenvalues| = spectral_radius),
    Q = diag(U(0.2, 0.5)^2), R = diag(U(0.3, 0.6)^2), H ~ N(0, 1/Z), z_0 ~ N(0, 1), P_0 = 0."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(z_dim, z_dim)))
    return LinearGaussianSSM(
        initial_mean=rng.normal(size=z_dim),
        initial_cov=np.zeros((z_dim, z_dim)),
        transition_matrix=spectral_radius * rotation,
        transition_bias=0.1 * rng.normal(size=z_dim),
        transition_cov=np.diag(rng.uniform(0.2, 0.5, z_dim) ** 2),
        emission_matrix=rng.normal(size=(obs_dim, z_dim)) / np.sqrt(z_dim),
        emission_bias=0.5 * rng.normal(size=obs_dim),
        emission_cov=np.diag(rng.uniform(0.3, 0.6, obs_dim) ** 2),
        input_matrix=0.5 * rng.normal(size=(z_dim, input_dim)) if input_dim else None,
        emission_input_matrix=(
            0.5 * rng.normal(size=(obs_dim, input_dim))
            if input_dim and inputs_to_emission
            else None
        ),
    )


def sample_linear_gaussian(
    ssm: LinearGaussianSSM,
    seed: int,
    num_sequences: int,
    num_steps: int,
    *,
    missing: float = 0.0,
    min_length: int | None = None,
) -> SequenceArrays:
    """Sequences from ``ssm``: inputs ~ N(0, 1) when it has an input matrix, a fraction
    ``missing`` of the entries of x set to NaN, lengths uniform in min_length..num_steps
    (default: all num_steps)."""
    p = ssm
    rng = np.random.default_rng(seed)
    obs_dim = p.emission_matrix.shape[0]
    input_dim = 0 if p.input_matrix is None else p.input_matrix.shape[1]
    inputs = rng.normal(size=(num_sequences, num_steps, input_dim))
    chol_q = np.linalg.cholesky(p.transition_cov)
    chol_r = np.linalg.cholesky(p.emission_cov)
    z = rng.multivariate_normal(p.initial_mean, p.initial_cov, size=num_sequences)
    x = np.empty((num_sequences, num_steps, obs_dim))
    for t in range(num_steps):  # vectorized over sequences; only generation, never trained on
        z = z @ p.transition_matrix.T + p.transition_bias + rng.normal(size=z.shape) @ chol_q.T
        if input_dim:
            z = z + inputs[:, t] @ p.input_matrix.T
        x[:, t] = z @ p.emission_matrix.T + p.emission_bias
        x[:, t] += rng.normal(size=(num_sequences, obs_dim)) @ chol_r.T
        if p.emission_input_matrix is not None:
            x[:, t] += inputs[:, t] @ p.emission_input_matrix.T
    x[rng.random(x.shape) < missing] = np.nan
    lengths = None
    if min_length is not None:
        lengths = rng.integers(min_length, num_steps + 1, num_sequences)
    return SequenceArrays(x, lengths, inputs if input_dim else None, source="synthetic")


def nonlinear_ssm_data(
    seed: int,
    num_sequences: int,
    num_steps: int,
    *,
    alpha: float = 0.5,
    beta: float = -0.1,
    transition_scale: float = 1.0,
    emission_scale: float = 0.1,
) -> tuple[SequenceArrays, dict[str, float]]:
    """A 1-D nonlinear SSM, z_0 = 0:

        z_t ~ N(0.2 z_{t-1} + tanh(alpha z_{t-1}), transition_scale^2)
        x_t ~ N(0.5 z_t + tanh(beta z_t), emission_scale^2)

    Returns the data (x [N, T, 1]) and the true parameters.
    """
    rng = np.random.default_rng(seed)
    z = np.zeros(num_sequences)
    x = np.empty((num_sequences, num_steps, 1))
    for t in range(num_steps):
        z = 0.2 * z + np.tanh(alpha * z) + transition_scale * rng.normal(size=num_sequences)
        x[:, t, 0] = 0.5 * z + np.tanh(beta * z) + emission_scale * rng.normal(size=num_sequences)
    truth = {
        "alpha": alpha,
        "beta": beta,
        "transition_scale": transition_scale,
        "emission_scale": emission_scale,
    }
    return SequenceArrays(x, source="synthetic"), truth
