"""Atomic checkpoints: parameters, optimizer state, PRNG state, epoch, configs and history.

One msgpack file per checkpoint directory (``checkpoint.msgpack``; with early stopping also
``best.msgpack``, the state of the best validation bound). It is written to a
temporary file in the same directory, flushed to disk and renamed over the old one, so a
crash mid-write leaves the previous checkpoint intact and never a file that loads wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization
from jax.flatten_util import ravel_pytree

from dmm_jax.config import TrainConfig, config_from_dict, config_to_dict
from dmm_jax.files import atomic_write_bytes
from dmm_jax.models import family_of, get_family

CHECKPOINT_FILE = "checkpoint.msgpack"
BEST_FILE = "best.msgpack"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match what it is restored into."""


def checkpoint_path(directory: str | os.PathLike, filename: str = CHECKPOINT_FILE) -> Path:
    return Path(directory) / filename


def save_checkpoint(
    directory: str | os.PathLike,
    train_state: Any,
    *,
    model_config: Any,
    train_config: TrainConfig,
    history: list[dict[str, Any]],
    metadata: dict[str, Any] | None = None,
    filename: str = CHECKPOINT_FILE,
) -> Path:
    """Atomically writes ``train_state`` (any pytree flax can serialize) with its configs.

    ``metadata`` is any JSON-serializable dict (e.g. the dataset name) kept alongside.
    ``filename``: ``CHECKPOINT_FILE`` (the latest state) or ``BEST_FILE``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "model": family_of(model_config).name,
        "model_config": json.dumps(config_to_dict(model_config)),
        "train_config": json.dumps(config_to_dict(train_config)),
        "history": json.dumps(history),
        "metadata": json.dumps(metadata or {}),
        "state": serialization.to_state_dict(train_state),
    }
    data = serialization.msgpack_serialize(payload)
    target = checkpoint_path(directory, filename)
    atomic_write_bytes(target, data)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


# Model fields added since checkpoints were first written, with the value that reproduces
# what an older checkpoint was trained with (its config lacks the field).
_ADDED_FIELDS = {"dmm": {"numerics": "reference"}}


def read_checkpoint(
    directory: str | os.PathLike, filename: str = CHECKPOINT_FILE
) -> dict[str, Any]:
    """Reads a checkpoint: configs as dataclasses, history as a list, state as a raw dict."""
    path = checkpoint_path(directory, filename)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
    except Exception as err:  # msgpack raises several unrelated types on corrupt bytes
        raise CheckpointError(f"{path}: unreadable checkpoint ({err})") from err
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a dmm_jax checkpoint of format {FORMAT_VERSION}")
    # Checkpoints written before there were several families hold a DMM and no "model" key.
    try:
        family = get_family(payload.get("model", "dmm"))
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err
    model_config = {**_ADDED_FIELDS.get(family.name, {}), **json.loads(payload["model_config"])}
    return {
        "model_config": config_from_dict(family.config_class, model_config),
        "train_config": config_from_dict(TrainConfig, json.loads(payload["train_config"])),
        "history": json.loads(payload["history"]),
        "metadata": json.loads(payload.get("metadata", "{}")),
        "state": payload["state"],
        "path": path,
    }


def migrate_state(raw_state: dict[str, Any], params: Any) -> dict[str, Any]:
    """Brings a raw saved state to the current format; a state already in it is returned as is.

    Checkpoints written before the optimizer ran on one raveled vector hold Adam's moments
    (any node with ``count``, ``mu`` and ``nu``) as trees shaped like the parameters; they are
    raveled here in the order ``optax.flatten`` uses (``jax.tree.leaves``). ``params``: the
    model's parameters (any values of the right structure), to read those trees with.
    """

    def ravel(tree_raw):
        return ravel_pytree(serialization.from_state_dict(params, tree_raw))[0]

    def visit(node):
        if not isinstance(node, dict):
            return node
        if (
            "count" in node
            and isinstance(node.get("mu"), dict)
            and isinstance(node.get("nu"), dict)
        ):
            return {**node, "mu": ravel(node["mu"]), "nu": ravel(node["nu"])}
        return {key: visit(value) for key, value in node.items()}

    return visit(raw_state)


def restore_state(template: Any, raw_state: dict[str, Any], source: Path | str = "checkpoint"):
    """Fills ``template`` (a freshly initialised state of the same structure) from raw_state."""
    try:
        restored = serialization.from_state_dict(template, raw_state)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{source}: state does not match this model ({err})") from err
    want = jax.tree.map(np.shape, template)
    got = jax.tree.map(np.shape, restored)
    if want != got:
        raise CheckpointError(f"{source}: array shapes do not match this model's configuration")
    return restored
