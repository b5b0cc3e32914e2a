"""Quality of ``--precision bf16`` (torchao AdamW8bit, stochastic rounding) against ``fp32``
(bitsandbytes AdamW8bit) on the default run.

    python bench/precision_quality.py [--max-steps 90] [--eval-every 10] [--out runs/bench-precision]

Runs ``fastmid train`` twice with the default settings (SmolLM2-135M-Instruct, band 0.2:0.8,
``builtin:arith``, 90 steps, lr 3e-4, exact match on 100 ``builtin:arith:test`` problems before and
after), once per arm, as separate processes, the held-out loss measured every ``--eval-every``
steps. Arms:

* ``fp32``: ``--precision fp32 --optim adamw8bit`` (the CPU default);
* ``bf16``: ``--precision bf16`` (which picks ``ao_adamw8bit``).

The arms differ in precision and in the 8-bit optimizer implementation (bitsandbytes vs torchao;
same block size 256, same dynamic-tree code book), because bitsandbytes cannot round bf16 weights
stochastically. Quality is compared on the same held-out examples and the same problems. The
wall-clock times are from a shared 2-core machine: they show the order of magnitude, not a speed
ratio. Writes ``bench/results/precision_quality.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name  # bench/ is on sys.path when a script runs

RESULTS = Path(__file__).parent / "results"
ARMS = {
    "fp32": ["--precision", "fp32", "--optim", "adamw8bit"],
    "bf16": ["--precision", "bf16"],
}


def run_arm(name: str, flags: list[str], args: argparse.Namespace) -> dict:
    """Run one ``fastmid train`` and collect its curve, accuracy and times."""
    out = Path(args.out) / name
    cmd = [
        sys.executable,
        "-m",
        "fastmid.cli",
        "train",
        "--output",
        str(out),
        "--overwrite",
        "--max-steps",
        str(args.max_steps),
        "--eval-every",
        str(args.eval_every),
        "--save-every",
        "0",
        *flags,
    ]
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    curve = {r["step"]: r["eval_loss"] for r in records if r.get("eval_loss") is not None}
    return {
        "flags": flags,
        "precision": summary["precision"],
        "optimizer": summary["optimizer"],
        "held_out_loss": curve,
        "train_loss": {r["step"]: r["loss"] for r in records},
        "accuracy_before": summary["accuracy_before"],
        "accuracy_after": summary["accuracy_after"],
        "final_eval_loss": summary["final_eval_loss"],
        "train_time_s": summary["train_time_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "wall_s": wall,
    }


def markdown(result: dict) -> str:
    """The results as a markdown page."""
    arms = result["arms"]
    names = list(arms)
    lines = [
        "# Quality of --precision bf16 vs fp32 on the default run",
        "",
        f"`{result['command']}` on {result['machine']} ({result['cpus']} CPUs), "
        f"{result['date']}. Both arms: the default `fastmid train` (SmolLM2-135M-Instruct, band "
        f"0.2:0.8, builtin:arith, {result['max_steps']} steps), held-out loss every "
        f"{result['eval_every']} steps.",
        "",
        "| | " + " | ".join(f"{n} ({arms[n]['optimizer']})" for n in names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]

    def acc(a: dict | None) -> str:
        if not a:
            return "-"
        lo, hi = a["ci95"]
        return f"{a['accuracy']:.1%} ({a['correct']}/{a['n']}), [{lo:.1%}, {hi:.1%}]"

    lines.append(
        "| exact match before | "
        + " | ".join(acc(arms[n]["accuracy_before"]) for n in names)
        + " |"
    )
    lines.append(
        "| exact match after | " + " | ".join(acc(arms[n]["accuracy_after"]) for n in names) + " |"
    )
    steps = sorted({int(s) for n in names for s in arms[n]["held_out_loss"]})
    for s in steps:
        cells = [
            arms[n]["held_out_loss"].get(s, arms[n]["held_out_loss"].get(str(s))) for n in names
        ]
        lines.append(
            f"| held-out loss, step {s} | "
            + " | ".join(f"{c:.4f}" if c is not None else "-" for c in cells)
            + " |"
        )
    lines.append(
        "| training time (s) | "
        + " | ".join(f"{arms[n]['train_time_s']:.0f}" for n in names)
        + " |"
    )
    lines.append(
        "| peak RSS (GiB) | "
        + " | ".join(f"{arms[n]['peak_memory_bytes'] / 2**30:.2f}" for n in names)
        + " |"
    )
    lines.append(
        "| whole command (s) | " + " | ".join(f"{arms[n]['wall_s']:.0f}" for n in names) + " |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=90)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", default="runs/bench-precision")
    parser.add_argument("--arms", default=",".join(ARMS))
    args = parser.parse_args()
    result = {
        "command": "python bench/precision_quality.py " + " ".join(sys.argv[1:]),
        "machine": cpu_name(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "max_steps": args.max_steps,
        "eval_every": args.eval_every,
        "arms": {},
    }
    for name in args.arms.split(","):
        result["arms"][name] = run_arm(name, ARMS[name], args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "precision_quality.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "precision_quality.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
