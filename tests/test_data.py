"""Tests for dmm_jax.data.polyphonic: loading, validation, safe unpickling, resolution."""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import urllib.error
import urllib.request

import numpy as np
import pytest

from dmm_jax.data import (
    DATASETS,
    LOWEST_NOTE,
    NUM_NOTES,
    DataError,
    PolyphonicDataset,
    SequenceSplit,
    default_cache_dir,
    load_dataset,
    polyphonic,
    read_canonical_file,
    resolve_dataset_file,
    restricted_pickle_loads,
    to_piano_rolls,
    validate_canonical,
)

OTHER_DATASETS = ("nottingham", "piano_midi", "muse_data")


def _small(num_train: int = 2) -> dict:
    """A small valid canonical dataset; ``num_train`` tags which file a test loaded."""
    train = [[[60, 64, 67], [], [21, 108, 108]] for _ in range(num_train)]
    return {
        "train": train,
        "valid": [[(62, 65), (69,)]],
        "test": [[[40]], [[41], [42, 43], [44]]],
    }


def _write_json(path: pathlib.Path, obj: object) -> pathlib.Path:
    path.write_text(json.dumps(obj))
    return path


def _write_pickle(path: pathlib.Path, obj: object, protocol: int | None = None) -> pathlib.Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def _py2_pickle(obj: object) -> bytes:
    """Protocol-2 bytes the way Python 2 writes them: ``str`` as SHORT_BINSTRING (``U``),
    ``long`` as LONG1, memo puts (``q``) on containers."""
    out = bytearray(b"\x80\x02")
    memo = iter(range(256))

    def enc(x: object) -> None:
        if isinstance(x, dict):
            out.extend(b"}q" + bytes([next(memo)]) + b"(")
            for key, value in x.items():
                enc(key)
                enc(value)
            out.extend(b"u")
        elif isinstance(x, list):
            out.extend(b"]q" + bytes([next(memo)]) + b"(")
            for value in x:
                enc(value)
            out.extend(b"e")
        elif isinstance(x, tuple):
            out.extend(b"(")
            for value in x:
                enc(value)
            out.extend(b"t")
        elif isinstance(x, str):
            raw = x.encode("latin1")
            out.extend(b"U" + bytes([len(raw)]) + raw)
        elif isinstance(x, int):
            out.extend(b"\x8a\x01" + bytes([x]) if x == 108 else b"K" + bytes([x]))
        else:
            raise TypeError(type(x))

    enc(obj)
    out.extend(b".")
    return bytes(out)


def _no_fetch(url: str, out: object, timeout: float) -> None:
    raise AssertionError(f"unexpected download of {url}")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """Keep the real cache out of reach and make any real network access fail loudly."""
    cache = tmp_path / "default_cache"
    monkeypatch.setenv("DMM_JAX_CACHE_DIR", str(cache))

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tests must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return cache


def _assert_error(excinfo: pytest.ExceptionInfo[DataError], path: object, *words: str) -> None:
    message = str(excinfo.value)
    assert str(path) in message, message
    for word in words:
        assert word in message, message


# --------------------------------------------------------------------------------------------
# JSB Chorales from the shared data dir
# --------------------------------------------------------------------------------------------


def test_jsb_split_sizes_and_steps(jsb_dataset: PolyphonicDataset, jsb_path: pathlib.Path):
    assert jsb_dataset.name == "jsb_chorales"
    assert jsb_dataset.source == jsb_path
    expected = {"train": (229, 13807), "valid": (76, 4602), "test": (77, 4725)}
    for split, (num_seqs, num_steps) in expected.items():
        data = jsb_dataset.split(split)
        assert len(data) == num_seqs
        assert data.num_steps == num_steps
        assert data.lengths.dtype == np.int32
        assert data.lengths.shape == (num_seqs,)
        assert int(data.lengths.sum()) == num_steps


def test_jsb_rolls_are_binary_and_note_range(jsb_dataset: PolyphonicDataset):
    for split in ("train", "valid", "test"):
        for roll in jsb_dataset.split(split).sequences:
            assert roll.dtype == np.uint8
            assert roll.ndim == 2 and roll.shape[1] == NUM_NOTES
            assert set(np.unique(roll).tolist()) <= {0, 1}
    train = np.concatenate(jsb_dataset.train.sequences)
    notes = np.nonzero(train.any(axis=0))[0] + LOWEST_NOTE
    assert (notes.min(), notes.max()) == (43, 96)
    lengths = jsb_dataset.train.lengths
    assert (lengths.min(), lengths.max()) == (25, 129)


def test_jsb_rolls_match_note_lists(jsb_dataset: PolyphonicDataset, jsb_path: pathlib.Path):
    raw = json.loads(jsb_path.read_text())
    for split in ("train", "test"):
        for seq, roll in zip(raw[split][:5], jsb_dataset.split(split).sequences[:5]):
            for t, step in enumerate(seq):
                assert sorted(np.nonzero(roll[t])[0] + LOWEST_NOTE) == sorted(set(step))


def test_jsb_alias_through_env_var(jsb_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DMM_JAX_DATA_DIR", str(jsb_path.parent))
    assert resolve_dataset_file("jsb", download=False) == jsb_path
    assert load_dataset("JSB", download=False).name == "jsb_chorales"


# --------------------------------------------------------------------------------------------
# The other datasets through the same code path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OTHER_DATASETS)
@pytest.mark.parametrize("fmt", ["json", "pickle2", "pickle_default", "pickle0", "py2"])
def test_other_datasets_load(name: str, fmt: str, tmp_path: pathlib.Path):
    data = _small()
    if fmt == "json":
        path = _write_json(tmp_path / f"{name}.json", data)
    elif fmt == "pickle2":
        path = _write_pickle(tmp_path / f"{name}.pickle", data, protocol=2)
    elif fmt == "pickle_default":
        path = _write_pickle(tmp_path / f"{name}.pickle", data)
    elif fmt == "pickle0":
        path = _write_pickle(tmp_path / f"{name}.pickle", data, protocol=0)
    else:
        path = tmp_path / f"{name}.pickle"
        path.write_bytes(_py2_pickle(data))

    for where in (path, tmp_path):  # a file, or the directory holding it
        dataset = load_dataset(name, where, download=False)
        assert dataset.name == name
        assert dataset.source == path
        assert [len(dataset.split(s)) for s in ("train", "valid", "test")] == [2, 1, 2]
        assert dataset.train.lengths.tolist() == [3, 3]
        assert dataset.test.lengths.tolist() == [1, 3]
        assert dataset.valid.num_steps == 2
        roll = dataset.train.sequences[0]
        assert roll.shape == (3, NUM_NOTES) and roll.dtype == np.uint8
        assert np.nonzero(roll[0])[0].tolist() == [60 - 21, 64 - 21, 67 - 21]
        assert not roll[1].any()  # rest
        assert np.nonzero(roll[2])[0].tolist() == [0, 87]  # duplicate 108 -> still one 1
        assert dataset.split("val") is dataset.valid
        assert dataset.split("validation") is dataset.valid


def test_py2_pickle_keys_come_out_as_str():
    obj = restricted_pickle_loads(_py2_pickle(_small()), "py2.pickle")
    assert isinstance(obj, dict) and sorted(obj) == ["test", "train", "valid"]
    assert all(type(k) is str for k in obj)
    assert obj["train"][0][2] == [21, 108, 108]


def test_aliases_and_unknown_name(tmp_path: pathlib.Path):
    _write_json(tmp_path / "muse_data.json", _small())
    _write_json(tmp_path / "piano_midi.json", _small())
    assert load_dataset("muse", tmp_path, download=False).name == "muse_data"
    assert load_dataset("MuseData", tmp_path, download=False).name == "muse_data"
    assert load_dataset("piano", tmp_path, download=False).name == "piano_midi"
    assert load_dataset("piano-midi", tmp_path, download=False).name == "piano_midi"
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist", tmp_path, download=False)
    assert DATASETS == ("jsb_chorales", "nottingham", "piano_midi", "muse_data")


def test_split_unknown_name(tmp_path: pathlib.Path):
    dataset = load_dataset("nottingham", _write_json(tmp_path / "n.json", _small()))
    with pytest.raises(ValueError, match="unknown split 'training'"):
        dataset.split("training")


def test_to_piano_rolls_columns():
    split = to_piano_rolls([[[21], [108], [], [50, 50, 51]]], "mem")
    assert isinstance(split, SequenceSplit)
    roll = split.sequences[0]
    assert roll[0, 0] == 1 and roll[1, 87] == 1 and roll[2].sum() == 0
    assert roll.sum() == 4 and roll[3, 29] == 1 and roll[3, 30] == 1
    with pytest.raises(DataError, match="mem: split 'sequences' sequence 0 step 0 has note 20"):
        to_piano_rolls([[[20]]], "mem")


def test_large_split_is_fast():
    """300k steps validate and convert without anything quadratic."""
    seqs = [[[60, 64, 67], [62], []] * 1000 for _ in range(100)]
    data = {"train": seqs, "valid": seqs[:1], "test": seqs[:1]}
    validate_canonical(data, "big")
    split = to_piano_rolls(seqs, "big")
    assert split.num_steps == 300_000 and len(split) == 100


# --------------------------------------------------------------------------------------------
# Bad inputs: each a DataError naming the file and the problem
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda d: d.pop("test"), ["missing", "test"]),
        (lambda d: d.update(extra=[]), ["unexpected", "extra"]),
        (lambda d: d.update(train=[[[60]], [[60], [72], [120]]]), ["sequence 1 step 2", "120"]),
        (lambda d: d.update(valid=[[[60], [20]]]), ["'valid'", "note 20 outside 21..108"]),
        (lambda d: d.update(train=[[[60]], []]), ["sequence 1", "empty"]),
        (lambda d: d.update(test=[]), ["'test'", "empty"]),
        (lambda d: d.update(test={"a": 1}), ["'test'", "list"]),
        (lambda d: d.update(train=[[[60], 61]]), ["step 1", "list of notes"]),
        (lambda d: d.update(train=[[[60, True]]]), ["step 0", "non-integer", "True"]),
        (lambda d: d.update(train=[[[60.0]]]), ["step 0", "non-integer", "float"]),
        (lambda d: d.update(train=[[["60"]]]), ["non-integer", "str"]),
    ],
)
@pytest.mark.parametrize("suffix", [".json", ".pickle"])
def test_invalid_content(mutate, words, suffix: str, tmp_path: pathlib.Path):
    data = _small()
    mutate(data)
    path = tmp_path / f"jsb_chorales{suffix}"
    if suffix == ".json":
        _write_json(path, data)
    else:
        _write_pickle(path, data)
    with pytest.raises(DataError) as excinfo:
        load_dataset("jsb_chorales", path, download=False)
    _assert_error(excinfo, path, *words)


def test_top_level_not_a_dict(tmp_path: pathlib.Path):
    path = _write_json(tmp_path / "x.json", [[[[60]]]])
    with pytest.raises(DataError) as excinfo:
        read_canonical_file(path)
    _assert_error(excinfo, path, "top level must be a dict", "list")


def test_truncated_json(tmp_path: pathlib.Path):
    path = tmp_path / "jsb_chorales.json"
    path.write_text(json.dumps(_small())[:-7])
    with pytest.raises(DataError) as excinfo:
        load_dataset("jsb_chorales", path, download=False)
    _assert_error(excinfo, path, "not valid JSON")


@pytest.mark.parametrize("protocol", [0, 2, pickle.DEFAULT_PROTOCOL])
def test_truncated_pickle(protocol: int, tmp_path: pathlib.Path):
    path = tmp_path / "nottingham.pickle"
    path.write_bytes(pickle.dumps(_small(), protocol=protocol)[:-9])
    with pytest.raises(DataError) as excinfo:
        load_dataset("nottingham", path, download=False)
    _assert_error(excinfo, path, "pickle")


def test_garbage_pickle(tmp_path: pathlib.Path):
    path = tmp_path / "nottingham.pickle"
    path.write_bytes(b"\x80\x04\xff\xfe not a pickle")
    with pytest.raises(DataError) as excinfo:
        load_dataset("nottingham", path, download=False)
    _assert_error(excinfo, path, "corrupt pickle")


class _Evil:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _EvilExec:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("evil_cls", [_Evil, _EvilExec])
@pytest.mark.parametrize("protocol", [0, 2, pickle.DEFAULT_PROTOCOL])
def test_malicious_pickle_executes_nothing(evil_cls, protocol: int, tmp_path: pathlib.Path):
    marker = tmp_path / "pwned"
    data = _small()
    data["train"][0][0] = evil_cls(marker)  # hidden deep inside otherwise valid data
    payload = pickle.dumps(data, protocol=protocol)
    assert b"system" in payload or b"exec" in payload
    path = tmp_path / "muse_data.pickle"
    path.write_bytes(payload)
    with pytest.raises(DataError) as excinfo:
        load_dataset("muse_data", path, download=False)
    _assert_error(excinfo, path, "not allowed")
    assert not marker.exists()
    # Also as bare top-level object, through the public helper.
    with pytest.raises(DataError, match="not allowed"):
        restricted_pickle_loads(pickle.dumps(evil_cls(marker), protocol=protocol), path)
    assert not marker.exists()


def test_pickle_with_any_global_is_refused(tmp_path: pathlib.Path):
    path = tmp_path / "piano_midi.pickle"
    data = {"train": [[{60, 64}]], "valid": [[[60]]], "test": [[[60]]]}
    _write_pickle(path, data, protocol=2)  # protocol 2 sets need builtins.set via find_class
    with pytest.raises(DataError) as excinfo:
        load_dataset("piano_midi", path, download=False)
    _assert_error(excinfo, path, "set", "not allowed")


def test_pickle_persistent_id_is_refused(tmp_path: pathlib.Path):
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return "pid" if obj == [60] else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(_small() | {"test": [[[60]]]})
    with pytest.raises(DataError, match="persistent"):
        restricted_pickle_loads(buf.getvalue(), tmp_path / "p.pickle")


def test_explicit_path_missing(tmp_path: pathlib.Path):
    path = tmp_path / "nope" / "jsb_chorales.json"
    with pytest.raises(DataError) as excinfo:
        load_dataset("jsb_chorales", path)
    _assert_error(excinfo, path, "no such file")


def test_explicit_dir_without_file(tmp_path: pathlib.Path):
    with pytest.raises(DataError) as excinfo:
        load_dataset("jsb_chorales", tmp_path, download=False)
    _assert_error(excinfo, tmp_path, "jsb_chorales.json or jsb_chorales.pickle")


def test_missing_file_without_download(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    monkeypatch.setenv("DMM_JAX_DATA_DIR", str(data_dir))
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as excinfo:
        load_dataset("jsb", cache_dir=cache, download=False)
    _assert_error(
        excinfo,
        cache,
        str(data_dir),
        "download disabled",
        f"put jsb_chorales.json or jsb_chorales.pickle in {cache}",
        "DMM_JAX_DATA_DIR",
    )
    assert not cache.exists()  # nothing created when not downloading


def test_download_failure_urlerror(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DMM_JAX_DATA_DIR", raising=False)
    calls = []

    def fail(url, timeout=None):
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as excinfo:
        load_dataset("nottingham", cache_dir=cache)
    _assert_error(
        excinfo,
        cache / "nottingham.pickle",
        "download from",
        "URLError",
        "no network",
        f"put nottingham.json or nottingham.pickle in {cache}",
        "DMM_JAX_DATA_DIR (not set)",
    )
    assert calls == ["https://d2hg8soec8ck9v.cloudfront.net/datasets/polyphonic/nottingham.pickle"]
    assert list(cache.iterdir()) == []  # no temp files left behind


@pytest.mark.parametrize("exc", [TimeoutError("timed out"), OSError("connection reset")])
def test_download_failure_midway_is_atomic(
    exc: Exception, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("DMM_JAX_DATA_DIR", raising=False)
    good = pickle.dumps(_small(), protocol=2)

    def half_then_fail(url, out, timeout):
        out.write(good[: len(good) // 2])
        raise exc

    monkeypatch.setattr(polyphonic, "_fetch_url", half_then_fail)
    with pytest.raises(DataError) as excinfo:
        load_dataset("muse_data", cache_dir=tmp_path)
    _assert_error(excinfo, tmp_path / "muse_data.pickle", type(exc).__name__)
    assert list(tmp_path.iterdir()) == []


def test_download_of_bad_content_is_not_kept(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("DMM_JAX_DATA_DIR", raising=False)
    monkeypatch.setattr(
        polyphonic, "_fetch_url", lambda url, out, timeout: out.write(b"<html>error</html>")
    )
    with pytest.raises(DataError) as excinfo:
        load_dataset("muse_data", cache_dir=tmp_path)
    _assert_error(excinfo, tmp_path / "muse_data.pickle", "pickle")
    assert list(tmp_path.iterdir()) == []


def test_download_success_lands_in_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DMM_JAX_DATA_DIR", raising=False)
    payload = pickle.dumps(_small(num_train=3), protocol=2)
    urls = []

    def fetch(url, out, timeout):
        urls.append(url)
        out.write(payload[:10])
        out.write(payload[10:])

    monkeypatch.setattr(polyphonic, "_fetch_url", fetch)
    cache = tmp_path / "new" / "cache"
    dataset = load_dataset("piano", cache_dir=cache)
    target = cache / "piano_midi.pickle"
    assert dataset.source == target and len(dataset.train) == 3
    assert urls == ["https://d2hg8soec8ck9v.cloudfront.net/datasets/polyphonic/piano_midi.pickle"]
    assert target.read_bytes() == payload
    assert sorted(p.name for p in cache.iterdir()) == ["piano_midi.pickle"]
    # Second load comes from the cache, no fetch.
    monkeypatch.setattr(polyphonic, "_fetch_url", _no_fetch)
    assert len(load_dataset("piano_midi", cache_dir=cache).train) == 3


def test_download_uses_default_cache_dir(
    _isolated_cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("DMM_JAX_DATA_DIR", raising=False)
    payload = pickle.dumps(_small(), protocol=2)
    monkeypatch.setattr(polyphonic, "_fetch_url", lambda url, out, timeout: out.write(payload))
    assert resolve_dataset_file("jsb") == _isolated_cache / "jsb_chorales.pickle"


# --------------------------------------------------------------------------------------------
# Resolution order and cache dir
# --------------------------------------------------------------------------------------------


def test_resolution_order(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    explicit, env, cache = (tmp_path / d for d in ("explicit", "env", "cache"))
    for directory in (explicit, env, cache):
        directory.mkdir()
    _write_json(explicit / "nottingham.json", _small(num_train=1))
    _write_pickle(env / "nottingham.pickle", _small(num_train=2))
    _write_json(cache / "nottingham.json", _small(num_train=3))
    monkeypatch.setenv("DMM_JAX_DATA_DIR", str(env))
    monkeypatch.setattr(polyphonic, "_fetch_url", _no_fetch)

    def num_train(path=None) -> int:
        return len(load_dataset("nottingham", path, cache_dir=cache).train)

    assert num_train(explicit) == 1
    assert num_train(explicit / "nottingham.json") == 1
    assert num_train() == 2
    monkeypatch.delenv("DMM_JAX_DATA_DIR")
    assert num_train() == 3
    monkeypatch.setenv("DMM_JAX_DATA_DIR", str(tmp_path / "elsewhere"))  # missing -> cache
    assert num_train() == 3


def test_json_preferred_over_pickle_in_same_dir(tmp_path: pathlib.Path):
    _write_json(tmp_path / "nottingham.json", _small(num_train=1))
    _write_pickle(tmp_path / "nottingham.pickle", _small(num_train=2))
    assert resolve_dataset_file("nottingham", tmp_path) == tmp_path / "nottingham.json"


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path):
    monkeypatch.setenv("DMM_JAX_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("DMM_JAX_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "dmm_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "dmm_jax"


def test_as_batchable_takes_every_kind_of_split_and_keeps_real_values():
    from dmm_jax.data.arrays import SequenceArrays
    from dmm_jax.data.batching import PaddedSequences
    from dmm_jax.data.splits import as_batchable

    rolls = [np.eye(3, dtype=np.uint8), np.ones((2, 3), np.uint8)]
    assert isinstance(as_batchable(rolls), PaddedSequences)
    real = [np.array([[0.5, -2.0, np.nan]], np.float32), np.zeros((4, 3), np.float32)]
    data = as_batchable(real, "train")
    assert isinstance(data, SequenceArrays) and as_batchable(data) is data
    x, lengths = data.batch(np.arange(2), 2)
    assert list(lengths) == [1, 4] and x[0, 0, 0] == 0.5 and x[0, 0, 1] == -2.0
    assert np.isnan(x[0, 0, 2])  # missing stays missing; never cast to a piano roll
    with pytest.raises(DataError, match="train: sequences must be"):
        as_batchable([np.zeros((2, 3)), np.zeros((2, 4))], "train")
    with pytest.raises(DataError, match="valid: no sequences"):
        as_batchable([], "valid")
