"""Two candidate speed-ups, timed against the default update in one process.

- ``donated``: the default, ``UpdateStep`` (the state's buffers donated to the call);
- ``no_donation``: the same update jitted without ``donate_argnums``;
- ``K_per_call``: K mini-batches per compiled call, a ``lax.scan`` of the same guarded update
  over K stacked batches of one shape (one dispatch instead of K).

Every variant runs the same K bucketed JSB batches of one padded length, in the same order,
from the same initial state, on their real steps; the variants alternate round by round after
one warm-up round, so all see the same machine. Reported: min and median seconds per round
and the last update's loss (which must agree: the same updates).

    python benchmarks/update_variants.py --batches 4 --rounds 60 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=4, help="K, mini-batches per round")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--length", type=int, default=96, help="padded length of the batches")
    parser.add_argument("--data", default=None, help="JSB file or dir (default: $DMM_JAX_DATA_DIR)")
    parser.add_argument("--out", default=None, help="also write the results here as JSON")
    args = parser.parse_args(argv)

    from dmm_jax.runtime import retain_freed_memory

    retain_freed_memory()  # as dmm-jax train does

    import jax
    import jax.numpy as jnp

    from dmm_jax.config import DMMConfig, TrainConfig
    from dmm_jax.data import load_dataset
    from dmm_jax.data.batching import PaddedSequences, epoch_batches
    from dmm_jax.real_steps import RealSteps, real_steps
    from dmm_jax.runtime import compiler_options
    from dmm_jax.step import (
        UpdateStep,
        build_svi,
        init_train_state,
        real_step_plan,
        skipping_nonfinite,
    )

    train = PaddedSequences(load_dataset("jsb_chorales", args.data).train.sequences)
    model_config, train_config = DMMConfig(), TrainConfig(length_bucketing=True)
    svi = build_svi(model_config, train_config)
    capacity = real_step_plan(train, train_config)[args.length]
    size = train_config.batch_size
    picked = []
    for epoch in range(8):
        for indices in epoch_batches(jax.random.PRNGKey(epoch), train.lengths, size, True):
            full = len(indices) == size and train.lengths[indices].sum() <= capacity
            if full and train.padded_shape(indices, size)[1] == args.length:
                picked.append(indices)
    if len(picked) < args.batches:
        parser.error(f"only {len(picked)} full batches of {args.length} padded steps")
    batches = [train.batch(indices, size) for indices in picked[: args.batches]]
    steps = [real_steps(lengths, args.length, capacity) for _, lengths in batches]

    options = compiler_options(jax.default_backend())
    donated = UpdateStep(svi)
    kept = jax.jit(skipping_nonfinite(svi.update), compiler_options=options or None)

    def scanned(svi_state, x, lengths, annealing, steps):
        def one(state, batch):
            x, lengths, annealing, steps = batch
            return skipping_nonfinite(svi.update)(state, x, lengths, annealing, steps=steps)

        return jax.lax.scan(one, svi_state, (x, lengths, annealing, steps))

    per_call = jax.jit(scanned, donate_argnums=0, compiler_options=options or None)
    stacked = (
        jnp.asarray(np.stack([x for x, _ in batches])),
        jnp.asarray(np.stack([lengths for _, lengths in batches])),
        jnp.ones(args.batches, jnp.float32),
        RealSteps(*(jnp.asarray(np.stack(field)) for field in zip(*steps))),
    )

    def initial_state():
        return jax.block_until_ready(init_train_state(svi, 0, model_config.obs_dim).svi_state)

    def one_call_each(update):
        def run(state):
            for (x, lengths), s in zip(batches, steps):
                state, loss = update(state, x, lengths, jnp.float32(1.0), steps=s)
            return loss

        return run

    variants = {
        "donated": one_call_each(donated),
        "no_donation": one_call_each(kept),
        f"{args.batches}_per_call": lambda state: per_call(state, *stacked)[1][-1],
    }
    seconds = {name: [] for name in variants}
    last_loss = {}
    for round_ in range(args.rounds + 1):  # round 0 compiles and warms up
        for name, run in variants.items():
            state = initial_state()
            start = time.perf_counter()
            loss = jax.block_until_ready(run(state))
            if round_:
                seconds[name].append(time.perf_counter() - start)
            last_loss[name] = float(loss)
    results = {
        "batches": args.batches,
        "length": args.length,
        "capacity": capacity,
        "real_steps": [int(lengths.sum()) for _, lengths in batches],
        "rounds": args.rounds,
        "variants": {
            name: {
                "min_s": min(s),
                "median_s": statistics.median(s),
                "last_loss": last_loss[name],
            }
            for name, s in seconds.items()
        },
    }
    print(
        f"{args.batches} batches of {size} x {args.length} steps "
        f"(real steps {results['real_steps']}), {args.rounds} rounds:"
    )
    for name, r in results["variants"].items():
        print(
            f"  {name:14s} min {1e3 * r['min_s']:7.1f} ms, median {1e3 * r['median_s']:7.1f} ms,"
            f" last loss {r['last_loss']:.4f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
