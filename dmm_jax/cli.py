"""``dmm-jax``: a thin command line over the library.

Subcommands: train, evaluate, sample, forecast, posterior, impute, plot.

Every subcommand builds configs from its flags and calls one library function; nothing here
that a test or a notebook could not call directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dmm_jax import distributed
from dmm_jax.checkpoint import CheckpointError
from dmm_jax.config import ANNEALING_SCHEDULES, KL_ESTIMATORS, LR_SCHEDULES, TrainConfig
from dmm_jax.data import DATASETS, NUM_NOTES, DataError, load_dataset
from dmm_jax.data.arrays import load_arrays
from dmm_jax.data.batching import PaddedSequences
from dmm_jax.evaluate import evaluate_split
from dmm_jax.files import atomic_write_bytes
from dmm_jax.generate import (
    forecast,
    forecast_split,
    hide_entries,
    impute,
    impute_split,
    note_frequencies,
    posterior_latents,
    sample_prior,
)
from dmm_jax.models import FAMILIES, get_family
from dmm_jax.music import write_midi
from dmm_jax.plots import (
    forecast_figure,
    piano_roll_figure,
    posterior_figure,
    read_training_log,
    save_png,
    training_curves_figure,
)
from dmm_jax.runtime import retain_freed_memory
from dmm_jax.train import fit, load_run

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
        help=f"one of {', '.join(DATASETS)} (or 'jsb')"
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


def _mesh(args: argparse.Namespace) -> Mesh | None:
    """Joins the multi-process run if one is asked for, then the device mesh; None where the
    run has one device in all, which keeps the single-device code path exactly."""
    try:
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        mesh = distributed.data_mesh(args.devices)
    except ValueError as err:
        raise SystemExit(f"dmm-jax {args.command}: {err}") from err
    return None if mesh.size == 1 else mesh


def _is_arrays(data: str | None) -> bool:
    return data is not None and data.endswith(".npz")


# Set from the data (or, custom_vjp, for tests), not from flags.
_DATA_FIELDS = ("obs_dim", "input_dim", "use_dt", "custom_vjp")


def _model_fields() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Every model config field of every family, by name: [(family, field), ...]."""
    fields: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for family in FAMILIES.values():
        for field in dataclasses.fields(family.config_class):
            if field.name not in _DATA_FIELDS:
                fields.setdefault(field.name, []).append((family.name, field))
    return fields


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per model config field, written once in the config dataclasses: the help is
    the field's ``metadata["help"]`` and the defaults of each family that has it. A flag left
    out keeps the chosen family's default."""
    group = parser.add_argument_group("model", "the model family and its settings")
    group.add_argument(
        "--model", choices=sorted(FAMILIES), default="dmm", help="model family (default: dmm)"
    )
    for name, owners in _model_fields().items():
        helps = [f.metadata.get("help") for _, f in owners if f.metadata.get("help")]
        defaults = ", ".join(f"{family} {f.default}" for family, f in owners)
        text = (helps[0] + "; " if helps else "") + f"default: {defaults}"
        flag = "--" + name.replace("_", "-")
        if owners[0][1].type in ("bool", bool):
            group.add_argument(flag, action="store_const", const=True, default=None, help=text)
        else:
            kind = {"int": int, "float": float}.get(str(owners[0][1].type), str)
            group.add_argument(flag, type=kind, default=None, help=text)


def _model_flags_given(args: argparse.Namespace) -> dict:
    """The model flags given on the command line; names those the ``--model`` family lacks."""
    family = get_family(args.model)
    names = {f.name for f in dataclasses.fields(family.config_class)}
    given = {n: getattr(args, n) for n in _model_fields() if getattr(args, n, None) is not None}
    foreign = sorted(set(given) - names)
    if foreign:
        flags = ", ".join("--" + n.replace("_", "-") for n in foreign)
        verb = "does" if len(foreign) == 1 else "do"
        raise ValueError(f"{flags} {verb} not apply to --model {family.name}")
    return given


def model_config_from_args(args: argparse.Namespace, **from_data):
    """The ``--model`` family's config: its defaults, the flags given, the data's sizes."""
    config_class = get_family(args.model).config_class
    names = {f.name for f in dataclasses.fields(config_class)}
    values = {k: v for k, v in from_data.items() if k in names}
    return config_class(**values, **_model_flags_given(args))


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
    train.add_argument("--eval-every", type=int, default=t.eval_every, help="0: only at the end")
    train.add_argument("--eval-samples", type=int, default=t.eval_samples)
    _add_model_flags(train)
    train.add_argument("--checkpoint-dir", default=None, help="atomic checkpoint after each epoch")
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    train.add_argument("--log-json", default=None, help="write one JSON object per epoch here")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
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
    evaluate.add_argument("--samples", type=int, default=1, help="guide draws per sequence")
    evaluate.add_argument(
        "--estimator",
        choices=("elbo", "is"),
        default="elbo",
        help="elbo: the bound (as the reference); is: also the importance-sampled NLL",
    )
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--batch-size", type=int, default=_DEFAULT_TRAIN.eval_batch_size)
    _add_parallel_flags(evaluate)

    sample = sub.add_parser("sample", help="draw piano rolls from the prior; MIDI files, PNGs")
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

    plot = sub.add_parser("plot", help="training/validation/test curves from a --log-json file")
    plot.add_argument("--log", required=True, help="the JSON-lines file of dmm-jax train")
    plot.add_argument("--out", required=True, help="PNG file to write")
    return parser


def _train(args: argparse.Namespace) -> int:
    if args.resume and args.checkpoint_dir is None:
        raise SystemExit("dmm-jax train: --resume needs --checkpoint-dir")
    try:  # settings first: a wrong flag is reported before any data is read
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
            microbatch_steps=args.microbatch_steps,
            real_steps=args.real_steps,
            eval_every=args.eval_every,
            eval_samples=args.eval_samples,
            kl=args.kl,
            lr_schedule=args.lr_schedule,
            annealing_schedule=args.annealing_schedule,
            early_stopping_patience=args.early_stopping_patience,
        )
        if train_config.kl == "analytic" and args.num_iafs:
            raise ValueError("--kl analytic is not available with --num-iafs > 0 (use sampled)")
        _model_flags_given(args)  # names a flag of another family before any data is read
    except ValueError as err:
        raise SystemExit(f"dmm-jax train: {err}") from err
    mesh = _mesh(args)  # a multi-process run must join before anything touches a device
    if _is_arrays(args.data):
        dataset = load_arrays(args.data)
        train = dataset.train
        obs_dim, input_dim, use_dt = train.obs_dim, train.input_dim, train.dt is not None
        binary = bool(np.all(np.isnan(train.x) | (train.x == 0) | (train.x == 1)))
        metadata = {"dataset": "arrays", "data": str(Path(args.data).resolve())}
    else:
        dataset = load_dataset(args.dataset, args.data)
        obs_dim, input_dim, use_dt, binary = NUM_NOTES, 0, False, None
        metadata = {"dataset": dataset.name}
    try:
        model_config = model_config_from_args(
            args, obs_dim=obs_dim, input_dim=input_dim, use_dt=use_dt
        )
    except ValueError as err:
        raise SystemExit(f"dmm-jax train: {err}") from err
    if binary is not None and model_config.emission == "bernoulli" and not binary:
        raise SystemExit(
            f"dmm-jax train: {args.data} holds values other than 0/1; use --emission gaussian"
        )
    lead = jax.process_index() == 0  # in a multi-process run, only process 0 prints
    devices = jax.devices() if mesh is None else list(mesh.devices.flat)
    if lead:
        print(
            f"dmm-jax: {dataset.name} from {dataset.source}: {len(dataset.train)} train "
            f"sequences ({dataset.train.num_steps} steps); "
            f"{'devices' if mesh is None else 'data parallel over'} {devices}",
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
        progress=lead and not args.no_progress,
        log=(lambda line: print(line, flush=True)) if lead else None,
        metadata=metadata,
        mesh=mesh,
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    mesh = _mesh(args)
    run = load_run(args.checkpoint, best=args.best)
    arrays_file = args.data if _is_arrays(args.data) else None
    if arrays_file is None and args.dataset is None and run.metadata.get("dataset") == "arrays":
        arrays_file = args.data or run.metadata.get("data")
    if arrays_file is not None:
        dataset = load_arrays(arrays_file)
        split = dataset.split(args.split)
    else:
        name = args.dataset or run.metadata.get("dataset")
        if name is None:
            raise SystemExit(
                "dmm-jax evaluate: the checkpoint does not name its dataset; pass --dataset"
            )
        dataset = load_dataset(name, args.data)
        split = dataset.split(args.split).sequences
    result = evaluate_split(
        run.params,
        jax.random.PRNGKey(args.seed),
        split,
        run.model_config,
        num_samples=args.samples,
        estimator=args.estimator,
        batch_size=args.batch_size,
        mesh=mesh,
    )
    result = {
        "dataset": dataset.name,
        "split": args.split,
        "checkpoint": str(args.checkpoint),
        "best": args.best,
        "epochs_trained": int(run.state.epoch),
        **result,
    }
    if jax.process_index() == 0:
        print(json.dumps(result))
    return 0


def _require(condition: bool, command: str, message: str) -> None:
    if not condition:
        raise SystemExit(f"dmm-jax {command}: {message}")


def _sample(args: argparse.Namespace) -> int:
    _require(args.num >= 1, "sample", f"--num must be >= 1, got {args.num}")
    _require(args.length >= 1, "sample", f"--length must be >= 1, got {args.length}")
    _require(args.tempo > 0, "sample", f"--tempo must be > 0, got {args.tempo}")
    run = load_run(args.checkpoint)
    _require(
        run.model_config.obs_dim == NUM_NOTES or (args.midi is None and args.png is None),
        "sample",
        f"--midi and --png need {NUM_NOTES}-key piano rolls; this model emits "
        f"{run.model_config.obs_dim} values a step",
    )
    out = sample_prior(
        run.params, jax.random.PRNGKey(args.seed), run.model_config, args.num, args.length
    )
    rolls = np.asarray(out["x"])
    written: dict[str, list[str]] = {"midi": [], "png": []}
    for i, roll in enumerate(rolls):
        if args.midi is not None:
            path = write_midi(Path(args.midi) / f"sample_{i:03d}.mid", roll, tempo_bpm=args.tempo)
            written["midi"].append(str(path))
        if args.png is not None:
            figure = piano_roll_figure([roll], [f"sample {i} (seed {args.seed})"])
            written["png"].append(str(save_png(figure, Path(args.png) / f"sample_{i:03d}.png")))
    result = {
        "checkpoint": str(args.checkpoint),
        "epochs_trained": int(run.state.epoch),
        "num": args.num,
        "length": args.length,
        "seed": args.seed,
        "notes_per_step": float(rolls.sum() / (args.num * args.length)),
        **written,
    }
    print(json.dumps(result))
    return 0


def _forecast(args: argparse.Namespace) -> int:
    for flag in ("prefix", "horizon", "samples", "batch_size"):
        value = getattr(args, flag)
        name = "--" + flag.replace("_", "-")
        _require(value >= 1, "forecast", f"{name} must be >= 1, got {value}")
    run, dataset = _run_dataset("forecast", args)
    sequences = dataset.split(args.split).sequences
    key = jax.random.PRNGKey(args.seed)
    try:
        result = forecast_split(
            run.params,
            key,
            sequences,
            run.model_config,
            prefix_length=args.prefix,
            horizon=args.horizon,
            num_samples=args.samples,
            frequencies=note_frequencies(dataset.train.sequences),
            batch_size=args.batch_size,
        )
    except ValueError as err:
        raise SystemExit(f"dmm-jax forecast: {err}") from err
    pngs = []
    if args.png is not None and args.png_count > 0:
        shown = [s for s in sequences if len(s) > args.prefix][: args.png_count]
        # Padded to the scoring batch's shape, so the forecast compiled above is reused.
        prefixes = np.zeros(
            (max(args.batch_size, len(shown)), args.prefix, run.model_config.obs_dim)
        )
        prefixes[: len(shown)] = [s[: args.prefix] for s in shown]
        lengths = jnp.full(len(prefixes), args.prefix, jnp.int32)
        probs = forecast(
            run.params,
            key,
            jnp.asarray(prefixes, jnp.float32),
            lengths,
            run.model_config,
            args.horizon,
            args.samples,
        )["mean_probs"]
        for i, seq in enumerate(shown):
            truth = seq[args.prefix : args.prefix + args.horizon]
            figure = forecast_figure(
                seq[: args.prefix], truth, np.asarray(probs[i, : len(truth)]), f"sequence {i}"
            )
            pngs.append(str(save_png(figure, Path(args.png) / f"forecast_{i:03d}.png")))
    result = {
        "dataset": dataset.name,
        "split": args.split,
        "checkpoint": str(args.checkpoint),
        "epochs_trained": int(run.state.epoch),
        **result,
        "png": pngs,
    }
    print(json.dumps(result))
    return 0


def _run_dataset(command: str, args: argparse.Namespace):
    """The checkpoint's run and the dataset it was trained on (or --dataset)."""
    run = load_run(args.checkpoint)
    name = args.dataset or run.metadata.get("dataset")
    _require(name is not None, command, "the checkpoint does not name its dataset; pass --dataset")
    return run, load_dataset(name, args.data)


def _posterior(args: argparse.Namespace) -> int:
    _require(args.samples >= 1, "posterior", f"--samples must be >= 1, got {args.samples}")
    run, dataset = _run_dataset("posterior", args)
    sequences = dataset.split(args.split).sequences
    _require(
        0 <= args.index < len(sequences),
        "posterior",
        f"--index must be in 0..{len(sequences) - 1} for the {args.split} split, got {args.index}",
    )
    x = np.asarray(sequences[args.index])
    levels = (0.05, 0.5, 0.95)
    out = posterior_latents(
        run.params,
        jax.random.PRNGKey(args.seed),
        jnp.asarray(x[None], jnp.float32),
        jnp.array([len(x)], jnp.int32),
        run.model_config,
        args.samples,
        levels,
    )
    mean, quantiles = np.asarray(out["mean"][0]), np.asarray(out["quantiles"][:, 0])
    result = {"split": args.split, "index": args.index, "num_steps": len(x), "levels": levels}
    if args.out is not None:
        buffer = io.BytesIO()
        np.savez(buffer, x=x, mean=mean, quantiles=quantiles, levels=np.array(levels))
        result["npz"] = str(atomic_write_bytes(args.out, buffer.getvalue()))
    if args.png is not None:
        result["png"] = str(save_png(posterior_figure(x, mean, quantiles), args.png))
    # How much the latents move over time and how uncertain they are, in one line each.
    result["mean_abs_step_change"] = float(np.abs(np.diff(mean, axis=0)).mean())
    result["mean_band_width"] = float((quantiles[-1] - quantiles[0]).mean())
    print(json.dumps(result))
    return 0


def _impute(args: argparse.Namespace) -> int:
    _require(
        0.0 <= args.fraction <= 1.0, "impute", f"--fraction must be in [0, 1], got {args.fraction}"
    )
    _require(args.fraction > 0 or args.gap is not None, "impute", "give --fraction or --gap")
    for flag in ("iterations", "batch_size"):
        value = getattr(args, flag)
        _require(value >= 1, "impute", f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    run, dataset = _run_dataset("impute", args)
    sequences = dataset.split(args.split).sequences
    key = jax.random.PRNGKey(args.seed)
    try:
        result = impute_split(
            run.params,
            key,
            sequences,
            run.model_config,
            frequencies=note_frequencies(dataset.train.sequences),
            fraction=args.fraction,
            gap=args.gap,
            num_iterations=args.iterations,
            batch_size=args.batch_size,
        )
    except ValueError as err:
        raise SystemExit(f"dmm-jax impute: {err}") from err
    pngs = []
    if args.png is not None and args.png_count > 0:
        shown = list(sequences[: args.png_count])
        x, lengths = PaddedSequences(shown).batch(np.arange(len(shown)), len(shown))
        hide_key, impute_key = jax.random.split(key)
        missing = hide_entries(hide_key, x, lengths, args.fraction, args.gap)
        out = impute(run.params, impute_key, x, lengths, missing, run.model_config, args.iterations)
        missing, probs = np.asarray(missing), np.asarray(out["probs"])
        for i, seq in enumerate(shown):
            n, hidden = len(seq), missing[i, : len(seq)]
            given = np.where(hidden, 0.3, seq)  # hidden entries drawn light grey
            figure = piano_roll_figure(
                [seq, given, probs[i, :n]],
                ["truth", "given (hidden in grey)", "imputed P(note) where hidden"],
            )
            pngs.append(str(save_png(figure, Path(args.png) / f"impute_{i:03d}.png")))
    print(json.dumps({"dataset": dataset.name, "split": args.split, **result, "png": pngs}))
    return 0


def _plot(args: argparse.Namespace) -> int:
    try:
        figure = training_curves_figure(read_training_log(args.log))
    except (OSError, ValueError) as err:
        raise SystemExit(f"dmm-jax plot: {err}") from err
    print(json.dumps({"log": str(args.log), "png": str(save_png(figure, args.out))}))
    return 0


_COMMANDS = {
    "train": _train,
    "evaluate": _evaluate,
    "sample": _sample,
    "forecast": _forecast,
    "posterior": _posterior,
    "impute": _impute,
    "plot": _plot,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cache = compile_cache_dir(args.compile_cache)
    if cache is not None and argv is None and "PYTHONHASHSEED" not in os.environ:
        # NumPyro's Trace_ELBO adds its sites in set order, which follows the per-process
        # string hash: the value is the same, but the program text (the cache key) is not. A
        # fixed hash seed makes every run lower the same program, so the cache can hit.
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "dmm_jax.cli", *sys.argv[1:]])
    if args.command == "train":
        # XLA's per-update scratch buffers are reused, not page-faulted in; not for the other
        # commands, whose peak it raises (see dmm_jax.runtime).
        retain_freed_memory()
    if cache is not None:
        # A second run of the same shapes loads its executables instead of recompiling them.
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    try:
        return _COMMANDS[args.command](args)
    except (DataError, CheckpointError, NotImplementedError) as err:
        print(f"dmm-jax {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
