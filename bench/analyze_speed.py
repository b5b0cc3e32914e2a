"""Benchmark (not a test): cost of `fastmid analyze`'s statistics over a bare forward pass.

Runs, on the same batches of the same tokens and in one process:

* bare: the decoder stacks of both models (no head, as the analysis runs them), no hooks;
* analysis: :func:`fastmid.analysis.analyze.measure_layers` over all batches (both forwards,
  hooks, streaming CKA, pooled cosine, matrix entropy and effective rank of both models, on
  every layer, and the final computation from the running sums).

The two are interleaved batch by batch: the bare forward of each batch runs right before the
analysis processes it (from the analysis's progress callback, excluded from its time). The
machine's speed drifts by +-15% over tens of seconds here, so only side by side timings of the
same batch compare. Repeated ``--repeats`` times. Reported: total analysis time / total bare time - 1,
and the median of the per-batch ratios. Target (issue 5): the statistics add at most 30% on CPU.
The process keeps freed memory (:func:`fastmid.analysis.heap.keep_freed_memory`, as
``fastmid analyze`` does) for both. Writes ``bench/results/analyze_speed.{json,md,png}``.

    python bench/analyze_speed.py [--base default] [--tuned PATH] [--max-tokens 6000]

Without ``--tuned`` the tuned model is a copy of the base with noise on every decoder layer (the
cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fastmid.analysis.analyze import load_examples, make_batches, measure_layers
from fastmid.analysis.heap import keep_freed_memory
from fastmid.models.families import backbone, decoder_layers
from fastmid.models.loading import load_model_and_tokenizer

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def bare_forward(models: list[torch.nn.Module], batch: dict[str, torch.Tensor]) -> None:
    for m in models:
        backbone(m)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )


def timed(fn: object) -> float:
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--tuned", default=None)
    ap.add_argument("--data", default="builtin:arith")
    ap.add_argument("--max-tokens", type=int, default=6000)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="analyze_speed", help="file stem under --out")
    args = ap.parse_args()

    heap = keep_freed_memory()
    base, tok = load_model_and_tokenizer(args.base)
    if args.tuned:
        tuned, _ = load_model_and_tokenizer(args.tuned)
    else:
        tuned = copy.deepcopy(base)
        with torch.no_grad():
            for p in decoder_layers(tuned).parameters():
                p.add_(0.01 * p.std() * torch.randn_like(p))
    examples = load_examples(args.data, tok, args.max_tokens, args.max_seq_len, mask_bos=False)
    batches = make_batches(examples, args.batch_size, int(tok.pad_token_id))
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(int(b["attention_mask"].numel()) for b in batches)

    bare_forward([base, tuned], batches[0])  # warm-up
    measure_layers(base, tuned, batches[:1])
    bare_s: list[float] = []
    analysis_s: list[float] = []
    last = [0.0]  # end of the previous timed stretch

    def between_batches(done: int, total: int) -> None:
        analysis_s.append(time.perf_counter() - last[0])
        if done < total:
            bare_s.append(timed(lambda: bare_forward([base, tuned], batches[done])))
        last[0] = time.perf_counter()

    for _ in range(args.repeats):
        # One real analysis over all batches; before each of its batches, the bare forward of
        # that batch runs (and is timed) inside the progress callback, outside the analysis time.
        bare_s.append(timed(lambda: bare_forward([base, tuned], batches[0])))
        last[0] = time.perf_counter()
        measure_layers(base, tuned, batches, on_batch=between_batches)
        # Finalizing the accumulators (CKA from the sums, means) belongs to the last batch.
        analysis_s[-1] += time.perf_counter() - last[0]
    bare, analysis_total = sum(bare_s), sum(analysis_s)
    ratios = [a / b - 1.0 for a, b in zip(analysis_s, bare_s, strict=True)]
    toks = n_tokens * args.repeats
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "device": str(next(base.parameters()).device),
        "command": "python bench/analyze_speed.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out",)
        ),
        "model": args.base,
        "data": args.data,
        "num_hidden_layers": len(decoder_layers(base)),
        "hidden_size": int(base.config.hidden_size),
        "tokens": n_tokens,
        "padded_positions": padded,
        "batches": len(batches),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "keep_freed_memory": heap,
        "bare_forward_s": bare_s,
        "analysis_s": analysis_s,
        "bare_tokens_per_s": toks / bare,
        "analysis_tokens_per_s": toks / analysis_total,
        "overhead": analysis_total / bare - 1.0,
        "overhead_median_per_batch": statistics.median(ratios),
        "target_overhead": 0.30,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / args.name
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    verdict = "meets" if result["overhead"] <= 0.30 else "misses"
    stem.with_suffix(".md").write_text(
        "# analyze speed\n\n"
        f"Command: `{result['command']}`\n\n"
        f"Machine: {result['machine']} ({result['device']}). Model: {args.base} "
        f"({result['num_hidden_layers']} layers, hidden {result['hidden_size']}), base + tuned, "
        f"{n_tokens} tokens of {args.data} in {len(batches)} batches of {args.batch_size}, "
        f"each batch timed bare and analysed side by side, {args.repeats} rounds.\n\n"
        "| run | seconds | tokens/s |\n|---|---|---|\n"
        f"| bare forward of both models | {bare:.2f} | {result['bare_tokens_per_s']:.0f} |\n"
        f"| analysis (forwards + all statistics) | {analysis_total:.2f} | "
        f"{result['analysis_tokens_per_s']:.0f} |\n\n"
        f"Statistics overhead: {100 * result['overhead']:.1f}% in total, median per batch "
        f"{100 * result['overhead_median_per_batch']:.1f}% ({verdict} the 30% target).\n"
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
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
