"""Benchmark (not a test): cost of `fastmid analyze`'s statistics over a bare forward pass.

Runs, on the same batches of the same tokens and in one process:

* bare: the decoder stacks of both models (no head, as the analysis runs them), no hooks;
* analysis: :func:`fastmid.analysis.analyze.measure_layers` (both forwards, hooks, streaming CKA,
  pooled cosine, matrix entropy and effective rank of both models, on every layer).

Each is repeated ``--repeats`` times, alternating, and the fastest run counts (the machine may be
shared). Target (issue 5): the statistics add at most 30% on CPU. Writes
``bench/results/analyze_speed.{json,md,png}``.

    python bench/analyze_speed.py [--base default] [--tuned PATH] [--max-tokens 4000]

Without ``--tuned`` the tuned model is a copy of the base with noise on its middle layers (the
cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from fastmid.analysis.analyze import load_examples, make_batches, measure_layers
from fastmid.models.families import backbone, decoder_layers
from fastmid.models.loading import load_model_and_tokenizer

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def bare_forward(models: list[torch.nn.Module], batches: list[dict[str, torch.Tensor]]) -> None:
    for b in batches:
        for m in models:
            backbone(m)(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--tuned", default=None)
    ap.add_argument("--data", default="builtin:arith")
    ap.add_argument("--max-tokens", type=int, default=4000)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    base, tok = load_model_and_tokenizer(args.base)
    if args.tuned:
        tuned, _ = load_model_and_tokenizer(args.tuned)
    else:
        tuned = copy.deepcopy(base)
        with torch.no_grad():
            for layer in list(decoder_layers(tuned))[6:24]:
                for p in layer.parameters():
                    p.add_(0.01 * p.std() * torch.randn_like(p))
    examples = load_examples(args.data, tok, args.max_tokens, args.max_seq_len, mask_bos=False)
    batches = make_batches(examples, args.batch_size, int(tok.pad_token_id))
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(int(b["attention_mask"].numel()) for b in batches)

    bare_forward([base, tuned], batches[:1])  # warm-up
    bare_s, analysis_s = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        bare_forward([base, tuned], batches)
        bare_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        measure_layers(base, tuned, batches)
        analysis_s.append(time.perf_counter() - t)
    bare, analysis = min(bare_s), min(analysis_s)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "device": str(next(base.parameters()).device),
        "model": args.base,
        "num_hidden_layers": len(decoder_layers(base)),
        "hidden_size": int(base.config.hidden_size),
        "tokens": n_tokens,
        "padded_positions": padded,
        "batch_size": args.batch_size,
        "bare_forward_s": bare_s,
        "analysis_s": analysis_s,
        "bare_tokens_per_s": n_tokens / bare,
        "analysis_tokens_per_s": n_tokens / analysis,
        "overhead": analysis / bare - 1.0,
        "target_overhead": 0.30,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "analyze_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    verdict = "meets" if result["overhead"] <= 0.30 else "misses"
    (args.out / "analyze_speed.md").write_text(
        "# analyze speed\n\n"
        f"Machine: {result['machine']} ({result['device']}). Model: {args.base} "
        f"({result['num_hidden_layers']} layers, hidden {result['hidden_size']}), base + tuned, "
        f"{n_tokens} tokens of {args.data} in batches of {args.batch_size}; best of "
        f"{args.repeats} alternating runs.\n\n"
        "| run | seconds | tokens/s |\n|---|---|---|\n"
        f"| bare forward of both models | {bare:.2f} | {result['bare_tokens_per_s']:.0f} |\n"
        f"| analysis (forwards + all statistics) | {analysis:.2f} | "
        f"{result['analysis_tokens_per_s']:.0f} |\n\n"
        f"Statistics overhead: {100 * result['overhead']:.1f}% ({verdict} the 30% target).\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.barh(
        ["bare forward\n(both models)", "analysis\n(forwards + stats)"],
        [result["bare_tokens_per_s"], result["analysis_tokens_per_s"]],
        color=["tab:gray", "tab:blue"],
    )
    ax.set_xlabel("tokens / s (higher is better)")
    ax.set_title(
        f"fastmid analyze on {result['device']}: +{100 * result['overhead']:.0f}% time "
        f"for the statistics",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(args.out / "analyze_speed.png", dpi=110)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
