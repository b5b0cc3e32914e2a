"""Sharded checkpoints (``torch.distributed.checkpoint``) and faults across ranks, on CPU with gloo.

References are runs without interruption: a resumed run must give the losses and band of the run
that never stopped (bit-equal in the same world size; 1e-5 relative across world sizes, where the
order of float sums differs), from the same global batch (micro-batch x grad-accum x processes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import COMMON, _env, _fastmid, _losses, _ok

pytestmark = pytest.mark.realmodel  # SmolLM2's tokenizer (the tiny model's vocabulary)


def _args(model: Path, out: Path, extra: str) -> list[str]:
    """4 steps, a checkpoint every 2."""
    return [
        "--model", str(model), *COMMON, "--max-steps", "4", *extra.split(), "--output", str(out),
        "--save-every", "2", "--keep-last", "3",
    ]  # fmt: skip


def _band(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "band_delta.safetensors"))


def _same_band(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        if rel == 0:
            assert torch.equal(a[key], b[key]), key
        else:
            diff = (a[key].double() - b[key].double()).norm()
            assert diff <= rel * a[key].double().norm(), (key, float(diff))


@pytest.fixture(scope="module")
def reference(dist_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, global batch 4 (micro-batch 2 x 2 accumulated), AdamW, 4 steps, a
    one-process checkpoint at step 2."""
    out = tmp_path_factory.mktemp("ref") / "run"
    _ok(_fastmid(*_args(dist_model_dir, out, "--optim adamw --micro-batch 2 --grad-accum 2")))
    return out


@pytest.fixture(scope="module")
def sharded_run(dist_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two processes, micro-batch 2 each (global batch 4), AdamW, 4 steps, sharded checkpoints
    at steps 2 and 4."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    _ok(_fastmid(*_args(dist_model_dir, out, "--optim adamw --micro-batch 2 --nproc 2")))
    return out


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_sharded_checkpoint_layout(sharded_run: Path) -> None:
    step = sharded_run / "checkpoints" / "step-2"
    assert {p.name for p in step.iterdir()} == {
        "dcp", "scheduler.json", "sharded.json", "trainer_state.json",
    }  # fmt: skip
    info = json.loads((step / "sharded.json").read_text())
    assert info["world_size"] == 2 and len(info["rng_per_rank"]) == 2
    assert (step / "dcp" / ".metadata").is_file()
    assert not list(step.parent.glob("*.tmp-*"))


def test_resume_in_the_same_world_size_is_bit_exact(sharded_run: Path, tmp_path: Path) -> None:
    """2 steps + resume + 2 steps (two processes) equals the 4 steps of the run that never
    stopped, bit for bit."""
    run = _copy(sharded_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step-4")
    _ok(
        _fastmid(
            str(run / "config.yaml"), "--resume", "latest", "--output", str(run), "--nproc", "2"
        )
    )
    assert _losses(run) == _losses(sharded_run)
    _same_band(_band(sharded_run), _band(run), 0)


def test_two_processes_resume_in_one(sharded_run: Path, reference: Path, tmp_path: Path) -> None:
    """A sharded checkpoint resumed by one process with the same global batch (--grad-accum 2):
    DCP reshards the band and AdamW's states; the run ends where the one-process run ends."""
    run = _copy(sharded_run, tmp_path / "run")
    proc = _fastmid(
        str(run / "config.yaml"), "--resume", str(run / "checkpoints" / "step-2"),
        "--output", str(run), "--nproc", "1", "--grad-accum", "2",
    )  # fmt: skip
    _ok(proc)
    assert _losses(run) == pytest.approx(_losses(reference), rel=1e-5)
    _same_band(_band(reference), _band(run), 1e-5)
    assert json.loads((run / "summary.json").read_text())["optimizer_state_restarted"] is False


def test_one_process_resumes_in_two(reference: Path, tmp_path: Path) -> None:
    """A one-process checkpoint resumed by two processes (--grad-accum 1 each)."""
    run = _copy(reference, tmp_path / "run")
    _ok(
        _fastmid(
            str(run / "config.yaml"),
            "--resume",
            str(run / "checkpoints" / "step-2"),
            "--output",
            str(run),
            "--nproc",
            "2",
            "--grad-accum",
            "1",
        )
    )
    assert _losses(run) == pytest.approx(_losses(reference), rel=1e-5)
    _same_band(_band(reference), _band(run), 1e-5)


def test_another_global_batch_is_refused(sharded_run: Path, tmp_path: Path) -> None:
    run = _copy(sharded_run, tmp_path / "run")
    proc = _fastmid(
        str(run / "config.yaml"), "--resume", "latest", "--output", str(run), "--nproc", "1"
    )
    assert proc.returncode == 2
    assert "grad_accum x processes: 2 -> 1" in proc.stderr, proc.stderr


def test_torchao_state_is_not_resharded_but_said(dist_model_dir: Path, tmp_path: Path) -> None:
    """torchao 8-bit: two processes -> one. The weights resume (the loss of step 3 is the one the
    uninterrupted run measured on the same weights and examples), the optimizer state starts
    fresh, and the run says so on the console and in summary.json."""
    run = tmp_path / "ao"
    _ok(_fastmid(*_args(dist_model_dir, run, "--optim ao_adamw8bit --micro-batch 2 --nproc 2")))
    uninterrupted = _losses(run)
    proc = _fastmid(
        str(run / "config.yaml"), "--resume", str(run / "checkpoints" / "step-2"),
        "--output", str(run), "--nproc", "1", "--grad-accum", "2",
    )  # fmt: skip
    _ok(proc)
    assert "cannot be resharded" in proc.stderr and "starts fresh" in proc.stderr
    assert json.loads((run / "summary.json").read_text())["optimizer_state_restarted"] is True
    assert _losses(run)[2] == pytest.approx(uninterrupted[2], rel=1e-5)


def test_nan_on_one_rank_stops_both(tmp_path: Path) -> None:
    """A NaN loss on rank 1 only: both ranks raise in the same step, before the optimizer steps
    (nothing changed), and neither hangs."""
    out = tmp_path / "nan"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(Path(__file__).with_name("dist_worker.py")),
            str(out),
            "nan",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = json.loads(Path(f"{out}.0").read_text())
    rank1 = json.loads(Path(f"{out}.1").read_text())
    assert rank1["raised"] == {"what": "loss", "micro_batch": 0, "stepped": False}
    assert rank0["raised"]["what"] == "loss on another rank" and not rank0["raised"]["stepped"]
    assert rank0["unchanged"] and rank1["unchanged"]


def test_ctrl_c_stops_every_rank_with_a_checkpoint(dist_model_dir: Path, tmp_path: Path) -> None:
    """SIGINT to the launcher's process group (what Ctrl-C in a terminal sends): every rank
    finishes the same step, a sharded checkpoint is saved, the resume command is printed once,
    exit 130, within a bounded time; the checkpoint resumes."""
    out = tmp_path / "sigint"
    args = [
        "--model", str(dist_model_dir), *COMMON, "--max-steps", "400", "--micro-batch", "1",
        "--optim", "adamw", "--nproc", "2", "--output", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastmid", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.2)
    assert metrics.exists(), "training never started"
    os.killpg(proc.pid, signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.count("Resume with:") == 1, stderr
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "trainer_state.json").is_file()
    step = int(saved[0].name.split("-")[1])
    assert len(_losses(out)) == step
