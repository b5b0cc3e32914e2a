"""Real-model analysis for bench/results: SmolLM2 base vs a tuned model (e.g. `fastmid train`).

    python bench/analyze_smollm2.py --tuned runs/<name>/final --label midblock
    python bench/analyze_smollm2.py --tuned runs/<full-ft>/final --label full-ft

Writes ``bench/results/analyze_smollm2_<label>/`` with ``analysis.{json,csv,png}`` and
``table.md`` (per-layer table, recommended band, and the depth pattern: mean change inside the
default band vs the final layers, per metric).
"""

from __future__ import annotations

import argparse
import math
import platform
from pathlib import Path

from rich.console import Console

from fastmid.analysis.analyze import run_analysis
from fastmid.analysis.results import AnalysisResult

RESULTS = Path(__file__).parent / "results"


def _fmt(v: float) -> str:
    return "" if not math.isfinite(v) else f"{v:.4f}"


def markdown(result: AnalysisResult, label: str) -> str:
    cols = [
        "index",
        "depth_fraction",
        "cka_debiased",
        "cka_biased",
        "weight_change",
        "cosine",
        "entropy_base",
        "entropy_tuned",
        "erank_base",
        "erank_tuned",
        "grad_norm",
    ]
    band = set(result.current_band)
    lines = [
        f"# SmolLM2 analysis: base vs {label}",
        "",
        f"Config: `{result.config}`. Tokens: {result.n_tokens} over {result.n_prompts} prompts. "
        f"Machine: {platform.processor() or platform.machine()}. "
        f"Time: {result.seconds.get('total', 0):.0f} s.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in result.layers:
        cells = [f"{r.index}{'*' if r.index in band else ''}", f"{r.depth_fraction:.3f}"]
        cells += [_fmt(getattr(r, c)) for c in cols[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    adv = result.advice
    lines += [
        "",
        "`*` = current default band. Recommended band: layers "
        f"{adv.start}..{adv.end - 1} ({adv.reason}; tau = {adv.threshold}).",
        "",
        "Depth pattern (mean change in the default band vs the final layers):",
        "",
        "| metric | middle | end | end / middle | stable middle, sensitive end |",
        "|---|---|---|---|---|",
    ]
    for name, m in result.pattern["metrics"].items():
        lines.append(
            f"| {name} | {m['middle']:.4g} | {m['end']:.4g} | {m['ratio']:.3g} | "
            f"{'yes' if m['stable_middle_sensitive_end'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--tuned", required=True)
    ap.add_argument("--label", required=True, help="folder suffix and title, e.g. midblock")
    ap.add_argument("--data", default="builtin:arith")
    ap.add_argument("--max-tokens", type=int, default=20000)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-grad-norms", action="store_true")
    ap.add_argument("--mask-bos", action="store_true")
    args = ap.parse_args()
    out = RESULTS / f"analyze_smollm2_{args.label}"
    result = run_analysis(
        args.base,
        args.tuned,
        args.data,
        max_tokens=args.max_tokens,
        max_seq_len=args.max_seq_len,
        batch_size=args.batch_size,
        mask_bos=args.mask_bos,
        grad_norms=not args.no_grad_norms,
        output_dir=out,
        overwrite=True,  # this script re-measures the committed results folder on purpose
        console=Console(),
        title=f"SmolLM2-135M-Instruct: base vs {args.label}",
    )
    (out / "table.md").write_text(markdown(result, args.label))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
