"""Test likelihood of one trained configuration: ``dmm-jax train`` with the given flags, then
the test split scored by the bound and by importance sampling (S draws per sequence).

Writes ``quality_<dataset>_<config>_<machine>_<yyyy-mm>.json`` into ``--out-dir`` with the
keys dataset, model, emission, objective, particles, split, bound_nll_per_step,
is_nll_per_step, samples, epochs, wall_seconds, command, machine, date (and the per-epoch
history, peak memory, package versions, and with ``--filter-particles K`` the particle
filter's bound ``pf_nll_per_step``). Everything after ``--`` goes to ``dmm-jax train``:

    python benchmarks/quality.py --config dmm-aug-nade --epochs 1000 --samples 2000 \\
        -- --dataset jsb --augmented --emission nade
    python benchmarks/quality.py --config vrnn-fivo4 --epochs 400 --best --filter-particles 4 \\
        -- --dataset jsb --model vrnn --objective fivo --particles 4 --early-stopping-patience 1000

The checkpoint directory (``--checkpoint-dir``, default a temporary one) lets a long run be
continued with ``--resume``. Lower figures are better (nats per time step).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from epoch_time import provenance
from robustness import run_cli, train_run

# File-name tags of the data sets (the --dataset names): a result file is never mistaken for data.
DATASET_TAGS = {"jsb_chorales": "jsb"}


def machine_tag(cpu_model: str) -> str:
    """A short file-name tag for the CPU: 'AMD EPYC 7B13' -> 'cpu_epyc'."""
    words = re.findall(r"[a-z0-9]+", cpu_model.lower())
    known = [w for w in words if w in ("epyc", "xeon", "ryzen", "core", "graviton", "m1", "m2")]
    return "cpu_" + (known[0] if known else (words[0] if words else "unknown"))


def train_setting(flags: list[str], name: str, default: str) -> str:
    """The value of ``--name`` among the train flags, or its default."""
    option = f"--{name}"
    for i, flag in enumerate(flags):
        if flag == option and i + 1 < len(flags):
            return flags[i + 1]
        if flag.startswith(option + "="):
            return flag.split("=", 1)[1]
    return default


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split_at = argv.index("--") if "--" in argv else len(argv)
    own, train_flags = argv[:split_at], argv[split_at + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a name for the file: letters, digits, -")
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=100, help="validation every K epochs")
    parser.add_argument("--samples", type=int, default=2000, help="IS draws per test sequence")
    parser.add_argument("--split", default="test", choices=("valid", "test"))
    parser.add_argument(
        "--best", action="store_true", help="score the best validation state (early stopping)"
    )
    parser.add_argument(
        "--filter-particles",
        type=int,
        default=0,
        help="also the particle filter's bound with this many particles (0: not)",
    )
    parser.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help="sequences per evaluation batch (smaller for long pieces: Nottingham's 1,793 steps)",
    )
    parser.add_argument("--checkpoint-dir", default=None, help="keep the run here (resumable)")
    parser.add_argument("--resume", action="store_true", help="continue --checkpoint-dir")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    args = parser.parse_args(own)
    if not re.fullmatch(r"[A-Za-z0-9-]+", args.config):
        parser.error(f"--config must be letters, digits and '-', got {args.config!r}")
    started = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        checkpoint = Path(args.checkpoint_dir or Path(workdir) / "run")
        flags = [*train_flags, "--epochs", str(args.epochs), "--eval-every", str(args.eval_every)]
        flags += ["--checkpoint-dir", str(checkpoint)] + (["--resume"] if args.resume else [])
        run = train_run(flags, Path(workdir) / "train.jsonl")
        evaluate = ["evaluate", "--checkpoint", str(checkpoint), "--split", args.split]
        data = train_setting(train_flags, "data", None)
        evaluate += (["--data", data] if data else []) + (["--best"] if args.best else [])
        if args.eval_batch_size:
            evaluate += ["--batch-size", str(args.eval_batch_size)]
        peak, console = run_cli([*evaluate, "--estimator", "is", "--samples", str(args.samples)])
        scores = json.loads(console[console.index("{") :])
        filtered = None
        if args.filter_particles:
            pf = ["--estimator", "pf", "--samples", str(args.filter_particles)]
            _, console = run_cli([*evaluate, *pf])
            filtered = json.loads(console[console.index("{") :])
    record = provenance("quality.py", argv)
    result = {
        "dataset": scores["dataset"],
        "model": train_setting(train_flags, "model", "dmm"),
        "augmented": "--augmented" in train_flags,
        "emission": train_setting(train_flags, "emission", "bernoulli"),
        "objective": train_setting(train_flags, "objective", "elbo"),
        "particles": int(train_setting(train_flags, "particles", "1")),
        "init_from": train_setting(train_flags, "init-from", None),
        "split": args.split,
        "bound_nll_per_step": scores["elbo_nll_per_step"],
        "is_nll_per_step": scores["is_nll_per_step"],
        "samples": args.samples,
        "pf_nll_per_step": None if filtered is None else filtered["pf_nll_per_step"],
        "filter_particles": args.filter_particles or None,
        "best_validation_state": args.best,
        "epochs": scores["epochs_trained"],
        "wall_seconds": time.time() - started,
        **record,
        "train_flags": train_flags,
        # Training seconds; the first epoch run (epoch 0, or a resumed run's first) compiles.
        "median_epoch_seconds": statistics.median(e["seconds"] for e in run["epochs"][1:])
        if len(run["epochs"]) > 1
        else None,
        "history": run["epochs"],
        "train_peak_rss_mib": run["peak_rss_mib"],
        "evaluation_peak_rss_mib": peak["peak_rss_bytes"] / 2**20,
        "evaluation": scores,
    }
    month = record["date"][:7]
    machine = machine_tag(record["machine"]["cpu_model"])
    short = DATASET_TAGS.get(result["dataset"], result["dataset"])
    out = Path(args.out_dir) / f"quality_{short}_{args.config}_{machine}_{month}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".json.partial")
    partial.write_text(json.dumps(result, indent=1) + "\n")
    partial.replace(out)  # atomic: a reader never sees half a file
    print(json.dumps({k: result[k] for k in ("bound_nll_per_step", "is_nll_per_step", "epochs")}))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
