"""The CKA statistics kernel's product precision and tile sizes: time and error vs float64.

    python bench/gpu/cka_precision.py [--n 1920] [--d 4096] [--out R.json] [--smoke]

On the GPU's profile of ``fastmid analyze`` at the 8B shape (bench/results/
gpu_h200_analyze_profile.json) the Triton kernel ``_augmented_gram`` (fp32 IEEE ``tl.dot``, tiles
of 64 features x 32 tokens) takes 19 ms per layer and batch, about 45% of the analysis. This
script times :func:`fastmid.kernels.cka_stats.augmented_gram_triton` on one layer's block (``n``
tokens, two models of width ``d``, bf16) for each product precision (``ieee``: fp32 products;
``tf32x3``: three TF32 tensor-core products per product, about 21 mantissa bits) and tile size,
and reports each variant's largest relative error against the float64 reference
(:func:`cka_block_stats_reference`), field by field as ``tests/bench/test_gpu_subset.py``
measures it (max |got - want| / max |want|; that test's bound is 1e-5).

The activations imitate an LLM layer's: unit-normal features plus a per-feature mean offset and
four outlier channels 300 times the typical size (the cancellation the reference mean guards
against); the "tuned" side is the base plus 10% noise. ``--smoke``: CPU, Triton's interpreter,
tiny shapes (the script's code path, no timing meaning). Two more rows time the same statistics
through torch's matmul (cuBLAS) in float64 and in float32 (:func:`cublas_runs`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as common
import torch
from fastmid.kernels.cka_stats import (
    accumulate_cka_block,
    augmented_gram_triton,
    augmented_rows,
    cka_block_stats_reference,
    gram_to_stats,
    new_running_gram,
    prepare_cka_block,
)

VARIANTS = [  # (precision, block_n, block_d); the first is the shipped default
    ("ieee", 32, 64),
    ("ieee", 32, 128),
    ("ieee", 64, 128),
    ("tf32x3", 32, 64),
    ("tf32x3", 32, 128),
    ("tf32x3", 64, 128),
]


def activations(n: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d) bf16 base and tuned activations with a mean offset and outlier channels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) + 0.5 * torch.randn(d, generator=g)
    x[:, :4] *= 300.0
    y = x + 0.1 * x.std(0) * torch.randn(n, d, generator=g)
    return x.to(device, torch.bfloat16), y.to(device, torch.bfloat16)


def relative_errors(got: Any, want: Any) -> dict[str, float]:
    """Per field of :class:`CKABlockStats`: max |got - want| / max |want| (float64, on the CPU)."""
    errs = {}
    for f in fields(got):
        g64, w64 = getattr(got, f.name).double().cpu(), getattr(want, f.name).double().cpu()
        scale = w64.abs().max().item()
        diff = (g64 - w64).abs().max().item()
        errs[f.name] = diff / scale if scale else diff
    return errs


def measure(
    run: Callable[[], torch.Tensor],
    repeats: int,
    device: torch.device,
    n: int,
    d: int,
    want: Any,
    flops_counted: str,
) -> dict[str, Any]:
    """Time ``run`` (the (D, D) augmented Gram of ``n`` tokens, ``D = 2 d + 3``) after one warm-up call (Triton
    compiles, cuBLAS makes its handle), the median of ``repeats``, and its largest relative error
    against ``want``. ``flops_counted``: ``"upper"`` (``n D^2 / 2`` multiply-adds, what the
    Triton kernel computes) or ``"full"`` (``n D^2``, what a cuBLAS ``W^T W`` computes); 2 FLOPs
    each."""
    G = run()
    times = []
    for _ in range(repeats):
        seconds, G = common.timed(run, device)
        times.append(seconds)
    errs = relative_errors(gram_to_stats(G, d, d), want)  # reads the upper triangle, as analyze
    worst = max(errs, key=errs.get)
    median = sorted(times)[len(times) // 2]
    D = 2 * d + 3
    flops = 2 * n * D * D / (2 if flops_counted == "upper" else 1)
    return {
        "ms": round(median * 1e3, 3), "tflops": round(flops / median / 1e12, 2),
        "flops_counted": flops_counted, "max_rel_err": errs[worst], "worst_field": worst,
        "rel_err_xty": errs["xty"],
    }  # fmt: skip


def cublas_runs(
    x: torch.Tensor, y: torch.Tensor, rx: torch.Tensor, ry: torch.Tensor
) -> dict[str, Callable[[], torch.Tensor]]:
    """The same block's Gram through torch's matmul (cuBLAS on a GPU).

    ``cublas-fp64`` is the library's own ``torch`` path, what ``fastmid analyze`` runs on a GPU
    under ``FASTMID_KERNELS=off`` (:func:`prepare_cka_block` and :func:`accumulate_cka_block`
    into a fresh running Gram; on a CPU that is BLAS ``dsyrk``, upper triangle only). Hopper has float64 tensor cores (about 67 TFLOP/s dense on an H100
    SXM, NVIDIA's data sheet), so the exact path may beat the fp32 Triton kernel. ``cublas-fp32``
    is the same product on float32 rows (:func:`augmented_rows`), measured with TF32 off (IEEE
    products): no library path, a candidate for one.
    """
    d1, d2 = x.shape[1], y.shape[1]

    def fp64() -> torch.Tensor:
        gram = new_running_gram(d1, d2, x.device)
        accumulate_cka_block(prepare_cka_block(x, y, rx, ry, backend="torch"), gram)
        return gram

    def fp32() -> torch.Tensor:
        W = augmented_rows(x, y, rx, ry, torch.float32)
        return W.T @ W

    return {"cublas-fp64": fp64, "cublas-fp32": fp32}


def spectra_timing(device: torch.device, small: bool) -> dict[str, float]:
    """Milliseconds for the eigenvalues behind matrix entropy at the 8B analysis's size: 32
    layers x 2 models of 4 prompts' (128, 128) Gram matrices, as ``measure_layers`` asks for
    them (64 calls of a batch of 4) and as one batched call, on the device and in float64 on
    the host's CPU."""
    calls, batch, t = (4, 2, 8) if small else (64, 4, 128)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(calls * batch, t, 2 * t, generator=g)
    gram = z @ z.transpose(1, 2)
    on_dev = gram.to(device)

    def ms_after_warm_up(fn: Callable[[], Any]) -> float:
        fn()  # warm-up (cusolver handles, workspace)
        return round(common.timed(fn, device)[0] * 1e3, 2)

    return {
        "shape": f"{calls} calls x ({batch}, {t}, {t})",
        "device_per_call_ms": ms_after_warm_up(
            lambda: [
                torch.linalg.eigvalsh(on_dev[i * batch : (i + 1) * batch]) for i in range(calls)
            ]
        ),
        "device_one_batched_call_ms": ms_after_warm_up(lambda: torch.linalg.eigvalsh(on_dev)),
        "cpu_float64_one_call_ms": ms_after_warm_up(lambda: torch.linalg.eigvalsh(gram.double())),
        "cpu_threads": torch.get_num_threads(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1920, help="tokens in the block")
    p.add_argument("--d", type=int, default=4096, help="width of each model")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    device = torch.device("cpu" if a.smoke else "cuda")
    n, d = (40, 24) if a.smoke else (a.n, a.d)
    x, y = activations(n, d, device)
    rx, ry = x[: max(1, n // 4)].float().mean(0), y[: max(1, n // 4)].float().mean(0)
    want = cka_block_stats_reference(x.double(), y.double(), rx.double(), ry.double())
    rows = []
    repeats = 1 if a.smoke else a.repeats
    for precision, block_n, block_d in VARIANTS:
        run = functools.partial(augmented_gram_triton, x, y, rx, ry, block_n, block_d, precision)
        row = {"precision": precision, "block_n": block_n, "block_d": block_d,
               **measure(run, repeats, device, n, d, want, "upper")}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # IEEE fp32 products for cublas-fp32
    try:
        for name, run in cublas_runs(x, y, rx, ry).items():
            row = {"precision": name, "block_n": None, "block_d": None,
                   **measure(run, repeats, device, n, d, want, "full")}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    spectra = spectra_timing(device, small=a.smoke)
    print(json.dumps(spectra), flush=True)
    result = {
        "spectra": spectra,
        "command": "python bench/gpu/cka_precision.py" + (" --smoke" if a.smoke else ""),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__,
        "n": n,
        "d": d,
        "rows": rows,
    }
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
