"""The subcommands of ``dmm-jax`` (``dmm_jax.cli`` parses their flags): each reads its data
or checkpoint, calls the library and prints one JSON object or one line per epoch."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dmm_jax import distributed
from dmm_jax.checkpoint import CheckpointError
from dmm_jax.cli import model_config_from_args, model_flags_given
from dmm_jax.config import BINARY_EMISSIONS, TrainConfig
from dmm_jax.data import NUM_NOTES, DataError, load_dataset
from dmm_jax.data.arrays import ArrayDataset, load_arrays
from dmm_jax.data.batching import PaddedSequences
from dmm_jax.data.irregular import periodic_arrays, series_from_arrays
from dmm_jax.evaluate import evaluate_split, particle_filter_split
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
from dmm_jax.models import family_of
from dmm_jax.music import write_midi
from dmm_jax.plots import (
    comparison_figure,
    forecast_figure,
    piano_roll_figure,
    posterior_figure,
    read_training_log,
    save_png,
    series_forecast_figure,
    training_curves_figure,
)
from dmm_jax.train import changed_settings, fit, load_run


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


def _real_valued(
    data: str | None, name: str | None, whole_train: bool = False
) -> ArrayDataset | None:
    """The real-valued data set of an ``.npz`` file or the generated periodic series (its
    training split whole with ``whole_train``); None for a polyphonic data set."""
    if _is_arrays(data):
        return load_arrays(data)
    return periodic_arrays(whole_train=whole_train) if name == "periodic" else None


def _init_params(path: str | None, model_config: Any) -> dict[str, Any] | None:
    """The parameters of the checkpoint at ``path`` (--init-from), which must hold a run of
    the same model settings; None without a path."""
    if path is None:
        return None
    run = load_run(path)
    changed = changed_settings(run.model_config, model_config)
    if changed:
        raise CheckpointError(
            f"--init-from {path}: trained with other model settings; changed: {', '.join(changed)}"
        )
    return run.params


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
            objective=args.objective,
            particles=args.particles,
            resampling=args.resampling,
            lr_schedule=args.lr_schedule,
            annealing_schedule=args.annealing_schedule,
            early_stopping_patience=args.early_stopping_patience,
            dropout=args.dropout,
            input_dropout=args.input_dropout,
            transpose=args.transpose,
            weight_average=args.weight_average,
        )
        if train_config.kl == "analytic" and args.num_iafs:
            raise ValueError("--kl analytic is not available with --num-iafs > 0 (use sampled)")
        model_flags_given(args)  # names a flag of another family before any data is read
    except ValueError as err:
        raise SystemExit(f"dmm-jax train: {err}") from err
    mesh = _mesh(args)  # a multi-process run must join before anything touches a device
    # An encoder that draws its own context trains on whole periodic series (the reference's
    # interpolation training); it reads the test split's observed points as before.
    dataset = _real_valued(args.data, args.dataset, bool(args.context_points))
    if dataset is not None:
        train = dataset.train
        obs_dim, input_dim, use_dt = train.obs_dim, train.input_dim, train.dt is not None
        binary = bool(np.all(np.isnan(train.x) | (train.x == 0) | (train.x == 1)))
        metadata = {"dataset": "periodic"}
        if _is_arrays(args.data):
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
    if binary is not None and model_config.emission in BINARY_EMISSIONS and not binary:
        raise SystemExit(
            f"dmm-jax train: {args.data} holds values other than 0/1; use --emission gaussian"
        )
    init_params = _init_params(args.init_from, model_config)
    # In a multi-process run only process 0 prints; --quiet prints nothing but errors.
    lead = jax.process_index() == 0 and not args.quiet
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
        init_params=init_params,
        model_config=model_config,
        train_config=train_config,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        log_json=args.log_json,
        progress=lead and not args.no_progress,
        # tqdm.write clears the bar, prints the line and redraws: the two never overwrite.
        log=(lambda line: tqdm.write(line)) if lead else None,
        metadata=metadata,
        mesh=mesh,
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    mesh = _mesh(args)
    run = load_run(args.checkpoint, best=args.best)
    dataset = _dataset("evaluate", args, run)
    split = dataset.split(args.split)
    name = f"{args.checkpoint}: {args.split} split"
    result = evaluate_split(
        run.params,
        jax.random.PRNGKey(args.seed),
        split,
        run.model_config,
        num_samples=args.samples,
        estimator="elbo" if args.estimator == "pf" else args.estimator,
        batch_size=args.batch_size,
        mesh=mesh,
        name=name,
    )
    if args.estimator == "pf":
        _require(mesh is None, "evaluate", "--estimator pf runs on one device")
        try:
            filtered = particle_filter_split(
                run.params,
                jax.random.PRNGKey(args.seed),
                split,
                run.model_config,
                num_particles=args.samples,
                resampling=args.resampling,
                name=name,
            )
        except ValueError as err:
            raise SystemExit(f"dmm-jax evaluate: {err}") from err
        result = {**result, "estimator": "pf", **filtered}
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


def _require_positive(args: argparse.Namespace, *flags: str) -> None:
    """Each of the integer ``flags`` (argparse names) is at least 1, or the command exits
    naming it."""
    for flag in flags:
        value = getattr(args, flag)
        name = "--" + flag.replace("_", "-")
        _require(value >= 1, args.command, f"{name} must be >= 1, got {value}")


def _sample(args: argparse.Namespace) -> int:
    _require_positive(args, "num", "length")
    _require(args.tempo > 0, "sample", f"--tempo must be > 0, got {args.tempo}")
    run = load_run(args.checkpoint)
    _require(
        (run.model_config.obs_dim == NUM_NOTES and run.model_config.emission in BINARY_EMISSIONS)
        or (args.midi is None and args.png is None),
        "sample",
        f"--midi and --png need 0/1 piano rolls of {NUM_NOTES} keys; this model emits "
        f"{run.model_config.obs_dim} {run.model_config.emission} values a step",
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
        # notes sounding per step for piano rolls, the mean drawn value otherwise
        ("notes_per_step" if "probs" in out else "mean_value"): float(
            rolls.sum() / (args.num * args.length) if "probs" in out else rolls.mean()
        ),
        **written,
    }
    print(json.dumps(result))
    return 0


def _forecast(args: argparse.Namespace) -> int:
    _require_positive(args, "prefix", "horizon", "samples", "batch_size")
    run = load_run(args.checkpoint)
    if family_of(run.model_config).extrapolate is not None:
        return _extrapolate_series(args, run)
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


def _extrapolate_series(args: argparse.Namespace, run) -> int:
    """``forecast`` of a continuous-time family: each series of the split observed before the
    midpoint of its time range, predicted after it; test MSE and pictures."""
    dataset = _dataset("forecast", args, run)
    _require(
        isinstance(dataset, ArrayDataset),
        "forecast",
        f"extrapolates real-valued series; {dataset.source} holds piano rolls",
    )
    arrays = dataset.split(args.split)
    _require(arrays is not None, "forecast", f"{dataset.source} has no {args.split} split")
    try:
        series = series_from_arrays(arrays)
        out = family_of(run.model_config).extrapolate(
            run.params, jax.random.PRNGKey(args.seed), run.model_config, series, args.samples
        )
    except (ValueError, DataError) as err:
        raise SystemExit(f"dmm-jax forecast: {err}") from err
    pngs = []
    task = out["task"]
    for i in range(min(args.png_count, series.num_series) if args.png else 0):
        seen, n = task.observed, int(series.lengths[i])
        figure = series_forecast_figure(
            seen.t[i, : seen.lengths[i]],
            seen.x[i, : seen.lengths[i]],
            series.t[i, :n],
            series.x[i, :n],
            out["grid"][i],
            out["draws"][:, i],
            f"series {i}: observed before t = {float(task.targets.t[i, 0]):.3g}",
            split_time=float(task.targets.t[i, 0]),
        )
        pngs.append(str(save_png(figure, Path(args.png) / f"forecast_{i:03d}.png")))
    result = {
        "dataset": dataset.name,
        "split": args.split,
        "checkpoint": str(args.checkpoint),
        "epochs_trained": int(run.state.epoch),
        "mode": "extrapolate",
        "test_mse": out["test_mse"],
        "num_series": series.num_series,
        "num_targets": int(task.targets.mask.sum()),
        "samples": args.samples,
        "png": pngs,
    }
    print(json.dumps(result))
    return 0


def _dataset(command: str, args: argparse.Namespace, run):
    """The data set ``--data`` / ``--dataset`` name, else the one the run was trained on: a
    polyphonic data set, or an ``ArrayDataset`` of real values (a .npz file)."""
    arrays_file = args.data if _is_arrays(args.data) else None
    if arrays_file is None and args.dataset is None and run.metadata.get("dataset") == "arrays":
        arrays_file = args.data or run.metadata.get("data")
    name = args.dataset or run.metadata.get("dataset")
    dataset = _real_valued(arrays_file, name)
    if dataset is not None:
        return dataset
    _require(name is not None, command, "the checkpoint does not name its dataset; pass --dataset")
    return load_dataset(name, args.data)


def _run_dataset(command: str, args: argparse.Namespace, piano_rolls: bool = True):
    """The checkpoint's run and its data set (``_dataset``); ``piano_rolls``: refuse
    real-valued data, naming the file."""
    run = load_run(args.checkpoint)
    dataset = _dataset(command, args, run)
    _require(
        not piano_rolls or not isinstance(dataset, ArrayDataset),
        command,
        f"scores 0/1 piano rolls against a per-note baseline; {dataset.source} holds "
        "real-valued arrays",
    )
    return run, dataset


def _split_sequences(dataset, split: str) -> list[np.ndarray]:
    """The split's sequences, each [length, X] (real values with NaN where missing)."""
    if isinstance(dataset, ArrayDataset):
        arrays = dataset.split(split)
        return [arrays.x[i, :n] for i, n in enumerate(arrays.lengths)]
    return list(dataset.split(split).sequences)


def _posterior(args: argparse.Namespace) -> int:
    _require_positive(args, "samples")
    run, dataset = _run_dataset("posterior", args, piano_rolls=False)
    family = family_of(run.model_config)
    _require(
        family.particle_filter is not None,
        "posterior",
        f"summarises a latent trajectory per step; the {family.name} family has none",
    )
    sequences = _split_sequences(dataset, args.split)
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
    _require_positive(args, "iterations", "batch_size")
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
    labels = args.label or [Path(log).stem for log in args.log]
    try:
        if len(labels) != len(args.log):
            raise ValueError(f"{len(labels)} --label for {len(args.log)} --log files")
        logs = {label: read_training_log(log) for label, log in zip(labels, args.log, strict=True)}
        if len(logs) != len(args.log):
            raise ValueError("two --log files share a label; name them with --label")
        if len(logs) == 1:
            figure = training_curves_figure(next(iter(logs.values())))
        else:
            figure = comparison_figure(logs)
    except (OSError, ValueError) as err:
        raise SystemExit(f"dmm-jax plot: {err}") from err
    logged = args.log[0] if len(args.log) == 1 else args.log
    print(json.dumps({"log": logged, "png": str(save_png(figure, args.out))}))
    return 0


COMMANDS = {
    "train": _train,
    "evaluate": _evaluate,
    "sample": _sample,
    "forecast": _forecast,
    "posterior": _posterior,
    "impute": _impute,
    "plot": _plot,
}
