"""Pictures: piano rolls, forecasts against the truth, series extrapolated in continuous time,
training curves of one run or several side by side (matplotlib, Agg).

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through pyplot,
so nothing here needs a display or touches global backend state. ``save_png`` and
``save_figure`` (PNG or SVG by the file's suffix) write atomically; ``png_bytes`` is for
notebooks (``IPython.display.Image(png_bytes(fig))``).
"""

from __future__ import annotations

import io
import json
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dmm_jax.data import LOWEST_NOTE, NUM_NOTES
from dmm_jax.files import atomic_write_bytes

_MARGIN = 2  # keys shown above and below the highest and lowest sounding note


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def svg_bytes(figure: Figure) -> bytes:
    """``figure`` as SVG with its text kept as text (searchable, diffable) and no creation
    date or random ids (the same figure gives the same bytes)."""
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "dmm_jax"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def save_png(figure: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Writes ``figure`` as a PNG at ``path`` (atomically, creating the folder)."""
    return atomic_write_bytes(path, png_bytes(figure, dpi))


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Writes ``figure`` at ``path`` as PNG (``.png``) or SVG (``.svg``), atomically."""
    suffix = Path(path).suffix.lower()
    if suffix == ".svg":
        return atomic_write_bytes(path, svg_bytes(figure))
    if suffix == ".png":
        return save_png(figure, path, dpi)
    raise ValueError(f"{path}: a figure is written as .png or .svg, not {suffix or 'no suffix'!r}")


def _pitch_window(rolls: Sequence[np.ndarray]) -> tuple[int, int]:
    """Key indices [low, high) covering every note that sounds (or may sound) in ``rolls``."""
    sounding = np.nonzero(np.any([np.any(np.asarray(r) > 0.05, axis=0) for r in rolls], axis=0))
    if not sounding[0].size:
        return 0, NUM_NOTES
    low, high = sounding[0].min(), sounding[0].max() + 1
    return max(0, low - _MARGIN), min(NUM_NOTES, high + _MARGIN)


def _check_rolls(rolls, name: str) -> list[np.ndarray]:
    rolls = [np.asarray(r, np.float32) for r in rolls]
    for r in rolls:
        if r.ndim != 2 or r.shape[1] != NUM_NOTES:
            raise ValueError(f"{name} must be [T, {NUM_NOTES}] piano rolls, got shape {r.shape}")
    return rolls


def _draw_roll(axes, roll: np.ndarray, window: tuple[int, int], start: int = 0):
    low, high = window
    image = axes.imshow(
        roll[:, low:high].T,
        aspect="auto",
        origin="lower",
        cmap="Greys",
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
        extent=(
            start - 0.5,
            start + len(roll) - 0.5,
            LOWEST_NOTE + low - 0.5,
            LOWEST_NOTE + high - 0.5,
        ),
    )
    axes.set_ylabel("MIDI note")
    return image


def piano_roll_figure(rolls, titles: Sequence[str] | None = None) -> Figure:
    """One panel per [T, 88] roll (0/1 notes or probabilities in [0, 1]), time across."""
    rolls = _check_rolls(rolls, "rolls")
    if titles is not None and len(titles) != len(rolls):
        raise ValueError(f"{len(titles)} titles for {len(rolls)} piano rolls")
    window = _pitch_window(rolls)
    figure = _new_figure(8.0, 2.2 * len(rolls))
    for i, (axes, roll) in enumerate(
        zip(figure.subplots(len(rolls), 1, squeeze=False)[:, 0], rolls, strict=True)
    ):
        _draw_roll(axes, roll, window)
        if titles is not None:
            axes.set_title(titles[i])
    axes.set_xlabel("time step (quarter note)")
    return figure


def forecast_figure(prefix, truth, probs, title: str | None = None) -> Figure:
    """The prefix and its true continuation, above the prefix and the forecast probabilities.

    ``prefix`` [k, 88], ``truth`` [h, 88] (0/1), ``probs`` [h, 88] (P(note on) per step); a
    red line marks where the forecast starts.
    """
    prefix, truth, probs = _check_rolls((prefix, truth, probs), "prefix, truth and probs")
    window = _pitch_window((prefix, truth, probs))
    figure = _new_figure(8.0, 4.4)
    top, bottom = figure.subplots(2, 1, sharex=True)
    for axes, future, label in ((top, truth, "truth"), (bottom, probs, "forecast P(note)")):
        _draw_roll(axes, np.concatenate([prefix, future]), window)
        axes.axvline(len(prefix) - 0.5, color="tab:red", linewidth=1.5)
        axes.set_title(label if title is None or axes is bottom else f"{title}: {label}")
    bottom.set_xlabel("time step (quarter note)")
    return figure


def read_training_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``dmm-jax train --log-json`` file (one JSON object per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from err
        if not isinstance(record, dict) or "epoch" not in record:
            raise ValueError(f"{path}:{number}: not a training record (no 'epoch')")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no training records")
    return records


CURVES = {
    "train_loss_per_step": "train (annealed -ELBO)",
    "val_loss_per_step": "validation -ELBO",
    "test_loss_per_step": "test -ELBO",
}


def training_curves_figure(records: Sequence[dict[str, Any]]) -> Figure:
    """Loss per time step against epoch: training every epoch, validation/test where evaluated.

    The y axis is logarithmic when every value is positive (early spikes span decades).
    """
    figure = _new_figure(7.0, 4.0)
    axes = figure.subplots()
    values = []
    for field, label in CURVES.items():
        points = [(r["epoch"], r[field]) for r in records if r.get(field) is not None]
        if not points:
            continue
        epochs, losses = zip(*points, strict=True)
        marker = None if field == "train_loss_per_step" else "o"
        axes.plot(epochs, losses, marker=marker, markersize=3, label=label)
        values += losses
    if not values:
        raise ValueError(f"no loss values in the records (expected one of {list(CURVES)})")
    if min(values) > 0:
        axes.set_yscale("log")
    axes.set_xlabel("epoch")
    axes.set_ylabel("nats per time step")
    axes.legend()
    axes.grid(alpha=0.3)
    return figure


def comparison_figure(
    runs: Mapping[str, Sequence[dict[str, Any]]], span: float = 3.0, footnote: str = ""
) -> Figure:
    """Several runs' curves on one axis, one colour per run: validation bound where evaluated
    (solid, markers), training loss every epoch (thin, dashed), so runs that overfit stand
    apart. The y axis shows ``span`` nats per step above the lowest value (early epochs sit
    far higher). ``footnote`` (e.g. the command, machine and date behind the runs) is printed
    under the axes."""
    if not runs:
        raise ValueError("no runs to compare")
    # Wrapped to the figure's width (about 125 characters of x-small text on 7 inches).
    footnote = "\n".join(
        "\n".join(textwrap.wrap(line, 125, subsequent_indent="  "))
        for line in footnote.splitlines()
    )
    lines = footnote.count("\n") + 1 if footnote else 0
    figure = _new_figure(7.0, 4.5 + 0.15 * lines)
    axes = figure.subplots()
    values = []
    for (label, records), color in zip(runs.items(), _colors(len(runs)), strict=True):
        train = [
            (r["epoch"], r["train_loss_per_step"]) for r in records if "train_loss_per_step" in r
        ]
        val = [(r["epoch"], r["val_loss_per_step"]) for r in records if "val_loss_per_step" in r]
        if not val:
            raise ValueError(f"run {label!r} has no validation values (val_loss_per_step)")
        axes.plot(*zip(*val, strict=True), marker="o", markersize=3, color=color, label=label)
        if train:
            axes.plot(*zip(*train, strict=True), linestyle="--", linewidth=0.8, color=color)
        values += [v for _, v in train + val]
    lowest = min(values)
    axes.set_ylim(lowest - 0.05 * span, lowest + span)
    axes.set_xlabel("epoch")
    axes.set_ylabel("nats per time step")
    axes.set_title("validation bound (solid), training loss (dashed)", fontsize="medium")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    if footnote:
        figure.supxlabel(footnote, fontsize="x-small", ha="left", x=0.01)
    return figure


def _colors(count: int) -> list:
    palette = colormaps["tab10"]
    return [palette(i % 10) for i in range(count)]


def posterior_figure(roll, mean, quantiles, dims: Sequence[int] = (0, 1, 2, 3)) -> Figure:
    """A sequence above its latent trajectory under the guide.

    ``roll`` [T, 88]; ``mean`` [T, Z] and ``quantiles`` [Q, T, Z] from
    ``dmm_jax.generate.posterior_latents`` (one sequence); the band spans the first and last
    quantile, for the latent dimensions ``dims``.
    """
    (roll,) = _check_rolls([roll], "roll")
    mean, quantiles = np.asarray(mean), np.asarray(quantiles)
    if mean.shape != quantiles.shape[1:] or mean.shape[0] != len(roll):
        raise ValueError(
            f"mean [T, Z] and quantiles [Q, T, Z] must match the roll's {len(roll)} steps, got "
            f"{mean.shape} and {quantiles.shape}"
        )
    dims = [d for d in dims if d < mean.shape[1]]
    figure = _new_figure(8.0, 4.4)
    top, bottom = figure.subplots(2, 1, sharex=True)
    _draw_roll(top, roll, _pitch_window([roll]))
    steps = np.arange(len(roll))
    for d in dims:
        (line,) = bottom.plot(steps, mean[:, d], label=f"z[{d}]")
        bottom.fill_between(
            steps, quantiles[0, :, d], quantiles[-1, :, d], alpha=0.25, color=line.get_color()
        )
    bottom.set_ylabel("latent (mean, band)")
    bottom.set_xlabel("time step (quarter note)")
    bottom.legend(loc="upper right", fontsize="small", ncols=len(dims))
    return figure


def series_forecast_figure(
    observed_t,
    observed_x,
    truth_t,
    truth_x,
    grid,
    draws,
    title: str | None = None,
    split_time: float | None = None,
) -> Figure:
    """One real-valued series: the points the model saw, the true points, and the model's
    mean with a band from the 5th to the 95th percentile over its draws, for each dimension
    (up to 4).

    ``observed_t`` [K] / ``observed_x`` [K, D], ``truth_t`` [M] / ``truth_x`` [M, D] (NaN:
    not observed), ``grid`` [G] and ``draws`` [S, G, D] (``extrapolate``'s, one series);
    ``split_time``, if given, is marked where the observed part ends.
    """
    draws = np.asarray(draws, np.float64)
    grid, truth_x, observed_x = np.asarray(grid), np.asarray(truth_x), np.asarray(observed_x)
    if draws.ndim != 3 or draws.shape[1] != len(grid) or draws.shape[2] != truth_x.shape[-1]:
        raise ValueError(
            f"draws must be [S, G, D] with G = {len(grid)} grid times and D = "
            f"{truth_x.shape[-1]} dims, got {draws.shape}"
        )
    dims = min(draws.shape[2], 4)
    figure = _new_figure(8.0, 2.4 * dims)
    axes = np.atleast_1d(figure.subplots(dims, 1, sharex=True, squeeze=False)[:, 0])
    low, high = np.percentile(draws, [5, 95], axis=0)
    for d, ax in enumerate(axes):
        (line,) = ax.plot(grid, draws[:, :, d].mean(0), label="model mean")
        ax.fill_between(grid, low[:, d], high[:, d], alpha=0.25, color=line.get_color(),
                        label="5-95% of draws")  # fmt: skip
        ax.plot(truth_t, truth_x[:, d], ".", color="0.5", markersize=3, label="truth")
        ax.plot(observed_t, observed_x[:, d], "o", color="black", markersize=4, label="observed")
        if split_time is not None:
            ax.axvline(split_time, color="0.3", linestyle="--", linewidth=1)
        ax.set_ylabel(f"x[{d}]")
    axes[0].legend(loc="best", fontsize="small", ncols=2)
    axes[-1].set_xlabel("time")
    if title:
        axes[0].set_title(title)
    return figure
