"""The canonical file format of the polyphonic data sets, read safely and validated.

A dict with exactly the keys ``"train"``, ``"valid"``, ``"test"``, each a list of sequences; a
sequence is a list of time steps; a time step is a list (or tuple) of MIDI note numbers in
21..108 (an empty step is a rest). The file may be JSON or a pickle; pickles are read with an
unpickler that resolves no globals at all, so a hostile file cannot run code. Every problem is
a :class:`DataError` naming the file.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
from collections.abc import Mapping
from typing import Any, BinaryIO

SPLITS: tuple[str, ...] = ("train", "valid", "test")
NUM_NOTES = 88
LOWEST_NOTE = 21
HIGHEST_NOTE = LOWEST_NOTE + NUM_NOTES - 1  # 108
_PICKLE_SUFFIXES = (".pickle", ".pkl")


class DataError(ValueError):
    """A dataset file is missing, unreadable, unsafe or not in the canonical format.

    The message always names the file (or the places searched for it) and the problem.
    """


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves no global and no persistent id: only the built-in container
    and scalar opcodes (dict, list, tuple, int, str, ...) work, so nothing can be executed."""

    def __init__(self, file: BinaryIO, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        raise DataError(
            f"{self._source}: pickle refers to global {module}.{name}, which is not allowed "
            "(the canonical format only has dicts, lists, tuples, ints and strings)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self._source}: pickle uses persistent ids, which are not allowed")


def restricted_pickle_loads(data: bytes, source: str | os.PathLike[str]) -> object:
    """Unpickle ``data`` without resolving any global (safe on untrusted bytes).

    Python 2 ``str`` objects decode as latin-1 text, so protocol-2 pickles made by Python 2
    load with ``str`` keys. Corrupt, truncated or unsafe pickles raise :class:`DataError`.
    """
    src = os.fspath(source)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), src).load()
    except DataError:
        raise
    except EOFError as err:
        raise DataError(f"{src}: truncated pickle (unexpected end of data)") from err
    except Exception as err:  # UnpicklingError, ValueError, KeyError, struct errors, ...
        raise DataError(f"{src}: corrupt pickle ({type(err).__name__}: {err})") from err


def parse_bytes(data: bytes, source: pathlib.Path) -> object:
    """Decode file bytes as pickle (protocol >= 2 header or pickle suffix) or else JSON."""
    if data[:1] == b"\x80" or source.suffix.lower() in _PICKLE_SUFFIXES:
        return restricted_pickle_loads(data, source)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{source}: not valid JSON, maybe truncated ({err})") from err


def read_canonical_file(path: str | os.PathLike[str]) -> dict[str, list[Any]]:
    """Read a dataset file (JSON or pickle, told apart by content and extension) and return
    its validated canonical dict."""
    source = pathlib.Path(path)
    try:
        data = source.read_bytes()
    except OSError as err:
        raise DataError(f"{source}: cannot read file ({err})") from err
    return validate_canonical(parse_bytes(data, source), source)


def validate_canonical(obj: object, source: str | os.PathLike[str]) -> dict[str, list[Any]]:
    """Check that ``obj`` is in the canonical format and return it as a plain dict.

    Raises :class:`DataError` naming ``source`` and the first problem found. Runs in one
    linear pass over all notes.
    """
    src = os.fspath(source)
    if not isinstance(obj, Mapping):
        raise DataError(
            f"{src}: top level must be a dict with keys train/valid/test, got {type(obj).__name__}"
        )
    # Tolerate bytes keys (Python 2 pickles read with encoding="bytes").
    content = {
        (key.decode("latin1") if isinstance(key, bytes) else key): value
        for key, value in obj.items()
    }
    keys = set(content)
    if keys != set(SPLITS):
        missing = sorted(set(SPLITS) - keys)
        unexpected = sorted(repr(k) for k in keys - set(SPLITS))
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys [{', '.join(unexpected)}]")
        raise DataError(
            f"{src}: top-level keys must be exactly train/valid/test: {'; '.join(problems)}"
        )
    for split in SPLITS:
        check_split(content[split], src, split)
    return {split: content[split] for split in SPLITS}


def check_split(sequences: object, src: str, split: str) -> None:
    where = f"split {split!r}"
    if not isinstance(sequences, list):
        raise DataError(
            f"{src}: {where} must be a list of sequences, got {type(sequences).__name__}"
        )
    if not sequences:
        raise DataError(f"{src}: {where} is empty (no sequences)")
    lo, hi = LOWEST_NOTE, HIGHEST_NOTE
    for i, seq in enumerate(sequences):
        if not isinstance(seq, (list, tuple)):
            raise DataError(
                f"{src}: {where} sequence {i} must be a list of time steps, "
                f"got {type(seq).__name__}"
            )
        if not seq:
            raise DataError(f"{src}: {where} sequence {i} is empty (zero time steps)")
        for t, step in enumerate(seq):
            if not isinstance(step, (list, tuple)):
                raise DataError(
                    f"{src}: {where} sequence {i} step {t} must be a list of notes, "
                    f"got {type(step).__name__}"
                )
            for note in step:
                # type() rather than isinstance(): bool is an int subclass but not a note.
                if type(note) is not int or not lo <= note <= hi:
                    what = (
                        f"note {note} outside {lo}..{hi}"
                        if type(note) is int
                        else f"non-integer note {note!r} ({type(note).__name__})"
                    )
                    raise DataError(f"{src}: {where} sequence {i} step {t} has {what}")
