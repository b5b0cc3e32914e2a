"""--report-to: TensorBoard events read back; wandb and trackio through fake modules (metric
names, values, steps, finish; wandb offline without a login); a missing package is one line."""

from __future__ import annotations

import importlib
import json
import sys
import types
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from fastmid.train import trackers as trackers_module
from fastmid.train.recipe import run_train
from fastmid.train.trackers import TrackerError, Trackers, wandb_mode


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


# ---- wandb and trackio, through fake modules (neither package is installed in the suite) ------

# What fastmid promises to send (HF Trainer's names plus its own), and from which record key.
SENT = {
    "train/loss": "loss",
    "train/learning_rate": "lr",
    "train/grad_norm": "grad_norm",
    "train/tokens_per_s": "tokens_per_s",
    "train/peak_memory_bytes": "peak_memory_bytes",
    "train/grad_bytes": "grad_bytes",
    "eval/loss": "eval_loss",
}


class FakeRun:
    """What ``wandb.init`` / ``trackio.init`` return: records ``log`` and ``finish``."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def log(self, data: dict, step: int | None = None) -> None:
        self.calls.append(("log", dict(data), step))

    def finish(self) -> None:
        self.calls.append(("finish",))


def fake_tracker(monkeypatch, name: str) -> list:
    """Install a fake ``name`` module (``init`` returning a :class:`FakeRun`); returns its calls."""
    calls: list = []

    def init(**kwargs):
        # trackio reserves config keys starting with "_" (raises ValueError); wandb stores any
        assert not any(str(k).startswith("_") for k in kwargs.get("config") or {})
        calls.append(("init", kwargs))
        return FakeRun(calls)

    module = types.ModuleType(name)
    module.init = init
    monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.fixture
def no_wandb_login(monkeypatch, tmp_path):
    """An environment with no W&B setting or credential (netrc pointed at a missing file)."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_wandb_and_trackio_get_each_steps_metrics_under_hf_names(
    make_config, monkeypatch, no_wandb_login
):
    wandb_calls = fake_tracker(monkeypatch, "wandb")
    trackio_calls = fake_tracker(monkeypatch, "trackio")
    cfg = make_config("wb", max_steps=4, eval_every=2, report_to="wandb,trackio")
    summary = run_train(cfg, Console(file=StringIO()))
    run = Path(summary["output"])
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]

    kind, init = wandb_calls[0]
    assert kind == "init" and init["project"] == "fastmid" and init["dir"] == str(run)
    assert init["mode"] == "offline"  # no WANDB_MODE, no key: never wandb's login prompt
    assert init["config"]["max_steps"] == 4 and init["config"]["report_to"] == "wandb,trackio"
    kind, init = trackio_calls[0]
    assert kind == "init" and init["project"] == "fastmid" and set(init) == {"project", "config"}
    assert init["config"]["lr"] == cfg.lr

    for calls in (wandb_calls, trackio_calls):
        logs = [c for c in calls if c[0] == "log"]
        assert calls[-1] == ("finish",) and calls.count(("finish",)) == 1
        assert [step for _, _, step in logs] == [r["step"] for r in records]
        for (_, sent, _), record in zip(logs, records, strict=True):
            expected = {name: record[key] for name, key in SENT.items() if key in record}
            assert set(sent) == set(expected)  # nothing else (step_time_s, tokens ...) is sent
            assert sent == pytest.approx(expected, rel=1e-12)
            assert all(type(v) is float for v in sent.values())
        assert [step for _, sent, step in logs if "eval/loss" in sent] == [2, 4]
        assert {"train/loss", "train/learning_rate", "train/grad_norm"} <= set(logs[0][1])


def test_wandb_is_offline_only_without_mode_and_credentials(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password k3y\n")
    other = tmp_path / "netrc-other"
    other.write_text("machine example.org login user password k3y\n")
    broken = tmp_path / "netrc-broken"
    broken.write_text("machine\n")
    none = str(tmp_path / "missing")
    assert wandb_mode({"NETRC": none}) == "offline"
    assert wandb_mode({"NETRC": none, "WANDB_MODE": ""}) == "offline"
    assert wandb_mode({"NETRC": str(other)}) == "offline"
    assert wandb_mode({"NETRC": str(broken)}) == "offline"
    # WANDB_MODE (offline, online, disabled) is wandb's to apply; a key means online
    assert wandb_mode({"NETRC": none, "WANDB_MODE": "online"}) is None
    assert wandb_mode({"NETRC": none, "WANDB_MODE": "disabled"}) is None
    assert wandb_mode({"NETRC": none, "WANDB_API_KEY": "k3y"}) is None
    assert wandb_mode({"NETRC": str(netrc)}) is None  # `wandb login`
    custom = {"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.com:8443"}
    assert wandb_mode(custom) == "offline"  # the key is for another host
    other.write_text("machine wandb.example.com login user password k3y\n")
    assert wandb_mode({**custom, "NETRC": str(other)}) is None


def test_wandb_with_a_key_is_left_to_wandb(monkeypatch, tmp_path, no_wandb_login):
    calls = fake_tracker(monkeypatch, "wandb")
    monkeypatch.setenv("WANDB_API_KEY", "k3y")
    trackers = Trackers(["wandb"], tmp_path, {"lr": 1e-3})
    trackers.log({"step": 3, "loss": 2.5, "lr": 1e-3, "eval_loss": None, "tokens": 7})
    trackers.close()
    trackers.close()  # a second close ends nothing twice
    assert calls == [
        ("init", {"project": "fastmid", "dir": str(tmp_path), "config": {"lr": 1e-3}}),
        ("log", {"train/loss": 2.5, "train/learning_rate": 1e-3}, 3),
        ("finish",),
    ]
