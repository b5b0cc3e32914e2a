"""Checkpoint format 2: no pickle on load, bit-exact optimizer state (torch AdamW and bitsandbytes
AdamW8bit), damaged checkpoints named with the one to use instead, pruning, partial-folder
cleanup, durable writes (fsync of files, folder and parent)."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmid.errors import FastmidError
from fastmid.train import runfolder as atomic
from fastmid.train.checkpoint import (
    CheckpointError,
    TrainerState,
    capture_rng,
    clean_partial_checkpoints,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
    verify_checkpoint,
)
from fastmid.train.optim import build_optimizer, build_scheduler


class Run:
    """A tiny model (two >= 4096-element matrices get 8-bit state, a LayerNorm keeps 32-bit) with
    the real optimizer and schedule builders."""

    def __init__(self, optim: str = "adamw", seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.Linear(128, 64), torch.nn.LayerNorm(64)
        )
        self.names = [n for n, _ in self.model.named_parameters()]
        self.optimizer = build_optimizer(self.model.named_parameters(), optim, 1e-3, 0.1)
        self.scheduler = build_scheduler(self.optimizer, 20, 2, "cosine")
        self.step = 0

    def train(self, steps: int, seed: int = 7) -> None:
        gen = torch.Generator().manual_seed(seed * 1000 + self.step)
        for _ in range(steps):
            self.optimizer.zero_grad()
            self.model(torch.randn(4, 64, generator=gen)).pow(2).mean().backward()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1

    def save(self, ckdir: Path, keep_last: int = 5, step: int | None = None) -> Path:
        step = self.step if step is None else step
        state = TrainerState(step, step, 10 * step, 5 * step, 0.5, capture_rng(), {"b": 1}, {})
        return save_checkpoint(
            ckdir, self.model, self.names, self.optimizer, self.scheduler, state, keep_last
        )

    def load(self, path: Path) -> TrainerState:
        state = load_checkpoint(path, self.model, self.names, self.optimizer, self.scheduler)
        self.step = state.step
        return state

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_resume_from_checkpoint_is_bit_exact(tmp_path, optim):
    straight = Run(optim)
    straight.train(3)
    path = straight.save(tmp_path)
    straight.train(3)

    resumed = Run(optim, seed=1)  # other initial weights: everything must come from the files
    resumed.load(path)
    resumed.train(3)
    for name, value in straight.weights().items():
        assert torch.equal(value, resumed.weights()[name]), name
    assert resumed.scheduler.state_dict() == straight.scheduler.state_dict()
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]


def test_format_is_safetensors_and_json(tmp_path):
    run = Run("adamw8bit")
    run.train(2)
    path = run.save(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == [
        "band.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "scheduler.json",
        "trainer_state.json",
    ]
    tensors = load_file(str(path / "optimizer.safetensors"))
    quant = "state.0.__bnb_optimizer_quant_state__"
    assert tensors[f"{quant}.state1"].dtype == torch.uint8
    assert tensors[f"{quant}.state1"].numel() == 64 * 128
    assert tensors[f"{quant}.absmax1"].dtype == torch.float32
    assert tensors["state.2.__bnb_optimizer_quant_state__.state1"].dtype == torch.float32  # bias
    opt = json.loads((path / "optimizer.json").read_text())
    assert opt["format"] == 2 and opt["class"].endswith(("AdamW8bit", "AdamW8bitCPU"))
    states = dict(opt["state_dict"]["state"]["__fastmid_dict__"])
    assert states[0]["step"] == 2  # bitsandbytes' int step stays a JSON int
    # the one qmap tensor bitsandbytes shares across parameters is stored once
    q0 = states[0]["__bnb_optimizer_quant_state__"]["qmap1"]
    q1 = states[1]["__bnb_optimizer_quant_state__"]["qmap1"]
    assert q0 == q1 == {"__fastmid_tensor__": f"{quant}.qmap1"}
    assert opt["state_dict"]["param_groups"][0]["betas"] == {"__fastmid_tuple__": [0.9, 0.999]}
    sched = json.loads((path / "scheduler.json").read_text())["state_dict"]
    assert sched["lr_lambdas"] == [None, None] and sched["last_epoch"] == 2
    assert set(load_file(str(path / "band.safetensors"))) == set(run.names)


def test_rng_state_is_json_and_restores(tmp_path):
    import random

    state = json.loads(json.dumps(capture_rng()))  # no pickle anywhere
    a = (random.random(), torch.rand(3))
    restore_rng(state)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


class Payload:
    """Unpickling this would create ``marker``: the test fails if the file ever appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_payload_is_refused_and_never_runs(tmp_path):
    run = Run()
    run.train(1)
    marker = tmp_path / "PWNED"
    evil = pickle.dumps({"state": {}, "param_groups": [], "x": Payload(marker)}, protocol=2)

    # a format-1 folder (optimizer.pt) whose pickle carries a payload
    legacy = run.save(tmp_path / "a")
    for name in ("optimizer.json", "optimizer.safetensors", "scheduler.json"):
        (legacy / name).unlink()
    (legacy / "optimizer.pt").write_bytes(evil)
    (legacy / "scheduler.pt").write_bytes(evil)
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: refused") as info:
        run.load(legacy)
    assert isinstance(info.value, FastmidError) and "\n" not in str(info.value)

    # a format-2 folder whose files were replaced by the same pickle
    current = run.save(tmp_path / "b")
    (current / "optimizer.safetensors").write_bytes(evil)
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors"):
        run.load(current)
    (current / "optimizer.json").write_bytes(evil)
    with pytest.raises(CheckpointError, match=r"optimizer\.json: not valid JSON"):
        run.load(current)
    assert not marker.exists()


def test_format_1_checkpoint_still_loads_without_unsafe_pickle(tmp_path):
    """Checkpoints written before format 2 (optimizer.pt/scheduler.pt) load through
    torch.load(weights_only=True), exactly."""
    straight = Run("adamw8bit")
    straight.train(2)
    path = straight.save(tmp_path)
    for name in ("optimizer.json", "optimizer.safetensors", "scheduler.json"):
        (path / name).unlink()
    torch.save(straight.optimizer.state_dict(), path / "optimizer.pt")
    torch.save(straight.scheduler.state_dict(), path / "scheduler.pt")
    straight.train(2)
    resumed = Run("adamw8bit", seed=3)
    resumed.load(resolve_resume(str(path), tmp_path))
    resumed.train(2)
    for name, value in straight.weights().items():
        assert torch.equal(value, resumed.weights()[name]), name


def _two_checkpoints(tmp_path: Path) -> tuple[Run, Path, Path]:
    run = Run()
    run.train(1)
    first = run.save(tmp_path / "checkpoints")
    run.train(1)
    second = run.save(tmp_path / "checkpoints")
    return run, first, second


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


DAMAGE = {
    "truncated band": ("band.safetensors", lambda p: _truncate(p), "truncated"),
    "truncated optimizer": ("optimizer.safetensors", lambda p: _truncate(p), "truncated"),
    "missing optimizer": ("optimizer.safetensors", lambda p: p.unlink(), "missing"),
    "missing optimizer json": ("optimizer.json", lambda p: p.unlink(), "missing"),
    "invalid json": ("optimizer.json", lambda p: p.write_text('{"format": 2,'), "not valid JSON"),
    "edited scheduler": ("scheduler.json", lambda p: p.write_text("[]"), "missing keys"),
    "missing key": (
        "trainer_state.json",
        lambda p: _edit_json(p, lambda d: d.pop("micro_batches")),
        r"missing keys \['micro_batches'\]",
    ),
    "bad step": (
        "trainer_state.json",
        lambda p: _edit_json(p, lambda d: d.update(step="3")),
        "'step' must be a non-negative integer",
    ),
    # far beyond any run: it overflowed the data-order seed after "resumed" was printed
    "huge micro_batches": (
        "trainer_state.json",
        lambda p: _edit_json(p, lambda d: d.update(micro_batches=10**30)),
        "'micro_batches' must be a non-negative integer below 2\\*\\*62",
    ),
    "step of 2**62": (
        "trainer_state.json",
        lambda p: _edit_json(p, lambda d: d.update(step=2**62)),
        "'step' must be a non-negative integer",
    ),
    "huge tokens": (
        "trainer_state.json",
        lambda p: _edit_json(p, lambda d: d.update(tokens=10**40)),
        "'tokens' must be a non-negative integer",
    ),
    "infinite elapsed time": (
        "trainer_state.json",
        lambda p: _edit_json(p, lambda d: d.update(elapsed_s=float("inf"))),
        "'elapsed_s' must be a non-negative number",
    ),
    "bad rng": (
        "trainer_state.json",
        lambda p: _edit_json(p, lambda d: d["rng"].update(torch=[1, 2])),
        "'rng.torch' has 2 bytes",
    ),
    "dangling tensor ref": (
        "optimizer.json",
        lambda p: p.write_text(p.read_text().replace("state.0.exp_avg_sq", "state.0.nope")),
        "refers to tensor 'state.0.nope'",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_names_the_file_and_the_older_one(tmp_path, case):
    name, damage, reason = DAMAGE[case]
    run, first, second = _two_checkpoints(tmp_path)
    damage(second / name)
    expected = rf"{second / name}: .*{reason}.*; resume from the previous complete checkpoint with `--resume {first}`"
    with pytest.raises(CheckpointError, match=expected) as info:
        resolve_resume("latest", tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=expected):
        run.load(second)
    # the advice works
    assert run.load(resolve_resume(str(first), tmp_path)).step == 1
    # with no older complete checkpoint the advice is to start again
    damage(first / name)
    with pytest.raises(CheckpointError, match="no older complete checkpoint .* without --resume"):
        verify_checkpoint(second)


def test_band_tensor_of_another_shape_names_the_older_checkpoint(tmp_path):
    """Found only when loading into the model (the file itself is sound), and worded like every
    damaged checkpoint: the file, what is wrong, and ``--resume <older checkpoint>``."""
    run, first, second = _two_checkpoints(tmp_path)
    band = second / "band.safetensors"
    tensors = load_file(str(band))
    name = run.names[0]
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(band))
    resolve_resume(str(second), tmp_path)  # header and length are fine
    expected = (
        rf"{re.escape(str(band))}: tensor {re.escape(name)} has shape \(3, 3\), the model's is "
        rf"\(128, 64\); .*resume from the previous complete checkpoint with "
        rf"`--resume {re.escape(str(first))}`"
    )
    with pytest.raises(CheckpointError, match=expected) as info:
        run.load(second)
    assert "\n" not in str(info.value)


def test_wrong_optimizer_class_or_band_is_refused(tmp_path):
    run = Run("adamw")
    run.train(1)
    path = run.save(tmp_path)
    with pytest.raises(CheckpointError, match=r"optimizer\.json: saved by torch\.optim.*AdamW8bit"):
        Run("adamw8bit").load(path)
    other = Run()
    other.names = other.names[:2]
    with pytest.raises(CheckpointError, match="do not match this run's band"):
        other.load(path)


def test_state_that_needs_pickle_is_refused_at_save(tmp_path):
    run = Run()

    class Holder:
        def __init__(self, value):
            self.value = value

        def state_dict(self):
            return {"state": {0: {"x": self.value}}, "param_groups": []}

    state = TrainerState(1, 1, 0, 0, 0.0, capture_rng(), {}, {})
    with pytest.raises(CheckpointError, match=r"without pickle: 'state\.0\.x' is a .*\.Holder"):
        save_checkpoint(tmp_path, run.model, run.names, Holder(Holder(1)), run.scheduler, state, 1)

    class Sub(torch.Tensor):
        pass

    sub = torch.zeros(3).as_subclass(Sub)
    with pytest.raises(CheckpointError, match=r"'state\.0\.x' is a tensor subclass \(.*Sub\)"):
        save_checkpoint(tmp_path, run.model, run.names, Holder(sub), run.scheduler, state, 1)
    assert list(tmp_path.iterdir()) == []  # nothing partial


def test_keep_last_prunes_and_always_keeps_the_new_checkpoint(tmp_path):
    run = Run()
    for _ in range(4):
        run.train(1)
        run.save(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-3", "step-4"]
    # resumed from step-2 of another timeline: the new step-3 is kept even with keep_last=1
    run.save(tmp_path, keep_last=1, step=3)
    assert [p.name for p in tmp_path.iterdir()] == ["step-3"]


def test_resave_of_the_same_step_replaces_it(tmp_path):
    run = Run()
    run.train(1)
    run.save(tmp_path)
    before = (tmp_path / "step-1" / "band.safetensors").read_bytes()
    with torch.no_grad():
        run.model[0].weight.add_(1.0)
    run.save(tmp_path)
    assert (tmp_path / "step-1" / "band.safetensors").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]
    verify_checkpoint(tmp_path / "step-1")


def test_clean_partial_checkpoints(tmp_path):
    run = Run()
    run.train(1)
    run.save(tmp_path)
    for name in ("step-2.tmp-ab12cd34", "step-7.del-00ff00ff", "step-1.old-11112222", "notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "band.safetensors").write_bytes(b"x")
    (tmp_path / "step-3.old-deadbeef").mkdir()  # moved aside; its replacement never landed
    (tmp_path / "step-3.old-deadbeef" / "trainer_state.json").write_text("{}")
    removed = clean_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in removed) == [
        "step-1.old-11112222",
        "step-2.tmp-ab12cd34",
        "step-3.old-deadbeef",
        "step-7.del-00ff00ff",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step-1", "step-3"]
    assert (tmp_path / "step-3" / "trainer_state.json").is_file()
    assert clean_partial_checkpoints(tmp_path) == []
    assert clean_partial_checkpoints(tmp_path / "absent") == []


def test_every_file_the_folder_and_the_parent_are_fsynced(tmp_path, monkeypatch):
    """Power loss: files and folder synced before the rename, the parent after it."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", recording_fsync)
    run = Run()
    run.train(1)
    path = run.save(tmp_path / "checkpoints")
    tmp_names = [s for s in synced if ".tmp-" in s]
    files = {Path(s).name for s in tmp_names}
    assert files == {p.name for p in path.iterdir()} | {Path(tmp_names[-1]).name}
    assert Path(tmp_names[-1]).name.startswith("step-1.tmp-")  # the folder after its files
    assert synced[-1] == str(path.parent)  # the parent, after the rename


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_a_state_reshaped_in_the_file_is_a_damaged_checkpoint(tmp_path, optim):
    """A state tensor with its parameter's element count but another shape would load and then
    fail inside the first step; it is refused when the checkpoint loads, naming the file."""
    from safetensors.torch import save_file

    run = Run(optim)
    run.train(2)
    path = run.save(tmp_path)
    file = path / "optimizer.safetensors"
    tensors = load_file(str(file))
    key = next(k for k, v in tensors.items() if tuple(v.shape) == (128, 64))  # Linear(64, 128)
    tensors[key] = tensors[key].reshape(64, 128).contiguous()
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError) as info:
        Run(optim, seed=1).load(path)
    message = str(info.value)
    assert "optimizer" in message and "(64, 128)" in message and "\n" not in message
