"""Shared pytest fixtures.

The JSB Chorales file is found through ``$DMM_JAX_DATA_DIR`` (CI sets it to
a directory that holds ``jsb_chorales.json``); tests that need it skip, saying why,
when it is not there.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib

import pytest

# The CLI keeps a persistent compilation cache in the user's home by default; tests that call
# it in-process must not write there.
os.environ.setdefault("DMM_JAX_COMPILE_CACHE", "none")

# Most of the suite's time is compiling small programs that then run a few steps. LLVM at -O0
# compiles them in about a third less time (`python -m pytest -q -n 2 --dist loadfile`: 417 s
# instead of 656 s on a 2-core Intel Xeon, 2026-12-03); the programs XLA builds are the same,
# only their machine code is less optimised.
# Read when the CPU backend starts (after this), and inherited by the suite's subprocesses.
# An optimisation level already in XLA_FLAGS wins.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()


@pytest.fixture
def jsb_path() -> pathlib.Path:
    """Path of the shared ``jsb_chorales.json``; skips the test when it is unavailable."""
    data_dir = os.environ.get("DMM_JAX_DATA_DIR")
    if not data_dir:
        pytest.skip("JSB data unavailable: DMM_JAX_DATA_DIR is not set")
    path = pathlib.Path(data_dir) / "jsb_chorales.json"
    if not path.is_file():
        pytest.skip(f"JSB data unavailable: {path} does not exist")
    return path


@pytest.fixture
def jsb_dataset(jsb_path: pathlib.Path):
    """The JSB Chorales dataset loaded from :func:`jsb_path` (never downloads), read once per
    process."""
    return _load_jsb(jsb_path)


@functools.cache
def _load_jsb(path: pathlib.Path):
    from dmm_jax.data import load_dataset

    return load_dataset("jsb_chorales", path, download=False)


@pytest.fixture
def key():
    import jax

    return jax.random.PRNGKey(0)


@pytest.fixture(scope="module")
def tiny_config():
    """A small DMM (fast to compile) over 6-dimensional binary observations."""
    from dmm_jax.config import DMMConfig

    return DMMConfig(obs_dim=6, z_dim=3, emission_dim=8, transition_dim=8, rnn_dim=10)


def random_binary_batch(seed: int, batch: int, num_steps: int, obs_dim: int, lengths=None):
    """x [batch, num_steps, obs_dim] float32 of 0/1 and lengths [batch] int32 (padding zeroed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = (rng.random((batch, num_steps, obs_dim)) < 0.3).astype(np.float32)
    if lengths is None:
        lengths = rng.integers(1, num_steps + 1, batch)
    lengths = np.asarray(lengths, np.int32)
    x[np.arange(num_steps)[None, :] >= lengths[:, None]] = 0.0
    return x, lengths


def init_params(config, seed: int = 0):
    """Parameters of the model and guide for ``config``, initialised as the SVI would."""
    from numpyro import handlers

    from dmm_jax.models.dmm import guide, model

    x, lengths = random_binary_batch(seed, 2, 3, config.obs_dim)
    params = {}
    for i, fn in enumerate((model, guide)):
        tr = handlers.trace(handlers.seed(fn, seed + i)).get_trace(x, lengths, config=config)
        params.update({n: site["value"] for n, site in tr.items() if site["type"] == "param"})
    return params


def write_tiny_chorales(path: pathlib.Path, lengths: dict[str, list[int]]) -> pathlib.Path:
    """A canonical dataset file at ``path``: for each split, sequences of the given lengths,
    each step three notes among MIDI 55..74 (seeded, so the same file every time)."""
    import numpy as np

    rng = np.random.default_rng(0)
    splits = {
        name: [
            [[int(n) for n in sorted(55 + rng.choice(20, 3, replace=False))] for _ in range(t)]
            for t in split_lengths
        ]
        for name, split_lengths in lengths.items()
    }
    path.write_text(json.dumps(splits))
    return path


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (the benchmarks are not a package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
