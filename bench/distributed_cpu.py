"""Two processes (FSDP2, gloo) against one on the default model and the demo data, on CPU.

    python bench/distributed_cpu.py [--max-steps 4] [--out runs/bench-distributed]

Runs ``fastmid train`` on SmolLM2-135M-Instruct (the default model), ``builtin:arith``, the
default band, ``--optim adamw`` in fp32, twice with the same global batch of 4 sequences:

* ``one``: one process, ``--micro-batch 2 --grad-accum 2``;
* ``two``: ``--nproc 2`` (FSDP2 on gloo), ``--micro-batch 2`` per rank.

It records each step's loss from ``metrics.jsonl``, the largest relative difference of any tensor
of ``final/model.safetensors`` and of ``band_delta.safetensors`` (``|a - b|_max / |a|_max`` per
tensor), and each run's wall-clock time (a shared 2-core machine: two processes split the same
two cores, so the times are not a speed-up measurement). Writes
``bench/results/distributed_cpu.json`` and ``.md``. This is the "done when" check of the FSDP2
issue on the real model; the CI tests (``tests/train/test_distributed.py``) do the same on a
tiny model.
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
from safetensors.torch import load_file

RESULTS = Path(__file__).parent / "results"
ARMS = {
    "one": ["--micro-batch", "2", "--grad-accum", "2"],
    "two": ["--micro-batch", "2", "--nproc", "2"],
}


def max_rel_diff(a: Path, b: Path) -> float:
    """The largest per-tensor ``max|a - b| / max|a|`` between two safetensors files."""
    ta, tb = load_file(str(a)), load_file(str(b))
    if sorted(ta) != sorted(tb):
        raise SystemExit(f"{a} and {b} hold different tensors")
    worst = 0.0
    for key in ta:
        x, y = ta[key].double(), tb[key].double()
        worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-30)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--out", default="runs/bench-distributed")
    args = parser.parse_args()
    common = (
        f"--data builtin:arith --max-steps {args.max_steps} --optim adamw --precision fp32 "
        "--save-every 0 --eval-every 0 --no-eval-accuracy --seed 0 --overwrite"
    ).split()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    out = Path(args.out)
    runs: dict[str, dict] = {}
    for arm, extra in ARMS.items():
        folder = out / arm
        cmd = [sys.executable, "-m", "fastmid", "train", *common, *extra, "--output", str(folder)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"{arm} failed:\n{proc.stderr[-3000:]}")
        losses = [
            json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()
        ]
        runs[arm] = {
            "command": "fastmid train " + " ".join(common + extra),
            "wall_s": round(seconds, 1),
            "losses": losses,
        }
    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "model": "SmolLM2-135M-Instruct (default), band 0.2:0.8, fp32, torch AdamW",
        "global_batch": 4,
        "runs": runs,
        "max_loss_rel_diff": max(
            abs(a - b) / abs(a)
            for a, b in zip(runs["one"]["losses"], runs["two"]["losses"], strict=True)
        ),
        "final_max_rel_diff": max_rel_diff(
            out / "one/final/model.safetensors", out / "two/final/model.safetensors"
        ),
        "band_delta_max_rel_diff": max_rel_diff(
            out / "one/band_delta.safetensors", out / "two/band_delta.safetensors"
        ),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = "\n".join(
        f"| {step + 1} | {a:.7f} | {b:.7f} |"
        for step, (a, b) in enumerate(
            zip(runs["one"]["losses"], runs["two"]["losses"], strict=True)
        )
    )
    (RESULTS / "distributed_cpu.md").write_text(
        f"# Two processes (FSDP2, gloo) against one: `python bench/distributed_cpu.py`\n\n"
        f"Machine: {result['machine']}. {result['model']}, global batch 4 sequences.\n\n"
        f"- one: `{runs['one']['command']}` ({runs['one']['wall_s']} s)\n"
        f"- two: `{runs['two']['command']}` ({runs['two']['wall_s']} s)\n\n"
        f"| step | loss, one process | loss, two processes |\n| --- | --- | --- |\n{rows}\n\n"
        f"Largest relative difference: losses {result['max_loss_rel_diff']:.2e}; any tensor of "
        f"`final/` {result['final_max_rel_diff']:.2e}; any band tensor "
        f"{result['band_delta_max_rel_diff']:.2e}. Times share one 2-core machine: not a "
        "speed-up measurement.\n"
    )
    print((RESULTS / "distributed_cpu.md").read_text())


if __name__ == "__main__":
    main()
