"""The prepared GPU run (``bench/gpu/run_all.sh``, issue 24) cannot rot between GPU runs.

``test_run_all_smoke`` runs the whole script with ``--smoke`` (every case on the CPU at tiny sizes,
kernels through the Triton interpreter; about a minute on 2 cores) and checks that every case
ended ok with figures, the files it leaves (at most 8, none in a subfolder: what the device tool
brings back), and the results file's schema. The other tests check the results file's logic
(status from exit codes, time boxes, goals met or not) on made-up results, in milliseconds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu" / "run_all.sh"
sys.path.insert(0, str(REPO / "bench" / "gpu"))
import gpu_results  # noqa: E402

CASES = list(gpu_results.CASES)


def finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("gpu_smoke")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", str(SCRIPT), "--smoke", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    files = sorted(out.iterdir())
    jsons = [f for f in files if f.suffix == ".json"]
    assert len(jsons) == 1, files
    return out, json.loads(jsons[0].read_text()), done.stdout


def test_run_all_smoke_files(smoke_run):
    out, _, stdout = smoke_run
    files = sorted(out.iterdir())
    assert len(files) == 3 and all(f.is_file() for f in files)  # at most 8 come back
    stem = files[0].stem
    assert stem.startswith("gpu_") and {f.name for f in files} == {
        f"{stem}.json",
        f"{stem}.md",
        f"{stem}.log",
    }
    assert all(set(f.name) <= set("abcdefghijklmnopqrstuvwxyz0123456789._-") for f in files)
    md = (out / f"{stem}.md").read_text()
    assert "Smoke run on CPU" in md and "## Goals" in md
    for case in CASES:
        assert f"### {case}:" in md
        assert case in stdout  # the summary printed at the end
    assert "case step_8b: start" in (out / f"{stem}.log").read_text()


def test_run_all_smoke_schema_and_every_case(smoke_run):
    _, data, _ = smoke_run
    assert data["schema"] == gpu_results.SCHEMA and data["smoke"] is True
    assert data["finished"] and data["budget_s"] == 120
    assert data["environment"]["torch"] and data["environment"]["triton"]
    assert list(data["cases"]) == CASES
    for name, case in data["cases"].items():
        assert case["status"] == "ok", (name, case)
        assert case["rc"] == 0 and finite(case["wall_s"]) and case["timeout_s"] > 0
        assert case["results"], name
    res = {name: case["results"] for name, case in data["cases"].items()}

    assert finite(res["env"]["cpu_fp32_matmul_tflops"])

    tests = res["kernel_tests"]
    assert tests["device"] == "cpu" and tests["failed"] == 0 and tests["passed"] >= 30
    names = {t["nodeid"]: t["outcome"] for t in tests["tests"]}
    assert names["test_tiny_model_trains_in_bf16_master"] == "passed"
    assert any(n.startswith("test_linear_cross_entropy") for n in names)

    bench = res["kernel_bench"]
    measured = {(r["op"], r["impl"], r["mode"]) for r in bench["ops"] if finite(r.get("ms"))}
    for op in ("rms_norm", "swiglu", "rope", "linear_cross_entropy"):
        assert (op, "fastmid", "fwd_bwd") in measured and (op, "eager", "fwd_bwd") in measured
    assert finite(bench["lce_goal"]["memory_ratio"]) and finite(bench["lce_goal"]["time_ratio"])

    step = res["step_8b"]
    for arm in ("default", "kernels_off", "packing", "fuse_frozen", "all_on"):
        a = step["arms"][arm]
        assert a["status"] == "ok", a
        assert a["step_time_s"] > 0 and a["tokens_per_s"] > 0 and a["flops_per_step"]["total"] > 0
        assert all(finite(x) for x in a["losses"])
    assert step["arms"]["default"]["kernels_report"]["loss"] == "fused_linear_cross_entropy"
    assert step["arms"]["kernels_off"]["kernels_report"]["loss"] == "eager"
    assert step["arms"]["fuse_frozen"]["fused_frozen_layers"] == 4  # 8 layers, band 2..5
    assert step["arms"]["packing_flash_attention_2"]["status"] == "skipped"
    assert step["arms"]["packing_flash_attention_2"]["reason"]
    assert "MFU" in step["flop_formula"]

    fit = res["fit_32b"]["report"]
    assert fit["status"] == "ok" and len(fit["steps"]) == 3 and fit["planned"]["total_bytes"] > 0

    rows = {r["optim"]: r["arms"] for r in res["optimizer_offload"]["rows"]}
    assert set(rows) == {"adamw", "adamw8bit"}
    for arms in rows.values():
        assert arms["in_backward"]["max_rel_diff_vs_ordinary"] < 1e-6
        assert arms["offload"]["skipped"] == "needs CUDA"

    fsdp = res["fsdp2"]
    assert fsdp["backend"] == "gloo" and fsdp["world_size"] == 1 and fsdp["units"] > 8
    assert len(fsdp["steps"]) == 2 and all(finite(s["loss"]) for s in fsdp["steps"])
    # same seeded weights and batch as step_8b's first step: the same first loss
    assert fsdp["first_loss_vs_step_8b"]["abs_diff"] < 1e-2

    an = res["analyze"]
    assert an["overhead_ratio"] > 0 and an["cka_max_abs_diff"] < 1e-5
    fp64 = an["cka_torch_fp64"]  # the second timing, CKA on the float64 torch path
    assert fp64["cka_backend"] == "torch" and fp64["overhead_ratio"] > 0
    assert fp64["tokens"] == an["tokens"] and fp64["cka_max_abs_diff_vs_auto"] < 1e-5

    assert [g["case"] for g in data["goals"]] == [
        "step_8b", "kernel_bench", "kernel_bench", "fit_32b", "analyze"
    ]  # fmt: skip
    assert all(g["met"] is None for g in data["goals"])  # no verdict from a CPU smoke run


# ---- the results file's logic, on made-up results --------------------------------------------------


def cli(*args: str) -> None:
    assert gpu_results.main(list(args)) == 0


def test_status_from_exit_codes_and_the_log_tail(tmp_path: Path):
    js, log = tmp_path / "r.json", tmp_path / "r.log"
    cli("init", "--json", str(js), "--smoke", "0", "--budget", "295", "--cases", "a,b,c,d")
    log.write_text("earlier case\n")
    offset = log.stat().st_size
    log.write_text("earlier case\nTraceback: CUDA error: an illegal memory access\n")
    for case, rc in (("a", 0), ("b", 124), ("c", 1)):
        cli("start", "--json", str(js), "--case", case, "--timeout", "30")
        cli("end", "--json", str(js), "--case", case, "--rc", str(rc), "--wall", "3.2",
            "--log", str(log), "--log-offset", str(offset))  # fmt: skip
    gpu_results.merge_case(js, "a", {"x": 1.5, "nested": {"n": float("nan")}})
    cli("render", "--json", str(js), "--md", str(tmp_path / "r.md"), "--final")
    data = json.loads(js.read_text())
    cases = data["cases"]
    assert cases["a"]["status"] == "ok" and cases["a"]["results"] == {
        "x": 1.5,
        "nested": {"n": None},
    }
    assert cases["b"]["status"] == "timeout" and "30" in cases["b"]["reason"]
    assert cases["c"]["status"] == "failed" and cases["c"]["reason"] == "exit status 1"
    assert cases["c"]["log_tail"].startswith("Traceback")  # this case's lines only
    assert cases["d"]["status"] == "skipped" and cases["d"]["reason"]
    assert data["finished"]
    md = (tmp_path / "r.md").read_text()
    assert "illegal memory access" in md and "| b | timeout |" in md


def test_a_case_that_skips_itself(tmp_path: Path):
    js = tmp_path / "r.json"
    cli("init", "--json", str(js), "--cases", "fsdp2")
    gpu_results.merge_case(js, "fsdp2", {"case_status": "skipped", "case_reason": "no NCCL"})
    cli("end", "--json", str(js), "--case", "fsdp2", "--rc", "0", "--wall", "1")
    entry = json.loads(js.read_text())["cases"]["fsdp2"]
    assert entry["status"] == "skipped" and entry["reason"] == "no NCCL"


def gpu_like(mfu: float, share: float, mem: float, time_ratio: float, reserved_gib: float,
             overhead: float) -> dict:  # fmt: skip
    return {
        "smoke": False,
        "cases": {
            "step_8b": {"results": {"arms": {
                "default": {"arm": "default", "mfu_spec": mfu, "mfu_measured": mfu * 1.25,
                            "tokens_per_s": 9000.0, "achieved_tflops": 400.0},
                "kernels_off": {"arm": "kernels_off", "mfu_spec": mfu / 2, "tokens_per_s": 1.0,
                                "achieved_tflops": 1.0},
            }}},
            "kernel_bench": {"results": {
                "ops": [{"op": op, "impl": "fastmid", "mode": "fwd_bwd", "tokens": 16384,
                         "copy_bw_share": share} for op in ("rms_norm", "swiglu")],
                "lce_goal": {"memory_ratio": mem, "time_ratio": time_ratio, "tokens": 8192,
                             "vocab": 152064},
            }},
            "fit_32b": {"results": {"report": {
                "status": "ok",
                "measured": {"peak_reserved_bytes": reserved_gib * 2**30,
                             "peak_allocated_bytes": (reserved_gib - 2) * 2**30},
                "planned": {"total_bytes": 105.47 * 2**30},
            }}},
            "analyze": {"results": {"overhead_ratio": overhead, "cka_max_abs_diff": 1e-7}},
        },
    }  # fmt: skip


def test_goals_met_and_not_met():
    good = gpu_results.evaluate_goals(gpu_like(0.47, 0.8, 0.1, 0.9, 110.0, 1.05))
    assert [g["met"] for g in good] == [True] * 5
    assert good[0]["value"] == 47.0 and "default" in good[0]["note"]
    bad = gpu_results.evaluate_goals(gpu_like(0.40, 0.6, 0.3, 1.2, 117.0, 3.0))
    assert [g["met"] for g in bad] == [False] * 5
    # 117 GiB is within plan + 10% (116.0)? no: 105.47 x 1.1 = 116.02
    assert bad[3]["value"] == 117.0
    assert gpu_results.evaluate_goals({"cases": {}})[0]["met"] is None
    md = gpu_results.render_markdown({**gpu_like(0.47, 0.8, 0.1, 0.9, 110.0, 1.05),
                                      "goals": good})  # fmt: skip
    assert md.count("**met**") == 5


def test_fit_goal_from_the_last_step_when_the_run_was_cut_short():
    data = gpu_like(0.47, 0.8, 0.1, 0.9, 110.0, 1.05)
    report = data["cases"]["fit_32b"]["results"]["report"]
    del report["measured"]
    report["status"] = "running"
    report["steps"] = [{"step": 1, "peak_reserved_bytes_after": 100 * 2**30,
                        "peak_allocated_bytes_after": 98 * 2**30}]  # fmt: skip
    goal = gpu_results.evaluate_goals(data)[3]
    assert goal["value"] == 100.0 and goal["met"] is False  # not a finished run
    assert "up to step 1" in goal["note"]


def test_only_runs_the_cases_named(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", str(SCRIPT), "--smoke", "--only", "env", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (js,) = tmp_path.glob("gpu_*.json")
    cases = json.loads(js.read_text())["cases"]
    assert cases["env"]["status"] == "ok"
    assert all(c["status"] == "skipped" and "--only" in c["reason"]
               for name, c in cases.items() if name != "env")  # fmt: skip
