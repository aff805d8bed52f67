"""Random transposition of piano rolls, a training-time augmentation for music.

Shifting every note of a piece by k semitones keeps its harmony and voice leading, so drawing
k afresh for every piece and update shows a model many pieces where the data set has one
(transposing through all keys is a standard augmentation for these benchmarks, e.g. Walder
2016). A piece is never shifted off the keyboard: k is drawn uniformly among the shifts in
[-max_shift, max_shift] that keep its lowest and highest notes on the keys, so no note is lost.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def shift_range(x: Array, max_shift: int) -> tuple[Array, Array]:
    """The lowest and highest shift, [B] int32 each, that keep every note of each piece of
    ``x`` [B, T, D] on the D keys, within [-max_shift, max_shift]; (0, 0) for a silent piece."""
    num_keys = x.shape[-1]
    played = jnp.any(x > 0, axis=1)  # [B, D]
    lowest = jnp.argmax(played, axis=-1)  # 0 where nothing is played
    highest = num_keys - 1 - jnp.argmax(played[:, ::-1], axis=-1)  # D - 1 where nothing is
    silent = ~jnp.any(played, axis=-1)
    low = jnp.where(silent, 0, jnp.maximum(-max_shift, -lowest))
    high = jnp.where(silent, 0, jnp.minimum(max_shift, num_keys - 1 - highest))
    return low.astype(jnp.int32), high.astype(jnp.int32)


def shift_keys(x: Array, shifts: Array) -> Array:
    """Each piece of ``x`` [B, T, D] moved up by its own ``shifts`` [B] keys (down where
    negative); keys shifted in from outside the range are 0."""
    num_keys = x.shape[-1]
    source = jnp.arange(num_keys) - shifts[:, None]  # [B, D]: the key each key reads
    inside = (source >= 0) & (source < num_keys)
    moved = jnp.take_along_axis(x, jnp.clip(source, 0, num_keys - 1)[:, None, :], axis=-1)
    return jnp.where(inside[:, None, :], moved, jnp.zeros((), x.dtype))


@functools.partial(jax.jit, static_argnames="max_shift")
def transpose_rolls(key: Array, x: Array, max_shift: int) -> Array:
    """``x`` [B, T, D] with each piece transposed by a shift drawn uniformly from those in
    [-max_shift, max_shift] that keep all its notes on the keys (``shift_range``)."""
    low, high = shift_range(x, max_shift)
    shifts = jax.random.randint(key, low.shape, low, high + 1)
    return shift_keys(x, shifts)
