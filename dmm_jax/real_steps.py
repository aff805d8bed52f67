"""The real steps of a padded batch, so that per-step networks run on those rows only.

A mini-batch of B sequences padded to T steps holds B * T rows, and with random mini-batches
fewer than half are real (JSB: 13,807 real steps in about 31,600 padded rows per epoch). Every
per-step term (transition, emitter, the encoder's input projection, the weight gradients of
the two recurrences) costs the same on a padded row as on a real one. ``RealSteps`` lists the
real rows, up to a static ``capacity``: networks run on the gathered [R, ...] rows and their
outputs are scattered back to [B, T, ...] with a fixed fill on padded steps, which the masks
drop as before. Values and gradients on real steps are the same numbers as the dense
computation (up to float summation order); only the padded rows' work is gone.

Unused slots (capacity above the batch's real steps) hold the index B * T, out of range:
they gather zeros and their scatter is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class RealSteps(NamedTuple):
    """Flat row indices of a batch's real steps, in sequence order, then out-of-range filler.

    batch_major: [R] int32, b * T + t (rows of a [B, T, ...] array).
    time_major: [R] int32, t * B + b (rows of a [T, B, ...] array), the same steps.
    """

    batch_major: Array
    time_major: Array


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
    return RealSteps(batch_major, time_major)


def gather_rows(a: Array, index: Array) -> Array:
    """Rows ``index`` of ``a`` [N1, N2, ...] flattened to [N1 * N2, ...]; out-of-range rows
    read 0."""
    flat = a.reshape(-1, *a.shape[2:])
    return flat.at[index].get(mode="fill", fill_value=0)


def scatter_rows(rows: Array, index: Array, leading: tuple[int, int], fill: float) -> Array:
    """[R, ...] rows written to the ``index`` rows of a ``leading + ...`` array filled with
    ``fill``; out-of-range rows are dropped."""
    flat = jnp.full((leading[0] * leading[1], *rows.shape[1:]), fill, rows.dtype)
    flat = flat.at[index].set(rows, mode="drop")
    return flat.reshape(*leading, *rows.shape[1:])


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
    rows = [None if a is None else gather_rows(a, steps.batch_major) for a in arrays]
    out = fn(*rows)
    leaves, tree = jax.tree.flatten(out)
    fills = fill if isinstance(fill, tuple) else (fill,) * len(leaves)
    if len(fills) != len(leaves):
        raise ValueError(f"{len(fills)} fill values for {len(leaves)} outputs")
    dense = [scatter_rows(r, steps.batch_major, leading, f) for r, f in zip(leaves, fills)]
    return jax.tree.unflatten(tree, dense)
