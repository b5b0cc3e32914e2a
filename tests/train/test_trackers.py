"""--report-to: TensorBoard events read back; a missing tracker package is one line."""

from __future__ import annotations

import importlib
import json
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from fastmid.train import trackers as trackers_module
from fastmid.train.recipe import run_train
from fastmid.train.trackers import TrackerError, Trackers


def test_tensorboard_events_hold_each_steps_metrics(make_config):
    pytest.importorskip(
        "tensorboard"
    )  # a dev dependency (pyproject); the test is not skipped there
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config("tb", max_steps=4, eval_every=2, report_to="tensorboard")
    summary = run_train(cfg, Console(file=StringIO()))
    run = Path(summary["output"])
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss"} <= tags
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in records]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    evals = [(e.step, e.value) for e in events.Scalars("eval/loss")]
    expected = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    assert [s for s, _ in evals] == [s for s, _ in expected]
    assert [v for _, v in evals] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_a_missing_tracker_package_is_one_line(tmp_path, monkeypatch):
    real = importlib.import_module

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(trackers_module.importlib, "import_module", no_wandb)
    with pytest.raises(TrackerError) as info:
        Trackers(["wandb"], tmp_path, {})
    message = str(info.value)
    assert "fastmid[wandb]" in message and "--report-to" in message and "\n" not in message


def test_none_tracks_nothing(tmp_path):
    trackers = Trackers(["none"], tmp_path, {})
    trackers.log({"step": 1, "loss": 1.0})
    trackers.close()
    assert list(tmp_path.iterdir()) == []
