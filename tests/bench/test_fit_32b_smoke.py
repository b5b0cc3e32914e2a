"""Smoke tests of ``bench/gpu/fit_32b.py`` (issue 15), the prepared 32B fit measurement.

The script runs as ``fastmid train`` would on a GPU; here ``--smoke`` trains a tiny model of the
32B config's architecture on CPU. The default smoke test uses ``--precision bf16-master --optim
adamw`` (no torch.compile of torchao's step, which takes about 40 s per run on 2 cold CPU cores;
bf16 with plain AdamW is refused by the plan, as by ``fastmid train``), keeping the GPU default's
optimizer in backward and checkpointing. The GPU's exact mode (bf16, ``ao_adamw8bit``) runs in
the slow test.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from bench_scripts import BENCH, load_bench_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu" / "fit_32b.py"
PLAN_LINES = ("weights", "gradients", "optimizer_states", "activations", "logits", "total")


def run_smoke(out: Path, *extra: str, timeout: int = 240) -> dict:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "fit_32b.json").read_text())


def check_report(report: dict, out: Path, steps: int = 3) -> None:
    assert report["status"] == "ok"
    assert report["smoke"] is True
    # the plan's Mid-Block lines and total, beside the measured peak and the difference
    planned = report["planned"]
    assert set(PLAN_LINES) <= set(planned["bytes"])
    assert planned["total_bytes"] == planned["bytes"]["total"] > 0
    assert planned["gib"]["total"] == pytest.approx(planned["total_bytes"] / 2**30)
    measured = report["measured"]
    assert measured["peak_rss_bytes"] > 0
    assert math.isfinite(report["comparison"]["peak_rss_vs_plan_percent"])
    # the steps: as many as asked, each with a finite loss and a time
    assert len(report["steps"]) == steps
    for i, step in enumerate(report["steps"], start=1):
        assert step["step"] == i
        assert step["loss"] is not None and math.isfinite(step["loss"]) and step["loss"] > 0
        assert math.isfinite(step["grad_norm"])
        assert step["step_time_s"] > 0
        seq = report["mode"]["seq_len"]
        assert step["supervised_tokens"] == seq - seq // 2  # the second half
    # the band trained: every band tensor moved away from its seeded initialization
    delta = report["band_weight_delta"]
    assert delta["l2_norm"] > 0 and math.isfinite(delta["l2_norm"])
    assert delta["tensors_changed"] == delta["tensors"] > 0
    assert report["band"]["indices"] == [2, 3, 4, 5]  # 0.2:0.8 of 8 layers
    markdown = (out / "fit_32b.md").read_text()
    assert report["device"]["name"] in markdown
    assert "CPU" in report["device"]["name"]
    assert "measured peak RSS" in markdown


def test_fit_32b_smoke_runs_and_reports(tmp_path: Path) -> None:
    report = run_smoke(tmp_path, "--precision", "bf16-master", "--optim", "adamw")
    check_report(report, tmp_path)
    mode = report["mode"]
    assert mode["optimizer_in_backward"] is True and mode["grad_checkpointing"] is True
    assert mode["seq_len"] == 64 and mode["micro_batch"] == 1
    assert report["materialize"]["dtype"] == "bfloat16"
    assert report["model"]["model_type"] == "qwen2"
    assert report["planned"]["setup"]["precision"] == "bf16-master"
    assert report["planned"]["setup"]["optimizer_in_backward"] is True
    assert report["recommended"] == {"asked": False}


@pytest.mark.slow
def test_fit_32b_smoke_in_the_gpu_default_mode(tmp_path: Path) -> None:
    """bf16 weights with torchao's AdamW8bit (compiled step), as on the GPU."""
    report = run_smoke(tmp_path, timeout=600)
    check_report(report, tmp_path)
    assert report["mode"]["precision"] == "bf16"
    assert report["mode"]["optim"] == "ao_adamw8bit"


def load_script() -> ModuleType:
    return load_bench_script(str(SCRIPT.relative_to(BENCH)), "fit_32b")


def test_recommended_flags_replace_the_given_mode(tmp_path: Path, monkeypatch) -> None:
    """A plan with a ``recommended`` entry sets the mode; flags the script has no use for are
    listed as ignored. (In-process, one step, the plan's entry faked.)"""
    fit = load_script()
    real = fit.make_plan

    def with_recommendation(*args, **kwargs):
        plan = real(*args, **kwargs)
        plan["recommended"] = {
            "flags": ["--precision", "fp32", "--optim", "adamw", "--no-optimizer-in-backward",
                      "--grad-accum", "1"],
            "total_bytes": 123,
            "headroom_bytes": 456,
        }  # fmt: skip
        return plan

    monkeypatch.setattr(fit, "make_plan", with_recommendation)
    argv = ["--smoke", "--out", str(tmp_path), "--steps", "1", "--recommended"]
    assert fit.main(argv) == 0
    report = json.loads((tmp_path / "fit_32b.json").read_text())
    rec = report["recommended"]
    assert rec["available"] is True
    assert rec["ignored"] == ["--grad-accum", "1"]
    assert rec["total_bytes"] == 123 and rec["headroom_bytes"] == 456
    assert report["mode"]["precision"] == "fp32" and report["mode"]["optim"] == "adamw"
    assert report["mode"]["optimizer_in_backward"] is False
    assert report["mode"]["grad_clip"] == 1.0  # the ordinary step's default clip
    assert report["planned"]["setup"]["precision"] == "fp32"
    check_report(report, tmp_path, steps=1)


def test_without_a_recommendation_the_given_flags_run(tmp_path: Path, monkeypatch) -> None:
    fit = load_script()
    real = fit.make_plan

    def without(*args, **kwargs):
        plan = real(*args, **kwargs)
        plan.pop("recommended", None)
        return plan

    monkeypatch.setattr(fit, "make_plan", without)
    argv = ["--smoke", "--out", str(tmp_path), "--steps", "1", "--recommended"]
    argv += ["--precision", "fp32", "--optim", "adamw"]
    assert fit.main(argv) == 0
    report = json.loads((tmp_path / "fit_32b.json").read_text())
    assert report["recommended"]["available"] is False
    assert "no 'recommended' entry" in report["recommended"]["note"]
    assert report["mode"]["precision"] == "fp32"
    assert "--recommended" in (tmp_path / "fit_32b.md").read_text()
