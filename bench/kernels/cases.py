"""Benchmark cases for the kernels: each op at 8B-model sizes against eager PyTorch and
``torch.compile`` of the eager code, forward and forward+backward.

Shared by ``test_bench_kernels.py`` (pytest-benchmark) and ``run_gpu.py`` (one-shot GPU report).
Sizes are those of Llama-3 8B: hidden 4096, intermediate 14336, vocab 128256, 32 query heads and 8
key/value heads of head_dim 128. ``bytes_moved`` is the minimum traffic of each op (every input
read once, every output written once), so ``bytes_moved / time`` against the card's measured copy
bandwidth says how close an op is to the memory roofline.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fastmid.kernels import (
    linear_cross_entropy,
    rms_norm,
    rms_norm_reference,
    rope,
    rope_reference,
    swiglu,
    swiglu_reference,
)

HIDDEN, INTERMEDIATE, VOCAB = 4096, 14336, 128256
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
IMPLS = ("eager", "compile", "fastmid")
MODES = ("fwd", "fwd_bwd")


@dataclass
class Case:
    """One benchmark: ``run()`` executes the op once (forward, or forward+backward).

    Attributes:
        op: op name.
        impl: ``eager`` | ``compile`` | ``fastmid``.
        mode: ``fwd`` | ``fwd_bwd``.
        tokens: number of token rows.
        bytes_moved: minimum bytes read + written by one ``run()`` (0 when not meaningful).
        run: the callable to time.
    """

    op: str
    impl: str
    mode: str
    tokens: int
    bytes_moved: int
    run: Callable[[], object]


def _maybe_compile(fn: Callable, impl: str) -> Callable:
    return torch.compile(fn, dynamic=False) if impl == "compile" else fn


def _runner(fwd: Callable[[], torch.Tensor], mode: str, grads: list[torch.Tensor]) -> Callable:
    """``fwd`` alone, or ``fwd`` + backward of a fixed random projection of its output."""
    if mode == "fwd":

        def run_fwd() -> object:
            with torch.no_grad():
                return fwd()

        return run_fwd

    def run_fwd_bwd() -> object:
        out = fwd()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(list(outs), grads[: len(outs)])
        return None

    return run_fwd_bwd


def rms_norm_case(impl: str, mode: str, tokens: int, device: str, dtype: torch.dtype) -> Case:
    """RMSNorm over (tokens, 4096) with a trained weight (the band case)."""
    x = torch.randn(tokens, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(HIDDEN, device=device, dtype=dtype, requires_grad=True)
    fn = _maybe_compile(rms_norm_reference, impl) if impl != "fastmid" else rms_norm
    dy = torch.randn_like(x)
    elt = x.element_size() * x.numel()
    # fwd: read x, write y. bwd: read dy, x, write dx.
    bytes_moved = 2 * elt + (3 * elt if mode == "fwd_bwd" else 0)
    return Case(
        "rms_norm", impl, mode, tokens, bytes_moved, _runner(lambda: fn(x, w, 1e-5), mode, [dy])
    )


def swiglu_case(impl: str, mode: str, tokens: int, device: str, dtype: torch.dtype) -> Case:
    """SwiGLU over (tokens, 14336)."""
    g = torch.randn(tokens, INTERMEDIATE, device=device, dtype=dtype, requires_grad=True)
    u = torch.randn_like(g, requires_grad=True)
    fn = _maybe_compile(swiglu_reference, impl) if impl != "fastmid" else swiglu
    dy = torch.randn_like(g)
    elt = g.element_size() * g.numel()
    # fwd: read g, u, write out. bwd: read dy, g, u, write dg, du.
    bytes_moved = 3 * elt + (5 * elt if mode == "fwd_bwd" else 0)
    return Case("swiglu", impl, mode, tokens, bytes_moved, _runner(lambda: fn(g, u), mode, [dy]))


def rope_case(impl: str, mode: str, tokens: int, device: str, dtype: torch.dtype) -> Case:
    """RoPE on q (1, 32, tokens, 128) and k (1, 8, tokens, 128) in transformers' layout."""
    q = torch.randn(1, tokens, Q_HEADS, HEAD_DIM, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(1, tokens, KV_HEADS, HEAD_DIM, device=device, dtype=dtype).transpose(1, 2)
    q.requires_grad_()
    k.requires_grad_()
    pos = torch.arange(tokens, device=device, dtype=torch.float32)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, HEAD_DIM, 2, device=device) / HEAD_DIM))
    emb = torch.cat([pos[:, None] * inv_freq] * 2, dim=-1)[None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    fn = _maybe_compile(rope_reference, impl) if impl != "fastmid" else rope
    grads = [torch.randn_like(q), torch.randn_like(k)]
    elt = (q.numel() + k.numel()) * q.element_size()
    bytes_moved = 2 * elt + (2 * elt if mode == "fwd_bwd" else 0)
    return Case(
        "rope", impl, mode, tokens, bytes_moved, _runner(lambda: fn(q, k, cos, sin), mode, grads)
    )


def _eager_lm_loss(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What transformers does: full logits in the model dtype, upcast, mean-free summed CE."""
    logits = (h @ w.T).float()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def linear_cross_entropy_case(
    impl: str, mode: str, tokens: int, device: str, dtype: torch.dtype, vocab: int = VOCAB
) -> Case:
    """lm_head (``vocab`` x 4096, default 128256; frozen: the Mid-Block default) +
    cross-entropy over ``tokens``."""
    h = torch.randn(tokens, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    w = (0.02 * torch.randn(vocab, HIDDEN, device=device, dtype=dtype)).requires_grad_(False)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[: tokens // 4] = -100
    if impl == "fastmid":

        def fwd() -> torch.Tensor:
            return linear_cross_entropy(h, w, labels)[0]

    else:
        fn = _maybe_compile(_eager_lm_loss, impl)

        def fwd() -> torch.Tensor:
            return fn(h, w, labels)

    one = torch.ones((), device=device)
    return Case("linear_cross_entropy", impl, mode, tokens, 0, _runner(fwd, mode, [one]))


OPS: dict[str, Callable[..., Case]] = {
    "rms_norm": rms_norm_case,
    "swiglu": swiglu_case,
    "rope": rope_case,
    "linear_cross_entropy": linear_cross_entropy_case,
}


def sync(device: str) -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(run: Callable[[], object], device: str, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of ``run()`` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        run()
    sync(device)
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(run: Callable[[], object], device: str) -> int:
    """Peak CUDA memory allocated during one ``run()`` above what was allocated before, in bytes
    (0 on CPU)."""
    if not device.startswith("cuda"):
        run()
        return 0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth_gbs(device: str, n_bytes: int = 2 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write bytes / time)."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * n_bytes / (ms * 1e-3) / 1e9
