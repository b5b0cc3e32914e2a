"""Case 6 of the prepared GPU run: ``fastmid analyze`` on a GPU (issue 24).

    python bench/gpu/analyze_gpu.py [--results-json R.json] [--smoke]

Two random models of the Llama-3.1-8B shape in bf16 on the GPU (``fit_32b.materialize``; the
"tuned" one is the base plus 1% noise on every decoder layer: the cost does not depend on the
weights), random token batches (``--batches`` x ``--batch-size`` x ``--seq-len``).

* **Speed**: :func:`fastmid.analysis.analyze.measure_layers` (what ``fastmid analyze`` runs: both
  forwards with hooks, streaming CKA through the Triton kernel, pooled cosine, matrix entropy
  and effective rank of both models on every layer) against a bare forward of both decoder
  stacks, interleaved batch by batch as ``bench/analyze_speed.py`` does (the bare forward of a
  batch is timed right before the analysis processes it; CUDA synchronized). Reported:
  ``overhead_ratio`` = analysis time / bare time (goal: at most 1.1). The same timing again
  with CKA on the float64 torch path (``backend="torch"``: cuBLAS on a GPU, what
  ``FASTMID_KERNELS=off`` selects) under ``cka_torch_fp64``, with its largest CKA difference from
  the first pass.
* **Values**: for two layers (middle and last) of the first batch, the streaming CKA on the GPU
  (Triton, fp32 IEEE products, float64 running sums) against float64 on the CPU (BLAS) for the
  same captured activations: the largest absolute difference of debiased and biased CKA.

``--smoke``: a tiny model of the same architecture on the CPU, the "GPU" side through the Triton
interpreter.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fit_32b as fit  # noqa: E402
import gpu_common as common  # noqa: E402
import gpu_results  # noqa: E402
import torch  # noqa: E402

from fastmid.analysis.analyze import measure_layers, token_mask  # noqa: E402
from fastmid.analysis.capture import layer_outputs  # noqa: E402
from fastmid.analysis.cka import StreamingCKA  # noqa: E402
from fastmid.analysis.metrics import PooledCosine, SpectralMeans  # noqa: E402
from fastmid.models.families import backbone, decoder_layers  # noqa: E402
from fastmid.models.loading import load_config, quiet_torchao  # noqa: E402


@torch.no_grad()
def bare_forward(models: list[torch.nn.Module], batch: dict[str, torch.Tensor]) -> None:
    for m in models:
        backbone(m)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(common.CONFIGS / "llama-3.1-8b.json"))
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None, help="default 4 (2 with --smoke)")
    p.add_argument("--seq-len", type=int, default=None, help="default 512 (16 with --smoke)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--results-json", default=None)
    p.add_argument("--results-case", default="analyze")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile", action="store_true",
        help="also time each part of the per-layer work on one batch (captures, finiteness "
        "checks, spectra, CKA prepare and accumulate, pooled cosine) and record torch.profiler's "
        "top operators of one measure_layers batch",
    )  # fmt: skip
    a = p.parse_args()
    quiet_torchao()
    device = torch.device("cpu" if a.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("analyze_gpu: no CUDA device (use --smoke on a CPU)")
    n_batches = a.batches
    bsz = a.batch_size or (2 if a.smoke else 4)
    seq = a.seq_len or (16 if a.smoke else 512)

    def out(results: dict) -> None:
        gpu_results.merge_case(a.results_json, a.results_case, results)

    t0 = time.perf_counter()
    config_path = a.config
    if a.smoke:
        config_path = str(common.smoke_config(a.config, common.scratch_dir()))
    config = load_config(config_path)
    dtype = torch.float32 if a.smoke else torch.bfloat16
    base, _ = fit.materialize(config, dtype, device, a.seed)
    tuned, _ = fit.materialize(config, dtype, device, a.seed)
    gen = torch.Generator(device=device).manual_seed(a.seed + 7)
    with torch.no_grad():
        for q in decoder_layers(tuned).parameters():
            q.add_(0.01 * q.float().std().to(q.dtype) * torch.randn(
                q.shape, generator=gen, device=device, dtype=q.dtype))  # fmt: skip
    base.eval()
    tuned.eval()
    cpu_gen = torch.Generator().manual_seed(a.seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, int(config.vocab_size), (bsz, seq), generator=cpu_gen)
        mask = torch.ones_like(ids)
        mask[-1, seq - seq // 4 :] = 0  # some right padding, as real batches have
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    n_layers = len(decoder_layers(base))
    shape = (f"{config.model_type}, {n_layers} layers, hidden {config.hidden_size}, "
             f"{str(dtype).removeprefix('torch.')}; {n_batches} batches of {bsz} x {seq}")  # fmt: skip
    out(
        {"model_shape": shape, "device": str(device), "setup_s": round(time.perf_counter() - t0, 1)}
    )

    timing, rows = time_analysis(base, tuned, batches, device, "auto")
    out({**timing, "cka_debiased_first_layers": [round(r.cka_debiased, 6) for r in rows[:3]],
         **common.peaks(device)})  # fmt: skip
    # The same analysis with CKA on the float64 torch path (cuBLAS on a GPU; what
    # FASTMID_KERNELS=off selects): exact sums, and Hopper's float64 tensor cores may make it
    # faster than the fp32 Triton kernel.
    fp64, rows64 = time_analysis(base, tuned, batches, device, "torch")
    fp64["cka_max_abs_diff_vs_auto"] = max(
        abs(r.cka_debiased - q.cka_debiased) for r, q in zip(rows, rows64, strict=True)
    )
    out({"cka_torch_fp64": fp64})

    # values: the device path against float64 on the CPU, same activations
    layers = sorted({n_layers // 2, n_layers - 1})
    batch = batches[0]
    mask = batch["attention_mask"].bool()
    hb = layer_outputs(base, batch["input_ids"], batch["attention_mask"], layers)
    ht = layer_outputs(tuned, batch["input_ids"], batch["attention_mask"], layers)
    diffs = {}
    for i in layers:
        on_dev = StreamingCKA(f"layer {i} device", backend="triton")
        on_cpu = StreamingCKA(f"layer {i} cpu", backend="torch")
        on_dev.update(hb[i], ht[i], mask)
        on_cpu.update(hb[i].cpu().double(), ht[i].cpu().double(), mask.cpu())
        r_dev, r_cpu = on_dev.compute(), on_cpu.compute()
        diffs[str(i)] = {
            "device_debiased": r_dev.debiased, "cpu_float64_debiased": r_cpu.debiased,
            "device_biased": r_dev.biased, "cpu_float64_biased": r_cpu.biased,
            "abs_diff": max(abs(r_dev.debiased - r_cpu.debiased), abs(r_dev.biased - r_cpu.biased)),
        }  # fmt: skip
    out({
        "cka_layers": diffs,
        "cka_max_abs_diff": max(d["abs_diff"] for d in diffs.values()),
        "wall_s": round(time.perf_counter() - t0, 1),
    })  # fmt: skip
    if a.profile:
        out({"breakdown": breakdown(base, tuned, batch, n_layers, device)})
        out({"profile_top": profile_top(base, tuned, batch, device)})
        out({"wall_s": round(time.perf_counter() - t0, 1)})
    return 0


def time_analysis(
    base: torch.nn.Module,
    tuned: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    backend: str,
) -> tuple[dict[str, object], list]:
    """measure_layers over ``batches`` with CKA on ``backend``, against a bare forward of both
    models, interleaved batch by batch (the bare forward of a batch timed right before the
    analysis processes it), after one warm-up batch of each. Returns the timing fields and the
    per-layer rows."""
    bare_forward([base, tuned], batches[0])  # warm-up: kernels compile, cuBLAS settles
    measure_layers(base, tuned, batches[:1], backend=backend)
    common.sync(device)

    bare_s: list[float] = []
    analysis_s: list[float] = []
    last = [0.0]

    def timed_bare(batch: dict[str, torch.Tensor]) -> float:
        return common.timed(lambda: bare_forward([base, tuned], batch), device)[0]

    def between(done: int, total: int) -> None:
        common.sync(device)
        analysis_s.append(time.perf_counter() - last[0])
        if done < total:
            bare_s.append(timed_bare(batches[done]))
        last[0] = time.perf_counter()

    bare_s.append(timed_bare(batches[0]))
    last[0] = time.perf_counter()
    rows, n_tokens = measure_layers(base, tuned, batches, on_batch=between, backend=backend)
    common.sync(device)
    analysis_s[-1] += time.perf_counter() - last[0]  # the final computation from the sums
    bare, analysis = sum(bare_s), sum(analysis_s)
    print(f"analyze ({backend}): {analysis:.3f} s vs bare {bare:.3f} s ({analysis / bare:.2f}x)",
          flush=True)  # fmt: skip
    return {
        "cka_backend": backend, "tokens": n_tokens, "bare_s": round(bare, 4),
        "analysis_s": round(analysis, 4),
        "bare_s_per_batch": [round(x, 4) for x in bare_s],
        "analysis_s_per_batch": [round(x, 4) for x in analysis_s],
        "overhead_ratio": round(analysis / bare, 4) if bare > 0 else None,
        "bare_tokens_per_s": round(n_tokens / bare, 1) if bare > 0 else None,
        "analysis_tokens_per_s": round(n_tokens / analysis, 1) if analysis > 0 else None,
    }, rows  # fmt: skip


def breakdown(
    base: torch.nn.Module,
    tuned: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    n_layers: int,
    device: torch.device,
) -> dict[str, float]:
    """Seconds per batch of each part of measure_layers' work, every layer, one batch.

    Each part runs alone over all layers between two synchronizations, so the parts add up to
    about what measure_layers spends (it runs them in this order, layer by layer).
    """
    layers = list(range(n_layers))
    mask = token_mask(batch["attention_mask"], False)
    times: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], object]) -> object:
        seconds, result = common.timed(fn, device)
        times[name] = round(times.get(name, 0.0) + seconds, 4)
        return result

    timed("bare_forward_both", lambda: bare_forward([base, tuned], batch))
    hb = timed("capture_base", lambda: layer_outputs(
        base, batch["input_ids"], batch["attention_mask"], layers))  # fmt: skip
    ht = timed("capture_tuned", lambda: layer_outputs(
        tuned, batch["input_ids"], batch["attention_mask"], layers))  # fmt: skip
    assert isinstance(hb, dict) and isinstance(ht, dict)
    m = mask.to(device)
    timed("finite_checks", lambda: [bool(torch.isfinite(h).all()) for d in (hb, ht)
                                     for h in d.values()])  # fmt: skip
    spectra = [SpectralMeans() for _ in range(2 * n_layers)]
    timed("spectra_both", lambda: [spectra[2 * i + k].update(h[i], m)
                                    for i in layers for k, h in enumerate((hb, ht))])  # fmt: skip
    ckas = [StreamingCKA(f"layer {i}") for i in layers]
    blocks = timed("cka_prepare", lambda: [ckas[i].prepare(hb[i], ht[i], m) for i in layers])
    assert isinstance(blocks, list)
    timed("cka_accumulate", lambda: [ckas[i].accumulate(blocks[i]) for i in layers])
    cos = PooledCosine()
    timed("pooled_cosine", lambda: [cos.update(hb[i], ht[i], m) for i in layers])
    print(f"analyze breakdown (s per batch): {times}", flush=True)
    return times


def profile_top(
    base: torch.nn.Module,
    tuned: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    rows: int = 20,
) -> list[dict[str, object]]:
    """torch.profiler over one measure_layers batch: the operators with the most self time on
    the device (CUDA) or, on a CPU, on the host."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        measure_layers(base, tuned, [batch])
        common.sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    top = [
        {
            "op": e.key[:80], "calls": e.count,
            "self_device_ms": round(getattr(e, "self_device_time_total", 0.0) / 1e3, 2),
            "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
        }
        for e in events[:rows]
    ]  # fmt: skip
    for row in top:
        print(f"  {row}", flush=True)
    return top


if __name__ == "__main__":
    sys.exit(main())
