"""Exactness checks of the optimizer placements that only a GPU can run (issue 14), for the
prepared GPU run.

    python bench/gpu/optimizer_checks.py [--device cuda] [--steps 3] [--out bench/results]

A random Llama (hidden 256, 4 layers, band = layers 1..2) trains ``--steps`` steps on the same
random batches three ways, each from the same initial weights:

* ``ordinary``: one optimizer over the band, ``optimizer.step()`` after backward;
* ``offload``: torchao's ``CPUOffloadOptimizer`` around the same optimizer class
  (``--optimizer-offload``; CUDA only, skipped elsewhere);
* ``in_backward``: :class:`fastmid.train.optim.OptimizerInBackward` (``--optimizer-in-backward``).

For each optimizer (``--optims``, default ``adamw``, ``adamw8bit``, ``ao_adamw8bit``) it reports
the largest relative difference of the band weights to ``ordinary`` (expected: 0 up to float
rounding, < 1e-6), the gradient bytes alive at once and, on CUDA, each arm's peak GPU memory above
what was allocated before it (``torch.cuda.max_memory_allocated``: weights copy excluded,
gradients, optimizer states on the GPU and the step's temporaries included), so offload's saving
is a measured figure. ``--device cpu`` smoke-tests the script (offload is skipped there). Writes
``gpu_optimizer_checks.json`` and ``.md`` under ``--out``; ``--results-json`` also merges each
optimizer's rows into the prepared GPU run's results file as they finish
(``bench/gpu/run_all.sh``). torchao's optimizers compile their step first (seconds per parameter
shape; on the host too for offload), so the time-boxed run leaves ``ao_adamw8bit`` out.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_results

from fastmid.models.loading import quiet_torchao
from fastmid.models.loss import causal_lm_loss_sum
from fastmid.train.optim import OptimizerInBackward, build_optimizer


def tiny_llama(device: torch.device) -> torch.nn.Module:
    """A random 4-layer Llama with layers 1..2 trainable (the band)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        vocab_size=1024,
    )
    model = LlamaForCausalLM(config).to(device)
    for name, p in model.named_parameters():
        p.requires_grad = ".layers.1." in name or ".layers.2." in name
    return model


def run(model, optimizer, batches) -> int:
    """Train on ``batches``; return the most gradient bytes alive at once."""
    peak = 0
    for input_ids in batches:
        labels = input_ids.clone()
        if isinstance(optimizer, OptimizerInBackward):
            optimizer.begin_step()
        else:
            optimizer.zero_grad(set_to_none=True)
        loss, n = causal_lm_loss_sum(model, input_ids, None, labels)
        (loss / n).backward()
        if isinstance(optimizer, OptimizerInBackward):
            optimizer.end_step()
            peak = max(peak, optimizer.grad_bytes_peak)
        else:
            held = [p.grad for p in model.parameters() if p.grad is not None]
            peak = max(peak, sum(g.untyped_storage().nbytes() for g in held))
            optimizer.step()
    if model.lm_head.weight.is_cuda:
        torch.cuda.synchronize()
    return peak


def start_peak(device: torch.device) -> int:
    """Reset CUDA's peak counter; returns the bytes allocated now (0 on CPU)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_extra(device: torch.device, before: int) -> int | None:
    """Peak CUDA bytes allocated since :func:`start_peak` above ``before`` (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def band(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-30)) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "results"))
    parser.add_argument("--optims", default="adamw,adamw8bit,ao_adamw8bit")
    parser.add_argument("--results-json", default=None, help="bench/gpu/run_all.sh's results")
    parser.add_argument("--results-case", default="optimizer_offload")
    args = parser.parse_args()
    quiet_torchao()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 1024, (2, 64), generator=gen).to(device) for _ in range(args.steps)]
    base = tiny_llama(device)
    rows = []
    gpu_results.merge_case(
        args.results_json, args.results_case,
        {"device": str(device), "steps": args.steps, "model": "Llama hidden 256, 4 layers, "
         "band layers 1..2, batches 2 x 64"},
    )  # fmt: skip
    for optim in [o for o in args.optims.split(",") if o]:
        arms: dict[str, dict] = {}
        ref_model = copy.deepcopy(base)
        named = [(n, p) for n, p in ref_model.named_parameters() if p.requires_grad]
        t0 = time.perf_counter()
        before = start_peak(device)
        peak = run(ref_model, build_optimizer(named, optim, 1e-3), batches)
        arms["ordinary"] = {
            "grad_bytes": peak, "seconds": time.perf_counter() - t0,
            "peak_extra_bytes": peak_extra(device, before),
        }  # fmt: skip
        reference = band(ref_model)
        for arm in ("offload", "in_backward"):
            if arm == "offload" and device.type != "cuda":
                arms[arm] = {"skipped": "needs CUDA"}
                continue
            model = copy.deepcopy(base)
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            t0 = time.perf_counter()
            before = start_peak(device)
            try:
                if arm == "offload":
                    opt = build_optimizer(named, optim, 1e-3, offload=True)
                else:
                    opt = OptimizerInBackward(
                        named, lambda one, o=optim: build_optimizer(one, o, 1e-3)
                    )
                peak = run(model, opt, batches)
            except Exception as exc:  # one arm failing must not lose the others
                arms[arm] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                continue
            arms[arm] = {
                "grad_bytes": peak,
                "seconds": time.perf_counter() - t0,
                "peak_extra_bytes": peak_extra(device, before),
                "max_rel_diff_vs_ordinary": max_rel_diff(reference, band(model)),
            }
        rows.append({"optim": optim, "arms": arms})
        print(json.dumps(rows[-1]), flush=True)
        gpu_results.merge_case(args.results_json, args.results_case, {"rows": rows})
    result = {
        "command": "python bench/gpu/optimizer_checks.py --device " + args.device,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "steps": args.steps,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_optimizer_checks.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Optimizer placements vs the ordinary step ({result['device']})",
        "",
        f"`{result['command']}`, {args.steps} steps, torch {torch.__version__}.",
        "",
        "| optimizer | arm | max relative weight difference | gradient bytes at once | "
        "peak GPU bytes above the start |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        for arm, data in row["arms"].items():
            if "skipped" in data or "error" in data:
                why = f"skipped: {data['skipped']}" if "skipped" in data else data["error"]
                lines.append(f"| {row['optim']} | {arm} | {why} | | |")
                continue
            diff = data.get("max_rel_diff_vs_ordinary")
            cell = "(reference)" if diff is None else f"{diff:.2e}"
            extra = data.get("peak_extra_bytes")
            lines.append(
                f"| {row['optim']} | {arm} | {cell} | {data['grad_bytes']:,} | "
                f"{'-' if extra is None else f'{extra:,}'} |"
            )
    (out / "gpu_optimizer_checks.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
