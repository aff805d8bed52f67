"""Data parallelism: one device and a 4-device mesh (one process, or two processes of two devices
on loopback) compute the same updates, losses and estimates; padding rows count exactly zero.

The multi-device runs happen in subprocesses (``tests/distributed_worker.py``), all four
started at once, so this process and the rest of the suite keep their single device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark

from dmm_jax import distributed
from dmm_jax.cli import main
from dmm_jax.data.batching import PaddedSequences

_ROOT = Path(__file__).resolve().parents[1]
_WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
_TIMEOUT_S = 300
_OUTPUTS = ("update", "single", "processes")  # the JSON files the workers write


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], devices: int, tmp: Path, name: str) -> tuple[subprocess.Popen, Path]:
    env = {
        **os.environ,
        # LLVM at -O0 halves the compile time of these few-step runs; every result compared
        # below is computed under the same flags.
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for var in (distributed.ENV_COORDINATOR_ADDRESS, distributed.ENV_NUM_PROCESSES):
        env.pop(var, None)
    log = tmp / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(_WORKER), *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return proc, log


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Results of a single process with 4 devices (one update), one with 1 device (a short fit)
    and two processes with 2 devices each (the same fit), all four started at once."""
    tmp = tmp_path_factory.mktemp("distributed")
    coordinator = f"127.0.0.1:{_free_port()}"
    started = {
        "update": _start(["update", str(tmp / "update.json")], 4, tmp, "update"),
        "single": _start(["single", str(tmp / "single.json")], 1, tmp, "single"),
        **{
            f"process{p}": _start(
                ["fit", str(tmp / "processes.json"), coordinator, "2", str(p)], 2, tmp, f"p{p}"
            )
            for p in range(2)
        },
    }
    deadline = time.monotonic() + _TIMEOUT_S
    for name, (proc, log) in started.items():
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = f"still running after {_TIMEOUT_S} s"
        if code != 0:  # a peer of a failed process would wait for it: stop them all
            for other, _ in started.values():
                other.kill()
            pytest.fail(f"{name} worker failed ({code}):\n{log.read_text()[-3000:]}")
    return {name: json.loads((tmp / f"{name}.json").read_text()) for name in _OUTPUTS}


def _assert_params_close(got, want, rtol, atol=0.0):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def test_one_update_on_4_devices_equals_one_device_for_a_batch_of_22(runs):
    assert runs["update"]["device_count"] == 4
    one, mesh = runs["update"]["update_22"]["one"], runs["update"]["update_22"]["mesh"]
    assert one["shapes"] == [[22, 16, 6, 0]]
    assert mesh["shapes"] == [[24, 16, 6, 0]]  # padded with two empty sequences, none dropped
    assert mesh["loss"] == pytest.approx(one["loss"], rel=1e-5)
    _assert_params_close(mesh["params"], one["params"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("objective", ["iwae", "fivo"])
def test_multi_sample_objectives_update_alike_on_4_devices_and_one(runs, objective):
    one, mesh = (runs["update"][f"update_22_{objective}"][k] for k in ("one", "mesh"))
    assert mesh["shapes"] == [[24, 16, 6, 0]]
    assert np.isfinite(one["loss"]) and mesh["loss"] == pytest.approx(one["loss"], rel=1e-5)
    _assert_params_close(mesh["params"], one["params"], rtol=1e-5, atol=1e-7)


def test_two_processes_of_2_devices_agree_with_one_device_in_training_and_evaluation(runs):
    """Two epochs of fit (batches of 8, the last holding 6, transposed) with a validation
    evaluation, then the importance-sampled estimator over 9 sequences in batches of 8
    (padded, sharded)."""
    assert runs["single"]["device_count"] == 1
    assert runs["processes"]["device_count"] == 4  # 2 processes x 2 devices, one global mesh
    four, one = runs["processes"]["fit"], runs["single"]["fit"]
    # The mesh scores every padded step; one device only the real ones (the same numbers).
    assert four["compiled_shapes"] == [[8, 48, 6, 0]]
    [[*shape, slots]] = one["compiled_shapes"]
    assert shape == [8, 48, 6] and 0 < slots < 8 * 48
    np.testing.assert_allclose(four["train_losses"], one["train_losses"], rtol=1e-5)
    for name in ("val_loss", "is_nll", "elbo_nll"):
        assert four[name] == pytest.approx(one[name], rel=1e-5), name
    assert four["is_nll"] < four["elbo_nll"]  # the IS estimate is below the bound it averages
    _assert_params_close(four["params"], one["params"], rtol=1e-4, atol=1e-6)


def test_empty_padding_sequences_add_exactly_zero_to_loss_and_gradients(runs):
    padding = runs["update"]["padding"]
    assert padding["padded_rows_elbo"] == 0.0
    assert padding["largest_padding_gradient"] == 0.0
    # Real rows draw the same noise whether or not padding rows follow them, so padding a
    # batch for a mesh leaves its loss as it is.
    np.testing.assert_allclose(
        padding["real_rows_with_padding"], padding["real_rows_alone"], rtol=1e-6
    )


def test_global_batch_on_one_device_is_the_plain_batch():
    rng = np.random.default_rng(0)
    data = PaddedSequences([(rng.random((n, 4)) < 0.5).astype(np.uint8) for n in (5, 20, 9)])
    mesh = distributed.data_mesh(1)
    indices = np.array([2, 0])
    x, lengths = distributed.global_batch(data, indices, 3, mesh)
    want_x, want_lengths = data.batch(indices, 3)
    np.testing.assert_array_equal(np.asarray(x), want_x)
    np.testing.assert_array_equal(np.asarray(lengths), want_lengths)
    assert distributed.padded_batch_size(22, mesh) == 22
    with pytest.raises(ValueError, match="do not fit a batch of 1"):
        distributed.global_batch(data, indices, 1, mesh)


def test_bad_device_and_process_settings_are_named(monkeypatch, capsys):
    for var in (
        distributed.ENV_COORDINATOR_ADDRESS,
        distributed.ENV_NUM_PROCESSES,
        distributed.ENV_PROCESS_ID,
    ):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is False  # nothing asked: a single-process run
    with pytest.raises(ValueError, match=r"devices must be between 1 and the 1 local"):
        distributed.data_mesh(2)
    with pytest.raises(ValueError, match=r"missing \['num_processes', 'process_id'\]"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer"):
        distributed.initialize()
    monkeypatch.delenv(distributed.ENV_NUM_PROCESSES)
    with pytest.raises(SystemExit, match="dmm-jax train: devices must be between 1"):
        main(["train", "--dataset", "jsb", "--devices", "3", "--epochs", "1"])


def test_scaling_benchmark_summary_reports_the_largest_loss_gap():
    scaling = load_benchmark("scaling")
    rows = [
        {"seconds_per_epoch": 2.0, "loss_per_epoch": [10.0, 8.0]},
        {"seconds_per_epoch": 3.0, "loss_per_epoch": [10.0, 8.004]},
        {"seconds_per_epoch": 1.0, "loss_per_epoch": [10.001, 8.0]},
    ]
    summary = scaling.summarize(rows)
    assert summary["max_relative_loss_difference"] == pytest.approx(5e-4)
    assert [r["seconds_vs_first"] for r in rows] == [1.0, 1.5, 0.5]
