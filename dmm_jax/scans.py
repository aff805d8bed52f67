"""The DMM's two recurrences with hand-written backward passes (``jax.custom_vjp``).

Only two things in a DMM are truly sequential: the inference RNN over x and the guide's draw
of z_t given z_{t-1}. Differentiating a ``lax.scan`` with autodiff keeps the weight-gradient
products inside the reverse loop, as many small [B, H] x [B, H] outer products as there are
steps. The backward passes below carry only the state cotangent through the loop (one small
matmul per step, like the forward) and compute every weight gradient afterwards as one large
matmul over all steps, which is what a CPU or GPU runs fastest. Values and gradients are those
of the plain scans; ``tests/test_scans.py`` checks both against autodiff.

Both loops run only over the steps some sequence of the batch still has (``num_steps``, a
traced count: ``active_steps``), not over the whole padded length, so padding a batch to a
coarse length bucket costs no sequential work. Steps past ``num_steps`` are padding for every
sequence; their outputs are fixed values (the RNN's start state, z = 0 with scale 1) that the
masks drop.

The weight gradients can also be summed over a batch's real steps only (``rows``: their flat
indices into the [T * B] rows, from ``dmm_jax.real_steps``), skipping the padded rows, whose
terms are zero.

All arrays here are time-major ([T, B, ...]) and in processing order.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from dmm_jax.real_steps import gather_rows

Array = jax.Array


def _shift_in(first: Array, states: Array) -> Array:
    """[first, s_0, ..., s_{T-2}]: the state each step started from."""
    return jnp.concatenate([first[None], states[:-1]], axis=0)


def active_steps(mask: Array) -> Array:
    """int32 count of leading steps up to the last one that is real in any sequence.

    mask: [B, T] (batch-major, True for real steps). For right-padded sequences this is the
    longest length; steps past it are padding for every sequence.
    """
    num_steps = mask.shape[1]
    any_real = jnp.any(mask, axis=0)
    return jnp.max(jnp.where(any_real, jnp.arange(1, num_steps + 1), 0)).astype(jnp.int32)


def _padding_steps(num_steps: Array, total: int) -> Array:
    """[T, 1, 1] bool, True at steps t >= num_steps."""
    return (jnp.arange(total) >= num_steps)[:, None, None]


def _outer_sum(a: Array, b: Array, rows: Array | None = None) -> Array:
    """sum over (t, b) of a[t, b]^T b[t, b]: one [T*B, I]^T x [T*B, J] matmul, or over the
    ``rows`` only (where the other rows of ``b`` are zero)."""
    if rows is not None:
        return gather_rows(a, rows).T @ gather_rows(b, rows)
    return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])


# ----------------------------------------------------------------------------- Elman RNN

ELMAN_ACTIVATIONS = ("relu", "capped-relu", "soft-capped-relu", "tanh")
# The cap of "capped-relu": above the states of healthy training after its first epochs (on
# JSB about 1.5 at most, the 99.9th percentile under 1); below it, the reference's ReLU exactly.
RELU_CAP = 4.0


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def reverse_elman_scan(
    x_proj: Array,
    keep: Array,
    h_start: Array,
    w_hh: Array,
    b_hh: Array,
    num_steps: Array,
    rows: Array | None = None,
    activation: str = "relu",
) -> Array:
    """An Elman RNN run backward in time, from t = num_steps-1 down to 0:

        h_t = act(x_proj_t + h_{t+1} W_hh + b_hh) where keep_t, else h_{t+1};  h_T = h_start.

    Args:
        x_proj: input projections [T, B, H] (x_t W_ih + b_ih, computed outside the loop).
        keep: [T, B, 1] bool, False on padded steps (the state passes through unchanged).
        h_start: [B, H]. w_hh: [H, H]. b_hh: [H].
        num_steps: int32 scalar; ``keep`` must be False at every step t >= num_steps (see
            ``active_steps``), where the state is h_start without running the loop.
        rows: optional [R] int32 flat indices (t * B + b) of every step where ``keep`` is
            True (out-of-range filler allowed); W_hh's gradient is then summed over them only.
        activation: "relu" (the reference's; the state is unbounded and can grow without
            limit over long sequences), "capped-relu" (min(relu(.), RELU_CAP): the same until a
            state reaches the cap), "soft-capped-relu" (``soft_capped_relu``: the same below
            the cap, logarithmic above it, so no unit loses its gradient) or "tanh" (the
            state stays in [-1, 1]).

    Returns:
        states h_t [T, B, H], in time order.
    """
    return _elman_forward(x_proj, keep, h_start, w_hh, b_hh, num_steps, rows, activation)[0]


def soft_capped_relu(v: Array) -> Array:
    """relu(v) up to RELU_CAP, RELU_CAP + log(1 + v - RELU_CAP) above it.

    Its slope above the cap, 1 / (1 + v - cap) = exp(cap - h), never reaches zero (a hard
    cap's is zero, so a unit held there stops learning), and the state still cannot grow
    without bound: h_t ~ cap + log(|W| h_{t+1}) has a finite fixed point for any weights.
    """
    excess = jnp.maximum(v - RELU_CAP, 0.0)
    return jnp.where(v > RELU_CAP, RELU_CAP + jnp.log1p(excess), jax.nn.relu(v))


def elman_activation(name: str):
    """The Elman cell's nonlinearity called ``name`` (one of ``ELMAN_ACTIVATIONS``)."""
    if name not in ELMAN_ACTIVATIONS:
        raise ValueError(f"activation must be one of {ELMAN_ACTIVATIONS}, got {name!r}")
    return {
        "relu": jax.nn.relu,
        "capped-relu": lambda v: jnp.clip(v, 0.0, RELU_CAP),
        "soft-capped-relu": soft_capped_relu,
        "tanh": jnp.tanh,
    }[name]


def _elman_forward(x_proj, keep, h_start, w_hh, b_hh, num_steps, rows, activation):
    act = elman_activation(activation)

    def step(i, carry):
        h, states = carry
        t = num_steps - 1 - i
        xp_t = jax.lax.dynamic_index_in_dim(x_proj, t, keepdims=False)
        keep_t = jax.lax.dynamic_index_in_dim(keep, t, keepdims=False)
        h = jnp.where(keep_t, act(xp_t + h @ w_hh + b_hh), h)
        return h, jax.lax.dynamic_update_index_in_dim(states, h, t, 0)

    states = jnp.broadcast_to(h_start, x_proj.shape).astype(x_proj.dtype)
    _, states = jax.lax.fori_loop(0, num_steps, step, (h_start, states))
    return states, (states, keep, h_start, w_hh, num_steps, rows)


def _elman_backward(activation, residuals, g_states):
    states, keep, h_start, w_hh, num_steps, rows = residuals
    # The activation's derivative from its output: relu' = [h > 0], tanh' = 1 - h^2, the soft
    # cap's exp(cap - h) above the cap.
    if activation == "relu":
        slope = (keep & (states > 0)).astype(states.dtype)
    elif activation == "capped-relu":
        slope = (keep & (states > 0) & (states < RELU_CAP)).astype(states.dtype)
    elif activation == "soft-capped-relu":
        slope = jnp.where(keep & (states > 0), jnp.exp(jnp.minimum(RELU_CAP - states, 0.0)), 0.0)
    else:
        slope = jnp.where(keep, 1.0 - states * states, 0.0)
    w_hh_t = w_hh.T

    def step(t, carry):
        dh_next, d_pre_all = carry
        dh = jax.lax.dynamic_index_in_dim(g_states, t, keepdims=False) + dh_next
        slope_t = jax.lax.dynamic_index_in_dim(slope, t, keepdims=False)
        keep_t = jax.lax.dynamic_index_in_dim(keep, t, keepdims=False)
        d_pre = jnp.where(keep_t, dh * slope_t, 0.0)
        dh_prev = jnp.where(keep_t, d_pre @ w_hh_t, dh)
        return dh_prev, jax.lax.dynamic_update_index_in_dim(d_pre_all, d_pre, t, 0)

    init = (jnp.zeros_like(h_start), jnp.zeros_like(g_states))
    dh_start, d_pre = jax.lax.fori_loop(0, num_steps, step, init)
    # Steps past num_steps hold h_start itself: their cotangents go straight to it.
    padding = _padding_steps(num_steps, g_states.shape[0])
    dh_start = dh_start + jnp.sum(jnp.where(padding, g_states, 0.0), axis=0)
    # The state each step started from: h_{t+1}, with h_T = h_start.
    previous = jnp.concatenate([states[1:], h_start[None]], axis=0)
    dw_hh = _outer_sum(previous, d_pre, rows)  # d_pre is 0 where keep is False
    return d_pre, None, dh_start, dw_hh, jnp.sum(d_pre, axis=(0, 1)), None, None


reverse_elman_scan.defvjp(_elman_forward, _elman_backward)


# ----------------------------------------------------------------------------- guide chain


_WIDER = 16  # extra output columns of the sampling loop's z_{t-1} W_z matmul, never read


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def combiner_scan(
    z_start: Array,
    hidden: Array,
    noise: Array,
    w_z: Array,
    b_z: Array,
    w_out: Array,
    b_out: Array,
    num_steps: Array,
    rows: Array | None = None,
    mix: float = 0.5,
) -> tuple[Array, Array]:
    """Draws z_{1:T} from the combiner chain, reparameterized by ``noise``.

        u_t = tanh(z_{t-1} W_z + b_z),  c_t = mix * (u_t + h_t)
        [loc_t, a_t] = c_t W_out + b_out,  scale_t = softplus(a_t)
        z_t = loc_t + scale_t * noise_t

    Args:
        z_start: [B, Z]. hidden: [T, B, H]. noise: [T, B, Z].
        w_z: [Z, H]. b_z: [H]. w_out: [H, 2Z] (loc and scale columns side by side). b_out: [2Z].
        num_steps: int32 scalar, the steps to draw; steps t >= num_steps (padding for every
            sequence) get z_t = 0 and scale_t = 1, constants that carry no gradient.
        rows: optional [R] int32 flat indices (t * B + b) of the real steps (out-of-range
            filler allowed): the weight gradients are then summed over them only, which is
            exact when the cotangents of z and scale are zero on every other step (masked).
        mix: a Python float, 1/2 for ST-R/ST-L (h_t one RNN state) and 1/3 for ST-LR (h_t the
            sum of the two directions' states), so c_t is the average of its terms.

    Returns:
        (z, scale), each [T, B, Z].
    """
    args = (z_start, hidden, noise, w_z, b_z, w_out, b_out, num_steps, rows)
    return _combiner_forward(*args, mix)[0]


def _combiner_forward(z_start, hidden, noise, w_z, b_z, w_out, b_out, num_steps, rows, mix=0.5):
    z_dim, hidden_dim = w_z.shape
    # The matmul's output is wider than z_{t-1} W_z so that it cannot share a buffer with the
    # tanh's: XLA's CPU loop emitters would write the tanh in place over it, and LLVM runs a
    # kernel whose output overlaps an input as scalar code (its vector loop is guarded by a
    # runtime alias check). A copy of this loop run forward only on a JSB batch (20 x 600),
    # per step: 123 us, against 207 us in place and 131 us with the fusion emitters.
    w_z_wide = jnp.pad(w_z, ((0, 0), (0, _WIDER)))

    def step(t, carry):
        z_prev, z_all, scale_all, scale_pre_all, z_proj_all = carry
        h_t = jax.lax.dynamic_index_in_dim(hidden, t, keepdims=False)
        eps_t = jax.lax.dynamic_index_in_dim(noise, t, keepdims=False)
        z_proj = (z_prev @ w_z_wide)[..., :hidden_dim]
        u = jnp.tanh(z_proj + b_z)
        out = (mix * (u + h_t)) @ w_out + b_out
        scale = jax.nn.softplus(out[..., z_dim:])
        z = out[..., :z_dim] + scale * eps_t
        update = jax.lax.dynamic_update_index_in_dim
        return (
            z,
            update(z_all, z, t, 0),
            update(scale_all, scale, t, 0),
            update(scale_pre_all, out[..., z_dim:], t, 0),
            update(z_proj_all, z_proj, t, 0),
        )

    # Padded steps keep these fills: z = 0, scale = softplus(log(e - 1)) = 1, z W_z = 0.
    init = (
        z_start,
        jnp.zeros_like(noise),
        jnp.ones_like(noise),
        jnp.full_like(noise, math.log(math.e - 1.0)),
        jnp.zeros_like(hidden),
    )
    _, z, scale, scale_pre, z_proj = jax.lax.fori_loop(0, num_steps, step, init)
    # z_{t-1} W_z is kept for the backward pass (one [T, B, H] residual), which then needs no
    # batched matmul to rebuild u_t.
    residuals = (
        z_start,
        hidden,
        noise,
        w_z,
        b_z,
        w_out,
        z,
        scale,
        scale_pre,
        z_proj,
        num_steps,
        rows,
    )
    return (z, scale), residuals


def _combiner_backward(mix, residuals, cotangents):
    z_start, hidden, noise, w_z, b_z, w_out, z, scale, scale_pre, z_proj, num_steps, rows = (
        residuals
    )
    padding = _padding_steps(num_steps, z.shape[0])
    # The padded steps' outputs are constants: whatever reaches them goes nowhere.
    g_z, g_scale = (jnp.where(padding, 0.0, g) for g in cotangents)
    w_out_t, w_z_t = w_out.T, w_z.T
    z_prev = _shift_in(z_start, z)
    u = jnp.tanh(z_proj + b_z)
    d_tanh = 1.0 - u**2
    d_softplus = jax.nn.sigmoid(scale_pre)
    # The scale's cotangent from outside the chain does not depend on the carry: hoist it.
    g_scale_pre = g_scale * d_softplus

    def d_output(dz, eps, d_softplus, g_scale_pre):
        return jnp.concatenate([dz, dz * eps * d_softplus + g_scale_pre], axis=-1)

    def step(i, carry):
        dz_next, dz_all, d_c_all = carry
        t = num_steps - 1 - i
        at = functools.partial(jax.lax.dynamic_index_in_dim, index=t, keepdims=False)
        dz = at(g_z) + dz_next
        d_c = d_output(dz, at(noise), at(d_softplus), at(g_scale_pre)) @ w_out_t
        dz_prev = (mix * d_c * at(d_tanh)) @ w_z_t
        update = jax.lax.dynamic_update_index_in_dim
        return dz_prev, update(dz_all, dz, t, 0), update(d_c_all, d_c, t, 0)

    # Only the carry's path runs step by step; what else the gradients need is rebuilt
    # from (dz, d_c) in batched ops, which also keeps fewer [T, B, H] arrays alive.
    init = (jnp.zeros_like(z_start), jnp.zeros_like(g_z), jnp.zeros_like(hidden))
    dz_start, dz, d_c = jax.lax.fori_loop(0, num_steps, step, init)
    d_hidden, d_noise = mix * d_c, dz * scale
    if rows is not None:  # the weight gradients' terms on the real steps only
        z_prev, u, hidden, d_c, d_tanh, dz, noise, d_softplus, g_scale_pre = (
            gather_rows(a, rows)
            for a in (z_prev, u, hidden, d_c, d_tanh, dz, noise, d_softplus, g_scale_pre)
        )
    d_out = d_output(dz, noise, d_softplus, g_scale_pre)
    d_a = mix * d_c * d_tanh
    c = mix * (u + hidden)
    return (
        dz_start,
        d_hidden,
        d_noise,
        _outer_sum(z_prev, d_a),
        jnp.sum(d_a, axis=tuple(range(d_a.ndim - 1))),
        _outer_sum(c, d_out),
        jnp.sum(d_out, axis=tuple(range(d_out.ndim - 1))),
        None,  # num_steps
        None,  # rows
    )


combiner_scan.defvjp(_combiner_forward, _combiner_backward)


def scan_up_to(step, carry, inputs, num_steps: Array | None, fill=0.0):
    """``lax.scan(step, carry, inputs)`` over time-major ``inputs`` whose results count only
    for t < ``num_steps`` (the batch's longest sequence; None: every step). Past it, where
    every sequence is padding, the carry is kept and the outputs are the constants ``fill``
    (one per output, or one for all).

    Every step runs and its results are selected, rather than skipped with a ``lax.cond``:
    under differentiation a cond inside a scan hands the weights its branch closes over to
    the backward pass as per-step residuals, a copy of every weight matrix per time step
    (2.1 MiB per step for the default VRNN, whatever the batch size).
    """
    if num_steps is None:
        return jax.lax.scan(step, carry, inputs)
    total = jax.tree.leaves(inputs)[0].shape[0]
    example = jax.eval_shape(step, carry, jax.tree.map(lambda a: a[0], inputs))[1]
    fills = fill if isinstance(fill, tuple) else (fill,) * len(jax.tree.leaves(example))
    if len(fills) != len(jax.tree.leaves(example)):
        raise ValueError(f"{len(fills)} fill values for {len(jax.tree.leaves(example))} outputs")
    filled = jax.tree.unflatten(
        jax.tree.structure(example),
        [jnp.full(o.shape, v, o.dtype) for o, v in zip(jax.tree.leaves(example), fills)],
    )

    def body(carry, indexed):
        t, x = indexed
        live = t < num_steps
        stepped, out = step(carry, x)
        keep = functools.partial(jnp.where, live)
        return jax.tree.map(keep, stepped, carry), jax.tree.map(keep, out, filled)

    return jax.lax.scan(body, carry, (jnp.arange(total), inputs))
