"""Every training mode of ``fastmid plan``'s recommendation, for three public models (issue 15).

    python bench/plan_modes.py                      # writes bench/results/plan_modes.{json,md}
    python bench/plan_modes.py --out /tmp/modes --gpu-memory 139 80 24

For Qwen2.5-32B, Llama-3.1-8B and OLMo-2-7B (``bench/configs/*.json``, no weights: the models are
built on the meta device) it runs :func:`fastmid.models.plan_report.make_plan` at the plan's
defaults (band 0.2:0.8, seq 4096, micro-batch 1, one GPU, activation checkpointing on) and takes
the Mid-Block estimate of every mode of :data:`~fastmid.models.plan_report.MODE_ORDER`. Each
mode gets one row (weights, gradients, optimizer states, activations, logits, total, pinned host
memory, all GiB = 2^30 bytes) and, per GPU size of ``--gpu-memory``, whether it fits with the
recommendation's minimum headroom (``yes``), only without it (``tight``) or not at all
(``no``); below each table, the mode ``fastmid plan`` recommends for each GPU size, with its
``fastmid train`` flags.

The markdown goes to stdout and to ``plan_modes.md``; ``plan_modes.json`` holds the same in bytes.
Nothing is measured here: the figures are the plan's. Re-run it when ``fastmid/models/memory.py``
changes; it takes a few seconds on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from fastmid.models.memory import GIB  # noqa: E402
from fastmid.models.plan_report import (  # noqa: E402
    default_min_headroom_gib,
    make_plan,
    pick_mode,
)

MODELS = (
    ("Qwen2.5-32B", "bench/configs/qwen2.5-32b.json"),
    ("Llama-3.1-8B", "bench/configs/llama-3.1-8b.json"),
    ("OLMo-2-7B", "bench/configs/olmo-2-1124-7b.json"),
)
LINES = ("weights", "gradients", "optimizer_states", "activations", "logits", "total")
DEFAULT_GPUS = (139.0, 80.0, 24.0)


def fit_word(total_bytes: int, gpu_gib: float) -> str:
    """``yes`` (fits with the recommendation's minimum headroom), ``tight`` (fits the GPU but
    leaves less) or ``no``."""
    free = gpu_gib * GIB - total_bytes
    if free >= default_min_headroom_gib(gpu_gib) * GIB:
        return "yes"
    return "tight" if free >= 0 else "no"


def model_report(name: str, config: str, gpus: tuple[float, ...]) -> dict[str, Any]:
    """One model: its band, the modes with their lines and fits, the recommendation per GPU."""
    plan = make_plan(REPO / config, gpu_memory_gib=gpus[0])
    modes = plan["recommendation"]["modes"]
    rows = []
    for m in modes:
        b = m["memory"]["bytes"]
        rows.append(
            {
                "rank": m["rank"],
                "label": m["label"],
                "flags": m["flags"],
                "bytes": {k: b[k] for k in (*LINES, "host_memory")},
                "fits": {f"{g:g}": fit_word(b["total"], g) for g in gpus},
            }
        )
    recommended = {}
    for g in gpus:
        rec = pick_mode(modes, g)
        smallest = min(modes, key=lambda m: m["total_bytes"])
        if rec is None:
            entry = {
                "rank": None,
                "smallest_rank": smallest["rank"],
                "smallest_bytes": smallest["total_bytes"],
            }
        else:
            keys = ("rank", "label", "flags", "total_bytes", "headroom_bytes")
            entry = {k: rec[k] for k in keys}
        recommended[f"{g:g}"] = entry
    p = plan["parameters"]
    return {
        "name": name,
        "config": config,
        "band": plan["band"]["describe"],
        "parameters": {"trainable": p["trainable"], "total": p["total"]},
        "activation_model": plan["activation_model"],
        "setup": {k: plan["setup"][k] for k in ("seq_len", "micro_batch", "gpus", "checkpointing")},
        "modes": rows,
        "recommended": recommended,
    }


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def markdown(report: dict[str, Any]) -> str:
    gpus = report["gpu_memory_gib"]
    heads = "| # | mode | weights | gradients | states | activations | logits | total | host |"
    heads += "".join(f" fits {g:g} GiB? |" for g in gpus)
    rule = "| ---: | --- |" + " ---: |" * 7 + " :---: |" * len(gpus)
    margins = ", ".join(f"{default_min_headroom_gib(g):.2f} GiB of {g:g}" for g in gpus)
    out = [
        "Mid-Block, default band 0.2:0.8, seq 4096 x micro-batch 1, one GPU, activation "
        "checkpointing on; GiB = 2^30 bytes; host = pinned host memory of the offload modes "
        "(outside the GPU total). `yes`: fits with the headroom the recommendation keeps free "
        f"({margins}); `tight`: fits the GPU, not with that headroom; `no`: does not fit. "
        "(`python bench/plan_modes.py`)",
        "",
    ]
    for model in report["models"]:
        p = model["parameters"]
        out += [
            f"**{model['name']}** (`{model['config']}`): {model['band']}, "
            f"{p['trainable'] / 1e9:.2f}B of {p['total'] / 1e9:.2f}B parameters train"
            + ("" if model["activation_model"] == "exact" else " (activations approximate)"),
            "",
            heads,
            rule,
        ]
        for row in model["modes"]:
            b = row["bytes"]
            host = gib(b["host_memory"]) if b["host_memory"] else "-"
            cells = [gib(b[k]) for k in LINES[:-1]] + [f"**{gib(b['total'])}**", host]
            fits = [row["fits"][f"{g:g}"] for g in gpus]
            out.append(f"| {row['rank']} | {row['label']} | " + " | ".join(cells + fits) + " |")
        out.append("")
        for g in gpus:
            rec = model["recommended"][f"{g:g}"]
            if rec["rank"] is None:
                out.append(
                    f"* {g:g} GiB: no mode fits; the smallest is mode {rec['smallest_rank']} at "
                    f"{gib(rec['smallest_bytes'])} GiB (a narrower band or a shorter sequence)."
                )
            else:
                out.append(
                    f"* {g:g} GiB: mode {rec['rank']} ({rec['label']}), {gib(rec['total_bytes'])} "
                    f"GiB, {gib(rec['headroom_bytes'])} GiB headroom: `fastmid train "
                    f"{' '.join(rec['flags'])}`"
                )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument(
        "--gpu-memory", type=float, nargs="+", default=list(DEFAULT_GPUS), help="GiB per GPU"
    )
    args = parser.parse_args(argv)
    gpus = tuple(args.gpu_memory)
    report = {
        "script": "bench/plan_modes.py",
        "gpu_memory_gib": list(gpus),
        "min_headroom_gib": {f"{g:g}": default_min_headroom_gib(g) for g in gpus},
        "models": [model_report(name, config, gpus) for name, config in MODELS],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    (out / "plan_modes.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "plan_modes.md").write_text("# fastmid plan: every mode\n\n" + text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
