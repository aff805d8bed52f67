"""Smoke test of the PyTorch/Pyro reference DMM in ``benchmarks/pyro_reference.py``.

Skips unless the ``bench`` extra (torch, pyro-ppl) is installed.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the bench extra (torch)")
pytest.importorskip("pyro", reason="needs the bench extra (pyro-ppl)")

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "pyro_reference.py"


@pytest.fixture(scope="module")
def ref():
    spec = importlib.util.spec_from_file_location("pyro_reference", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_one_epoch_finite_and_seeded(ref):
    rng = np.random.default_rng(0)
    seqs = [(rng.random((n, 6)) < 0.3).astype(np.uint8) for n in (3, 5, 4, 2)]
    sizes = {"z_dim": 3, "emission_dim": 5, "transition_dim": 7, "rnn_dim": 8}

    def one_epoch():
        trainer = ref.ReferenceTrainer(seqs, seed=1, batch_size=3, **sizes)
        row = trainer.run_epoch()
        return row, trainer.evaluate(seqs[:2])

    (row_a, eval_a), (row_b, eval_b) = one_epoch(), one_epoch()
    assert row_a["epoch"] == 0
    assert math.isfinite(row_a["train_loss_per_step"]) and math.isfinite(eval_a)
    assert row_a["annealing_factor"] == pytest.approx(0.2 + 0.8 * 2 / 2000)
    assert row_a["train_loss_per_step"] == row_b["train_loss_per_step"]
    assert eval_a == eval_b
