"""Peak memory of one training update on long sequences (Piano-midi.de / MuseData lengths).

Each setting runs in its own process, so its peak resident memory (ru_maxrss) is its own:
one update of the default DMM (``--model vrnn``: the default VRNN; ``--emission nade``: with
a NADE output) on a batch of ``--batch`` random piano rolls of ``--steps`` steps, then a
second one timed. Reported per setting: micro-batches per update, XLA's
temporary buffer size for the compiled update, peak RSS, compile and update seconds.

    python benchmarks/long_sequence_memory.py --microbatch-steps 0 25000 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MIB = 2**20


def worker(
    batch: int, steps: int, microbatch_steps: int, model: str = "dmm", emission: str = "bernoulli"
) -> dict:
    import jax
    import numpy as np

    from dmm_jax.config import DMMConfig, TrainConfig, VRNNConfig
    from dmm_jax.data.batching import microbatch_count
    from dmm_jax.runtime import retain_freed_memory
    from dmm_jax.step import UpdateStep, build_svi, init_train_state

    retain_freed_memory()  # as dmm-jax train does; the peak must hold with it

    train_config = TrainConfig(microbatch_steps=microbatch_steps)
    model_config = (VRNNConfig if model == "vrnn" else DMMConfig)(emission=emission)
    svi = build_svi(model_config, train_config)
    state = init_train_state(svi, 0, 88).svi_state
    update = UpdateStep(svi, microbatch_steps=microbatch_steps)
    rng = np.random.default_rng(0)
    x = (rng.random((batch, steps, 88)) < 0.05).astype(np.float32)
    lengths = np.full(batch, steps, np.int32)
    update.compile(state, [(x, lengths, {})])
    temp = update.executable(x.shape).memory_analysis().temp_size_in_bytes
    state, loss = update(state, x, lengths, 1.0)
    jax.block_until_ready(loss)
    start = time.perf_counter()
    state, loss = update(state, x, lengths, 1.0)
    jax.block_until_ready(loss)
    return {
        "model": model,
        "emission": emission,
        "batch": batch,
        "steps": steps,
        "microbatch_steps": microbatch_steps,
        "microbatches": microbatch_count(batch, steps, microbatch_steps),
        "xla_temp_mib": temp / MIB,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "compile_seconds": update.compile_seconds,
        "update_seconds": time.perf_counter() - start,
        "loss_per_step": float(loss) / float(lengths.sum()),
        "platform": jax.default_backend(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4300)
    parser.add_argument("--microbatch-steps", type=int, nargs="+", default=[0, 25_000])
    parser.add_argument("--model", choices=("dmm", "vrnn"), default="dmm")
    parser.add_argument("--emission", choices=("bernoulli", "nade"), default="bernoulli")
    parser.add_argument("--out", default=None, help="also write the results here as JSON")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.batch, args.steps, args.worker, args.model, args.emission)))
        return
    results = []
    for setting in args.microbatch_steps:
        command = [sys.executable, __file__, "--batch", str(args.batch), "--steps"]
        command += [str(args.steps), "--worker", str(setting)]
        command += ["--model", args.model, "--emission", args.emission]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        r = results[-1]
        print(
            f"microbatch_steps={setting:>6} ({r['microbatches']} micro-batches): "
            f"XLA temp {r['xla_temp_mib']:.0f} MiB, peak RSS {r['peak_rss_mib']:.0f} MiB, "
            f"update {r['update_seconds']:.2f} s, compile {r['compile_seconds']:.1f} s, "
            f"loss/step {r['loss_per_step']:.3f} ({r['platform']})",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
