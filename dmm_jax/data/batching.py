"""Padded mini-batches with a bounded set of shapes.

Every batch handed to a jitted function is [batch_size, T_bucket, X]: time is padded up to a
length bucket (so a run compiles a handful of shapes, not one per batch maximum) and a short
final batch is filled with empty sequences of length 0, which the masks turn into exact zeros.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # JAX is imported where it is used, so the CLI starts without it
    import jax


# Up to 288 steps buckets are multiples of 48; beyond, they grow geometrically by 1.25 (at most
# 25% padding) so long datasets still compile few shapes. Coarse on purpose: each shape costs
# seconds of compiling, and the padding costs no sequential work (the recurrences stop at the
# batch's longest sequence, see dmm_jax.scans), only batched work on the padded steps. For JSB
# (25-129 steps) a run compiles 2 shapes with random mini-batches, 3 with length bucketing.
_FINE_STEP = 48
_FINE_LIMIT = 288
_GROWTH = 1.25
_COARSE_MULTIPLE = 64


def length_bucket(length: int) -> int:
    """The padded length used for a batch whose longest sequence has ``length`` steps."""
    if length <= _FINE_LIMIT:
        return max(_FINE_STEP, _FINE_STEP * math.ceil(length / _FINE_STEP))
    bucket = _FINE_LIMIT
    while bucket < length:
        bucket = _COARSE_MULTIPLE * math.ceil(bucket * _GROWTH / _COARSE_MULTIPLE)
    return bucket


class PaddedSequences:
    """A split held once as a dense [N, T_max, X] uint8 array, sliced into padded batches."""

    def __init__(self, sequences: Sequence[np.ndarray]):
        if not sequences:
            raise ValueError("PaddedSequences needs at least one sequence")
        self.lengths = np.array([len(s) for s in sequences], dtype=np.int32)
        num_features = sequences[0].shape[1]
        self.dense = np.zeros((len(sequences), int(self.lengths.max()), num_features), np.uint8)
        for i, seq in enumerate(sequences):
            self.dense[i, : len(seq)] = seq

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_steps(self) -> int:
        return int(self.lengths.sum())

    def padded_shape(self, indices: np.ndarray, batch_size: int) -> tuple[int, int, int]:
        """The shape of ``batch(indices, batch_size)``'s x, without building it."""
        longest = int(self.lengths[indices].max()) if len(indices) else 0
        return batch_size, length_bucket(longest), self.dense.shape[2]

    def batch(self, indices: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """x [batch_size, T_bucket, X] float32 and lengths [batch_size] int32 for ``indices``.

        Rows past ``len(indices)`` are empty sequences (length 0).
        """
        if len(indices) > batch_size:
            raise ValueError(f"{len(indices)} indices do not fit a batch of {batch_size}")
        lengths = np.zeros(batch_size, np.int32)
        lengths[: len(indices)] = self.lengths[indices]
        num_steps = length_bucket(int(lengths.max()))
        x = np.zeros((batch_size, num_steps, self.dense.shape[2]), np.float32)
        stop = min(num_steps, self.dense.shape[1])
        x[: len(indices), :stop] = self.dense[indices, :stop]
        return x, lengths

    def batch_covariates(self, indices: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
        """Piano rolls carry no inputs or time gaps (see ``dmm_jax.data.arrays``)."""
        del indices, batch_size
        return {}


def shuffled_batches(key: jax.Array, num_sequences: int, batch_size: int) -> list[np.ndarray]:
    """A random partition of range(num_sequences) into consecutive chunks of batch_size."""
    import jax

    order = np.asarray(jax.random.permutation(key, num_sequences))
    return [order[i : i + batch_size] for i in range(0, num_sequences, batch_size)]


def length_grouped_batches(
    key: jax.Array, lengths: np.ndarray, batch_size: int, pool_batches: int = 8
) -> list[np.ndarray]:
    """Random mini-batches of sequences of similar length (less padding than shuffled_batches).

    The shuffled sequences are cut into pools of ``pool_batches * batch_size``; each pool is
    sorted by length and cut into batches; the batches of all pools are then shuffled. Which
    sequences share a batch stays random (pools are drawn anew every epoch), but a batch's
    lengths are close, so padding to its longest member wastes little.
    """
    import jax

    perm_key, order_key = jax.random.split(key)
    order = np.asarray(jax.random.permutation(perm_key, len(lengths)))
    pool = batch_size * pool_batches
    batches = []
    for start in range(0, len(order), pool):
        members = order[start : start + pool]
        members = members[np.argsort(lengths[members], kind="stable")]
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    batch_order = np.asarray(jax.random.permutation(order_key, len(batches)))
    return [batches[i] for i in batch_order]


def epoch_batches(
    key: jax.Array, lengths: np.ndarray, batch_size: int, length_grouped: bool
) -> list[np.ndarray]:
    """One training epoch's mini-batches: ``length_grouped_batches`` or ``shuffled_batches``."""
    if length_grouped:
        return length_grouped_batches(key, np.asarray(lengths), batch_size)
    return shuffled_batches(key, len(lengths), batch_size)


def balanced_batch_size(num_items: int, batch_size: int) -> int:
    """The smallest size that splits ``num_items`` into as few batches as ``batch_size`` does.

    77 sequences in batches of 64 would pad the second batch of 13 to 64 rows; in batches of
    39 the same two batches carry one padded row.
    """
    if num_items < 1 or batch_size < 1:
        raise ValueError(f"need num_items >= 1 and batch_size >= 1, got {num_items}, {batch_size}")
    return math.ceil(num_items / math.ceil(num_items / batch_size))


def sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Deterministic chunks of sequences sorted by length: least padding, for evaluation."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def microbatch_count(batch_size: int, num_steps: int, microbatch_steps: int) -> int:
    """Fewest micro-batches (a divisor of batch_size) with at most ``microbatch_steps`` padded
    steps each; 1 when ``microbatch_steps`` is 0 (off)."""
    if microbatch_steps <= 0:
        return 1
    for count in range(1, batch_size + 1):
        if batch_size % count == 0 and (batch_size // count) * num_steps <= microbatch_steps:
            return count
    return batch_size


def group_real_steps(lengths: np.ndarray, batch_size: int, groups: int) -> np.ndarray:
    """Real steps of each of ``groups`` consecutive groups of a batch of ``lengths`` (fewer
    than ``batch_size`` are followed by empty sequences, as ``PaddedSequences.batch`` pads)."""
    padded = np.zeros(batch_size, np.int64)
    padded[: len(lengths)] = lengths
    return padded.reshape(groups, -1).sum(axis=1)


def real_step_capacities(
    lengths: np.ndarray,
    batch_size: int,
    length_grouped: bool,
    epochs: int = 32,
    microbatch_steps: int = 0,
) -> dict[int, int]:
    """Per length bucket, how many real steps a batch of that bucket is planned to hold.

    Scoring only the real steps (``dmm_jax.real_steps``) needs a static row count per compiled
    shape. It is planned from the data: the most real steps of any batch in ``epochs``
    simulated epochs of the same batching (``epoch_batches``; fixed keys, so every run plans
    alike), plus 10% and rounded up
    to a multiple of 64, at most batch_size * bucket. A batch above its bucket's capacity (rare
    by construction) is scored densely instead: one more compiled shape, never a wrong result.

    With ``microbatch_steps`` (``TrainConfig.microbatch_steps``), a bucket whose batches are
    split into micro-batches (``microbatch_count``) is planned per micro-batch instead: the
    most real steps of any one micro-batch, at most its sequences * bucket.
    """
    lengths = np.asarray(lengths)
    import jax

    most: dict[int, int] = {}
    for epoch in range(epochs):
        key = jax.random.fold_in(jax.random.PRNGKey(0), epoch)
        for indices in epoch_batches(key, lengths, batch_size, length_grouped):
            bucket = length_bucket(int(lengths[indices].max()))
            groups = microbatch_count(batch_size, bucket, microbatch_steps)
            real = int(group_real_steps(lengths[indices], batch_size, groups).max())
            most[bucket] = max(most.get(bucket, 0), real)
    capacities = {}
    for bucket, real in most.items():
        rows = batch_size // microbatch_count(batch_size, bucket, microbatch_steps) * bucket
        capacities[bucket] = min(rows, 64 * math.ceil(1.1 * real / 64))
    return capacities
