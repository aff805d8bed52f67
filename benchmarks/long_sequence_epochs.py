"""Epoch time of training on long sequences split into micro-batches, with and without scoring
each micro-batch on its real steps only.

Synthetic piano rolls with Piano-midi.de / MuseData lengths (log-uniform between 100 and 4,300
steps), the default DMM, batches of 20, ``--microbatch-steps`` padded steps per micro-batch.
Each setting runs in its own process (so its peak resident memory is its own) and reports
every epoch's seconds (the first compiles), the compile time, the compiled shapes with their
real-step slots, the loss per step after the last epoch and the peak RSS.

    python benchmarks/long_sequence_epochs.py --epochs 4 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def worker(
    real_steps: bool,
    microbatch_steps: int,
    length_bucketing: bool,
    sequences: int = 60,
    longest: int = 4300,
    epochs: int = 4,
) -> dict:
    import numpy as np

    from dmm_jax.runtime import retain_freed_memory

    retain_freed_memory()  # as dmm-jax train does

    from dmm_jax.config import DMMConfig, TrainConfig
    from dmm_jax.data.batching import PaddedSequences
    from dmm_jax.train import UpdateStep, build_svi, init_train_state, train_epoch

    rng = np.random.default_rng(0)
    shortest = min(100, longest)
    lengths = np.exp(rng.uniform(np.log(shortest), np.log(longest), sequences)).astype(int)
    data = PaddedSequences([(rng.random((n, 88)) < 0.05) for n in lengths])
    config = TrainConfig(
        real_steps=real_steps, microbatch_steps=microbatch_steps, length_bucketing=length_bucketing
    )
    svi = build_svi(DMMConfig(), config)
    state = init_train_state(svi, 0, 88)
    update = UpdateStep(svi, microbatch_steps=microbatch_steps)
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        state, loss, _ = train_epoch(update, state, data, config)
        seconds.append(time.perf_counter() - start)
    return {
        "real_steps": real_steps,
        "microbatch_steps": microbatch_steps,
        "length_bucketing": length_bucketing,
        "epoch_seconds": seconds,
        "compile_seconds": update.compile_seconds,
        "compiled_shapes": [list(s) for s in update.compiled_shapes],
        "loss_per_step": loss / data.num_steps,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--microbatch-steps", type=int, default=25_000)
    parser.add_argument("--rounds", type=int, default=1, help="alternations of on and off")
    parser.add_argument("--out", default=None, help="also write the results here as JSON")
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        real, bucketing = (value == "1" for value in args.worker)
        result = worker(real, args.microbatch_steps, bucketing, epochs=args.epochs)
        print(json.dumps(result))
        return
    results = []
    for _ in range(args.rounds):
        for bucketing in ("0", "1"):
            for real in ("1", "0"):
                command = [sys.executable, __file__, "--epochs", str(args.epochs)]
                command += ["--microbatch-steps", str(args.microbatch_steps)]
                command += ["--worker", real, bucketing]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                results.append(r)
                timed = r["epoch_seconds"][1:] or r["epoch_seconds"]
                print(
                    f"{'bucketed' if r['length_bucketing'] else 'random  '} "
                    f"real steps {'on ' if r['real_steps'] else 'off'}: "
                    f"median {statistics.median(timed):.2f} s/epoch after the first "
                    f"({', '.join(f'{s:.2f}' for s in r['epoch_seconds'])}), "
                    f"compile {r['compile_seconds']:.1f} s, loss/step {r['loss_per_step']:.5f}, "
                    f"peak RSS {r['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
