"""``dmm-jax``: a thin command line over the library (train, evaluate).

Every subcommand builds configs from its flags and calls one library function; nothing here
that a test or a notebook could not call directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import jax

from dmm_jax.checkpoint import CheckpointError
from dmm_jax.config import (
    ANNEALING_SCHEDULES,
    GUIDES,
    KL_ESTIMATORS,
    LR_SCHEDULES,
    DMMConfig,
    TrainConfig,
)
from dmm_jax.data import DATASETS, DataError, load_dataset
from dmm_jax.evaluate import evaluate_split
from dmm_jax.train import fit, load_run

_DEFAULT_MODEL = DMMConfig()
_DEFAULT_TRAIN = TrainConfig()


def _add_data_flags(parser: argparse.ArgumentParser, dataset_default: str | None) -> None:
    parser.add_argument(
        "--dataset",
        default=dataset_default,
        help=f"one of {', '.join(DATASETS)} (or 'jsb')"
        + ("" if dataset_default else "; default: the one the checkpoint was trained on"),
    )
    parser.add_argument(
        "--data",
        default=None,
        help="dataset file or directory (default: $DMM_JAX_DATA_DIR, the cache, then download)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmm-jax", description="Deep Markov Models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a DMM by SVI (defaults: the reference's)")
    _add_data_flags(train, "jsb_chorales")
    t, m = _DEFAULT_TRAIN, _DEFAULT_MODEL
    train.add_argument("--epochs", type=int, default=t.epochs)
    train.add_argument("--seed", type=int, default=t.seed)
    train.add_argument("--batch-size", type=int, default=t.batch_size)
    train.add_argument("--learning-rate", type=float, default=t.learning_rate)
    train.add_argument("--beta1", type=float, default=t.beta1)
    train.add_argument("--beta2", type=float, default=t.beta2)
    train.add_argument("--clip-norm", type=float, default=t.clip_norm)
    train.add_argument("--lr-decay", type=float, default=t.lr_decay)
    train.add_argument("--weight-decay", type=float, default=t.weight_decay)
    train.add_argument("--annealing-epochs", type=int, default=t.annealing_epochs)
    train.add_argument("--minimum-annealing-factor", type=float, default=t.minimum_annealing_factor)
    train.add_argument(
        "--annealing-schedule",
        choices=ANNEALING_SCHEDULES,
        default=t.annealing_schedule,
        help="shape of the KL annealing ramp over --annealing-epochs",
    )
    train.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=t.lr_schedule,
        help="exponential: lr * lr_decay^step (the reference); cosine: to 0 over all epochs",
    )
    train.add_argument(
        "--kl",
        choices=KL_ESTIMATORS,
        default=t.kl,
        help="sampled: log p(z) - log q(z) at the draw (the reference); analytic: closed-form "
        "KL per step given the drawn z_{t-1} (the paper; not with --num-iafs)",
    )
    train.add_argument(
        "--early-stopping-patience",
        type=int,
        default=t.early_stopping_patience,
        help="stop after this many evaluations (--eval-every) without a better validation "
        "bound, keeping the best state in best.msgpack of --checkpoint-dir; 0: never",
    )
    train.add_argument(
        "--length-bucketing",
        action="store_true",
        help="random mini-batches of similar-length sequences (less padding, faster epochs)",
    )
    train.add_argument("--eval-every", type=int, default=t.eval_every, help="0: only at the end")
    train.add_argument("--eval-samples", type=int, default=t.eval_samples)
    train.add_argument("--z-dim", type=int, default=m.z_dim)
    train.add_argument("--emission-dim", type=int, default=m.emission_dim)
    train.add_argument("--transition-dim", type=int, default=m.transition_dim)
    train.add_argument("--rnn-dim", type=int, default=m.rnn_dim)
    train.add_argument("--rnn-cell", choices=("rnn", "gru", "lstm"), default=m.rnn_cell)
    train.add_argument(
        "--guide", choices=GUIDES, default=m.guide, help="inference network (paper, Table 1)"
    )
    train.add_argument("--num-iafs", type=int, default=m.num_iafs, help="IAF layers on q(z_t)")
    train.add_argument("--iaf-dim", type=int, default=m.iaf_dim, help="hidden units per IAF")
    train.add_argument("--checkpoint-dir", default=None, help="atomic checkpoint after each epoch")
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    train.add_argument("--log-json", default=None, help="write one JSON object per epoch here")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    evaluate = sub.add_parser("evaluate", help="-ELBO per time step of a trained checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="a --checkpoint-dir of dmm-jax train")
    _add_data_flags(evaluate, None)
    evaluate.add_argument(
        "--best",
        action="store_true",
        help="evaluate best.msgpack (best validation bound, kept by early stopping)",
    )
    evaluate.add_argument("--split", choices=("train", "valid", "test"), default="test")
    evaluate.add_argument("--samples", type=int, default=1, help="guide draws per sequence")
    evaluate.add_argument(
        "--estimator",
        choices=("elbo", "is"),
        default="elbo",
        help="elbo: the bound (as the reference); is: also the importance-sampled NLL",
    )
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--batch-size", type=int, default=_DEFAULT_TRAIN.eval_batch_size)
    return parser


def _train(args: argparse.Namespace) -> int:
    if args.resume and args.checkpoint_dir is None:
        raise SystemExit("dmm-jax train: --resume needs --checkpoint-dir")
    try:
        model_config = DMMConfig(
            z_dim=args.z_dim,
            emission_dim=args.emission_dim,
            transition_dim=args.transition_dim,
            rnn_dim=args.rnn_dim,
            rnn_cell=args.rnn_cell,
            guide=args.guide,
            num_iafs=args.num_iafs,
            iaf_dim=args.iaf_dim,
        )
        train_config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            beta1=args.beta1,
            beta2=args.beta2,
            clip_norm=args.clip_norm,
            lr_decay=args.lr_decay,
            weight_decay=args.weight_decay,
            annealing_epochs=args.annealing_epochs,
            minimum_annealing_factor=args.minimum_annealing_factor,
            seed=args.seed,
            length_bucketing=args.length_bucketing,
            eval_every=args.eval_every,
            eval_samples=args.eval_samples,
            kl=args.kl,
            lr_schedule=args.lr_schedule,
            annealing_schedule=args.annealing_schedule,
            early_stopping_patience=args.early_stopping_patience,
        )
        if train_config.kl == "analytic" and model_config.num_iafs:
            raise ValueError("--kl analytic is not available with --num-iafs > 0 (use sampled)")
    except ValueError as err:
        raise SystemExit(f"dmm-jax train: {err}") from err
    dataset = load_dataset(args.dataset, args.data)
    print(
        f"dmm-jax: {dataset.name} from {dataset.source}: {len(dataset.train)} train sequences "
        f"({dataset.train.num_steps} steps); devices {jax.devices()}",
        flush=True,
    )
    fit(
        dataset.train,
        dataset.valid,
        dataset.test,
        model_config=model_config,
        train_config=train_config,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        log_json=args.log_json,
        progress=not args.no_progress,
        log=lambda line: print(line, flush=True),
        metadata={"dataset": dataset.name},
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    run = load_run(args.checkpoint, best=args.best)
    name = args.dataset or run.metadata.get("dataset")
    if name is None:
        raise SystemExit(
            "dmm-jax evaluate: the checkpoint does not name its dataset; pass --dataset"
        )
    dataset = load_dataset(name, args.data)
    result = evaluate_split(
        run.params,
        jax.random.PRNGKey(args.seed),
        dataset.split(args.split).sequences,
        run.model_config,
        num_samples=args.samples,
        estimator=args.estimator,
        batch_size=args.batch_size,
    )
    result = {
        "dataset": dataset.name,
        "split": args.split,
        "checkpoint": str(args.checkpoint),
        "best": args.best,
        "epochs_trained": int(run.state.epoch),
        **result,
    }
    print(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": _train, "evaluate": _evaluate}[args.command](args)
    except (DataError, CheckpointError) as err:
        print(f"dmm-jax {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
