"""The Kalman filter against a brute-force joint Gaussian over all observations, with inputs,
missing entries (NaN and mask alike), padding and full covariances."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dmm_jax.kalman import LinearGaussianSSM, dmm_params, kalman_log_likelihood

RTOL = 2e-4  # the filter runs in float32, the reference in float64


def _random_spd(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.3 * np.eye(dim)


@pytest.fixture
def ssm():
    """Full (non-diagonal) covariances, a random start, inputs into both equations."""
    rng = np.random.default_rng(0)
    z, x, u = 2, 3, 2
    return LinearGaussianSSM(
        initial_mean=rng.normal(size=z),
        initial_cov=_random_spd(rng, z),
        transition_matrix=0.8 * np.linalg.qr(rng.normal(size=(z, z)))[0],
        transition_bias=rng.normal(size=z),
        transition_cov=_random_spd(rng, z),
        emission_matrix=rng.normal(size=(x, z)),
        emission_bias=rng.normal(size=x),
        emission_cov=_random_spd(rng, x),
        input_matrix=rng.normal(size=(z, u)),
        emission_input_matrix=rng.normal(size=(x, u)),
    )


def brute_force_log_likelihood(p, x, inputs, observed):
    """log N(x_observed; mean, cov) of the joint Gaussian of x_{1:T}, built from the model
    equations alone (no conditioning): Cov(z_s, z_t) = A^(t-s) Var(z_s) for s <= t."""
    num_steps, obs_dim = x.shape
    means, variances = [], []
    mean, var = p.initial_mean, p.initial_cov
    for t in range(num_steps):
        mean = p.transition_matrix @ mean + p.input_matrix @ inputs[t] + p.transition_bias
        var = p.transition_matrix @ var @ p.transition_matrix.T + p.transition_cov
        means.append(mean)
        variances.append(var)
    joint_mean = np.concatenate(
        [
            p.emission_matrix @ means[t] + p.emission_input_matrix @ inputs[t] + p.emission_bias
            for t in range(num_steps)
        ]
    )
    joint_cov = np.zeros((num_steps * obs_dim,) * 2)
    for s in range(num_steps):
        for t in range(s, num_steps):
            cross = np.linalg.matrix_power(p.transition_matrix, t - s) @ variances[s]
            block = p.emission_matrix @ cross @ p.emission_matrix.T  # Cov(x_t, x_s)
            if s == t:
                block = block + p.emission_cov
            joint_cov[t * obs_dim : (t + 1) * obs_dim, s * obs_dim : (s + 1) * obs_dim] = block
            joint_cov[s * obs_dim : (s + 1) * obs_dim, t * obs_dim : (t + 1) * obs_dim] = block.T
    keep = observed.reshape(-1)
    return stats.multivariate_normal(joint_mean[keep], joint_cov[np.ix_(keep, keep)]).logpdf(
        x.reshape(-1)[keep]
    )


def test_filter_matches_brute_force_joint_gaussian_with_missing_entries(ssm):
    rng = np.random.default_rng(1)
    batch, num_steps = 3, 5
    x = rng.normal(size=(batch, num_steps, 3))
    inputs = rng.normal(size=(batch, num_steps, 2))
    lengths = np.array([5, 3, 5])
    observed = rng.random(x.shape) > 0.3
    observed[0] = True  # one fully observed sequence
    observed[2, 1] = False  # a step with nothing observed
    observed &= np.arange(num_steps)[None, :, None] < lengths[:, None, None]
    x_nan = np.where(observed, x, np.nan)
    x_nan[1, 3:] = 123.0  # padding: never read

    want = [brute_force_log_likelihood(ssm, x[b], inputs[b], observed[b]) for b in range(batch)]
    params = LinearGaussianSSM(*(jnp.asarray(a, jnp.float32) for a in ssm))
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    by_nan = kalman_log_likelihood(params, f32(x_nan), jnp.asarray(lengths), f32(inputs))
    by_mask = kalman_log_likelihood(
        params, f32(x), jnp.asarray(lengths), f32(inputs), jnp.asarray(observed)
    )
    np.testing.assert_allclose(by_nan, want, rtol=RTOL)
    np.testing.assert_allclose(by_mask, want, rtol=RTOL)


def test_dmm_params_refuses_what_a_dmm_cannot_hold(ssm):
    with pytest.raises(ValueError, match="transition_cov must be diagonal"):
        dmm_params(ssm)
    diagonal = ssm._replace(
        transition_cov=np.diag(np.diag(ssm.transition_cov)),
        emission_cov=np.diag(np.diag(ssm.emission_cov)),
    )
    with pytest.raises(ValueError, match="initial_cov must be 0"):
        dmm_params(diagonal)
