"""Trains the PyTorch/Pyro reference and dmm_jax in lockstep on JSB: same initial weights
(the reference's, copied in), same mini-batches, same guide noise. Where the two agree update
after update, any difference between separate runs of the two is the random streams'.

    python benchmarks/lockstep.py --epochs 3 --seed 0 [--sequences N] [--out FILE.json]

Prints each update's loss per time step in both; stops where the reference fails (it raises
on a NaN parameter). dmm_jax runs its NumPyro loss with the dense path (no real-step rows;
``tests/test_real_steps.py`` shows that path gives the same loss and gradients) and
``clipped_adam``, jitted once per padded length. Needs the ``bench`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import pyro_reference as ref

import dmm_jax.distributions
from dmm_jax.config import DMMConfig, TrainConfig
from dmm_jax.data.batching import length_bucket
from dmm_jax.optim import annealing_factor, clipped_adam
from dmm_jax.step import build_svi


@contextlib.contextmanager
def given_dmm_jax_noise() -> Iterator[list]:
    """Inside, dmm_jax's guides draw their noise [T, B, Z] from ``holder[0]`` (the yielded
    list; set it inside the traced function) instead of from their key: the counterpart of
    ``pyro_reference.given_guide_noise``."""
    holder = [None]
    own_noise = dmm_jax.distributions.step_noise
    dmm_jax.distributions.step_noise = lambda key, n, shape: holder[0][:n]
    try:
        yield holder
    finally:
        dmm_jax.distributions.step_noise = own_noise


def training_step(svi, transform, noise_holder: list):
    """jitted (params, opt_state, x, lengths, annealing, noise, **covariates) ->
    (params, opt_state, loss, grads): one step of dmm_jax's NumPyro loss (``svi.loss``) and
    ``transform`` with the guide noise given (under ``given_dmm_jax_noise``)."""

    @jax.jit
    def step(p, opt_state, x, lengths, annealing, noise, **covariates):
        def loss_fn(p):
            noise_holder[0] = noise
            key = jax.random.PRNGKey(0)  # unused: the noise is given
            return svi.loss.loss(key, p, svi.model, svi.guide, x, lengths, annealing, **covariates)

        loss, grads = jax.value_and_grad(loss_fn)(p)
        delta, opt_state = transform.update(grads, opt_state, p)
        return optax.apply_updates(p, delta), opt_state, loss, grads

    return step


def _run(args, trainer, params, train_config, transform, step) -> tuple[list, str | None]:
    """The lockstep updates: per-update records, and the reference's error if it failed."""
    batch_size, z_dim = trainer.batch_size, trainer.dmm.z_0.shape[0]
    opt_state = transform.init(params)
    rng = np.random.default_rng(args.seed)
    updates, reference_error = [], None
    for epoch in range(args.epochs):
        order = rng.permutation(trainer.n_data)
        for b in range(trainer.n_mini_batches):
            factor = annealing_factor(epoch, b, trainer.n_mini_batches, train_config)
            indices = torch.as_tensor(order[b * batch_size : (b + 1) * batch_size])
            batch = ref.get_mini_batch(indices, trainer.sequences, trainer.seq_lengths)
            mini_batch, seq_lengths = batch[0], batch[3]
            rows, longest = mini_batch.shape[:2]
            padded = length_bucket(longest)
            noise = rng.standard_normal((padded, batch_size, z_dim)).astype(np.float32)
            queue = [noise[t, :rows] for t in range(longest)]
            try:
                with trainer._activate(), ref.given_guide_noise(queue):
                    ref_loss = trainer.svi.step(*batch, factor)
            except ValueError as error:  # torch's check on a NaN parameter
                reference_error = f"epoch {epoch} update {b}: {str(error).splitlines()[0]}"
                ref_loss = math.nan
            x = np.zeros((batch_size, padded, mini_batch.shape[2]), np.float32)
            x[:rows, :longest] = mini_batch.numpy()
            lengths = np.zeros(batch_size, np.int32)
            lengths[:rows] = seq_lengths.numpy()
            params, opt_state, jax_loss, _ = step(
                params, opt_state, x, lengths, np.float32(factor), noise
            )
            steps = float(seq_lengths.sum())
            record = {
                "epoch": epoch,
                "update": b,
                "reference": ref_loss / steps,
                "dmm_jax": float(jax_loss) / steps,
            }
            updates.append(record)
            print(
                f"epoch {epoch} update {b:2d}: reference {record['reference']:14.4f}   "
                f"dmm_jax {record['dmm_jax']:14.4f}",
                flush=True,
            )
            if reference_error:
                break
        if reference_error:
            break

    return updates, reference_error


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="initial weights, batches, noise")
    parser.add_argument("--data", default=None, help="JSB file or directory")
    parser.add_argument(
        "--sequences", type=int, default=None, help="train on the first N sequences only"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default=None, help="write the per-update losses as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    splits, source = ref.load_jsb(args.data)
    trainer = ref.ReferenceTrainer(splits["train"][: args.sequences], seed=args.seed)
    params = jax.tree.map(jnp.asarray, ref.dmm_jax_weights(trainer.dmm))
    train_config = TrainConfig(seed=args.seed)
    svi, transform = (
        build_svi(DMMConfig(numerics="reference"), train_config),
        clipped_adam(train_config),
    )
    with given_dmm_jax_noise() as noise_holder:
        step = training_step(svi, transform, noise_holder)
        updates, reference_error = _run(args, trainer, params, train_config, transform, step)

    agree = 0
    for record in updates:
        if not abs(record["reference"] - record["dmm_jax"]) <= 1e-3 * abs(record["reference"]):
            break
        agree += 1
    summary = {
        "updates": len(updates),
        "agree_to_0.1%": agree,
        "reference_error": reference_error,
        "seed": args.seed,
        "sequences": trainer.n_data,
        "data": source,
    }
    print(json.dumps(summary))
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**summary, "per_update": updates}, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
