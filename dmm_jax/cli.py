"""``dmm-jax``: a thin command line over the library.

Subcommands: train, evaluate, sample, forecast, posterior, impute, plot (``dmm_jax.commands``).

This module holds the parser only and imports no JAX, so ``dmm-jax --help`` answers at once;
the commands load the library when one runs. Every subcommand builds configs from its flags
and calls library functions; nothing here that a test or a notebook could not call directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from dmm_jax.config import (
    ANNEALING_SCHEDULES,
    KL_ESTIMATORS,
    LR_SCHEDULES,
    MODEL_CONFIGS,
    OBJECTIVES,
    RESAMPLING,
    TrainConfig,
)
from dmm_jax.data.polyphonic import DATASETS

_DEFAULT_TRAIN = TrainConfig()


def _gap(text: str) -> tuple[int, int]:
    try:
        start, stop = (int(part) for part in text.split(":"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected START:STOP steps, got {text!r}") from err
    if not 0 <= start < stop:
        raise argparse.ArgumentTypeError(f"expected 0 <= START < STOP, got {text!r}")
    return start, stop


def _add_data_flags(parser: argparse.ArgumentParser, dataset_default: str | None) -> None:
    parser.add_argument(
        "--dataset",
        default=dataset_default,
        help=f"one of {', '.join(DATASETS)} (or 'jsb'), or periodic (the Latent ODE paper's toy "
        "series, generated)"
        + ("" if dataset_default else "; default: the one the checkpoint was trained on"),
    )
    parser.add_argument(
        "--data",
        default=None,
        help="dataset file or directory (default: $DMM_JAX_DATA_DIR, the cache, then download); "
        "a .npz file is real-valued arrays (see dmm_jax.data.arrays) and --dataset is ignored",
    )


def compile_cache_dir(flag: str | None) -> Path | None:
    """The persistent XLA compilation cache: ``--compile-cache``, else $DMM_JAX_COMPILE_CACHE,
    else ~/.cache/dmm_jax/xla; "none" turns it off."""
    default = str(Path.home() / ".cache" / "dmm_jax" / "xla")
    value = flag if flag is not None else os.environ.get("DMM_JAX_COMPILE_CACHE", default)
    if value.strip().lower() in ("", "none", "off"):
        return None
    return Path(value).expanduser()


def _add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "devices and hosts", "data parallelism over a device mesh (see README: many devices)"
    )
    group.add_argument(
        "--devices",
        type=int,
        default=None,
        help="local devices to split each mini-batch over (default: all local devices)",
    )
    group.add_argument(
        "--coordinator-address",
        default=None,
        help="host:port of process 0, for a multi-process run (or $JAX_COORDINATOR_ADDRESS)",
    )
    group.add_argument(
        "--num-processes", type=int, default=None, help="processes in all (or $JAX_NUM_PROCESSES)"
    )
    group.add_argument(
        "--process-id", type=int, default=None, help="this process, 0..N-1 (or $JAX_PROCESS_ID)"
    )


# Set from the data (the sizes and covariates) or by the library only (custom_vjp), not by flags.
_NOT_FLAGS = ("obs_dim", "input_dim", "use_dt", "custom_vjp")


def _model_fields() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Every model config field of every family, by name: [(family, field), ...]."""
    fields: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for family, config_class in MODEL_CONFIGS.items():
        for field in dataclasses.fields(config_class):
            if field.name not in _NOT_FLAGS:
                fields.setdefault(field.name, []).append((family, field))
    return fields


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per model config field, written once in the config dataclasses: the help is
    the field's ``metadata["help"]`` (each family's where they differ) and the defaults of
    each family that has it. A flag left out keeps the chosen family's default; the config
    checks the value and names the field when it is wrong."""
    group = parser.add_argument_group("model", "the model family and its settings")
    group.add_argument(
        "--model", choices=sorted(MODEL_CONFIGS), default="dmm", help="model family (default: dmm)"
    )
    types = {family: typing.get_type_hints(c) for family, c in MODEL_CONFIGS.items()}
    for name, owners in _model_fields().items():
        helps = {family: f.metadata.get("help", "") for family, f in owners}
        if len(set(helps.values())) == 1:
            text = next(iter(helps.values()))
        else:
            text = "; ".join(f"{family}: {h}" for family, h in helps.items() if h)
        defaults = ", ".join(f"{family} {f.default}" for family, f in owners)
        text = (text + "; " if text else "") + f"default: {defaults}"
        flag = "--" + name.replace("_", "-")
        kind = types[owners[0][0]][name]
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(flag, type=kind, default=None, help=text)


def model_flags_given(args: argparse.Namespace) -> dict:
    """The model flags given on the command line; names those the ``--model`` family lacks."""
    names = {f.name for f in dataclasses.fields(MODEL_CONFIGS[args.model])}
    given = {n: getattr(args, n) for n in _model_fields() if getattr(args, n, None) is not None}
    foreign = sorted(set(given) - names)
    if foreign:
        flags = ", ".join("--" + n.replace("_", "-") for n in foreign)
        verb = "does" if len(foreign) == 1 else "do"
        raise ValueError(f"{flags} {verb} not apply to --model {args.model}")
    return given


def model_config_from_args(args: argparse.Namespace, **from_data):
    """The ``--model`` family's config: its defaults, the flags given, the data's sizes."""
    config_class = MODEL_CONFIGS[args.model]
    names = {f.name for f in dataclasses.fields(config_class)}
    values = {k: v for k, v in from_data.items() if k in names}
    return config_class(**values, **model_flags_given(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmm-jax", description="Deep Markov Models in JAX.")
    parser.add_argument(
        "--compile-cache",
        default=None,
        metavar="DIR",
        help="keep compiled programs here so later runs skip compiling "
        "(default: $DMM_JAX_COMPILE_CACHE or ~/.cache/dmm_jax/xla; 'none' turns it off)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model by SVI (DMM defaults: the reference's)")
    _add_data_flags(train, "jsb_chorales")
    t = _DEFAULT_TRAIN
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
        help="exponential: lr * lr_decay^steps (the reference); cosine: to 0 over all epochs",
    )
    train.add_argument(
        "--kl",
        choices=KL_ESTIMATORS,
        default=t.kl,
        help="sampled: log p(z) - log q(z) at the draw (the reference); analytic: closed-form "
        "KL per step given the drawn z_{t-1} (the paper; not with --num-iafs)",
    )
    train.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=t.objective,
        help="elbo: the evidence lower bound (averaged over --particles draws); iwae: the "
        "importance-weighted bound over --particles draws of every latent path (tighter); "
        "fivo: a particle filter's bound with --particles particles (dmm, vrnn)",
    )
    train.add_argument(
        "--resampling",
        choices=RESAMPLING,
        default=t.resampling,
        help="fivo: how particles are resampled when their effective number falls below half",
    )
    train.add_argument(
        "--particles",
        type=int,
        default=t.particles,
        help="draws of every latent path per sequence and update",
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
    train.add_argument(
        "--no-real-steps",
        dest="real_steps",
        action="store_false",
        help="run the per-step networks on every padded step too (the same numbers, slower; "
        "by default only on each batch's real steps)",
    )
    train.add_argument(
        "--microbatch-steps",
        type=int,
        default=t.microbatch_steps,
        help="split batches with more padded steps (sequences x steps) than this into "
        "micro-batches whose gradients are summed: caps memory on long sequences (0: never)",
    )
    train.add_argument(
        "--dropout",
        type=float,
        default=t.dropout,
        help="dmm, vrnn: rate of dropout on the emission network's input while training "
        "(objective elbo or iwae; evaluation never drops)",
    )
    train.add_argument(
        "--input-dropout",
        type=float,
        default=t.input_dropout,
        help="vrnn: rate of dropout on the observations' features entering the model's RNN "
        "while training (objective elbo or iwae; evaluation never drops)",
    )
    train.add_argument(
        "--transpose",
        type=int,
        default=t.transpose,
        metavar="K",
        help="piano rolls: transpose each training piece by a random number of semitones in "
        "[-K, K] at every update, never off the keyboard (validation and test as they are; "
        "0: never)",
    )
    train.add_argument(
        "--weight-average",
        type=float,
        default=t.weight_average,
        metavar="DECAY",
        help="keep an exponential moving average of the parameters, DECAY per update (e.g. "
        "0.99); evaluation, early stopping, checkpoints and the trained model use it (0: off)",
    )
    train.add_argument("--eval-every", type=int, default=t.eval_every, help="0: only at the end")
    train.add_argument("--eval-samples", type=int, default=t.eval_samples)
    _add_model_flags(train)
    train.add_argument("--checkpoint-dir", default=None, help="atomic checkpoint after each epoch")
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    train.add_argument(
        "--init-from",
        default=None,
        metavar="CHECKPOINT",
        help="start from the parameters of this checkpoint (a --checkpoint-dir, or its "
        "best.msgpack) of the same model settings, with a fresh optimizer and schedule: e.g. "
        "a model trained on the ELBO trained further on --objective iwae or fivo",
    )
    train.add_argument("--log-json", default=None, help="write one JSON object per epoch here")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument(
        "--quiet", action="store_true", help="print nothing but errors (no bar, no epoch lines)"
    )
    _add_parallel_flags(train)

    evaluate = sub.add_parser("evaluate", help="-ELBO per time step of a trained checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="a --checkpoint-dir of dmm-jax train")
    _add_data_flags(evaluate, None)
    evaluate.add_argument(
        "--best",
        action="store_true",
        help="evaluate best.msgpack (best validation bound, kept by early stopping)",
    )
    evaluate.add_argument("--split", choices=("train", "valid", "test"), default="test")
    evaluate.add_argument(
        "--samples", type=int, default=1, help="guide draws (pf: particles) per sequence"
    )
    evaluate.add_argument(
        "--estimator",
        choices=("elbo", "is", "pf"),
        default="elbo",
        help="elbo: the bound (as the reference); is: also the importance-sampled NLL; pf: "
        "also the particle filter's, with --samples particles (dmm, vrnn)",
    )
    evaluate.add_argument(
        "--resampling",
        choices=RESAMPLING,
        default=_DEFAULT_TRAIN.resampling,
        help="pf: how particles are resampled",
    )
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--batch-size", type=int, default=_DEFAULT_TRAIN.eval_batch_size)
    _add_parallel_flags(evaluate)

    sample = sub.add_parser(
        "sample", help="draw sequences from the prior; MIDI files and PNGs of piano rolls"
    )
    sample.add_argument("--checkpoint", required=True, help="a --checkpoint-dir of dmm-jax train")
    sample.add_argument("--num", type=int, default=4, help="number of sequences")
    sample.add_argument("--length", type=int, default=64, help="time steps (quarter notes) each")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--midi", default=None, help="folder for sample_NNN.mid")
    sample.add_argument("--png", default=None, help="folder for sample_NNN.png")
    sample.add_argument("--tempo", type=float, default=120.0, help="MIDI tempo, quarter notes/min")

    fc = sub.add_parser(
        "forecast", help="forecast log-likelihood of continuations vs a per-note-frequency baseline"
    )
    fc.add_argument("--checkpoint", required=True, help="a --checkpoint-dir of dmm-jax train")
    _add_data_flags(fc, None)
    fc.add_argument("--split", choices=("train", "valid", "test"), default="test")
    fc.add_argument("--prefix", type=int, default=16, help="steps given (k)")
    fc.add_argument("--horizon", type=int, default=16, help="steps forecast after the prefix")
    fc.add_argument("--samples", type=int, default=100, help="forecast draws per sequence")
    fc.add_argument("--seed", type=int, default=0)
    fc.add_argument("--batch-size", type=int, default=32)
    fc.add_argument("--png", default=None, help="folder for forecast_NNN.png vs the truth")
    fc.add_argument("--png-count", type=int, default=4, help="how many sequences to draw")

    post = sub.add_parser("posterior", help="latent trajectory of one sequence under the guide")
    post.add_argument("--checkpoint", required=True, help="a --checkpoint-dir of dmm-jax train")
    _add_data_flags(post, None)
    post.add_argument("--split", choices=("train", "valid", "test"), default="test")
    post.add_argument("--index", type=int, default=0, help="which sequence of the split")
    post.add_argument("--samples", type=int, default=100, help="guide draws")
    post.add_argument("--seed", type=int, default=0)
    post.add_argument("--out", default=None, help=".npz file: x, mean, quantiles, levels")
    post.add_argument("--png", default=None, help="PNG file: the sequence above its latents")

    imp = sub.add_parser(
        "impute", help="hide entries of a split, fill them in, score against the baseline"
    )
    imp.add_argument("--checkpoint", required=True, help="a --checkpoint-dir of dmm-jax train")
    _add_data_flags(imp, None)
    imp.add_argument("--split", choices=("train", "valid", "test"), default="test")
    imp.add_argument("--fraction", type=float, default=0.0, help="hide each entry with this p")
    imp.add_argument("--gap", type=_gap, default=None, help="hide steps START:STOP entirely")
    imp.add_argument("--iterations", type=int, default=20, help="guide/emitter refills")
    imp.add_argument("--seed", type=int, default=0)
    imp.add_argument("--batch-size", type=int, default=32)
    imp.add_argument("--png", default=None, help="folder for impute_NNN.png")
    imp.add_argument("--png-count", type=int, default=2, help="how many sequences to draw")

    plot = sub.add_parser(
        "plot", help="training/validation/test curves from --log-json files (several: compared)"
    )
    plot.add_argument(
        "--log",
        required=True,
        action="append",
        help="the JSON-lines file of dmm-jax train; given more than once, the runs' validation "
        "and training curves are drawn side by side",
    )
    plot.add_argument(
        "--label", action="append", default=None, help="a name per --log (default: file names)"
    )
    plot.add_argument("--out", required=True, help="PNG file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cache = compile_cache_dir(args.compile_cache)
    if cache is not None and argv is None and "PYTHONHASHSEED" not in os.environ:
        # NumPyro's Trace_ELBO adds its sites in set order, which follows the per-process
        # string hash: the value is the same, but the program text (the cache key) is not. A
        # fixed hash seed makes every run lower the same program, so the cache can hit.
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "dmm_jax.cli", *sys.argv[1:]])
    import jax  # the library loads once a command runs, not for --help

    from dmm_jax import commands
    from dmm_jax.checkpoint import CheckpointError
    from dmm_jax.data import DataError
    from dmm_jax.runtime import retain_freed_memory

    if args.command == "train":
        # XLA's per-update scratch buffers are reused, not page-faulted in; not for the other
        # commands, whose peak it raises (see dmm_jax.runtime).
        retain_freed_memory()
    if cache is not None:
        # A second run of the same shapes loads its executables instead of recompiling them.
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    try:
        return commands.COMMANDS[args.command](args)
    except (DataError, CheckpointError, NotImplementedError, FloatingPointError) as err:
        print(f"dmm-jax {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
