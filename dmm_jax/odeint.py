"""A batch of ODE solutions at every series' own times: Dormand-Prince 5(4) with adaptive
steps, one step size for the whole batch, gradients by a reverse sweep over the accepted
steps.

    path = odeint(field, params, y0 [B, S], times [B, T], rtol, atol, max_steps)

solves dy/dt = field(params, y) (autonomous: the field does not read t) for every series b
from y(times[b, 0]) = y0[b] and returns y at each of its times, [B, T, S].

Why not one adaptive solve per series (``jax.vmap`` of ``diffrax.diffeqsolve``): a batched
while loop runs until the slowest series is done anyway, and differentiating through a
general-purpose solver loop (checkpointed carries, save buffers) cost about 1.75 times this
solver's gradient on the Latent ODE's batches (docs/RESULTS.md). This solver:

- shifts every series to start at 0 (the field is autonomous, so y depends on t - t_0 only)
  and takes the same steps for all of them, each accepted when the error of *every* series
  is within tolerance (the maximum over series of the per-series RMS of
  error / (atol + rtol |y|)): no series is solved less accurately than on its own;
- keeps y, dy/dt and the solution at the middle of each accepted step, and reads the values
  at the query times off the quartic through them (Dopri5's fourth-order dense output, as
  torchdiffeq interpolates);
- differentiates the discrete solution (as backpropagation through the solver's operations
  would, "discretise then optimise"): a ``jax.custom_vjp`` whose backward pass runs the
  accepted steps in reverse, one vector-Jacobian product of a step each, the step sizes held
  fixed.

A solve that needs more than ``max_steps`` steps returns NaN (a training update with a NaN
loss is dropped and counted) instead of a wrong path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Field = Callable[[object, Array], Array]  # (params, y [B, S]) -> dy/dt [B, S]

# Dormand & Prince (1980) 5(4): stage weights a, 5th-order weights b and the difference from
# the embedded 4th-order weights (the error estimate); the nodes c are not needed, the field
# being autonomous.
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_B_ERROR = (  # b - b*, the last entry for the stage at y1 (first-same-as-last)
    35 / 384 - 5179 / 57600,
    0.0,
    500 / 1113 - 7571 / 16695,
    125 / 192 - 393 / 640,
    -2187 / 6784 + 92097 / 339200,
    11 / 84 - 187 / 2100,
    -1 / 40,
)
# The solution at the middle of a step from its stages (Shampine 1986): with y0, y1 and the
# slopes at both ends it fixes the quartic that interpolates within the step (4th order).
_B_MID = (
    6025192743 / 30085553152 / 2,
    0.0,
    51252292925 / 65400821598 / 2,
    -2691868925 / 45128329728 / 2,
    187940372067 / 1594534317056 / 2,
    -1776094331 / 19743644256 / 2,
    11237099 / 235043384 / 2,
)
_ORDER = 5  # the error estimate's order: step factors go as error^(-1/5)
_SAFETY, _FACTOR_MIN, _FACTOR_MAX = 0.9, 0.2, 10.0


def _step(field: Field, params, y: Array, f0: Array, h: Array) -> tuple[Array, ...]:
    """One Dormand-Prince step of size h (a scalar) from y with f0 = field(y): returns (y1,
    field(y1), the error estimate, the solution at the step's middle)."""
    ks = [f0]
    for a_row in _A[1:]:
        ks.append(field(params, y + h * sum(a * k for a, k in zip(a_row, ks) if a)))
    y1 = y + h * sum(b * k for b, k in zip(_B, ks) if b)
    ks.append(field(params, y1))
    error = h * sum(e * k for e, k in zip(_B_ERROR, ks) if e)
    middle = y + h * sum(b * k for b, k in zip(_B_MID, ks) if b)
    return y1, ks[-1], error, middle


def _rms(a: Array) -> Array:
    """The largest over series of the RMS over a series' entries."""
    return jnp.sqrt(jnp.max(jnp.mean(a**2, axis=-1)))


def _error_norm(error: Array, y0: Array, y1: Array, rtol: float, atol: float) -> Array:
    """max over series of the RMS of error / (atol + rtol max(|y0|, |y1|))."""
    return _rms(error / (atol + rtol * jnp.maximum(jnp.abs(y0), jnp.abs(y1))))


def _initial_step(field, params, y0, f0, rtol, atol) -> Array:
    """Hairer, Norsett & Wanner's starting step (Solving ODEs I, II.4)."""
    scale = atol + rtol * jnp.abs(y0)
    d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
    d2 = _rms((field(params, y0 + h0 * f0) - f0) / scale) / h0
    h1 = jnp.where(
        jnp.maximum(d1, d2) <= 1e-15,
        jnp.maximum(1e-6, h0 * 1e-3),
        (0.01 / jnp.maximum(d1, d2)) ** (1.0 / _ORDER),
    )
    return jnp.minimum(100 * h0, h1)


def _solve_steps(field, params, y0, t_end, rtol, atol, max_steps):
    """The accepted steps from 0 to t_end: times [K + 1]; y, field(y) and the solution at the
    middle of the step that starts there, [K + 1, B, S] (entries past the last step repeat
    it); the number of steps (-1: did not finish)."""
    f0 = field(params, y0)
    slots = max_steps + 1
    ts = jnp.full((slots,), t_end, y0.dtype).at[0].set(0.0)
    ys = jnp.zeros((slots, *y0.shape), y0.dtype).at[0].set(y0)
    fs = jnp.zeros((slots, *y0.shape), y0.dtype).at[0].set(f0)
    mids = jnp.zeros((slots, *y0.shape), y0.dtype)
    h0 = jnp.minimum(_initial_step(field, params, y0, f0, rtol, atol), t_end)

    def running(carry):
        t, _, _, h, n, attempts, *_ = carry
        return (t < t_end) & (n < max_steps) & (attempts < 4 * max_steps) & jnp.isfinite(h)

    def attempt(carry):
        t, y, f, h, n, attempts, ts, ys, fs, mids = carry
        last = h >= t_end - t
        h = jnp.where(last, t_end - t, h)
        y1, f1, error, middle = _step(field, params, y, f, h)
        norm = _error_norm(error, y, y1, rtol, atol)
        accept = norm <= 1.0
        factor = jnp.clip(
            _SAFETY * jnp.where(norm > 0, norm, 1e-10) ** (-1.0 / _ORDER), _FACTOR_MIN, _FACTOR_MAX
        )
        factor = jnp.where(accept, factor, jnp.minimum(factor, 1.0))
        factor = jnp.where(jnp.isfinite(norm), factor, jnp.nan)  # NaN h ends the loop
        n1 = n + accept
        t1 = jnp.where(accept, jnp.where(last, t_end, t + h), t)
        # The middle of an accepted step belongs to its start, slot n.
        mids = mids.at[n].set(jnp.where(accept, middle, mids[n]))
        y, f = jnp.where(accept, y1, y), jnp.where(accept, f1, f)
        # Slot n1 is the new step, or (rejected: n1 = n) the current one written again.
        ts, ys, fs = ts.at[n1].set(t1), ys.at[n1].set(y), fs.at[n1].set(f)
        return t1, y, f, h * factor, n1, attempts + 1, ts, ys, fs, mids

    carry = (jnp.zeros((), y0.dtype), y0, f0, h0, jnp.int32(0), jnp.int32(0), ts, ys, fs, mids)
    t, y, f, _, n, _, ts, ys, fs, mids = jax.lax.while_loop(running, attempt, carry)
    # Slots past the last step repeat it (a query at t_end reads a zero-length interval).
    after = jnp.arange(slots)[:, None, None] > n
    ys, fs, mids = jnp.where(after, y, ys), jnp.where(after, f, fs), jnp.where(after, y, mids)
    return ts, ys, fs, mids, jnp.where(t >= t_end, n, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5, 6))
def _steps(field, params, y0, t_end, rtol, atol, max_steps):
    return _solve_steps(field, params, y0, t_end, rtol, atol, max_steps)


def _steps_forward(field, params, y0, t_end, rtol, atol, max_steps):
    ts, ys, fs, mids, n = _solve_steps(field, params, y0, t_end, rtol, atol, max_steps)
    return (ts, ys, fs, mids, n), (params, ts, ys, n)


def _steps_backward(field, rtol, atol, max_steps, residuals, cotangents):
    """The reverse sweep: the cotangent of y_j is that of the outputs y_j, f(y_j) and the
    middle of step j, plus what flows back through that step to y_{j+1} (its size fixed at
    t_{j+1} - t_j)."""
    del rtol, atol, max_steps
    params, ts, ys, n = residuals
    _, ct_ys, ct_fs, ct_mids, _ = cotangents
    n = jnp.maximum(n, 0)
    g_params, a = jax.vjp(field, params, ys[n])[1](ct_fs[n])
    a = a + ct_ys[n]

    def back(i, carry):
        g_params, a = carry
        j = n - 1 - i

        def step(p, y):
            f0 = field(p, y)
            y1, _, _, middle = _step(field, p, y, f0, ts[j + 1] - ts[j])
            return y1, f0, middle

        dp, dy = jax.vjp(step, params, ys[j])[1]((a, ct_fs[j], ct_mids[j]))
        return jax.tree_util.tree_map(jnp.add, g_params, dp), dy + ct_ys[j]

    g_params, a = jax.lax.fori_loop(0, n, back, (g_params, a))
    return g_params, a, jnp.zeros_like(ts[0])


_steps.defvjp(_steps_forward, _steps_backward)


def odeint(
    field: Field,
    params,
    y0: Array,
    times: Array,
    *,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    max_steps: int = 512,
) -> Array:
    """y [B, T, S] at ``times`` [B, T] (non-decreasing per series; y(times[:, 0]) = y0 [B, S])
    of dy/dt = field(params, y); module docstring."""
    shifted = times - times[:, :1]
    t_end = jax.lax.stop_gradient(jnp.max(shifted))
    ts, ys, fs, mids, n = _steps(field, params, y0, t_end, rtol, atol, max_steps)
    # The step around each query time: ts[k] <= t < ts[k + 1] (k = n - 1 at t = t_end).
    k = jnp.clip(jnp.searchsorted(ts, shifted, side="right") - 1, 0, jnp.maximum(n - 1, 0))
    h = (ts[k + 1] - ts[k])[..., None]
    x = jnp.where(h > 0, (shifted - ts[k])[..., None] / jnp.where(h > 0, h, 1.0), 0.0)

    series = jnp.arange(k.shape[0])[:, None]

    def at(buffer, index):  # buffer [K + 1, B, S], index [B, T] -> [B, T, S], no transpose
        return buffer[index, series]

    y_lo, y_hi, mid = at(ys, k), at(ys, k + 1), at(mids, k)
    f_lo, f_hi = at(fs, k), at(fs, k + 1)
    # The quartic through y_lo, mid, y_hi with slopes f_lo, f_hi at its ends, x = (t - t_k) / h.
    c4 = 2 * h * (f_hi - f_lo) - 8 * (y_hi + y_lo) + 16 * mid
    c3 = h * (5 * f_lo - 3 * f_hi) + 18 * y_lo + 14 * y_hi - 32 * mid
    c2 = h * (f_hi - 4 * f_lo) - 11 * y_lo - 5 * y_hi + 16 * mid
    path = y_lo + x * (h * f_lo + x * (c2 + x * (c3 + x * c4)))
    return jnp.where(n >= 0, path, jnp.nan)
