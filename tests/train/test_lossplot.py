"""loss.png: the smoothing against its closed form, and the picture a run writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastmid.train.lossplot import read_metrics, smoothed, write_loss_plot
from fastmid.train.recipe import run_train


def test_smoothing_is_the_bias_corrected_moving_average():
    w = 0.9
    x1, x2 = 3.0, 1.0
    # m1 = (1-w) x1 / (1-w) = x1; m2 = (w (1-w) x1 + (1-w) x2) / (1 - w^2) = (w x1 + x2) / (1 + w)
    assert smoothed([x1, x2], w) == pytest.approx([x1, (w * x1 + x2) / (1 + w)], rel=1e-12)
    assert smoothed([2.0] * 50, w) == pytest.approx([2.0] * 50, rel=1e-12)  # constant stays put
    assert smoothed([5.0, 1.0], 0.0) == [5.0, 1.0]


def test_a_partial_last_line_is_skipped_and_no_step_draws_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0, "lr": 0.1}]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert write_loss_plot(empty, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()


def test_a_run_draws_loss_png_and_the_summary_names_it(make_config):
    from io import StringIO

    import matplotlib.image as mpimg
    from rich.console import Console

    summary = run_train(make_config("plot", max_steps=4, save_every=2), Console(file=StringIO()))
    png = summary["loss_plot"]
    assert png is not None and png.endswith("loss.png")
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    height, width = mpimg.imread(png).shape[:2]
    assert (width, height) == (700, 400)  # 7 x 4 inches at 100 dpi
    written = json.loads((Path(summary["output"]) / "summary.json").read_text())
    assert written["loss_plot"] == png
