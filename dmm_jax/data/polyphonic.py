"""Polyphonic music datasets (Boulanger-Lewandowski et al. 2012) as binary piano rolls.

All four datasets (JSB Chorales, Nottingham, Piano-midi.de, MuseData) share one canonical
format: a dict with exactly the keys ``"train"``, ``"valid"``, ``"test"``, each a list of
sequences; a sequence is a list of time steps; a time step is a list (or tuple) of MIDI note
numbers in 21..108 (an empty step is a rest), JSON or pickle (``dmm_jax.data.canonical``
reads and validates it; pickles with an unpickler that resolves no globals at all).

A dataset file is looked up, in order, at an explicit ``path``, in ``$DMM_JAX_DATA_DIR``, in the
cache dir, and finally downloaded into the cache dir from the mirror that Pyro's and NumPyro's
loaders use. Every problem is reported as a :class:`DataError` naming the file.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import pathlib
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np

from dmm_jax.data.canonical import (
    HIGHEST_NOTE,
    LOWEST_NOTE,
    NUM_NOTES,
    SPLITS,
    DataError,
    check_split,
    parse_bytes,
    read_canonical_file,
    restricted_pickle_loads,
    validate_canonical,
)

__all__ = [
    "CACHE_DIR_ENV",
    "DATASETS",
    "DATA_DIR_ENV",
    "DOWNLOAD_URL",
    "HIGHEST_NOTE",
    "LOWEST_NOTE",
    "NUM_NOTES",
    "SPLITS",
    "DataError",
    "PolyphonicDataset",
    "SequenceSplit",
    "canonical_name",
    "default_cache_dir",
    "load_dataset",
    "read_canonical_file",
    "resolve_dataset_file",
    "restricted_pickle_loads",
    "to_piano_rolls",
    "validate_canonical",
]

DATASETS: tuple[str, ...] = ("jsb_chorales", "nottingham", "piano_midi", "muse_data")

DATA_DIR_ENV = "DMM_JAX_DATA_DIR"
CACHE_DIR_ENV = "DMM_JAX_CACHE_DIR"
DOWNLOAD_URL = "https://d2hg8soec8ck9v.cloudfront.net/datasets/polyphonic/{name}.pickle"
DOWNLOAD_TIMEOUT_S = 60.0

_ALIASES: dict[str, str] = {
    "jsb": "jsb_chorales",
    "jsb_chorale": "jsb_chorales",
    "jsbchorales": "jsb_chorales",
    "muse": "muse_data",
    "musedata": "muse_data",
    "piano": "piano_midi",
    "pianomidi": "piano_midi",
    "piano_midi.de": "piano_midi",
}
# File names of the original Boulanger-Lewandowski release, accepted as a last resort.
_ORIGINAL_FILE_NAMES: dict[str, str] = {
    "jsb_chorales": "JSB Chorales.pickle",
    "nottingham": "Nottingham.pickle",
    "piano_midi": "Piano-midi.de.pickle",
    "muse_data": "MuseData.pickle",
}
_SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "valid": "valid",
    "val": "valid",
    "validation": "valid",
    "test": "test",
}


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceSplit:
    """One split of a dataset: variable-length binary piano rolls.

    Each element of ``sequences`` is a ``[length_i, 88]`` uint8 array of 0/1, column
    ``n - 21`` being MIDI note ``n``.
    """

    sequences: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "sequences", tuple(self.sequences))
        for i, seq in enumerate(self.sequences):
            if seq.ndim != 2 or seq.shape[1] != NUM_NOTES or seq.dtype != np.uint8:
                raise ValueError(
                    f"sequence {i}: expected a [length, {NUM_NOTES}] uint8 piano roll, "
                    f"got shape {seq.shape} dtype {seq.dtype}"
                )

    @property
    def lengths(self) -> np.ndarray:
        """Number of time steps of each sequence, int32 ``[num_sequences]``."""
        return np.array([seq.shape[0] for seq in self.sequences], dtype=np.int32)

    @property
    def num_steps(self) -> int:
        """Total number of time steps over all sequences."""
        return int(sum(seq.shape[0] for seq in self.sequences))

    def __len__(self) -> int:
        return len(self.sequences)


@dataclasses.dataclass(frozen=True, eq=False)
class PolyphonicDataset:
    """A loaded dataset: its canonical name, the file it came from, and its three splits."""

    name: str
    source: pathlib.Path
    train: SequenceSplit
    valid: SequenceSplit
    test: SequenceSplit

    def split(self, name: str) -> SequenceSplit:
        """Return the split ``"train"``, ``"valid"`` (or ``"val"``/``"validation"``) or
        ``"test"``."""
        key = _SPLIT_ALIASES.get(name.strip().lower()) if isinstance(name, str) else None
        if key is None:
            raise ValueError(
                f"unknown split {name!r}; expected one of 'train', 'valid' "
                "('val', 'validation'), 'test'"
            )
        return getattr(self, key)


# --------------------------------------------------------------------------------------------
# Names and locations
# --------------------------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """Map a dataset name or alias (``"jsb"``, ``"JSB-Chorales"``, ``"muse"``...) to one of
    :data:`DATASETS`."""
    if not isinstance(name, str):
        raise DataError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return key


def default_cache_dir() -> pathlib.Path:
    """Where downloaded datasets live: ``$DMM_JAX_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/dmm_jax``, else ``~/.cache/dmm_jax``."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return pathlib.Path(xdg).expanduser() / "dmm_jax"
    return pathlib.Path.home() / ".cache" / "dmm_jax"


def _candidate_names(name: str) -> tuple[str, ...]:
    # JSON first: it is the format of the shared data dir and needs no unpickling.
    return (f"{name}.json", f"{name}.pickle", f"{name}.pkl", _ORIGINAL_FILE_NAMES[name])


def _find_in_dir(directory: pathlib.Path, name: str) -> pathlib.Path | None:
    for file_name in _candidate_names(name):
        candidate = directory / file_name
        if candidate.is_file():
            return candidate
    return None


def resolve_dataset_file(
    name: str,
    path: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> pathlib.Path:
    """Find the file holding dataset ``name``, downloading it into the cache if allowed.

    Order: explicit ``path`` (a file, or a directory holding ``{name}.json`` /
    ``{name}.pickle``), then ``$DMM_JAX_DATA_DIR``, then ``cache_dir`` (default
    :func:`default_cache_dir`), then a download into ``cache_dir``. A download is validated
    before it is moved into place, so the cache never holds a partial or bad file.
    """
    return _resolve(name, path, cache_dir=cache_dir, download=download)[0]


def _resolve(
    name: str,
    path: str | os.PathLike[str] | None,
    *,
    cache_dir: str | os.PathLike[str] | None,
    download: bool,
) -> tuple[pathlib.Path, dict[str, list[Any]] | None]:
    """Like :func:`resolve_dataset_file`, also returning the validated content when the file
    was just downloaded (so it is not parsed twice)."""
    name = canonical_name(name)
    wanted = f"{name}.json or {name}.pickle"

    if path is not None:
        explicit = pathlib.Path(path).expanduser()
        if explicit.is_file():
            return explicit, None
        if explicit.is_dir():
            found = _find_in_dir(explicit, name)
            if found is None:
                raise DataError(f"{explicit}: directory has no {wanted} for dataset {name!r}")
            return found, None
        raise DataError(f"{explicit}: no such file or directory (explicit path for {name!r})")

    searched: list[str] = []
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir:
        data_dir = pathlib.Path(env_dir).expanduser()
        if data_dir.is_dir():
            found = _find_in_dir(data_dir, name)
            if found is not None:
                return found, None
            searched.append(f"{DATA_DIR_ENV}={data_dir}")
        else:
            searched.append(f"{DATA_DIR_ENV}={data_dir} (not a directory)")
    else:
        searched.append(f"{DATA_DIR_ENV} (not set)")

    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if cache.is_dir():
        found = _find_in_dir(cache, name)
        if found is not None:
            return found, None
    searched.append(f"cache dir {cache}")

    target = cache / f"{name}.pickle"
    hint = (
        f"put {wanted} in {cache} or set {DATA_DIR_ENV} to a directory holding it "
        "(or pass path=... to load_dataset)"
    )
    if not download:
        raise DataError(
            f"{target}: dataset {name!r} not found (searched {'; '.join(searched)}; "
            f"download disabled). To fix: {hint}"
        )
    url = DOWNLOAD_URL.format(name=name)
    try:
        content = _download(url, target)
    except DataError as err:
        raise DataError(f"{err} (searched {'; '.join(searched)}). To fix: {hint}") from err
    return target, content


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


def _fetch_url(url: str, out: BinaryIO, timeout: float) -> None:
    """Stream ``url`` into ``out``. Separate so tests can replace the network."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)


def _download(url: str, target: pathlib.Path) -> dict[str, list[Any]]:
    """Download ``url`` to ``target`` atomically and return its validated content.

    The bytes go to a temp file in the same directory, are parsed and validated, and only then
    ``os.replace``-d onto ``target``; on any failure the temp file is removed.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".part"
        )
    except OSError as err:
        raise DataError(f"{target}: cannot create cache dir or temp file ({err})") from err
    tmp = pathlib.Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                _fetch_url(url, out, DOWNLOAD_TIMEOUT_S)
                out.flush()
                os.fsync(out.fileno())
        except (OSError, http.client.HTTPException, ValueError) as err:
            # URLError, HTTPError, socket timeouts and TimeoutError are all OSError.
            raise DataError(
                f"{target}: download from {url} failed ({type(err).__name__}: {err})"
            ) from err
        content = validate_canonical(parse_bytes(tmp.read_bytes(), target), f"{target} ({url})")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return content


def to_piano_rolls(
    sequences: Sequence[Sequence[Sequence[int]]],
    source: str | os.PathLike[str],
    *,
    split: str = "sequences",
    validate: bool = True,
) -> SequenceSplit:
    """Turn note-list sequences into a :class:`SequenceSplit` of binary piano rolls.

    Note ``n`` sets column ``n - 21``; repeated notes in a step are harmless. ``source`` and
    ``split`` only label error messages; ``validate=False`` skips the checks for input that
    :func:`validate_canonical` already accepted.
    """
    if validate:
        check_split(list(sequences), os.fspath(source), split)
    if not sequences:
        return SequenceSplit(())
    lengths = [len(seq) for seq in sequences]
    counts = [len(step) for seq in sequences for step in seq]
    notes = np.fromiter(
        (note for seq in sequences for step in seq for note in step), dtype=np.int64
    )
    total = sum(lengths)
    rolls = np.zeros((total, NUM_NOTES), dtype=np.uint8)
    rows = np.repeat(np.arange(total, dtype=np.int64), counts)
    rolls[rows, notes - LOWEST_NOTE] = 1
    # Row blocks of one C-contiguous array: each sequence is a contiguous view.
    return SequenceSplit(tuple(np.split(rolls, np.cumsum(lengths)[:-1])))


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    path: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> PolyphonicDataset:
    """Load dataset ``name`` (one of :data:`DATASETS` or an alias such as ``"jsb"``) as piano
    rolls. See :func:`resolve_dataset_file` for where the file is looked for."""
    canonical = canonical_name(name)
    source, content = _resolve(canonical, path, cache_dir=cache_dir, download=download)
    if content is None:
        content = read_canonical_file(source)
    splits = {
        split: to_piano_rolls(content[split], source, split=split, validate=False)
        for split in SPLITS
    }
    return PolyphonicDataset(name=canonical, source=source, **splits)
