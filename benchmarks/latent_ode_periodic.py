"""The Latent ODE on the periodic toy data, dmm_jax against the paper's PyTorch reference.

Both train the same model at the reference's settings for its periodic command
(``run_models.py --niters E -n 1000 -s 50 -l 10 --dataset periodic --latent-ode
--noise-weight 0.01``): 800 training series of 100 points, batches of 50, learning rate
1e-2 decayed by 0.999 per update, latent size 10, ODE-RNN encoder of 20, ODE networks of 100
units, decoder noise 0.01, the test split scored after every epoch. As the reference's ``-s
50``, the encoder reads 50 random points of each whole training series, drawn afresh at every
update, and the decoder scores all 100 (``--context-points 50``; 0 trains on a fixed 50
observed points per series instead). Each side draws its own data from the same distribution
(the reference generates it inside its script).
Reported per side: the median seconds per epoch after the first, its test evaluation
included (dmm_jax: between the ends of successive epochs; the reference: (wall of E epochs -
wall of 1 epoch) / (E - 1), each a fresh process, so its start-up and data generation
cancel) and the test MSE (interpolation) after E epochs.

Both decode ``--particles`` draws of z_0 per series in each update (the reference: 3, fixed
in its script; dmm_jax averages the ELBO over them). Differences that remain: the reference
trains with Adamax on its own objective (per series the reconstruction log-density averaged
over points and draws, minus the KL averaged over latent dimensions, then a log-sum-exp over
the series of the batch), dmm_jax with Adam on the ELBO summed over points, KL annealed
linearly from 0.01 over the run (the reference: 0 for 10 epochs, then 1 - 0.99^(epoch -
10)).

    taskset -c 0 python benchmarks/latent_ode_periodic.py --epochs 500 --reference DIR --out F

(500 epochs: the reference's ``--niters 500``; about 2 s and 4.5 s per epoch on one core of
the machine in docs/RESULTS.md.)

(``taskset -c 0``: both sides on one core, the reference with one OpenMP thread.)

``--reference DIR``: a checkout of github.com/YuliaRubanova/latent_ode with torch, torchdiffeq,
scikit-learn, matplotlib and pandas importable by ``--reference-python`` (omit it to time
dmm_jax alone; its scripts import torchvision, which the periodic data never uses). The
reference runs with ``--reference-threads`` OpenMP threads (default 1: with torch's default
pool on two cores an epoch took 101 s while one other process ran).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from epoch_time import provenance


def periodic_data(seed: int, extrapolate: bool = False) -> dict:
    """The reference's periodic command's data: 1,000 series, 50 of 100 points observed."""
    from dmm_jax.data.irregular import periodic_dataset

    return periodic_dataset(
        n=1000, subsample=50, noise_weight=0.01, seed=seed, extrapolate=extrapolate
    )


def train_on_periodic(
    model_config,
    epochs: int,
    seed: int,
    data: dict,
    eval_every: int = 1,
    particles: int = 1,
    whole_series: bool = False,
):
    """``fit`` at the reference's settings on the training series' observed points (or, with
    ``whole_series``, all their points), the test split's bound and MSE every ``eval_every``
    epochs; returns fit's result and the wall seconds of each epoch after the first, its
    evaluation included (as the reference's are)."""
    from dmm_jax.config import TrainConfig
    from dmm_jax.data.irregular import as_sequence_arrays
    from dmm_jax.train import fit

    train = as_sequence_arrays(data["train"].truth if whole_series else data["train"].observed)
    test = as_sequence_arrays(data["test"].observed)
    train_config = TrainConfig(
        epochs=epochs,
        batch_size=50,
        learning_rate=1e-2,
        lr_decay=0.999,
        weight_decay=0.0,
        annealing_epochs=epochs,
        minimum_annealing_factor=0.01,
        eval_every=eval_every,
        seed=seed,
        particles=particles,
    )
    ends = []

    def epoch_done(line: str) -> None:  # fit logs an epoch's line once it is evaluated too
        if line.startswith("[training epoch"):
            ends.append(time.perf_counter())

    result = fit(
        train, test=test, model_config=model_config, train_config=train_config, log=epoch_done
    )
    return result, list(np.diff(ends))


def run_dmm_jax(epochs: int, seed: int, particles: int, context_points: int) -> dict:
    import jax

    from dmm_jax.config import LatentODEConfig
    from dmm_jax.models.latent_ode import predict
    from dmm_jax.models.series_tasks import task_mse

    data = periodic_data(seed)
    model_config = LatentODEConfig(obs_dim=1, use_dt=True, context_points=context_points)
    result, epoch_seconds = train_on_periodic(
        model_config, epochs, seed, data, particles=particles, whole_series=context_points > 0
    )
    mse = task_mse(predict, result.params, jax.random.PRNGKey(seed), model_config, data["test"])
    return {
        "seconds_per_epoch": statistics.median(epoch_seconds),
        "training_seconds_per_epoch": statistics.median(r["seconds"] for r in result.history[1:]),
        "test_mse": mse,
        "test_bound_per_step": result.history[-1].get("test_loss_per_step"),
    }


def run_reference(directory: Path, python: str, epochs: int, threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:  # torch's own thread pool oversubscribes a small machine badly
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    def run(niters: int) -> tuple[float, str]:
        command = [python, "run_models.py", "--niters", str(niters), "-n", "1000", "-s", "50"]
        command += ["-l", "10", "--dataset", "periodic", "--latent-ode", "--noise-weight", "0.01"]
        started = time.perf_counter()
        done = subprocess.run(
            command, cwd=directory, env=env, capture_output=True, text=True, check=False
        )
        if done.returncode:
            raise RuntimeError(f"the reference failed: {done.stderr[-2000:]}")
        return time.perf_counter() - started, done.stderr

    one, _ = run(1)
    total, log = run(epochs)
    mse = [float(m) for m in re.findall(r"Test MSE: ([0-9.eE+-]+)", log)]
    return {
        "seconds_per_epoch": (total - one) / (epochs - 1),
        "wall_seconds_one_epoch": one,
        "wall_seconds": total,
        "test_mse": mse[-1] if mse else None,
        "epochs_logged": len(mse),
        "threads": threads or "torch default",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--particles",
        type=int,
        default=3,
        help="draws of z_0 per series in each update (the reference trains on 3)",
    )
    parser.add_argument(
        "--context-points",
        type=int,
        default=50,
        help="train on whole series, q(z_0) reading this many random points of each (the "
        "reference's -s 50); 0: train on the 50 observed points of each series",
    )
    parser.add_argument("--reference", default=None, help="checkout of the reference repository")
    parser.add_argument("--reference-python", default=sys.executable)
    parser.add_argument(
        "--reference-threads", type=int, default=1, help="OMP threads of the reference (0: torch's)"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2")
    result = {
        **provenance("latent_ode_periodic.py", argv or sys.argv[1:]),
        "epochs": args.epochs,
        "particles": args.particles,
        "context_points": args.context_points,
        "dmm_jax": run_dmm_jax(args.epochs, args.seed, args.particles, args.context_points),
    }
    if args.reference:
        result["reference"] = run_reference(
            Path(args.reference), args.reference_python, args.epochs, args.reference_threads
        )
        result["speedup"] = (
            result["reference"]["seconds_per_epoch"] / result["dmm_jax"]["seconds_per_epoch"]
        )
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
