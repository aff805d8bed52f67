"""The batched adaptive solver (dmm_jax.odeint) against closed forms: linear ODEs and their
matrix exponentials, values and gradients."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import expm

from dmm_jax.odeint import odeint

A = jnp.array([[-0.3, 1.0, 0.0], [-1.0, -0.1, 0.2], [0.0, 0.3, -0.5]])
TIMES = jnp.array([[0.0, 0.4, 1.3, 2.0, 2.0], [0.5, 0.6, 0.7, 3.0, 4.5], [1.0, 1.0, 1.0, 1.0, 1.0]])
Y0 = jnp.array([[1.0, 0.0, -1.0], [0.3, 2.0, 0.5], [0.1, 0.2, 0.3]])


def linear(a, y):
    return y @ a.T


def exact(a, y0, times):
    """y(t) = expm(a (t - t_0)) y0 for every series and time, [B, T, S]."""
    gaps = times - times[:, :1]
    return jnp.einsum("btij,bj->bti", jax.vmap(jax.vmap(lambda g: expm(a * g)))(gaps), y0)


def test_linear_ode_equals_the_matrix_exponential_at_every_series_own_times():
    got = odeint(linear, A, Y0, TIMES, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(got, exact(A, Y0, TIMES), rtol=1e-5, atol=1e-6)


def test_at_the_default_tolerances_as_accurate_as_diffrax_solving_each_series_alone():
    got = odeint(linear, A, Y0, TIMES)  # rtol 1e-3, atol 1e-4
    want = exact(A, Y0, TIMES)
    assert jnp.all(jnp.abs(got - want) <= 5 * (1e-4 + 1e-3 * jnp.abs(want)))

    def alone(y0, times):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: A @ y),
            diffrax.Dopri5(),
            times[0],
            times[-1],
            None,
            y0,
            saveat=diffrax.SaveAt(ts=times),
            stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-4),
        ).ys

    reference = jax.vmap(alone)(Y0[:2], TIMES[:2])  # the third series never moves
    assert jnp.max(jnp.abs(got - want)) <= 1.25 * jnp.max(jnp.abs(reference - want[:2]))


def test_gradients_equal_those_of_the_matrix_exponential():
    weights = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 3))

    def loss(solution):
        return lambda a, y0: jnp.sum(weights * solution(a, y0))

    solver = loss(lambda a, y0: odeint(linear, a, y0, TIMES, rtol=1e-8, atol=1e-10))
    closed = loss(lambda a, y0: exact(a, y0, TIMES))
    got = jax.grad(solver, argnums=(0, 1))(A, Y0)
    want = jax.grad(closed, argnums=(0, 1))(A, Y0)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_a_fast_series_does_not_loosen_a_slow_ones_accuracy():
    """Every series is held to the tolerance: a slow series solved beside a fast one is as
    accurate as alone (the steps are those the most demanding series needs)."""
    rates = jnp.array([[0.5], [40.0]])
    field = lambda rate, y: -rate * y
    times = jnp.broadcast_to(jnp.linspace(0.0, 2.0, 9), (2, 9))
    y0 = jnp.ones((2, 1))
    both = odeint(field, rates, y0, times)
    alone = odeint(field, rates[:1], y0[:1], times[:1])
    want = jnp.exp(-rates[:, :, None] * times[..., None])
    assert jnp.all(jnp.abs(both - want) <= 5 * (1e-4 + 1e-3 * want))
    assert jnp.max(jnp.abs(both[0] - want[0])) <= jnp.max(jnp.abs(alone[0] - want[0])) + 1e-7


def test_too_few_steps_give_nan_not_a_wrong_path():
    got = odeint(linear, A * 50, Y0, TIMES, max_steps=3)
    assert jnp.isnan(got).all()  # a loss from it is NaN: the training update is dropped
    assert jnp.isfinite(odeint(linear, A * 50, Y0, TIMES)).all()
    assert jnp.isnan(odeint(lambda a, y: y @ a.T, A * jnp.nan, Y0, TIMES)).all()


def test_vmap_over_draws_equals_one_solve_per_draw():
    y0s = Y0[None] * jnp.array([1.0, -2.0, 0.5])[:, None, None]
    batched = jax.jit(jax.vmap(lambda y0: odeint(linear, A, y0, TIMES)))(y0s)
    for i in range(3):
        np.testing.assert_allclose(batched[i], odeint(linear, A, y0s[i], TIMES), rtol=1e-6)


@pytest.mark.parametrize("start", [0.0, 3.5])
def test_only_time_differences_matter(start):
    """The field is autonomous: shifting a series' times shifts nothing in its path."""
    got = odeint(linear, A, Y0, TIMES + start)
    np.testing.assert_allclose(got, odeint(linear, A, Y0, TIMES), rtol=1e-5, atol=1e-5)
