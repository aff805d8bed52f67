"""Data parallelism: one device and a 4-device mesh (one process, or two processes of two devices
on loopback) compute the same updates, losses and estimates; padding rows count exactly zero.

The multi-device runs happen in subprocesses (``tests/distributed_worker.py``), all three
started at once, so this process and the rest of the suite keep their single device.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import init_params, random_binary_batch

from dmm_jax import distributed
from dmm_jax.cli import main
from dmm_jax.data.batching import PaddedSequences
from dmm_jax.evaluate import elbo_per_sequence

_ROOT = Path(__file__).resolve().parents[1]
_WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
_TIMEOUT_S = 300


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
    """Results of the single-process 4-device worker and of a 2-process x 2-device run."""
    tmp = tmp_path_factory.mktemp("distributed")
    coordinator = f"127.0.0.1:{_free_port()}"
    started = {
        "devices": _start(["devices", str(tmp / "devices.json")], 4, tmp, "devices"),
        **{
            f"process{p}": _start(
                ["fit", str(tmp / "processes.json"), coordinator, "2", str(p)], 2, tmp, f"p{p}"
            )
            for p in range(2)
        },
    }
    for name, (proc, log) in started.items():
        try:
            code = proc.wait(timeout=_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other, _ in started.values():
                other.kill()
            pytest.fail(f"{name} worker ran past {_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        assert code == 0, f"{name} worker failed:\n{log.read_text()[-3000:]}"
    return {
        "devices": json.loads((tmp / "devices.json").read_text()),
        "processes": json.loads((tmp / "processes.json").read_text()),
    }


def _assert_params_close(got, want, rtol, atol=0.0):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def test_one_update_on_4_devices_equals_one_device_for_a_batch_of_22(runs):
    assert runs["devices"]["device_count"] == 4
    one, mesh = runs["devices"]["update_22"]["one"], runs["devices"]["update_22"]["mesh"]
    assert one["shapes"] == [[22, 16, 6]]
    assert mesh["shapes"] == [[24, 16, 6]]  # padded with two empty sequences, none dropped
    assert mesh["loss"] == pytest.approx(one["loss"], rel=1e-5)
    _assert_params_close(mesh["params"], one["params"], rtol=1e-5, atol=1e-7)


def test_fit_and_evaluation_on_4_devices_equal_one_device(runs):
    one, mesh = runs["devices"]["fit"]["one"], runs["devices"]["fit"]["mesh"]
    assert mesh["compiled_shapes"] == one["compiled_shapes"] == [[8, 16, 6]]
    np.testing.assert_allclose(mesh["train_losses"], one["train_losses"], rtol=1e-5)
    for name in ("val_loss", "is_nll", "elbo_nll"):
        assert mesh[name] == pytest.approx(one[name], rel=1e-5), name
    assert mesh["is_nll"] < mesh["elbo_nll"]  # the IS estimate is below the bound it averages
    _assert_params_close(mesh["params"], one["params"], rtol=1e-4, atol=1e-6)


def test_two_processes_agree_with_a_single_process_run(runs):
    assert runs["processes"]["device_count"] == 4  # 2 processes x 2 devices, one global mesh
    two, one = runs["processes"]["fit"], runs["devices"]["fit"]["one"]
    np.testing.assert_allclose(two["train_losses"], one["train_losses"], rtol=1e-5)
    for name in ("val_loss", "is_nll", "elbo_nll"):
        assert two[name] == pytest.approx(one[name], rel=1e-5), name
    _assert_params_close(two["params"], one["params"], rtol=1e-4, atol=1e-6)


def test_empty_padding_sequences_add_exactly_zero_to_loss_and_gradients(tiny_config, key):
    params = init_params(tiny_config)
    x, lengths = random_binary_batch(0, 6, 10, tiny_config.obs_dim, lengths=[10, 3, 7, 1, 0, 0])
    padding = lengths == 0
    elbo = jax.jit(elbo_per_sequence, static_argnames="config")

    def padded_rows_elbo(p):
        per_sequence = elbo_per_sequence(p, key, x, lengths, tiny_config)
        return per_sequence[padding].sum(), per_sequence

    (value, per_sequence), grads = jax.jit(jax.value_and_grad(padded_rows_elbo, has_aux=True))(
        params
    )
    assert float(value) == 0.0
    for leaf in jax.tree.leaves(grads):
        assert not np.any(np.asarray(leaf)), "a padding row moved a gradient"
    # Real rows draw the same noise whether or not padding rows follow them (as batches and
    # meshes pad: at the end), so padding for a mesh leaves the loss as it is.
    alone = elbo(params, key, x[:4], lengths[:4], config=tiny_config)
    np.testing.assert_allclose(per_sequence[:4], alone, rtol=1e-6)


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
    spec = importlib.util.spec_from_file_location("scaling", _ROOT / "benchmarks" / "scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    rows = [
        {"seconds_per_epoch": 2.0, "loss_per_epoch": [10.0, 8.0]},
        {"seconds_per_epoch": 3.0, "loss_per_epoch": [10.0, 8.004]},
        {"seconds_per_epoch": 1.0, "loss_per_epoch": [10.001, 8.0]},
    ]
    summary = scaling.summarize(rows)
    assert summary["max_relative_loss_difference"] == pytest.approx(5e-4)
    assert [r["seconds_vs_first"] for r in rows] == [1.0, 1.5, 0.5]
