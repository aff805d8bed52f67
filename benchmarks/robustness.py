"""Training that must stay finite: long polyphonic sequences, many seeds, both numerics.

Each run is ``dmm-jax train`` (then, where asked, ``dmm-jax evaluate``) in its own process, whose
peak resident memory is its own. Per run it reports every epoch's train/val/test loss per
step, the non-finite updates skipped, and peak RSS; per task, whether the checks hold:

    nottingham  seeds 0 1 2, 5 epochs each at the defaults, val/test every epoch: zero skipped
                updates, every figure finite, no epoch's train loss above its epoch 0's
    numerics    JSB, seed 0, the defaults against --numerics reference (val every 100 epochs)
    long        one epoch and the evaluation of a synthetic file of 20 x 4000-step sequences
                per split: peak RSS at most 4 GiB
    quality     a longer Nottingham run, then its test split importance-sampled

    python benchmarks/robustness.py nottingham --data ../shared/data/nottingham.json --out F.json
    python benchmarks/robustness.py numerics --epochs 500 --out F.json   # JSB via DMM_JAX_DATA_DIR
    python benchmarks/robustness.py long --out F.json
    python benchmarks/robustness.py quality --data ../shared/data/nottingham.json --epochs 50
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from epoch_time import provenance

GIB = 2**30


def child(argv: list[str]) -> None:
    """Runs the dmm-jax CLI in this process, then prints its peak RSS in bytes (Linux: KiB)."""
    from dmm_jax.cli import main

    try:
        main(argv)
    finally:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"peak_rss_bytes": peak}), flush=True)


def run_cli(argv: list[str]) -> tuple[dict, str]:
    """``dmm-jax ARGV`` in a child process: (its peak RSS record, its console output)."""
    command = [sys.executable, __file__, "--child", *argv]
    print("$ dmm-jax " + shlex.join(argv), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode:
        raise RuntimeError(f"dmm-jax {shlex.join(argv)} failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1]), "\n".join(lines[:-1])


def train_run(flags: list[str], log: Path) -> dict:
    peak, console = run_cli(["train", *flags, "--log-json", str(log), "--no-progress"])
    print(console, flush=True)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    epochs = [
        {
            key: r[key]
            for key in (
                "epoch",
                "train_loss_per_step",
                "val_loss_per_step",
                "test_loss_per_step",
                "seconds",
            )
            if key in r
        }
        | {"skipped_updates": r.get("skipped_updates", 0)}
        for r in records
    ]
    return {"flags": flags, "epochs": epochs, "peak_rss_mib": peak["peak_rss_bytes"] / 2**20}


def checks(run: dict, every_epoch_evaluated: bool) -> dict:
    epochs = run["epochs"]
    figures = [v for e in epochs for k, v in e.items() if k.endswith("_per_step") and v is not None]
    first = epochs[0]["train_loss_per_step"]
    return {
        "skipped_updates": sum(e["skipped_updates"] for e in epochs),
        "all_finite": all(isinstance(v, float) and math.isfinite(v) for v in figures)
        and all(not any(k.endswith("_error") for k in e) for e in epochs),
        "evaluated_every_epoch": all("val_loss_per_step" in e for e in epochs)
        if every_epoch_evaluated
        else None,
        "no_epoch_above_epoch_0": all(e["train_loss_per_step"] <= first for e in epochs),
    }


def nottingham(args, workdir: Path) -> dict:
    runs = []
    for seed in args.seeds:
        flags = ["--dataset", "nottingham", "--epochs", str(args.epochs), "--seed", str(seed)]
        flags += ["--eval-every", "1", *data_flags(args)]
        run = train_run(flags, workdir / f"nottingham_{seed}.jsonl")
        run["checks"] = checks(run, every_epoch_evaluated=True)
        runs.append(run)
    return {"runs": runs}


def numerics(args, workdir: Path) -> dict:
    runs = []
    for setting in args.numerics:
        flags = ["--dataset", "jsb", "--epochs", str(args.epochs), "--seed", str(args.seed)]
        flags += ["--numerics", setting, "--eval-every", str(args.eval_every), *data_flags(args)]
        run = train_run(flags, workdir / f"jsb_{setting}.jsonl")
        run["numerics"] = setting
        run["checks"] = checks(run, every_epoch_evaluated=False)
        runs.append(run)
    return {"runs": runs}


def long_sequences(args, workdir: Path) -> dict:
    import random

    rng = random.Random(0)

    def sequence():  # up to 4 notes per step, as dense as polyphonic music
        return [sorted(rng.sample(range(40, 90), rng.randint(0, 4))) for _ in range(args.steps)]

    data = workdir / "long.json"
    splits = {name: [sequence() for _ in range(args.batch)] for name in ("train", "valid", "test")}
    data.write_text(json.dumps(splits))
    flags = ["--data", str(data), "--epochs", "1", "--batch-size", str(args.batch)]
    run = train_run(flags, workdir / "long.jsonl")
    run["checks"] = checks(run, every_epoch_evaluated=False)
    run["checks"]["peak_rss_within_4_gib"] = run["peak_rss_mib"] * 2**20 <= 4 * GIB
    return {"runs": [run], "batch": args.batch, "steps": args.steps}


def quality(args, workdir: Path) -> dict:
    checkpoint = workdir / "nottingham"
    flags = ["--dataset", "nottingham", "--epochs", str(args.epochs), "--seed", str(args.seed)]
    flags += ["--eval-every", str(args.eval_every), "--checkpoint-dir", str(checkpoint)]
    run = train_run([*flags, *data_flags(args)], workdir / "quality.jsonl")
    run["checks"] = checks(run, every_epoch_evaluated=False)
    evaluate = ["evaluate", "--checkpoint", str(checkpoint), "--split", "test"]
    evaluate += ["--estimator", "is", "--samples", str(args.samples), *data_flags(args)]
    peak, console = run_cli(evaluate)
    run["test_evaluation"] = json.loads(console[console.index("{") :])
    run["evaluation_peak_rss_mib"] = peak["peak_rss_bytes"] / 2**20
    return {"runs": [run]}


def data_flags(args) -> list[str]:
    return ["--data", args.data] if args.data else []


TASKS = {"nottingham": nottingham, "numerics": numerics, "long": long_sequences, "quality": quality}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--data", default=None, help="data file (default: $DMM_JAX_DATA_DIR)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument(
        "--numerics", nargs="+", default=["soft", "reference"], help="numerics: settings to run"
    )
    parser.add_argument("--samples", type=int, default=500, help="IS draws per test sequence")
    parser.add_argument("--batch", type=int, default=20, help="long: sequences per split")
    parser.add_argument("--steps", type=int, default=4000, help="long: steps per sequence")
    parser.add_argument("--out", default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        result = TASKS[args.task](args, Path(workdir))
    result = {
        "task": args.task,
        **provenance("robustness.py", argv),
        "wall_seconds": time.time() - started,
        **result,
    }
    for run in result["runs"]:
        print(json.dumps({"flags": run["flags"], "peak_rss_mib": round(run["peak_rss_mib"])}))
        print("  checks:", json.dumps(run["checks"]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
