"""Piano-roll and training-curve pictures: they show the data they are given, as PNG or SVG
files."""

import json

import numpy as np
import pytest

from dmm_jax.plots import (
    comparison_figure,
    forecast_figure,
    piano_roll_figure,
    posterior_figure,
    read_training_log,
    save_figure,
    save_png,
    training_curves_figure,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_piano_roll_figure_draws_the_roll_over_the_sounding_keys(tmp_path):
    roll = np.zeros((10, 88), np.uint8)
    roll[2:5, 40] = roll[7, 50] = 1
    figure = piano_roll_figure([roll, roll[::-1]], ["a", "b"])
    image = figure.axes[0].images[0]
    # Keys 38..52 (two either side of the notes), time across: the roll's transposed window.
    np.testing.assert_array_equal(image.get_array(), roll[:, 38:53].T)
    assert image.get_extent()[2:] == [21 + 38 - 0.5, 21 + 53 - 0.5]
    path = save_png(figure, tmp_path / "sub" / "roll.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match=r"\[T, 88\]"):
        piano_roll_figure([np.zeros((4, 10))])


def test_forecast_figure_puts_prefix_before_truth_and_forecast():
    prefix, truth = np.zeros((3, 88)), np.zeros((2, 88))
    prefix[:, 30] = truth[:, 31] = 1
    probs = np.full((2, 88), 0.01)
    probs[:, 32] = 0.7
    figure = forecast_figure(prefix, truth, probs)
    top, bottom = (axes.images[0].get_array() for axes in figure.axes)
    assert top.shape == bottom.shape == (7, 5)  # keys 28..34: notes 30..32 and a margin of 2
    for image in (top, bottom):
        np.testing.assert_array_equal(image[30 - 28, :3], 1)  # the prefix, in both panels
    np.testing.assert_array_equal(top[31 - 28, 3:], 1)  # the true continuation
    np.testing.assert_allclose(bottom[32 - 28, 3:], 0.7)  # the forecast probabilities
    assert bottom[31 - 28, 3:].max() == pytest.approx(0.01)


def test_training_curves_show_each_logged_loss(tmp_path):
    records = [
        {"epoch": 0, "train_loss_per_step": 60.0},
        {"epoch": 1, "train_loss_per_step": 20.0, "val_loss_per_step": 21.0},
        {
            "epoch": 2,
            "train_loss_per_step": 10.0,
            "val_loss_per_step": 11.0,
            "test_loss_per_step": 12.0,
        },
    ]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    figure = training_curves_figure(read_training_log(log))
    lines = {line.get_label(): line.get_xydata().tolist() for line in figure.axes[0].lines}
    assert lines == {
        "train (annealed -ELBO)": [[0, 60.0], [1, 20.0], [2, 10.0]],
        "validation -ELBO": [[1, 21.0], [2, 11.0]],
        "test -ELBO": [[2, 12.0]],
    }
    assert figure.axes[0].get_yscale() == "log"


def test_bad_training_logs_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        read_training_log(tmp_path / "nowhere.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"epoch": 0, "train_loss_per_step": 3.0}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_training_log(bad)
    with pytest.raises(ValueError, match="no loss values"):
        training_curves_figure([{"epoch": 0}])


def test_posterior_figure_draws_each_latent_mean_and_band():
    roll = np.zeros((6, 88))
    roll[:, 40] = 1
    mean = np.arange(12.0).reshape(6, 2)
    quantiles = np.stack([mean - 1, mean, mean + 1])
    figure = posterior_figure(roll, mean, quantiles, dims=(0, 1, 5))  # 5 is out of range
    lines = figure.axes[1].lines
    assert [line.get_label() for line in lines] == ["z[0]", "z[1]"]
    np.testing.assert_array_equal(lines[1].get_ydata(), mean[:, 1])
    with pytest.raises(ValueError, match="must match"):
        posterior_figure(roll[:5], mean, quantiles)


def test_comparison_draws_each_runs_validation_and_training_curves_in_one_colour():
    runs = {
        "a": [
            {"epoch": 0, "train_loss_per_step": 30.0},
            {"epoch": 1, "train_loss_per_step": 6.0, "val_loss_per_step": 7.0},
        ],
        "b": [{"epoch": 1, "train_loss_per_step": 5.0, "val_loss_per_step": 6.5}],
    }
    axes = comparison_figure(runs, span=2.0).axes[0]
    lines = [
        (line.get_label(), line.get_xydata().tolist(), line.get_color()) for line in axes.lines
    ]
    (a_val, a_train, b_val, b_train) = lines
    assert a_val[:2] == ("a", [[1, 7.0]]) and a_train[1] == [[0, 30.0], [1, 6.0]]
    assert b_val[:2] == ("b", [[1, 6.5]]) and b_train[1] == [[1, 5.0]]
    assert a_val[2] == a_train[2] != b_val[2] == b_train[2]
    assert axes.get_ylim() == pytest.approx((5.0 - 0.1, 7.0))  # span above the lowest value
    footnote = "command " + "x" * 200 + "\nmachine, date"
    figure = comparison_figure(runs, footnote=footnote)
    [text] = [t for t in figure.texts if t.get_text()]
    assert text.get_text().replace("\n  ", "").replace("\n", " ") == footnote.replace("\n", " ")
    with pytest.raises(ValueError, match="run 'c' has no validation values"):
        comparison_figure({"c": [{"epoch": 0, "train_loss_per_step": 1.0}]})


def test_save_figure_writes_svg_with_its_text_as_text_and_the_same_bytes_each_time(tmp_path):
    runs = {"a": [{"epoch": 0, "train_loss_per_step": 6.0, "val_loss_per_step": 7.0}]}
    figure = comparison_figure(runs, footnote="python draw.py --out curves.svg\nCPU X; 2026-12-08")
    first = save_figure(figure, tmp_path / "curves.svg")
    svg = first.read_text()
    assert svg.lstrip().startswith("<?xml") and "python draw.py --out curves.svg" in svg
    assert "<dc:date>" not in svg  # no creation date: the figure alone decides the bytes
    again = save_figure(figure, tmp_path / "again.svg")
    assert again.read_bytes() == first.read_bytes()
    assert save_figure(figure, tmp_path / "curves.png").read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match=r"curves\.pdf: a figure is written as \.png or \.svg"):
        save_figure(figure, tmp_path / "curves.pdf")
    assert not (tmp_path / "curves.pdf").exists()
