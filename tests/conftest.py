"""Shared pytest fixtures.

The JSB Chorales file is found through ``$DMM_JAX_DATA_DIR`` (CI sets it to
/work/shared/data, which holds ``jsb_chorales.json``); tests that need it skip, saying why,
when it is not there.
"""

from __future__ import annotations

import os
import pathlib

import pytest


@pytest.fixture(scope="session")
def jsb_path() -> pathlib.Path:
    """Path of the shared ``jsb_chorales.json``; skips the test when it is unavailable."""
    data_dir = os.environ.get("DMM_JAX_DATA_DIR")
    if not data_dir:
        pytest.skip("JSB data unavailable: DMM_JAX_DATA_DIR is not set")
    path = pathlib.Path(data_dir) / "jsb_chorales.json"
    if not path.is_file():
        pytest.skip(f"JSB data unavailable: {path} does not exist")
    return path


@pytest.fixture(scope="session")
def jsb_dataset(jsb_path: pathlib.Path):
    """The JSB Chorales dataset loaded from :func:`jsb_path` (never downloads)."""
    from dmm_jax.data import load_dataset

    return load_dataset("jsb_chorales", jsb_path, download=False)
