"""Real tokens/s of the default run with and without ``--packing``, on CPU.

    python bench/packing_cpu.py [--max-steps 6] [--rounds 2] [--out runs/bench-packing]

Runs ``fastmid train`` with the default settings (SmolLM2-135M-Instruct, ``builtin:arith``, the
default band, micro-batch and optimizer), without evaluations or checkpoints, ``--max-steps``
steps, once per arm and round, the arms alternated (``plain``, ``packing``, ``plain``, ...), as
separate processes. Reports each run's real (non-padding) tokens/s and padded tokens/s from
``summary.json`` (training steps only: loading and export excluded) and the medians per arm.
A packed step holds more tokens (micro-batch x rows of ``--max-seq-len`` tokens) than a padded one,
so steps are not comparable: tokens/s are. The machine is shared and has 2 cores: the ratio of
the medians is what to read. Writes ``bench/results/packing_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from machine import cpu_name  # bench/ is on sys.path when a script runs

RESULTS = Path(__file__).parent / "results"
ARMS = {"plain": [], "packing": ["--packing"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-packing")
    args = parser.parse_args()
    common = (
        f"--max-steps {args.max_steps} --no-eval-accuracy --eval-every 0 --save-every 0 --overwrite"
    ).split()
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        for arm, extra in ARMS.items():
            out = Path(args.out) / f"{arm}-{r}"
            cmd = [sys.executable, "-m", "fastmid", "train", *common, *extra, "--output", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{arm} failed:\n{proc.stderr[-3000:]}")
            s = json.loads((out / "summary.json").read_text())
            runs[arm].append(
                {
                    "tokens_per_s": s["tokens_per_s"],
                    "padded_tokens_per_s": s["padded_tokens_per_s"],
                    "tokens": s["tokens"],
                    "train_time_s": s["train_time_s"],
                    "packing": s.get("packing"),
                }
            )
            print(arm, r, round(s["tokens_per_s"]), "real tokens/s", flush=True)
    med = {arm: statistics.median(x["tokens_per_s"] for x in v) for arm, v in runs.items()}
    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores (shared)",
        "command": "fastmid train " + " ".join(common) + " [--packing]",
        "runs": runs,
        "median_real_tokens_per_s": med,
        "ratio_packing_to_plain": med["packing"] / med["plain"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "packing_cpu.json").write_text(json.dumps(result, indent=1) + "\n")

    def row(arm: str, v: list[dict]) -> str:
        per_run = ", ".join(f"{x['tokens_per_s']:.0f}" for x in v)
        return (
            f"| {arm} | {statistics.median(x['tokens_per_s'] for x in v):.0f} | "
            f"{statistics.median(x['padded_tokens_per_s'] for x in v):.0f} | {per_run} |"
        )

    rows = "\n".join(row(arm, v) for arm, v in runs.items())
    (RESULTS / "packing_cpu.md").write_text(
        "# Default run with and without `--packing`: `python bench/packing_cpu.py`\n\n"
        f"Machine: {result['machine']}. Command: `{result['command']}`, arms alternated, "
        f"{args.rounds} rounds.\n\n"
        "| arm | real tokens/s (median) | padded tokens/s (median) | real tokens/s per run |\n"
        f"| --- | --- | --- | --- |\n{rows}\n\n"
        f"Packing / plain, real tokens/s: {result['ratio_packing_to_plain']:.2f}x.\n"
    )
    print((RESULTS / "packing_cpu.md").read_text())


if __name__ == "__main__":
    main()
