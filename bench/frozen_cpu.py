"""Fused frozen layers on CPU: prefix forward, suffix backward and a whole step, fused vs unfused.

    python bench/frozen_cpu.py [--threads 1,2] [--step-rounds 3] [--no-step]

Two models, each built twice in one process (unfused and fused, same weights), with the default
band 0.2:0.8, the execution policy installed (prefix under ``no_grad``) and fp32 (the CPU
default):

* SmolLM2-135M-Instruct (the default model: hidden 576, 30 layers; prefix 0..5, suffix 24..29);
* a random Llama of TinyLlama's width (hidden 2048, intermediate 5632, 32 heads, 4 key/value
  heads, vocabulary 32000) with 8 layers (prefix 0..1, band 2..5, suffix 6..7).

Measured, at several token counts (batch x sequence) and torch thread counts, in interleaved
rounds (unfused and fused alternate, their order swapped every round, so machine noise hits both
alike; more rounds for small token counts, whose runs are short). Reported: the minimum over
rounds (the least-disturbed run: on a shared machine other work only ever slows a run down) and
the median; the speed-up is the ratio of the minima. On a machine shared with other CPU-bound
work, 2-thread runs swing by up to 10x (an OpenMP team waits for its descheduled thread), so
the 1-thread rows are the steadier comparison:

* ``prefix_forward``: the frozen prefix layers on hidden states, under the policy's ``no_grad``;
* ``suffix_forward`` and ``suffix_backward``: the frozen suffix layers on hidden states that
  require grad (the band's output), then backward of a fixed output gradient: input gradients
  only, the part the packed ``[q; k; v]`` and ``[gate; up]`` GEMMs speed up in backward;
* ``train_step``: one whole :func:`fastmid.train.recipe.train_step` (forward, loss, backward,
  clip, AdamW8bit step: the CPU defaults) on random tokens, the last half of each sequence
  supervised (as ``bench/step_cpu.py``): the fused share of a real step.

Large token counts are GEMM-bound: packing saves the re-reading of the input and the per-GEMM
overheads, which matter most at small token counts. On CPU the add + RMSNorm runs its torch
reference (the Triton kernel is for CUDA), so the CPU gain is the packing alone.

Writes ``bench/results/frozen_cpu.json`` and ``bench/results/frozen_cpu.md`` (machine named,
with the load average: the machine may be shared with other work while this runs).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from machine import cpu_name  # bench/ is on sys.path when a script runs

from fastmid.models.band import BandPlan, apply_band, install_execution_policy
from fastmid.models.families import backbone, decoder_layers
from fastmid.models.fused_frozen import fuse_frozen_layers
from fastmid.models.loading import load_model_and_tokenizer
from fastmid.train.optim import build_optimizer, build_scheduler
from fastmid.train.recipe import train_step

RESULTS = Path(__file__).parent / "results"

# (batch, sequence) per model for the layer measurements.
LAYER_SHAPES = {
    "smollm2-135m": [(1, 32), (4, 128), (8, 512)],
    "wide-h2048-l8": [(1, 32), (2, 128), (4, 256)],
}
# The whole step: bench/step_cpu.py's micro-batch 4 x 256 for SmolLM2; a short one for the wide
# model (one of its steps at 1024 tokens takes about a minute on 2 cores).
STEP_SHAPES = {"smollm2-135m": (4, 256), "wide-h2048-l8": (1, 128)}


def wide_model() -> torch.nn.Module:
    """A random Llama of TinyLlama-1.1B's width with 8 layers (seeded)."""
    config = transformers.LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        num_hidden_layers=8,
        vocab_size=32000,
        max_position_embeddings=2048,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def build_pair(name: str) -> dict[str, Any]:
    """The unfused and fused copies of one model, band applied and policy installed."""
    if name == "smollm2-135m":
        base, _ = load_model_and_tokenizer("default", device="cpu")
    else:
        base = wide_model()
    base.train()
    plan = BandPlan.from_fractions(base.config.num_hidden_layers, 0.2, 0.8)
    pair: dict[str, Any] = {"plan": plan, "config": base.config}
    for variant in ("unfused", "fused"):
        model = copy.deepcopy(base) if variant == "unfused" else base
        apply_band(model, plan)
        install_execution_policy(model, plan)
        if variant == "fused":
            report = fuse_frozen_layers(model, plan)
            pair["report"] = report.to_dict()
        pair[variant] = model
    return pair


def _layer_kwargs(model: torch.nn.Module, hidden: torch.Tensor) -> dict[str, Any]:
    """What the model passes its decoder layers: positions, RoPE cos/sin, no mask (SDPA causal)."""
    position_ids = torch.arange(hidden.shape[1]).unsqueeze(0)
    cos_sin = backbone(model).rotary_emb(hidden, position_ids)
    return {"attention_mask": None, "position_ids": position_ids, "position_embeddings": cos_sin}


def time_layers(model: torch.nn.Module, plan: BandPlan, hidden: torch.Tensor, dy: torch.Tensor):
    """(prefix forward, suffix forward, suffix backward) wall times in seconds."""
    layers = decoder_layers(model)
    kwargs = _layer_kwargs(model, hidden)
    prefix = [layers[i] for i in range(plan.first)]
    suffix = [layers[i] for i in range(plan.last + 1, len(layers))]
    t0 = time.perf_counter()
    h = hidden
    for layer in prefix:  # the policy's wrapper runs it under no_grad
        h = layer(h, **kwargs)
    t1 = time.perf_counter()
    h = hidden.detach().requires_grad_()
    x = h
    for layer in suffix:
        x = layer(x, **kwargs)
    t2 = time.perf_counter()
    x.backward(dy)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def rounds_for(tokens: int, hidden: int) -> int:
    """Interleaved rounds for one shape: many for short runs, at least 5."""
    return max(5, min(25, int(4e6 / (tokens * hidden))))


def bench_layers(pair: dict[str, Any], threads: int) -> list[dict[str, Any]]:
    rows = []
    hidden_size = pair["config"].hidden_size
    for batch, seq in LAYER_SHAPES[pair["name"]]:
        rounds = rounds_for(batch * seq, hidden_size)
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(batch, seq, hidden_size, generator=g)
        dy = torch.randn(batch, seq, hidden_size, generator=g)
        samples: dict[str, dict[str, list[float]]] = {
            v: {"prefix_forward": [], "suffix_forward": [], "suffix_backward": []}
            for v in ("unfused", "fused")
        }
        for r in range(rounds + 1):  # round 0 warms up (allocator, BLAS buffers)
            order = ("unfused", "fused") if r % 2 == 0 else ("fused", "unfused")
            for variant in order:
                times = time_layers(pair[variant], pair["plan"], hidden, dy)
                if r > 0:
                    for key, t in zip(samples[variant], times, strict=True):
                        samples[variant][key].append(t)
        for part in ("prefix_forward", "suffix_forward", "suffix_backward"):
            rows.append(_row(pair["name"], part, batch, seq, threads, samples, part))
        print(
            f"{pair['name']} {batch}x{seq} {threads}t: " + ", ".join(_brief(r) for r in rows[-3:]),
            flush=True,
        )
    return rows


def bench_step(pair: dict[str, Any], rounds: int, threads: int) -> dict[str, Any]:
    batch, seq = STEP_SHAPES[pair["name"]]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, pair["config"].vocab_size, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    micro = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    runs = {}
    for variant in ("unfused", "fused"):
        model = pair[variant]
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = build_optimizer(named, "adamw8bit", 3e-4)
        scheduler = build_scheduler(optimizer, 1000, 0, "constant")
        runs[variant] = (model, optimizer, scheduler, [p for _, p in named])
    samples: dict[str, dict[str, list[float]]] = {v: {"train_step": []} for v in runs}
    for r in range(rounds + 1):
        order = ("unfused", "fused") if r % 2 == 0 else ("fused", "unfused")
        for variant in order:
            model, optimizer, scheduler, params = runs[variant]
            t0 = time.perf_counter()
            train_step(model, [micro], optimizer, scheduler, params, grad_clip=1.0)
            if r > 0:
                samples[variant]["train_step"].append(time.perf_counter() - t0)
    row = _row(pair["name"], "train_step", batch, seq, threads, samples, "train_step")
    print(f"{pair['name']} step {batch}x{seq} {threads}t: {_brief(row)}", flush=True)
    return row


def _row(
    model: str, part: str, batch: int, seq: int, threads: int, samples, key: str
) -> dict[str, Any]:
    unfused, fused = samples["unfused"][key], samples["fused"][key]
    return {
        "model": model,
        "part": part,
        "batch": batch,
        "seq": seq,
        "tokens": batch * seq,
        "threads": threads,
        "rounds": len(unfused),
        "unfused_min_s": min(unfused),
        "fused_min_s": min(fused),
        "speedup": min(unfused) / min(fused),
        "unfused_median_s": statistics.median(unfused),
        "fused_median_s": statistics.median(fused),
        "speedup_of_medians": statistics.median(unfused) / statistics.median(fused),
        "unfused_all_s": unfused,
        "fused_all_s": fused,
    }


def _brief(row: dict[str, Any]) -> str:
    return (
        f"{row['part']} {row['unfused_min_s'] * 1e3:.1f} -> {row['fused_min_s'] * 1e3:.1f} ms "
        f"(min), {row['speedup']:.2f}x"
    )


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct parameter storages (packed views counted once)."""
    seen = {
        p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()
    }
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    ap.add_argument("--step-rounds", type=int, default=3, help="interleaved whole-step rounds")
    ap.add_argument("--no-step", action="store_true", help="skip the whole training step")
    ap.add_argument(
        "--markdown-only", action="store_true", help="rewrite the .md from the committed .json"
    )
    args = ap.parse_args()
    if args.markdown_only:
        data = json.loads((RESULTS / "frozen_cpu.json").read_text())
        (RESULTS / "frozen_cpu.md").write_text(markdown(data["meta"], data["models"], data["rows"]))
        return
    load_start = os.getloadavg()
    started = time.time()
    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    thread_counts = [int(t) for t in args.threads.split(",")]
    for name in LAYER_SHAPES:
        pair = build_pair(name)
        pair["name"] = name
        for threads in thread_counts:
            torch.set_num_threads(threads)
            rows += bench_layers(pair, threads)
            if not args.no_step:
                rows.append(bench_step(pair, args.step_rounds, threads))
        models[name] = {
            "band": pair["plan"].to_dict(),
            "fuse_report": pair["report"],
            "parameter_bytes_unfused": param_bytes(pair["unfused"]),
            "parameter_bytes_fused": param_bytes(pair["fused"]),
        }
        del pair
    meta = {
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs",
        "torch_threads": thread_counts,
        "load_average_1_5_15_at_start": [round(x, 2) for x in load_start],
        "load_average_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
        "shared_machine": (
            "other work ran on this machine at the same time; rounds are interleaved and "
            "medians reported so that noise hits both variants alike"
        ),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": "float32",
        "rounds": "layer shapes: max(5, min(25, 4e6 / (tokens x hidden))); see rows",
        "step_rounds": 0 if args.no_step else args.step_rounds,
        "wall_s": round(time.time() - started, 1),
        "command": "python bench/frozen_cpu.py",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "frozen_cpu.json").write_text(
        json.dumps({"meta": meta, "models": models, "rows": rows}, indent=1) + "\n"
    )
    text = markdown(meta, models, rows)
    (RESULTS / "frozen_cpu.md").write_text(text)
    print(text)


def markdown(meta: dict[str, Any], models: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Fused frozen layers on CPU: fused vs unfused",
        "",
        f"`{meta['command']}`. Machine: {meta['machine']}, shared with other work while this ran "
        f"(load average {meta['load_average_1_5_15_at_start'][0]} at the start, "
        f"{meta['load_average_1_5_15_at_end'][0]} at the end, on 2 CPUs); float32; torch "
        f"{meta['torch']}, transformers {meta['transformers']}; {meta['wall_s']:.0f} s.",
        "",
        "Interleaved rounds (unfused and fused alternate, order swapped each round) after one "
        "warm-up round; `min` is the least-disturbed run (other work only slows a run down), "
        "`median` the typical one; speed-up = unfused min / fused min. Under sharing, 2-thread "
        "runs swing by up to 10x (an OpenMP team waits for a descheduled thread): read the "
        "1-thread rows first.",
        "",
        "Fused: q/k/v and gate/up of every frozen layer packed into one GEMM each, the residual "
        "add run with the MLP's RMSNorm (its torch reference on CPU). Default band 0.2:0.8.",
        "",
    ]
    for name, info in models.items():
        band = info["band"]
        lines.append(
            f"- {name}: band {band['first']}..{band['last']} of {band['num_hidden_layers']}; "
            f"fused layers {info['fuse_report']['layers']}; parameter bytes unfused "
            f"{info['parameter_bytes_unfused']:,}, fused {info['parameter_bytes_fused']:,}."
        )
    lines += ["", *_reading(rows)]
    lines += [
        "",
        "| model | threads | part | batch x seq | tokens | rounds | unfused min / median (ms) "
        "| fused min / median (ms) | speed-up (min) | (median) |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['threads']} | {r['part']} | {r['batch']} x {r['seq']} | "
            f"{r['tokens']} | {r['rounds']} | {r['unfused_min_s'] * 1e3:.1f} / "
            f"{r['unfused_median_s'] * 1e3:.1f} | {r['fused_min_s'] * 1e3:.1f} / "
            f"{r['fused_median_s'] * 1e3:.1f} | {r['speedup']:.2f}x | "
            f"{r['speedup_of_medians']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _reading(rows: list[dict[str, Any]]) -> list[str]:
    """The summary lines: the range of speed-ups per thread count, layers and whole steps."""
    out = ["Reading:", ""]
    for threads in sorted({r["threads"] for r in rows}):
        layer = [
            r["speedup"] for r in rows if r["threads"] == threads and r["part"] != "train_step"
        ]
        step = [r["speedup"] for r in rows if r["threads"] == threads and r["part"] == "train_step"]
        line = f"- {threads} thread(s): frozen-layer parts {min(layer):.2f}x to {max(layer):.2f}x"
        if step:
            line += f"; whole train_step {min(step):.2f}x to {max(step):.2f}x"
        out.append(line + " (fused vs unfused, ratio of minima).")
    return out


if __name__ == "__main__":
    main()
