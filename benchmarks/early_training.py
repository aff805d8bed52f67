"""How often the first epochs of JSB training spike or fail, dmm_jax against the reference.

The default DMM can spike in its first epochs when the prior's scale collapses under a guide
trajectory far from it (README, known limitations). This trains each implementation from many
seeds at the reference's settings (random mini-batches of 20, its hyperparameters) for a few
epochs and counts, per implementation, the seeds whose run failed (the reference raises when
its argument check rejects a distribution's parameters; dmm_jax drops a non-finite update
instead), the seeds whose training loss per step went above ``--spike`` in some epoch and
recovered, and the loss after the last epoch of the runs that finished. Each implementation runs in its own process,
one seed after another; nothing here is timed.

    python benchmarks/early_training.py --seeds 32 --epochs 7 --out FILE.json

Needs the ``bench`` extra for the reference (``--impls dmm_jax`` runs without it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMPLS = ("pyro_reference", "dmm_jax")


def _reference_runs(seeds, epochs: int, data: str | None):
    sys.path.insert(0, str(HERE))
    from pyro_reference import ReferenceTrainer, load_jsb

    splits, _ = load_jsb(data)
    for seed in seeds:
        trainer = ReferenceTrainer(splits["train"], seed=seed)
        losses, error = [], None
        for epoch in range(epochs):
            try:
                losses.append(trainer.run_epoch()["train_loss_per_step"])
            except ValueError as e:  # Pyro's argument check rejected a parameter
                error = f"epoch {epoch}: {str(e).splitlines()[0][:120]}"
                break
        yield {"seed": seed, "losses": losses, "error": error}


def _dmm_jax_runs(seeds, epochs: int, data: str | None):
    from dmm_jax.runtime import retain_freed_memory

    retain_freed_memory()  # as dmm-jax train does

    from dmm_jax.config import DMMConfig, TrainConfig
    from dmm_jax.data import load_dataset
    from dmm_jax.data.batching import PaddedSequences
    from dmm_jax.train import UpdateStep, build_svi, init_train_state, train_epoch

    train = PaddedSequences(load_dataset("jsb_chorales", data).train.sequences)
    model_config = DMMConfig()
    # The seed enters through the initial state only (weights, batch order, noise), so one
    # update step, compiled once, serves every seed.
    svi = build_svi(model_config, TrainConfig())
    update = UpdateStep(svi)
    for seed in seeds:
        train_config = TrainConfig(seed=seed)
        state = init_train_state(svi, seed, model_config.obs_dim)
        skipped_before = update.skipped_updates
        losses, error = [], None
        for epoch in range(epochs):
            try:
                state, loss, _ = train_epoch(update, state, train, train_config)
            except FloatingPointError as e:  # every update of an epoch non-finite
                error = f"epoch {epoch}: {e}"
                break
            losses.append(loss / train.num_steps)
        yield {
            "seed": seed,
            "losses": losses,
            "error": error,
            "skipped_updates": update.skipped_updates - skipped_before,
        }


def summarize(impl: str, runs: list[dict], epochs: int, spike: float) -> dict:
    failed = [r["seed"] for r in runs if r["error"]]
    finished = [r for r in runs if not r["error"] and len(r["losses"]) == epochs]
    spiked = [r["seed"] for r in finished if max(r["losses"]) > spike]
    finals = [r["losses"][-1] for r in finished]
    return {
        "impl": impl,
        "seeds": len(runs),
        "failed": failed,
        "spiked_and_recovered": spiked,
        "finished": len(finished),
        "median_final_loss": statistics.median(finals) if finals else None,
    }


def format_table(summaries: list[dict], epochs: int, spike: float) -> str:
    header = (
        f"| impl | seeds | failed | spiked above {spike:g} and recovered | finished "
        f"| median loss after {epochs} epochs |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    for s in summaries:
        final = "-" if s["median_final_loss"] is None else f"{s['median_final_loss']:.2f}"
        lines.append(
            f"| {s['impl']} | {s['seeds']} | {len(s['failed'])} {s['failed']} "
            f"| {len(s['spiked_and_recovered'])} {s['spiked_and_recovered']} "
            f"| {s['finished']} | {final} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {IMPLS}")
    parser.add_argument("--seeds", type=int, default=32, help="seeds 0 .. N-1")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--spike", type=float, default=1e3, help="loss per step counted a spike")
    parser.add_argument("--data", default=None, help="JSB file or dir (default: $DMM_JAX_DATA_DIR)")
    parser.add_argument("--out", default=None, help="also write the runs and summary as JSON")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    if args.worker:
        runs = _reference_runs if args.worker == "pyro_reference" else _dmm_jax_runs
        for run in runs(seeds, args.epochs, args.data):
            print(json.dumps(run), flush=True)
        return
    impls = [i for i in args.impls.split(",") if i]
    if set(impls) - set(IMPLS):
        parser.error(f"unknown --impls {sorted(set(impls) - set(IMPLS))}; choose from {IMPLS}")
    results = {}
    for impl in impls:
        command = [sys.executable, __file__, "--worker", impl, "--seeds", str(args.seeds)]
        command += ["--first-seed", str(args.first_seed), "--epochs", str(args.epochs)]
        if args.data:
            command += ["--data", args.data]
        runs = []
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as worker:
            for line in worker.stdout:
                run = json.loads(line)
                runs.append(run)
                shown = ", ".join(f"{loss:.4g}" for loss in run["losses"])
                print(f"{impl:15s} seed {run['seed']:3d}: [{shown}] {run['error'] or ''}")
        if worker.returncode:
            raise RuntimeError(f"the {impl} worker exited with code {worker.returncode}")
        results[impl] = runs
    summaries = [summarize(i, runs, args.epochs, args.spike) for i, runs in results.items()]
    print(format_table(summaries, args.epochs, args.spike))
    if args.out:
        from epoch_time import provenance

        out = {
            **provenance("early_training.py", argv or sys.argv[1:]),
            "epochs": args.epochs,
            "spike": args.spike,
            "summary": summaries,
            "runs": results,
        }
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
