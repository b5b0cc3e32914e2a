"""The recipe: token-normalized accumulation, exact resume, faults, run-folder safety."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from fastmid.train import recipe as recipe_module
from fastmid.train.recipe import (
    MidBlockRecipe,
    NonFiniteLossError,
    RunFolderError,
    TrainingInterrupted,
)


def _run(cfg) -> tuple[MidBlockRecipe, list[dict]]:
    trainer = MidBlockRecipe(cfg)
    trainer.setup()
    trainer.train()
    records = [json.loads(x) for x in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    return trainer, records


def _interrupt_after(trainer: MidBlockRecipe, step: int, monkeypatch) -> None:
    """Deliver a real SIGINT to this process right after optimizer step ``step``."""
    real = recipe_module.train_step

    def step_then_interrupt(*args, **kwargs):
        record = real(*args, **kwargs)
        if trainer.state.step + 1 == step:  # the recipe counts the step once this returns
            os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(recipe_module, "train_step", step_then_interrupt)


def _band_state(trainer: MidBlockRecipe) -> dict[str, torch.Tensor]:
    params = dict(trainer.model.named_parameters())
    return {n: params[n].detach().clone() for n in trainer.trainable_names}


def test_micro_batch_2_equals_two_accumulated_micro_batches_of_1(make_config):
    """Design section 4: sum of token losses over the window / supervised tokens in the window."""
    a, rec_a = _run(make_config("a", micro_batch=2, grad_accum=1, max_steps=2, optim="adamw"))
    b, rec_b = _run(make_config("b", micro_batch=1, grad_accum=2, max_steps=2, optim="adamw"))
    for ra, rb in zip(rec_a, rec_b, strict=True):
        assert ra["supervised_tokens"] == rb["supervised_tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)
    wa, wb = _band_state(a), _band_state(b)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-7)


def test_resume_is_exact(make_config, monkeypatch):
    """2N steps in one go == N steps, interrupt, resume, N steps: same losses and weights."""
    full, rec_full = _run(make_config("full", max_steps=6, save_every=0))

    first = MidBlockRecipe(make_config("split", max_steps=6, save_every=0))
    first.setup()
    _interrupt_after(first, 3, monkeypatch)
    with pytest.raises(TrainingInterrupted):
        first.train()
    assert (first.out / "checkpoints" / "step-3").is_dir()

    resumed, rec_split = _run(make_config("split", max_steps=6, save_every=0, resume="latest"))
    assert [r["step"] for r in rec_split] == list(range(1, 7))
    for r1, r2 in zip(rec_full, rec_split, strict=True):
        assert r1["loss"] == r2["loss"], (r1, r2)
        assert r1["grad_norm"] == r2["grad_norm"]
        assert r1["lr"] == r2["lr"]
    wf, wr = _band_state(full), _band_state(resumed)
    for name in wf:
        assert torch.equal(wf[name], wr[name]), name


def test_nan_loss_stops_before_the_step_and_keeps_the_checkpoint(make_config, monkeypatch):
    trainer = MidBlockRecipe(make_config("nan", max_steps=6, save_every=2))
    trainer.setup()
    real = recipe_module.micro_batch_loss
    calls = {"n": 0}

    def poisoned(model, batch, fused):
        calls["n"] += trainer.model.training  # eval batches do not count
        loss, n = real(model, batch, fused)
        return (loss * float("nan"), n) if calls["n"] == 3 and trainer.model.training else (loss, n)

    monkeypatch.setattr(recipe_module, "micro_batch_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 3, micro-batch 2 .*examples \["):
        trainer.train()
    ckpt = trainer.out / "checkpoints" / "step-2"
    assert ckpt.is_dir()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    assert trainer.state.step == 2  # the failed step never reached the optimizer


def test_non_finite_weights_stop_the_run_before_any_save_or_export(make_config, monkeypatch):
    """An infinite learning rate at step 3 gives finite gradients but NaN/inf weights: the run
    stops there, step 3 is never saved, the step-2 checkpoint stays finite, nothing is exported."""
    trainer = MidBlockRecipe(make_config("inf", max_steps=6, save_every=1))
    trainer.setup()
    real = recipe_module.train_step

    def infinite_lr_at_step_3(model, batches, optimizer, *args, **kwargs):
        if trainer.state.step == 2:
            for group in optimizer.param_groups:
                group["lr"] = float("inf")
        return real(model, batches, optimizer, *args, **kwargs)

    monkeypatch.setattr(recipe_module, "train_step", infinite_lr_at_step_3)
    with pytest.raises(NonFiniteLossError, match=r"band weights .* step 3.*--resume latest"):
        trainer.train()
    checkpoints = sorted(p.name for p in (trainer.out / "checkpoints").iterdir())
    assert checkpoints == ["step-1", "step-2"]
    saved = load_file(str(trainer.out / "checkpoints" / "step-2" / "band.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (trainer.out / "final").exists()


def test_sigint_saves_and_prints_resume_command(make_config, monkeypatch):
    trainer = MidBlockRecipe(make_config("sig", max_steps=6, save_every=0))
    trainer.setup()
    _interrupt_after(trainer, 2, monkeypatch)
    with pytest.raises(TrainingInterrupted, match="--resume latest") as info:
        trainer.train()
    assert "step 2" in str(info.value)
    assert (trainer.out / "checkpoints" / "step-2" / "band.safetensors").is_file()


def test_existing_run_is_not_overwritten(make_config):
    _run(make_config("twice", max_steps=1))
    with pytest.raises(RunFolderError, match="--resume latest.*--overwrite"):
        MidBlockRecipe(make_config("twice", max_steps=1)).setup()
    MidBlockRecipe(make_config("twice", max_steps=1, overwrite=True)).setup()


def test_only_band_gets_optimizer_state_and_small_tensors_keep_32bit(make_config):
    trainer = MidBlockRecipe(make_config("optim", max_steps=1))
    trainer.setup()
    trainer.train()
    band_ids = {id(p) for p in trainer.trainable}
    for p, st in trainer.optimizer.state.items():
        assert id(p) in band_ids
        dtype = st["state1"].dtype
        assert dtype == (torch.uint8 if p.numel() >= 4096 else torch.float32), (p.shape, dtype)
    assert len(trainer.optimizer.state) == len(trainer.trainable)


def test_metrics_and_run_folder(make_config):
    trainer, records = _run(make_config("folder", max_steps=4, keep_last=1))
    for key in (
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "supervised_tokens",
        "tokens_per_s",
        "peak_memory_bytes",
        "elapsed_s",
    ):
        assert key in records[0], key
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    out = trainer.out
    assert (out / "config.yaml").is_file() and (out / "plan.json").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-4"]  # keep_last=1
    plan = json.loads((out / "plan.json").read_text())
    assert plan["band"]["indices"] == [1, 2, 3]  # 5 layers, 0.2:0.8 -> [1, 4)


def test_overwrite_deletes_nothing_when_setup_fails(make_config, tmp_path):
    trainer, _ = _run(make_config("keep", max_steps=1))
    before = sorted(p.name for p in trainer.out.iterdir())
    with pytest.raises(Exception, match="nope.jsonl"):
        MidBlockRecipe(
            make_config("keep", overwrite=True, data=str(tmp_path / "nope.jsonl"))
        ).setup()
    assert sorted(p.name for p in trainer.out.iterdir()) == before
    saved = (trainer.out / "config.yaml").read_text()
    assert "overwrite: false" in saved and "resume: null" in saved


def test_resume_refuses_different_settings_and_finished_runs(make_config):
    from fastmid.train.checkpoint import CheckpointError

    _run(make_config("r", max_steps=2, save_every=0))
    with pytest.raises(CheckpointError, match=r"max_examples: 64 -> 32.*config\.yaml --resume"):
        MidBlockRecipe(make_config("r", max_steps=4, max_examples=32, resume="latest")).setup()
    with pytest.raises(RunFolderError, match="already finished its 2 steps"):
        MidBlockRecipe(make_config("r", max_steps=2, resume="latest")).setup()
    # a checkpoint resumed into a new, not yet existing folder
    ckpt = str(make_config("r").output) + "/checkpoints/step-2"
    _, records = _run(make_config("new/sub", max_steps=3, resume=ckpt))
    assert [r["step"] for r in records] == [3]


def test_resume_removes_partial_checkpoints_and_says_so(make_config):
    """A folder left by a save that was killed (``step-N.tmp-*``) is removed at the next start."""
    from io import StringIO

    from rich.console import Console

    first, _ = _run(make_config("partial", max_steps=2, save_every=0))
    partial = first.out / "checkpoints" / "step-3.tmp-killed"
    partial.mkdir()
    (partial / "band.safetensors").write_bytes(b"half a file")
    log = StringIO()
    cfg = make_config("partial", max_steps=3, save_every=0, resume="latest")
    resumed = MidBlockRecipe(cfg, Console(file=log, width=200))
    resumed.setup()
    assert not partial.exists()
    assert "step-3.tmp-killed" in log.getvalue()
    assert resumed.state.step == 2


def test_a_second_train_on_a_locked_folder_is_refused(make_config, tmp_path):
    """Two runs, one folder: the second real ``fastmid train`` process names the first's PID."""
    import subprocess
    import sys

    out = tmp_path / "locked"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path;"
            "from fastmid.train.runfolder import acquire_run_lock;"
            f"lock = acquire_run_lock(Path({str(out)!r})); print('held', flush=True);"
            "time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = make_config("unused")
        second = subprocess.run(
            ["fastmid", "train", "--model", cfg.model, "--output", str(out), "--max-steps", "1"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stderr
    assert f"PID {holder.pid}" in second.stderr and "Traceback" not in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr


def test_resume_refuses_a_new_learning_rate(make_config):
    """The checkpoint's optimizer and scheduler state fix the learning rate: a new --lr on resume
    would be recorded in config.yaml and never used, so it is refused, naming the key."""
    from fastmid.train.checkpoint import CheckpointError

    _run(make_config("lr", max_steps=2, save_every=0))
    with pytest.raises(CheckpointError, match=r"lr: 0\.001 -> 0\.01"):
        MidBlockRecipe(make_config("lr", max_steps=4, lr=1e-2, resume="latest")).setup()


def test_a_run_that_saved_nothing_can_simply_start_again(make_config, monkeypatch):
    """Divergence at step 1: no checkpoint exists, so the message offers no resume; the same
    command then starts again without --overwrite."""
    trainer = MidBlockRecipe(make_config("again", max_steps=4, save_every=1))
    trainer.setup()
    real = recipe_module.train_step

    def infinite_lr(model, batches, optimizer, *args, **kwargs):
        for group in optimizer.param_groups:
            group["lr"] = float("inf")
        return real(model, batches, optimizer, *args, **kwargs)

    monkeypatch.setattr(recipe_module, "train_step", infinite_lr)
    with pytest.raises(NonFiniteLossError, match="no checkpoint was saved yet") as info:
        trainer.train()
    assert "--resume" not in str(info.value)
    monkeypatch.setattr(recipe_module, "train_step", real)
    again, records = _run(make_config("again", max_steps=2, save_every=0))
    assert [r["step"] for r in records] == [1, 2]
    assert (again.out / "checkpoints" / "step-2").is_dir()


def test_config_yaml_holds_absolute_paths_and_resumes_from_anywhere(
    make_config, tmp_path, monkeypatch
):
    """A run started with relative paths writes absolute ones, so `fastmid train
    <run>/config.yaml --resume latest` works from another working directory."""
    import yaml

    from fastmid.config import build_config

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    model = make_config("unused").model
    cfg = make_config("unused", max_steps=2, save_every=0)
    cfg.output = "runs/rel"  # as typed on the command line
    _run(cfg)
    saved = yaml.safe_load((work / "runs/rel/config.yaml").read_text())
    assert saved["output"] == str(work / "runs/rel") and saved["model"] == model
    monkeypatch.chdir(tmp_path)
    resumed = build_config(work / "runs/rel/config.yaml", {"max_steps": 3, "resume": "latest"})
    _, records = _run(resumed)
    assert [r["step"] for r in records] == [1, 2, 3]


def test_ctrl_c_before_the_first_step_says_there_is_nothing_to_resume(make_config, monkeypatch):
    from fastmid.train.recipe import run_train

    def interrupted(self, label):
        raise KeyboardInterrupt

    monkeypatch.setattr(MidBlockRecipe, "evaluate", interrupted)
    cfg = make_config("early", max_steps=2)
    with pytest.raises(TrainingInterrupted, match="before the first checkpoint; nothing to"):
        run_train(cfg)
    assert TrainingInterrupted.exit_code == 130


def test_progress_is_plain_lines_when_the_console_is_not_a_terminal(make_config):
    """stderr in a file (CI, nohup, a cluster log): one line per --log-every steps and at the
    end, with step/total, loss, lr, tokens/s, elapsed and ETA, instead of a silent live bar."""
    import re
    from io import StringIO

    from rich.console import Console

    log = StringIO()
    trainer = MidBlockRecipe(make_config("plain", max_steps=5, log_every=2), Console(file=log))
    trainer.setup()
    trainer.train()
    lines = [line for line in log.getvalue().splitlines() if line.startswith("train ")]
    assert [line.split()[1] for line in lines] == ["2/5", "4/5", "5/5"]
    pattern = (
        r"^train \d/5 loss \d+\.\d{4} lr \S+ grad_norm \S+ \d+ tok/s "
        r"elapsed \d:\d\d:\d\d ETA \d:\d\d:\d\d$"
    )
    assert all(re.match(pattern, line) for line in lines), lines


def test_a_run_extended_with_more_steps_switches_to_the_longer_schedule(make_config):
    """3 steps, then resumed from step 2 with --max-steps 5: steps 3..5 take the learning rates
    of an uninterrupted 5-step run (not one more step at the 3-step schedule's value)."""
    _full, rec_full = _run(make_config("full", max_steps=5, save_every=0, eval_every=0))
    short, _ = _run(make_config("short", max_steps=3, save_every=1, eval_every=0))
    resume = str(short.out / "checkpoints" / "step-2")
    _longer, rec = _run(make_config("short", max_steps=5, eval_every=0, resume=resume))
    assert [r["step"] for r in rec] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in rec[2:]] == pytest.approx([r["lr"] for r in rec_full[2:]], rel=1e-12)


def test_train_log_holds_the_run_lines_and_library_warnings(make_config):
    """train.log: the header, a line every --log-every steps (and the last), the outcome, and
    a library's warning that stays off the console."""
    import warnings
    from io import StringIO

    from rich.console import Console

    from fastmid.train.recipe import run_train

    real = recipe_module.train_step

    def warn_then_step(*args, **kwargs):
        warnings.warn("a library complains", UserWarning, stacklevel=1)
        return real(*args, **kwargs)

    console_out = StringIO()
    cfg = make_config("log", max_steps=5, log_every=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recipe_module, "train_step", warn_then_step)
        summary = run_train(cfg, Console(file=console_out))
    text = (recipe_module.Path(summary["output"]) / "train.log").read_text()
    steps = [line.split("step ")[1].split()[0] for line in text.splitlines() if " step " in line]
    assert steps == ["2/5", "4/5", "5/5"]
    assert "fastmid train" in text and "done: 5 steps" in text
    assert "a library complains" in text
    assert "a library complains" not in console_out.getvalue()
