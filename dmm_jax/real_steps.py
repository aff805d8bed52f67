"""The real steps of a padded batch, so that per-step networks run on those rows only.

A mini-batch of B sequences padded to T steps holds B * T rows, and with random mini-batches
fewer than half are real (JSB: 13,807 real steps in about 31,600 padded rows per epoch). Every
per-step term (transition, emitter, the encoder's input projection, the weight gradients of
the two recurrences) costs the same on a padded row as on a real one. ``RealSteps`` lists the
real rows, up to a static ``capacity``: networks run on the gathered [R, ...] rows and their
outputs are put back in [B, T, ...] with a fixed fill on padded steps, which the masks
drop as before. Values and gradients on real steps are the same numbers as the dense
computation (up to float summation order); only the padded rows' work is gone.

Unused slots (capacity above the batch's real steps) hold the index B * T, out of range:
they gather zeros and what they would write back is dropped.

No scatter is left in the compiled step: XLA's CPU backend runs a scatter (and the scatter-add
that differentiates a gather) as a loop with one iteration per row, ten such loops of 1,664
iterations in a JSB training step before this. Each step's slot (``RealSteps.*_slots``, the
inverse of the row indices) turns the scatter into a gather, and custom VJPs make every
transpose a gather too: gathering rows by ``index`` and gathering slots by ``slots`` are each
other's transposes, since every real step sits in exactly one slot.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class RealSteps(NamedTuple):
    """Flat row indices of a batch's real steps, in sequence order, then out-of-range filler,
    and for every row of the batch its slot among them.

    batch_major: [R] int32, b * T + t (rows of a [B, T, ...] array).
    time_major: [R] int32, t * B + b (rows of a [T, B, ...] array), the same steps.
    batch_major_slots: [B * T] int32, the slot r of row b * T + t in ``batch_major``, R where
        the step is padding.
    time_major_slots: [T * B] int32, the same for the rows t * B + b.
    """

    batch_major: Array
    time_major: Array
    batch_major_slots: Array
    time_major_slots: Array


def real_steps(lengths: np.ndarray, num_steps: int, capacity: int) -> RealSteps:
    """The real steps of a batch with ``lengths`` [B] padded to ``num_steps``, on the host.

    Raises ValueError when the batch has more real steps than ``capacity``.
    """
    lengths = np.minimum(np.asarray(lengths, np.int64), num_steps)
    batch = lengths.shape[0]
    total = int(lengths.sum())
    if total > capacity:
        raise ValueError(f"the batch has {total} real steps, more than capacity={capacity}")
    b = np.repeat(np.arange(batch), lengths)
    t = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    filler = np.full(capacity - total, batch * num_steps)
    batch_major = np.concatenate([b * num_steps + t, filler]).astype(np.int32)
    time_major = np.concatenate([t * batch + b, filler]).astype(np.int32)
    return RealSteps(
        batch_major,
        time_major,
        _slots(batch_major[:total], batch * num_steps, capacity),
        _slots(time_major[:total], batch * num_steps, capacity),
    )


def grouped_real_steps(
    lengths: np.ndarray, num_steps: int, capacity: int, groups: int
) -> RealSteps:
    """``real_steps`` of each of ``groups`` consecutive, equal groups of the batch's sequences
    (the micro-batches of ``dmm_jax.step.microbatched_update``), stacked: every field gets a
    leading [groups] axis, and group g's indices address its own [B / groups, T] rows.

    ``capacity`` is per group. Raises ValueError when ``groups`` does not divide the batch or
    a group has more real steps than ``capacity``.
    """
    lengths = np.asarray(lengths)
    if groups < 1 or lengths.shape[0] % groups:
        raise ValueError(f"{groups} groups do not split a batch of {lengths.shape[0]} sequences")
    per_group = [real_steps(g, num_steps, capacity) for g in np.split(lengths, groups)]
    return RealSteps(*(np.stack(field) for field in zip(*per_group)))


def _slots(rows: np.ndarray, num_rows: int, capacity: int) -> np.ndarray:
    """[num_rows] int32: slot r where rows[r] == n, ``capacity`` (the fill slot) elsewhere."""
    slots = np.full(num_rows, capacity, np.int32)
    slots[rows] = np.arange(len(rows), dtype=np.int32)
    return slots


def gather_rows(a: Array, index: Array, slots: Array | None = None) -> Array:
    """Rows ``index`` of ``a`` [N1, N2, ...] flattened to [N1 * N2, ...]; out-of-range rows
    read 0.

    With ``slots`` (each row's slot in ``index``, as in ``RealSteps``) the gradient is a
    gather by ``slots`` instead of a scatter-add; without, it is the scatter-add.
    """
    flat = a.reshape(-1, *a.shape[2:])
    if slots is None or not jnp.issubdtype(flat.dtype, jnp.inexact):
        return _read_rows(flat, index)
    return _gather_rows_by_slot(flat, index, slots)


def scatter_rows(
    rows: Array, index: Array, leading: tuple[int, int], fill: float, slots: Array | None = None
) -> Array:
    """[R, ...] rows written to the ``index`` rows of a ``leading + ...`` array filled with
    ``fill``; out-of-range rows are dropped.

    With ``slots`` this is a gather of ``rows`` by ``slots`` (and its gradient a gather by
    ``index``), not a scatter.
    """
    if slots is None:
        flat = jnp.full((leading[0] * leading[1], *rows.shape[1:]), fill, rows.dtype)
        flat = flat.at[index].set(rows, mode="drop")
    else:
        flat = _scatter_rows_by_slot(rows, index, slots, fill)
    return flat.reshape(*leading, *rows.shape[1:])


def _read_rows(flat: Array, index: Array) -> Array:
    return flat.at[index].get(mode="fill", fill_value=0)


def _read_slots(rows: Array, slots: Array, fill: float) -> Array:
    """rows [R, ...] with one ``fill`` row appended (slot R), read at ``slots``.

    Every slot is in range, so the gather needs no bounds check: a fill-mode gather
    (``mode="fill"``) gave the same loss but a slower JSB update (91-96 ms against 82-93 ms,
    min of 22, three alternating pairs).
    """
    fill_row = jnp.full((1, *rows.shape[1:]), fill, rows.dtype)
    return jnp.concatenate([rows, fill_row]).at[slots].get(mode="promise_in_bounds")


@jax.custom_vjp
def _gather_rows_by_slot(flat: Array, index: Array, slots: Array) -> Array:
    return _read_rows(flat, index)


def _gather_rows_by_slot_fwd(flat, index, slots):
    return _read_rows(flat, index), slots


def _gather_rows_by_slot_bwd(slots, g_rows):
    return _read_slots(g_rows, slots, 0.0), None, None


_gather_rows_by_slot.defvjp(_gather_rows_by_slot_fwd, _gather_rows_by_slot_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _scatter_rows_by_slot(rows: Array, index: Array, slots: Array, fill: float) -> Array:
    return _read_slots(rows, slots, fill)


def _scatter_rows_by_slot_fwd(rows, index, slots, fill):
    return _read_slots(rows, slots, fill), index


def _scatter_rows_by_slot_bwd(fill, index, g_flat):
    return _read_rows(g_flat, index), None, None


_scatter_rows_by_slot.defvjp(_scatter_rows_by_slot_fwd, _scatter_rows_by_slot_bwd)


def per_real_step(
    fn: Callable[..., Any], steps: RealSteps | None, *arrays: Array | None, fill: Any = 0.0
) -> Any:
    """``fn(*arrays)`` for batch-major [B, T, ...] inputs, run on the real steps only.

    With ``steps`` None this is ``fn(*arrays)``. Otherwise each output array is [B, T, ...]
    with ``fill`` on padded steps (a float, or one per output: e.g. (0.0, 1.0) for a
    (loc, scale) pair, so padded steps hold a valid distribution). ``None`` inputs pass
    through as None.
    """
    if steps is None:
        return fn(*arrays)
    leading = next(a for a in arrays if a is not None).shape[:2]
    index, slots = steps.batch_major, steps.batch_major_slots
    rows = [None if a is None else gather_rows(a, index, slots) for a in arrays]
    out = fn(*rows)
    leaves, tree = jax.tree.flatten(out)
    fills = fill if isinstance(fill, tuple) else (fill,) * len(leaves)
    if len(fills) != len(leaves):
        raise ValueError(f"{len(fills)} fill values for {len(leaves)} outputs")
    dense = [scatter_rows(r, index, leading, f, slots) for r, f in zip(leaves, fills)]
    return jax.tree.unflatten(tree, dense)
