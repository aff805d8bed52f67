"""Real-valued sequences from arrays: in memory or a NumPy ``.npz`` file.

A split is ``x`` [N, T, X] (float; NaN marks a missing entry), ``lengths`` [N] (steps
t >= lengths[n] are padding; default: all T), and optionally ``inputs`` [N, T, U] (control
inputs; ``inputs[n, t]`` acts between steps t-1 and t), ``dt`` [N, T] (time gaps: ``dt[n, t]``
is the time from step t-1 to step t) and ``mask`` [N, T, X] (False where missing; folded into x
as NaN). Everything is validated on construction; a problem raises :class:`DataError` naming
the source and the array.

An ``.npz`` file holds one split under the names above, or several under prefixed names
(``train_x``, ``train_lengths``, ..., ``valid_x``, ..., ``test_x``, ...; train is required).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile
import zipfile

import numpy as np

from dmm_jax.data.batching import length_bucket
from dmm_jax.data.polyphonic import SPLITS, DataError

ARRAY_NAMES = ("x", "lengths", "inputs", "dt", "mask")


class SequenceArrays:
    """One validated split of real-valued sequences, sliced into padded mini-batches.

    Has the interface of ``dmm_jax.data.batching.PaddedSequences`` (``lengths``,
    ``num_steps``, ``batch``, ``batch_covariates``), so ``fit`` and ``evaluate_split`` take it.
    """

    def __init__(
        self,
        x: np.ndarray,
        lengths: np.ndarray | None = None,
        inputs: np.ndarray | None = None,
        dt: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        *,
        source: str = "arrays",
    ):
        x = _float_array(x, "x", source, ndim=3)
        num, num_steps, _ = x.shape
        if num == 0 or num_steps == 0:
            raise DataError(f"{source}: x must hold at least one step of one sequence")
        self.lengths = _lengths(lengths, num, num_steps, source)
        real = np.arange(num_steps)[None, :] < self.lengths[:, None]  # [N, T]
        if np.any(np.isinf(x[real])):
            raise DataError(f"{source}: x has infinite entries (use NaN for missing ones)")
        if mask is not None:
            mask = np.asarray(mask)
            if (
                mask.shape != x.shape
                or mask.dtype.kind not in "biu"
                or np.any((mask != 0) & (mask != 1))
            ):
                raise DataError(
                    f"{source}: mask must be a 0/1 or bool array of shape {x.shape}, "
                    f"got shape {mask.shape} dtype {mask.dtype}"
                )
            x = np.where(mask.astype(bool), x, np.nan)
        self.x = np.where(real[..., None], x, 0.0).astype(np.float32)  # padding is 0, not NaN
        self.inputs = None
        if inputs is not None:
            inputs = _float_array(inputs, "inputs", source, ndim=3)
            if inputs.shape[:2] != (num, num_steps):
                raise DataError(
                    f"{source}: inputs must have shape ({num}, {num_steps}, U), got {inputs.shape}"
                )
            if not np.all(np.isfinite(inputs[real])):
                raise DataError(f"{source}: inputs must be finite on real steps")
            self.inputs = np.where(real[..., None], inputs, 0.0).astype(np.float32)
        self.dt = None
        if dt is not None:
            dt = _float_array(dt, "dt", source, ndim=2)
            if dt.shape != (num, num_steps):
                raise DataError(
                    f"{source}: dt must have shape ({num}, {num_steps}), got {dt.shape}"
                )
            if not np.all(np.isfinite(dt[real])) or np.any(dt[real] < 0):
                raise DataError(f"{source}: dt must be finite and >= 0 on real steps")
            self.dt = np.where(real, dt, 0.0).astype(np.float32)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def obs_dim(self) -> int:
        return self.x.shape[-1]

    @property
    def input_dim(self) -> int:
        return 0 if self.inputs is None else self.inputs.shape[-1]

    @property
    def num_steps(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_missing(self) -> int:
        return int(np.isnan(self.x).sum())

    def as_dict(self) -> dict[str, np.ndarray]:
        """The arrays, under the names ``SequenceArrays`` takes (missing entries as NaN in x)."""
        arrays = {"x": self.x, "lengths": self.lengths, "inputs": self.inputs, "dt": self.dt}
        return {name: a for name, a in arrays.items() if a is not None}

    def _padded(self, array: np.ndarray, indices: np.ndarray, batch_size: int, num_steps: int):
        out = np.zeros((batch_size, num_steps, *array.shape[2:]), np.float32)
        stop = min(num_steps, array.shape[1])
        out[: len(indices), :stop] = array[indices, :stop]
        return out

    def _bucket(self, indices: np.ndarray, batch_size: int) -> int:
        if len(indices) > batch_size:
            raise ValueError(f"{len(indices)} indices do not fit a batch of {batch_size}")
        # Never past the arrays' own length: series of one length T (the periodic data's 100)
        # are not padded to the next bucket (144), where every padded step is work.
        return min(length_bucket(int(self.lengths[indices].max())), self.x.shape[1])

    def padded_shape(self, indices: np.ndarray, batch_size: int) -> tuple[int, int, int]:
        """The shape of ``batch(indices, batch_size)``'s x, without building it."""
        return batch_size, self._bucket(indices, batch_size), self.obs_dim

    def batch(self, indices: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """x [batch_size, T_bucket, X] float32 (NaN where missing) and lengths [batch_size]."""
        num_steps = self._bucket(indices, batch_size)
        lengths = np.zeros(batch_size, np.int32)
        lengths[: len(indices)] = self.lengths[indices]
        return self._padded(self.x, indices, batch_size, num_steps), lengths

    def batch_covariates(self, indices: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
        """``inputs`` [batch_size, T_bucket, U] and ``dt`` [batch_size, T_bucket], where held."""
        num_steps = self._bucket(indices, batch_size)
        out = {}
        if self.inputs is not None:
            out["inputs"] = self._padded(self.inputs, indices, batch_size, num_steps)
        if self.dt is not None:
            out["dt"] = self._padded(self.dt, indices, batch_size, num_steps)
        return out


def _float_array(value, name: str, source: str, ndim: int) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as err:  # ragged lists and the like
        raise DataError(f"{source}: {name} is not an array ({err})") from err
    if array.dtype.kind not in "biuf":
        raise DataError(f"{source}: {name} must be numeric, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise DataError(f"{source}: {name} must have {ndim} dimensions, got shape {array.shape}")
    return array.astype(np.float64)


def _lengths(lengths, num: int, num_steps: int, source: str) -> np.ndarray:
    if lengths is None:
        return np.full(num, num_steps, np.int32)
    lengths = np.asarray(lengths)
    if lengths.shape != (num,) or lengths.dtype.kind not in "iu":
        raise DataError(
            f"{source}: lengths must be {num} integers, got shape {lengths.shape} "
            f"dtype {lengths.dtype}"
        )
    if np.any(lengths < 1) or np.any(lengths > num_steps):
        raise DataError(f"{source}: lengths must be in 1..{num_steps} (the time axis of x)")
    return lengths.astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Splits of real-valued sequences; valid and test may be absent (None)."""

    name: str
    source: pathlib.Path | str
    train: SequenceArrays
    valid: SequenceArrays | None = None
    test: SequenceArrays | None = None

    def split(self, name: str) -> SequenceArrays:
        key = {"val": "valid", "validation": "valid"}.get(name, name)
        split = getattr(self, key, None) if key in SPLITS else None
        if split is None:
            held = [s for s in SPLITS if getattr(self, s) is not None]
            raise DataError(f"{self.source}: no split {name!r}; it holds {held}")
        return split


def read_npz(path: pathlib.Path, kind: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (pickled objects refused), or a one-line ``DataError``."""
    if not path.is_file():
        raise DataError(f"no {kind} at {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err


def load_arrays(path: str | os.PathLike) -> ArrayDataset:
    """Reads an ``.npz`` of one split (x, lengths, ...) or of prefixed train/valid/test splits."""
    path = pathlib.Path(path)
    arrays = read_npz(path, "array file")
    if set(arrays) == {"t", "x", "lengths"}:  # irregularly sampled series (times, values)
        from dmm_jax.data.irregular import load_irregular, series_dataset

        return series_dataset(load_irregular(path), path.stem, str(path))
    prefixed = any(name.startswith(f"{s}_") for name in arrays for s in SPLITS)
    known = {f"{s}_{a}" for s in SPLITS for a in ARRAY_NAMES} if prefixed else set(ARRAY_NAMES)
    unknown = sorted(set(arrays) - known)
    if unknown:
        raise DataError(
            f"{path}: unknown arrays {unknown}; expected {list(ARRAY_NAMES)}, "
            "or the same prefixed with train_, valid_, test_"
        )
    splits = {}
    for split in SPLITS if prefixed else ("train",):
        prefix = f"{split}_" if prefixed else ""
        held = {a: arrays[prefix + a] for a in ARRAY_NAMES if prefix + a in arrays}
        if not held:
            continue
        if "x" not in held:
            raise DataError(f"{path}: split {split} has no {prefix}x")
        splits[split] = SequenceArrays(**held, source=f"{path} ({split})")
    if "train" not in splits:
        raise DataError(f"{path}: no train split (train_x)")
    return ArrayDataset(path.stem, path, **splits)


def save_arrays(path: str | os.PathLike, **splits: SequenceArrays) -> pathlib.Path:
    """Atomically writes splits (train=..., valid=..., test=...) as prefixed arrays to ``path``."""
    path = pathlib.Path(path)
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or "train" not in splits:
        raise ValueError(
            f"save_arrays takes train= (required), valid=, test=; got {sorted(splits)}"
        )
    arrays = {
        f"{name}_{key}": value
        for name, split in splits.items()
        for key, value in split.as_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path
