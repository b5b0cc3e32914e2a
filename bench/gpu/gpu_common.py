"""Shared pieces of the prepared GPU run's case scripts (issue 24): tiny smoke configs, random
token batches (plain and packed), the Mid-Block FLOP count and MFU, memory peaks.

The model itself is built by ``fit_32b.materialize`` (meta device, ``to_empty``, seeded in-place
init: an 8B model in bf16 is on the GPU in about a second, nothing downloaded).
"""

from __future__ import annotations

import gc
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastmid.data.packing import collate_packed
from fastmid.labels import IGNORE_INDEX

GIB = 2**30
REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bench" / "configs"
# A tiny model of any config's architecture, for --smoke (CPU, seconds).
SMOKE_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 16384,
}
FLOP_FORMULA = (
    "per step = linear + attention + head, counted as model FLOPs (recomputation under "
    "checkpointing not counted): linear = 2 x P_layer x tokens x (prefix layers x 1 + band "
    "layers x 3 + suffix layers x 2) [forward only below the band; forward, input and weight "
    "gradients in the band; forward and input gradients above it], P_layer = the matmul "
    "parameters of one decoder layer; attention = 4 x d_attn x sum over examples of length^2 x "
    "(prefix x 1 + (band + suffix) x 3) [QK^T and AV, 2 x 2 x s x d per token forward, no causal "
    "halving (the torchtitan/PaLM convention); the backward of attention computes dQ, dK, dV in "
    "the suffix too, so suffix attention counts 3x]; head = 2 x vocab x hidden x supervised "
    "tokens x 2 [lm_head forward and input gradient at supervised positions only; frozen]. "
    "MFU = FLOPs / step time / peak, against the datasheet's dense bf16 rate (989.5 TFLOP/s for "
    "H100/H200 SXM, as torchtitan reports) and against the bf16 matmul rate measured on this GPU"
)


def smoke_config(source: str | Path, out: Path, **extra: Any) -> Path:
    """A tiny config of ``source``'s architecture, written to ``out`` (returns its path)."""
    data = json.loads(Path(source).read_text())
    data.update(SMOKE_SIZES, **extra)
    data.pop("head_dim", None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(data.get(key), int):
            data[key] = SMOKE_SIZES["vocab_size"] - 1
    if "max_window_layers" in data:
        data["max_window_layers"] = SMOKE_SIZES["num_hidden_layers"]
    if "sliding_window" in data:
        data["sliding_window"] = SMOKE_SIZES["max_position_embeddings"]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"smoke_{Path(source).stem}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def scratch_dir() -> Path:
    """A fresh temporary folder of this process (smoke configs)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="fastmid_gpu_"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """``(seconds, fn())``: wall seconds of ``fn`` with the device synchronized before and after,
    so queued kernels are neither charged to it nor left out."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peaks(device: torch.device) -> dict[str, Any]:
    """Peak allocated and reserved GiB since the last :func:`reset_peaks` (None on CPU)."""
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3),
        "allocated_now_gib": round(torch.cuda.memory_allocated(device) / GIB, 3),
    }


def plain_batch(
    micro_batch: int, seq_len: int, vocab: int, device: torch.device, seed: int
) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """Random ids; labels on the second half of each sequence (a prompt, then its answer)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=gen)
    labels = ids.clone()
    labels[:, : seq_len // 2] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}, [[seq_len] for _ in range(micro_batch)]


def packed_batch(
    micro_batch: int, seq_len: int, vocab: int, device: torch.device, seed: int
) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """Rows of exactly ``seq_len`` tokens packed from examples of seq_len/16 .. seq_len/4 tokens
    (the last one of a row takes the rest), each supervised on its second half, collated by
    :func:`fastmid.data.collate_packed` (per-example ``position_ids``)."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    rows, lengths = [], []
    lo, hi = max(4, seq_len // 16), max(8, seq_len // 4)
    for _ in range(micro_batch):
        row, sizes, left = [], [], seq_len
        while left > 0:
            n = rnd.randint(lo, hi)
            n = left if left - n < lo else n
            ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
            labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]
            row.append({"input_ids": ids, "labels": labels})
            sizes.append(n)
            left -= n
        rows.append(row)
        lengths.append(sizes)
    batch = collate_packed(rows, pad_token_id=0)
    return {k: v.to(device) for k, v in batch.items()}, lengths


def layer_counts(model: torch.nn.Module, plan: Any) -> dict[str, int]:
    """What the FLOP count needs, read off the model (before any fusing)."""
    from fastmid.models.families import decoder_layers

    layers = decoder_layers(model)
    config = model.config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    n = len(layers)
    return {
        "layers": n,
        "prefix": plan.first,
        "band": plan.size,
        "suffix": n - plan.last - 1,
        "p_layer": sum(p.numel() for p in layers[plan.first].parameters() if p.ndim == 2),
        "d_attn": heads * head_dim,
        "hidden": int(config.hidden_size),
        "vocab": int(config.vocab_size),
    }


def step_flops(c: dict[str, int], lengths: list[list[int]], supervised: int) -> dict[str, float]:
    """Model FLOPs of one Mid-Block step (:data:`FLOP_FORMULA`)."""
    tokens = sum(sum(r) for r in lengths)
    squares = sum(n * n for r in lengths for n in r)
    linear = 2.0 * c["p_layer"] * tokens * (c["prefix"] + 3 * c["band"] + 2 * c["suffix"])
    attention = 4.0 * c["d_attn"] * squares * (c["prefix"] + 3 * (c["band"] + c["suffix"]))
    head = 4.0 * c["vocab"] * c["hidden"] * supervised
    return {
        "total": linear + attention + head,
        "linear": linear,
        "attention": attention,
        "head": head,
        "tokens": tokens,
        "supervised": supervised,
    }


def mfu(flops: float, seconds: float, machine: dict[str, Any]) -> dict[str, Any]:
    achieved = flops / seconds / 1e12 if seconds > 0 else None
    spec, measured = machine.get("spec_bf16_tflops"), machine.get("bf16_matmul_tflops")
    return {
        "achieved_tflops": None if achieved is None else round(achieved, 1),
        "mfu_spec": None if not (achieved and spec) else round(achieved / spec, 4),
        "mfu_measured": None if not (achieved and measured) else round(achieved / measured, 4),
    }


class Clock:
    """Seconds since start, and whether a budget is spent."""

    def __init__(self, budget_s: float) -> None:
        self.t0, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def spent(self) -> bool:
        return self.elapsed() > self.budget_s
