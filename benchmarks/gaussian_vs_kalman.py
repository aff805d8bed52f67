"""Trains the default (nonlinear) DMM on linear-Gaussian data and reports its test NLL per time
step beside the true model's exact one (the Kalman filter).

The DMM has the default gated transition, a two-layer MLP Gaussian emission with learned
scales and the ST-R guide (smaller than the music defaults; see the flags); it knows nothing
of linearity. The target is a test NLL within
0.1 nats per step of the true model's. Standalone: never imported by the package.

    python benchmarks/gaussian_vs_kalman.py --epochs 200 --out benchmarks/results/gaussian.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from dmm_jax.config import DMMConfig, TrainConfig
from dmm_jax.data.synthetic import linear_gaussian_ssm, sample_linear_gaussian
from dmm_jax.evaluate import evaluate_split
from dmm_jax.kalman import kalman_log_likelihood
from dmm_jax.train import fit


def exact_nll_per_step(ssm, data) -> float:
    """The true model's -log p(x) per time step over a split, by the Kalman filter."""
    log_lik = kalman_log_likelihood(
        jax.tree.map(jnp.asarray, ssm),
        jnp.asarray(data.x),
        jnp.asarray(data.lengths),
        None if data.inputs is None else jnp.asarray(data.inputs),
    )
    return -float(jnp.sum(log_lik)) / data.num_steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--z-dim", type=int, default=2, help="state dim of the true SSM")
    parser.add_argument("--obs-dim", type=int, default=4)
    parser.add_argument("--input-dim", type=int, default=0)
    parser.add_argument("--missing", type=float, default=0.0, help="fraction of entries NaN")
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--train-sequences", type=int, default=500)
    parser.add_argument("--test-sequences", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--annealing-epochs", type=int, default=20)
    # The default architecture at a size that suits 2-D dynamics (and a CPU).
    parser.add_argument("--dmm-z-dim", type=int, default=8)
    parser.add_argument("--transition-dim", type=int, default=32)
    parser.add_argument("--emission-dim", type=int, default=32)
    parser.add_argument("--rnn-dim", type=int, default=64)
    parser.add_argument("--samples", type=int, default=100, help="IS draws per test sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)

    ssm = linear_gaussian_ssm(args.seed, args.z_dim, args.obs_dim, args.input_dim)
    common = {"missing": args.missing}
    train = sample_linear_gaussian(
        ssm, args.seed + 1, args.train_sequences, args.num_steps, **common
    )
    test = sample_linear_gaussian(ssm, args.seed + 2, args.test_sequences, args.num_steps, **common)
    model_config = DMMConfig(
        obs_dim=args.obs_dim,
        z_dim=args.dmm_z_dim,
        transition_dim=args.transition_dim,
        emission_dim=args.emission_dim,
        rnn_dim=args.rnn_dim,
        emission="gaussian",
        input_dim=args.input_dim,
    )
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_decay=1.0,
        weight_decay=0.0,
        annealing_epochs=args.annealing_epochs,
        seed=args.seed,
    )
    start = time.perf_counter()
    result = fit(
        train,
        model_config=model_config,
        train_config=train_config,
        log=lambda s: print(s, flush=True),
    )
    train_seconds = time.perf_counter() - start
    evaluated = evaluate_split(
        result.params,
        jax.random.PRNGKey(args.seed + 3),
        test,
        model_config,
        num_samples=args.samples,
        estimator="is",
    )
    exact = exact_nll_per_step(ssm, test)
    report = {
        "command": "python benchmarks/gaussian_vs_kalman.py " + " ".join(argv or []),
        "true_model_exact_nll_per_step": exact,
        "dmm_is_nll_per_step": evaluated["is_nll_per_step"],
        "dmm_is_nll_per_step_se": evaluated["is_nll_per_step_se"],
        "dmm_elbo_nll_per_step": evaluated["elbo_nll_per_step"],
        "gap_nats_per_step": evaluated["is_nll_per_step"] - exact,
        "target_gap": 0.1,
        "final_train_loss_per_step": result.history[-1]["train_loss_per_step"],
        "train_seconds": train_seconds,
        "device": str(jax.devices()[0]),
        "args": vars(args),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, out)
    return report


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
