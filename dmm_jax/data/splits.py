"""One way in for every kind of split that training and evaluation take (``as_batchable``).

A split reaches ``fit`` or ``evaluate_split`` as one of:

    PaddedSequences, SequenceArrays      used as they are
    SequenceSplit                        its piano rolls
    a sequence of [length, X] arrays     0/1 values: piano rolls (PaddedSequences); anything
                                         else (real values, NaN for missing): SequenceArrays

and leaves as a ``Batchable``: padded mini-batches of a bounded set of shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from dmm_jax.data.arrays import SequenceArrays
from dmm_jax.data.batching import PaddedSequences
from dmm_jax.data.polyphonic import DataError, SequenceSplit


class Batchable(Protocol):
    """What training and evaluation read of a split (shapes as in ``PaddedSequences``)."""

    lengths: np.ndarray

    def __len__(self) -> int: ...

    @property
    def num_steps(self) -> int: ...

    def padded_shape(self, indices: np.ndarray, batch_size: int) -> tuple[int, int, int]: ...

    def batch(self, indices: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]: ...

    def batch_covariates(self, indices: np.ndarray, batch_size: int) -> dict: ...


def as_batchable(split: Batchable | SequenceSplit | Sequence[np.ndarray], name: str = "split"):
    """The split as a ``Batchable``; ``name`` (e.g. "train") goes into error messages."""
    if isinstance(split, (PaddedSequences, SequenceArrays)):
        return split
    sequences = split.sequences if isinstance(split, SequenceSplit) else split
    sequences = [np.asarray(s) for s in sequences]
    if not sequences:
        raise DataError(f"{name}: no sequences")
    widths = {s.shape[1] if s.ndim == 2 else None for s in sequences}
    if len(widths) != 1 or None in widths:
        raise DataError(f"{name}: sequences must be [length, X] arrays of one width X")
    if all(np.isin(s, (0, 1)).all() for s in sequences):
        return PaddedSequences(sequences)
    lengths = np.array([len(s) for s in sequences])
    x = np.full((len(sequences), lengths.max(), widths.pop()), np.nan, np.float32)
    for i, s in enumerate(sequences):
        x[i, : len(s)] = s
    return SequenceArrays(x, lengths, source=name)
