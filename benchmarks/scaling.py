"""Seconds per JSB epoch with the mini-batch split over 1, 2 and 4 devices (data parallel).

Seconds per epoch exclude compiling (timed apart, ``compile_seconds``) and the first epoch.
Each device count runs in its own worker process, one after the other, with the same data,
hyperparameters and seed; the losses must then agree across device counts (the draws do not
depend on the sharding), and the script reports how far apart they are.

On CPU the devices are forced host devices (``XLA_FLAGS=--xla_force_host_platform_device_count``)
that share the machine's cores: there it is a check that scaling out is correct and what it
costs, not a speed claim. On a machine with several accelerators the same script measures real
data-parallel epoch times (set ``--devices`` to counts that exist there).

    python benchmarks/scaling.py --epochs 4 --out scaling.json
    python benchmarks/scaling.py --small --sequences 80 --epochs 3     # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

_CPU_NOTE = (
    "CPU: the devices are forced host devices sharing {cores} core(s); this checks that data "
    "parallelism keeps the loss and runs, it does not measure a speed-up"
)


def worker(args) -> None:
    import jax

    from dmm_jax.config import DMMConfig, TrainConfig
    from dmm_jax.data import load_dataset
    from dmm_jax.data.batching import PaddedSequences
    from dmm_jax.distributed import data_mesh
    from dmm_jax.train import UpdateStep, build_svi, init_train_state, train_epoch

    dataset = load_dataset("jsb_chorales", args.data)
    sequences = dataset.train.sequences
    train = PaddedSequences(sequences[: args.sequences] if args.sequences else sequences)
    small = {"z_dim": 16, "emission_dim": 16, "transition_dim": 32, "rnn_dim": 64}
    model_config = DMMConfig(**(small if args.small else {}))
    train_config = TrainConfig(seed=args.seed, batch_size=args.batch_size)
    mesh = None if args.worker == 1 else data_mesh(args.worker)  # 1: the plain single-device path
    svi = build_svi(model_config, train_config)
    state = init_train_state(svi, train_config.seed, model_config.obs_dim)
    update = UpdateStep(svi, mesh)
    epochs = []
    for _ in range(args.epochs):
        compiled_before = sum(update.compile_seconds.values())
        start = time.perf_counter()
        state, loss, _ = train_epoch(update, state, train, train_config)
        seconds = time.perf_counter() - start
        compiling = sum(update.compile_seconds.values()) - compiled_before
        # A later epoch may meet a new batch shape: its compile time is not epoch time.
        epochs.append(
            {"seconds": seconds - compiling, "compiling": compiling, "loss": loss / train.num_steps}
        )
    timed = [e["seconds"] for e in epochs[1:]] or [epochs[0]["seconds"]]
    print(
        json.dumps(
            {
                "devices": args.worker,
                "platform": jax.default_backend(),
                "device_kind": jax.devices()[0].device_kind,
                "sequences": len(train),
                "seconds_per_epoch": statistics.median(timed),
                "epochs_timed": len(timed),
                "first_epoch_seconds": epochs[0]["seconds"] + epochs[0]["compiling"],
                "compile_seconds": sum(update.compile_seconds.values()),
                "compiled_shapes": [list(s) for s in update.compiled_shapes],
                "loss_per_epoch": [e["loss"] for e in epochs],
            }
        ),
        flush=True,
    )


def run_worker(devices: int, forced: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(devices), "--epochs", str(args.epochs)]
    cmd += ["--seed", str(args.seed), "--batch-size", str(args.batch_size)]
    cmd += ["--sequences", str(args.sequences)] + (["--small"] if args.small else [])
    if args.data:
        cmd += ["--data", args.data]
    flags = os.environ.get("XLA_FLAGS", "")
    env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={forced}"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker for {devices} device(s) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(rows: list[dict]) -> dict:
    """Largest relative loss difference from the first row, and times relative to it."""
    base = rows[0]
    for row in rows:
        row["seconds_vs_first"] = row["seconds_per_epoch"] / base["seconds_per_epoch"]
    gaps = [
        abs(a - b) / abs(b)
        for row in rows[1:]
        for a, b in zip(row["loss_per_epoch"], base["loss_per_epoch"])
    ]
    return {"max_relative_loss_difference": max(gaps, default=0.0)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1,2,4", help="comma-separated device counts")
    parser.add_argument("--epochs", type=int, default=4, help="the first (compiling) is untimed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--sequences", type=int, default=0, help="first K training sequences")
    parser.add_argument("--small", action="store_true", help="z 16, rnn 64: a quick check")
    parser.add_argument("--data", default=None, help="JSB file (default: $DMM_JAX_DATA_DIR, ...)")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args)

    counts = [int(n) for n in args.devices.split(",")]
    rows = [run_worker(n, max(counts), args) for n in counts]
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "model": "small (z 16, rnn 64)" if args.small else "reference defaults",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "rows": rows,
        **summarize(rows),
    }
    if rows[0]["platform"] == "cpu":
        result["note"] = _CPU_NOTE.format(cores=os.cpu_count())
    for row in rows:
        print(
            f"{row['devices']} device(s): {row['seconds_per_epoch']:.2f} s/epoch "
            f"(x{row['seconds_vs_first']:.2f}), first epoch {row['first_epoch_seconds']:.1f} s, "
            f"losses {[round(v, 4) for v in row['loss_per_epoch']]}"
        )
    print(f"largest relative loss difference: {result['max_relative_loss_difference']:.2e}")
    if "note" in result:
        print(result["note"])
    if args.out:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
