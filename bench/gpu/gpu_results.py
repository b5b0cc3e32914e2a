"""The prepared GPU run's one results file, written piece by piece (issue 24).

``bench/gpu/run_all.sh`` runs each case in its own process; every case merges its part into one
JSON file as it goes (after each test, op, arm or step), so a case that hangs, dies or runs out of
time still leaves what it measured, and the run's markdown is rendered from the JSON after every
case. This module imports nothing heavy (no torch): the shell calls it between cases.

Layout of ``gpu_<stamp>.json`` (``SCHEMA``)::

    {"schema": "fastmid-gpu-run/1", "smoke": bool, "started": ISO, "finished": ISO | null,
     "command": str, "budget_s": int, "out_dir": str,
     "environment": {...},          # env_probe.py: GPU, driver, versions, install method
     "machine": {...},              # env_probe.py: measured bf16 matmul TFLOP/s, copy GB/s
     "cases": {NAME: {"title", "status", "reason", "timeout_s", "wall_s", "rc",
                      "started", "results": {...}, "log_tail"}},
     "goals": [{"name", "target", "value", "unit", "met", "case", "note"}]}

``status``: ``pending`` (not reached yet), ``running``, ``ok``, ``failed`` (exit status not 0),
``timeout`` (killed at its time box: 124/137), ``skipped`` (with ``reason``: the case said why, or
the run's budget was spent).

CLI (used by run_all.sh)::

    python bench/gpu/gpu_results.py init   --json P --smoke 0|1 --budget S --command C --cases a,b
    python bench/gpu/gpu_results.py start  --json P --case NAME --timeout S
    python bench/gpu/gpu_results.py end    --json P --case NAME --rc RC --wall S [--log L]
    python bench/gpu/gpu_results.py skip   --json P --case NAME --reason TEXT
    python bench/gpu/gpu_results.py set    --json P --key environment.install --value JSON
    python bench/gpu/gpu_results.py render --json P --md M [--final]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA = "fastmid-gpu-run/1"
# The cases in the order run_all.sh runs them (issue 24's items 1-6; 1 and 4 have two parts).
CASES: dict[str, str] = {
    "env": "machine: GPU, driver, versions; measured bf16 matmul rate and copy bandwidth",
    "kernel_tests": "1. CUDA test subset: kernels and CKA against float64, tiny bf16 training",
    "kernel_bench": "2. kernels vs eager and torch.compile (bench/kernels/run_gpu.py)",
    "step_8b": "3. Mid-Block step, 8B-shaped model, seq 4096: kernels, packing, fused frozen",
    "fit_32b": "4a. Qwen2.5-32B default band in the recommended mode vs the plan",
    "optimizer_offload": "4b. optimizer offload and step in backward vs the on-device step",
    "fsdp2": "5. FSDP2 at world size 1 (NCCL) on the 8B shape, 3 steps",
    "analyze": "6. fastmid analyze on GPU: streaming CKA overhead and values vs float64",
}
H200_BF16_DENSE_TFLOPS = 989.5  # NVIDIA's datasheet figure for H100/H200 SXM, dense bf16
GIB = 2**30


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---- reading and writing ------------------------------------------------------------------------


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock for ``path`` (a lock file in the temp folder, not beside ``path``: the
    results folder may only hold the results)."""
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    lock = Path(tempfile.gettempdir()) / f"fastmid_gpu_results_{key}.lock"
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become None, tuples lists, unknown objects their repr."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return repr(value)


def load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def save(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(clean(data), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def deep_merge(into: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value
    return into


def update(path: str | Path | None, fn: Any) -> None:
    """Apply ``fn(data)`` to the results file under its lock (no-op when ``path`` is None)."""
    if not path:
        return
    path = Path(path)
    with locked(path):
        data = load(path)
        fn(data)
        save(path, data)


def case_entry(data: dict[str, Any], case: str) -> dict[str, Any]:
    cases = data.setdefault("cases", {})
    return cases.setdefault(case, {"title": CASES.get(case, case), "status": "pending"})


def merge_case(path: str | Path | None, case: str, results: dict[str, Any]) -> None:
    """Deep-merge ``results`` into ``cases[case].results`` (what a case script calls as it goes)."""

    def fn(data: dict[str, Any]) -> None:
        deep_merge(case_entry(data, case).setdefault("results", {}), clean(results))

    update(path, fn)


def set_case(path: str | Path | None, case: str, **fields: Any) -> None:
    """Set top-level fields of ``cases[case]`` (``status``, ``reason``...)."""
    update(path, lambda data: case_entry(data, case).update(clean(fields)))


def merge_top(path: str | Path | None, key: str, value: dict[str, Any]) -> None:
    """Deep-merge ``value`` into the top-level ``key`` (``environment``, ``machine``)."""

    def fn(data: dict[str, Any]) -> None:
        current = data.setdefault(key, {})
        if isinstance(current, dict) and isinstance(value, dict):
            deep_merge(current, clean(value))
        else:
            data[key] = clean(value)

    update(path, fn)


def machine_peaks(path: str | Path | None) -> dict[str, Any]:
    """The ``machine`` section (measured bf16 matmul rate, copy bandwidth), or {}."""
    return load(Path(path)).get("machine", {}) if path else {}


# ---- goals ---------------------------------------------------------------------------------------


def _results(data: dict[str, Any], case: str) -> dict[str, Any]:
    return (data.get("cases", {}).get(case) or {}).get("results") or {}


def _goal(name: str, target: str, case: str, value: Any = None, unit: str = "", met: Any = None,
          note: str = "") -> dict[str, Any]:  # fmt: skip
    return {
        "name": name, "target": target, "case": case, "value": value, "unit": unit,
        "met": met, "note": note,
    }  # fmt: skip


def evaluate_goals(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's five goals, each met (True/False) or not measured (None), with its figure."""
    goals = []
    smoke = bool(data.get("smoke"))
    tail = " (smoke run on CPU: figures say nothing about a GPU)" if smoke else ""

    # 1. Mid-Block step MFU >= 45% at the 8B shape (against the spec's dense bf16 rate, as
    #    torchtitan reports it; the measured-peak figure beside it).
    step = _results(data, "step_8b")
    arms = [a for a in (step.get("arms") or {}).values() if a.get("mfu_spec") is not None]
    if arms:
        best = max(arms, key=lambda a: a["mfu_spec"])
        goals.append(_goal(
            "Mid-Block step MFU, 8B shape, seq 4096", ">= 45% of 989.5 TFLOP/s", "step_8b",
            round(100 * best["mfu_spec"], 1), "%", best["mfu_spec"] >= 0.45,
            f"best arm '{best['arm']}': {best['tokens_per_s']:.0f} tokens/s, "
            f"{best['achieved_tflops']:.0f} TFLOP/s; "
            + (f"{100 * best['mfu_measured']:.1f}% of the measured matmul rate"
               if best.get("mfu_measured") is not None else "no measured matmul rate")
            + tail,
        ))  # fmt: skip
    else:
        arms_any = step.get("arms") or {}
        if arms_any and smoke:
            goals.append(_goal("Mid-Block step MFU, 8B shape, seq 4096", ">= 45%", "step_8b",
                               note="no MFU on CPU (no bf16 peak)" + tail))  # fmt: skip
        else:
            goals.append(_goal("Mid-Block step MFU, 8B shape, seq 4096", ">= 45%", "step_8b",
                               note="not measured"))  # fmt: skip

    # 2. RMSNorm and SwiGLU forward+backward >= 70% of copy bandwidth.
    kb = _results(data, "kernel_bench")
    shares = {}
    for op in ("rms_norm", "swiglu"):
        rows = [r for r in kb.get("ops", []) if r.get("op") == op and r.get("impl") == "fastmid"
                and r.get("mode") == "fwd_bwd" and r.get("copy_bw_share") is not None]  # fmt: skip
        if rows:
            shares[op] = max(rows, key=lambda r: r["tokens"])["copy_bw_share"]
    if len(shares) == 2:
        worst = min(shares.values())
        goals.append(_goal(
            "RMSNorm and SwiGLU fwd+bwd bandwidth", ">= 70% of measured copy bandwidth",
            "kernel_bench", round(100 * worst, 1), "% (the lower of the two)", worst >= 0.70,
            ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items()) + tail,
        ))  # fmt: skip
    else:
        goals.append(_goal("RMSNorm and SwiGLU fwd+bwd bandwidth", ">= 70% of copy bandwidth",
                           "kernel_bench", note="not measured" + tail))  # fmt: skip

    # 3. Frozen-head fused loss <= 1/4 of eager's peak memory at no more than eager's time.
    lce = kb.get("lce_goal") or {}
    if lce.get("memory_ratio") is not None and lce.get("time_ratio") is not None:
        met = lce["memory_ratio"] <= 0.25 and lce["time_ratio"] <= 1.0
        goals.append(_goal(
            "frozen-head fused linear cross-entropy", "<= 1/4 of eager's peak memory, time <= eager",
            "kernel_bench", round(lce["memory_ratio"], 3), "x eager's peak memory", met,
            f"time {lce['time_ratio']:.2f}x eager at {lce.get('tokens')} tokens, vocabulary "
            f"{lce.get('vocab')}" + tail,
        ))  # fmt: skip
    else:
        goals.append(_goal("frozen-head fused linear cross-entropy", "<= 1/4 memory, <= time",
                           "kernel_bench", note="not measured" + tail))  # fmt: skip

    # 4. 32B band within the plan's estimate +10% and under 139 GiB.
    fit = (_results(data, "fit_32b").get("report")) or {}
    measured, source = fit.get("measured") or {}, "whole run"
    if "peak_reserved_bytes" not in measured and fit.get("steps"):  # cut short: the last step's
        last = fit["steps"][-1]
        measured = {k.removesuffix("_after"): v for k, v in last.items() if k.endswith("_after")}
        source = f"up to step {last.get('step')} (the run was cut short)"
    planned = ((fit.get("planned") or {}).get("total_bytes") or 0) / GIB
    if "peak_reserved_bytes" in measured and planned:
        reserved = measured["peak_reserved_bytes"] / GIB
        allocated = measured["peak_allocated_bytes"] / GIB
        met = reserved <= 1.10 * planned and reserved < 139.0 and fit.get("status") == "ok"
        goals.append(_goal(
            "32B default band, recommended mode, one GPU", "peak <= plan + 10% and < 139 GiB",
            "fit_32b", round(reserved, 2), "GiB peak reserved", met,
            f"plan {planned:.2f} GiB; peak allocated {allocated:.2f} GiB "
            f"({100 * (allocated - planned) / planned:+.1f}%), reserved "
            f"{100 * (reserved - planned) / planned:+.1f}%; {source}; status {fit.get('status')}",
        ))  # fmt: skip
    else:
        note = f"status {fit['status']}" if fit.get("status") else "not measured"
        if smoke and fit:
            note = "CPU smoke: peak RSS only, no GPU peak" + tail
        goals.append(_goal("32B default band, recommended mode, one GPU",
                           "peak <= plan + 10% and < 139 GiB", "fit_32b", note=note))  # fmt: skip

    # 5. Analysis overhead at most 1.1x a bare forward.
    an = _results(data, "analyze")
    if an.get("overhead_ratio") is not None:
        goals.append(_goal(
            "fastmid analyze time vs a bare forward", "<= 1.1x", "analyze",
            round(an["overhead_ratio"], 3), "x bare forward", an["overhead_ratio"] <= 1.1,
            f"{an.get('model_shape', '')}; CKA vs float64 on CPU: max |diff| "
            f"{an.get('cka_max_abs_diff')}" + tail,
        ))  # fmt: skip
    else:
        goals.append(_goal("fastmid analyze time vs a bare forward", "<= 1.1x", "analyze",
                           note="not measured"))  # fmt: skip
    if smoke:  # CPU figures of tiny models: no verdict on a GPU goal
        for goal in goals:
            goal["met"] = None
    return goals


# ---- markdown ------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return [*out, ""]


def render_markdown(data: dict[str, Any]) -> str:
    env, machine = data.get("environment") or {}, data.get("machine") or {}
    smoke = bool(data.get("smoke"))
    gpu = env.get("gpu_name") or ("CPU smoke run" if smoke else "unknown device")
    lines = [
        f"# fastmid prepared GPU run: {gpu}, {data.get('started', '?')}",
        "",
        (
            "**Smoke run on CPU** (`--smoke`: tiny sizes, Triton interpreter): it checks that "
            "the script runs; no figure below says anything about a GPU."
            if smoke
            else "`bash bench/gpu/run_all.sh`: every GPU claim of fastmid measured in one run "
            "(issue 24)."
        ),
        "",
        f"Command: `{data.get('command', '')}`; budget {data.get('budget_s')} s; finished: "
        f"{data.get('finished') or 'not yet (or cut off)'}.",
        "",
        "## Machine",
        "",
    ]
    rows = [
        ["GPU", env.get("gpu_name")],
        ["GPU memory (GiB)", env.get("gpu_memory_gib")],
        ["driver", env.get("driver")],
        ["CUDA (torch build)", env.get("cuda")],
        ["torch", env.get("torch")],
        ["triton", env.get("triton")],
        ["transformers", env.get("transformers")],
        ["torchao / bitsandbytes / datasets", " / ".join(
            str(env.get(k) or "-") for k in ("torchao", "bitsandbytes", "datasets"))],
        ["python", env.get("python")],
        ["fastmid installed as", (env.get("install") or {}).get("method")],
        ["measured bf16 matmul (TFLOP/s)", machine.get("bf16_matmul_tflops")],
        ["measured copy bandwidth (GB/s)", machine.get("copy_gbs")],
        ["spec dense bf16 (TFLOP/s)", machine.get("spec_bf16_tflops")],
    ]  # fmt: skip
    lines += _table(["", ""], rows)
    lines += ["## Goals", ""]
    goal_rows = []
    for g in data.get("goals") or evaluate_goals(data):
        unmeasured = "no verdict (smoke)" if smoke and g["value"] is not None else "not measured"
        met = {True: "**met**", False: "**not met**", None: unmeasured}[g["met"]]
        value = "-" if g["value"] is None else f"{_fmt(g['value'])} {g['unit']}"
        goal_rows.append([g["name"], g["target"], value, met, g["note"]])
    lines += _table(["goal", "target", "measured", "verdict", "note"], goal_rows)
    lines += ["## Cases", ""]
    case_rows = []
    for name, entry in (data.get("cases") or {}).items():
        case_rows.append([
            name, entry.get("status"), entry.get("wall_s"), entry.get("timeout_s"),
            entry.get("reason") or "",
        ])  # fmt: skip
    lines += _table(["case", "status", "wall s", "time box s", "reason / note"], case_rows)
    for name, entry in (data.get("cases") or {}).items():
        lines += [f"### {name}: {entry.get('title', '')}", ""]
        res = entry.get("results") or {}
        lines += _case_details(name, res)
        if entry.get("status") in ("failed", "timeout") and entry.get("log_tail"):
            lines += ["Last lines of its log:", "", "```", entry["log_tail"][-1500:], "```", ""]
    return "\n".join(lines) + "\n"


def _case_details(name: str, res: dict[str, Any]) -> list[str]:
    """A compact table of one case's results (the JSON holds everything)."""
    if not res:
        return ["(no results)", ""]
    if name == "kernel_tests":
        tests = res.get("tests") or []
        out = [f"{res.get('passed', 0)} passed, {res.get('failed', 0)} failed, "
               f"{res.get('skipped', 0)} skipped on {res.get('device')}.", ""]  # fmt: skip
        bad = [[t["nodeid"], t["outcome"], (t.get("message") or "")[:200]] for t in tests
               if t.get("outcome") not in ("passed", "skipped")]  # fmt: skip
        return out + (_table(["test", "outcome", "message"], bad) if bad else [])
    if name == "kernel_bench":
        rows = [[r.get("op"), r.get("tokens"), r.get("mode"), r.get("impl"),
                 r.get("ms", r.get("skipped") or r.get("error")), r.get("gb_per_s"),
                 r.get("copy_bw_share"), r.get("peak_extra_mib")] for r in res.get("ops", [])]  # fmt: skip
        return _table(["op", "tokens", "mode", "impl", "ms", "GB/s", "share of copy BW",
                       "peak extra MiB"], rows)  # fmt: skip
    if name in ("step_8b", "fsdp2"):
        out = []
        if res.get("flop_formula"):
            out += [f"FLOPs per step: {res['flop_formula']}", ""]
        rows = []
        for a in (res.get("arms") or {}).values():
            rows.append([a.get("arm"), a.get("status", "ok"), a.get("step_time_s"),
                         a.get("tokens_per_s"), a.get("achieved_tflops"),
                         None if a.get("mfu_spec") is None else round(100 * a["mfu_spec"], 1),
                         None if a.get("mfu_measured") is None else round(100 * a["mfu_measured"], 1),
                         a.get("peak_allocated_gib"), a.get("reason") or a.get("error") or ""])  # fmt: skip
        return out + _table(["arm", "status", "step s", "tokens/s", "TFLOP/s", "MFU % (spec)",
                             "MFU % (measured peak)", "peak GiB", "note"], rows)  # fmt: skip
    if name == "fit_32b":
        rep = res.get("report") or {}
        comp, planned = rep.get("comparison") or {}, rep.get("planned") or {}
        return [
            f"Status {rep.get('status')}; mode {json.dumps(rep.get('mode'))}; plan total "
            f"{_fmt(planned.get('total_gib'))} GiB; measured {json.dumps(rep.get('measured'))}; "
            f"vs plan: allocated {_fmt(comp.get('peak_allocated_vs_plan_percent'))}%, reserved "
            f"{_fmt(comp.get('peak_reserved_vs_plan_percent'))}%; steps "
            f"{[round(s.get('step_time_s', 0), 2) for s in rep.get('steps') or []]} s.",
            "",
        ]
    if name == "optimizer_offload":
        rows = []
        for r in res.get("rows") or []:
            for arm, d in (r.get("arms") or {}).items():
                rows.append([r.get("optim"), arm, d.get("skipped") or d.get("max_rel_diff_vs_ordinary"),
                             d.get("grad_bytes"), d.get("peak_extra_bytes"), d.get("seconds")])  # fmt: skip
        return _table(["optimizer", "arm", "max rel. weight diff vs ordinary", "grad bytes",
                       "peak extra bytes (CUDA)", "s"], rows)  # fmt: skip
    if name == "analyze":
        keys = ("model_shape", "tokens", "bare_s", "analysis_s", "overhead_ratio",
                "cka_max_abs_diff", "cka_layers")  # fmt: skip
        lines = _table(["", ""], [[k, res.get(k)] for k in keys if k in res])
        parts = res.get("breakdown") or {}
        if parts:  # --profile: seconds per batch of each part of the work
            lines += ["Seconds per batch, each part timed alone (`--profile`):", ""]
            lines += _table(["part", "s"], [[k, v] for k, v in parts.items()])
        return lines
    if name == "env":
        return ["(see Machine)", ""]
    flat = [[k, v] for k, v in res.items() if not isinstance(v, dict | list)]
    return _table(["", ""], flat) if flat else ["(see the JSON)", ""]


# ---- CLI ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("init", "start", "end", "skip", "set", "render"))
    p.add_argument("--json", required=True, type=Path)
    p.add_argument("--md", type=Path)
    p.add_argument("--case")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--smoke", type=int, default=0)
    p.add_argument("--budget", type=int)
    p.add_argument("--command", default="")
    p.add_argument("--timeout", type=float)
    p.add_argument("--rc", type=int)
    p.add_argument("--wall", type=float)
    p.add_argument("--log")
    p.add_argument("--log-offset", type=int, default=0, help="where this case's log lines begin")
    p.add_argument("--reason", default="")
    p.add_argument("--key")
    p.add_argument("--value")
    p.add_argument("--final", action="store_true")
    a = p.parse_args(argv)

    if a.action == "init":
        data = {
            "schema": SCHEMA, "smoke": bool(a.smoke), "started": now(), "finished": None,
            "command": a.command, "budget_s": a.budget, "out_dir": str(a.json.parent),
            "environment": {}, "machine": {},
            "cases": {c: {"title": CASES.get(c, c), "status": "pending"}
                      for c in a.cases.split(",") if c},
            "goals": [],
        }  # fmt: skip
        with locked(a.json):
            save(a.json, data)
    elif a.action == "start":
        set_case(a.json, a.case, status="running", started=now(), timeout_s=a.timeout)
    elif a.action == "end":

        def fn(data: dict[str, Any]) -> None:
            entry = case_entry(data, a.case)
            entry["rc"], entry["wall_s"] = a.rc, round(a.wall or 0.0, 1)
            said = entry.get("results", {}).get("case_status")  # a case may skip itself
            if a.rc == 0:
                entry["status"] = said or "ok"
                entry["reason"] = entry.get("results", {}).get("case_reason", "")
            elif a.rc in (124, 137):
                entry["status"] = "timeout"
                entry["reason"] = f"killed at its time box of {entry.get('timeout_s')} s"
            else:
                entry["status"] = "failed"
                entry["reason"] = f"exit status {a.rc}"
            if entry["status"] in ("failed", "timeout"):
                entry["log_tail"] = _case_log(a)  # this case's part of the shared log

        update(a.json, fn)
    elif a.action == "skip":
        set_case(a.json, a.case, status="skipped", reason=a.reason)
    elif a.action == "set":
        value = json.loads(a.value) if a.value else None
        top, _, sub = a.key.partition(".")
        update(a.json, lambda d: d.setdefault(top, {}).update({sub: value}) if sub
               else d.update({top: value}))  # fmt: skip
    if a.action in ("end", "render"):  # `end --md M` renders too (one process per case less)

        def goals(data: dict[str, Any]) -> None:
            data["goals"] = evaluate_goals(data)
            if a.final:
                data["finished"] = now()
                for entry in data.get("cases", {}).values():
                    if entry.get("status") == "pending":
                        entry["status"] = "skipped"
                        entry["reason"] = entry.get("reason") or "not run (run stopped first)"

        update(a.json, goals)
        if a.md:
            md = render_markdown(load(a.json))
            tmp = a.md.with_name(f".{a.md.name}.tmp")
            tmp.write_text(md)
            os.replace(tmp, a.md)
    return 0


def _case_log(a: argparse.Namespace) -> str:
    """The last 4000 characters this case wrote to the shared log (from ``--log-offset``)."""
    if not a.log:
        return ""
    try:
        with open(a.log, "rb") as fh:
            fh.seek(a.log_offset)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return text[-4000:]


if __name__ == "__main__":
    sys.exit(main())
