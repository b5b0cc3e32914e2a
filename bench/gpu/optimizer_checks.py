"""Exactness checks of the optimizer placements that only a GPU can run (issue 14), for the
prepared GPU run.

    python bench/gpu/optimizer_checks.py [--device cuda] [--steps 3] [--out bench/results]

A random Llama (hidden 256, 4 layers, band = layers 1..2) trains ``--steps`` steps on the same
random batches three ways, each from the same initial weights:

* ``ordinary``: one optimizer over the band, ``optimizer.step()`` after backward;
* ``offload``: torchao's ``CPUOffloadOptimizer`` around the same optimizer class
  (``--optimizer-offload``; CUDA only, skipped elsewhere);
* ``in_backward``: :class:`fastmid.train.optim.OptimizerInBackward` (``--optimizer-in-backward``).

For each optimizer (``adamw``, ``adamw8bit``, ``ao_adamw8bit``) it reports the largest relative
difference of the band weights to ``ordinary`` (expected: 0 up to float rounding, < 1e-6) and the
gradient bytes alive at once. ``--device cpu`` smoke-tests the script (offload is skipped there).
Writes ``gpu_optimizer_checks.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

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


def band(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-30)) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "results"))
    args = parser.parse_args()
    quiet_torchao()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 1024, (2, 64), generator=gen).to(device) for _ in range(args.steps)]
    base = tiny_llama(device)
    rows = []
    for optim in ("adamw", "adamw8bit", "ao_adamw8bit"):
        arms: dict[str, dict] = {}
        ref_model = copy.deepcopy(base)
        named = [(n, p) for n, p in ref_model.named_parameters() if p.requires_grad]
        t0 = time.perf_counter()
        peak = run(ref_model, build_optimizer(named, optim, 1e-3), batches)
        arms["ordinary"] = {"grad_bytes": peak, "seconds": time.perf_counter() - t0}
        reference = band(ref_model)
        for arm in ("offload", "in_backward"):
            if arm == "offload" and device.type != "cuda":
                arms[arm] = {"skipped": "needs CUDA"}
                continue
            model = copy.deepcopy(base)
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            if arm == "offload":
                opt = build_optimizer(named, optim, 1e-3, offload=True)
            else:
                opt = OptimizerInBackward(named, lambda one, o=optim: build_optimizer(one, o, 1e-3))
            t0 = time.perf_counter()
            peak = run(model, opt, batches)
            arms[arm] = {
                "grad_bytes": peak,
                "seconds": time.perf_counter() - t0,
                "max_rel_diff_vs_ordinary": max_rel_diff(reference, band(model)),
            }
        rows.append({"optim": optim, "arms": arms})
        print(json.dumps(rows[-1]), flush=True)
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
        "| optimizer | arm | max relative weight difference | gradient bytes at once |",
        "| --- | --- | ---: | ---: |",
    ]
    for row in rows:
        for arm, data in row["arms"].items():
            if "skipped" in data:
                lines.append(f"| {row['optim']} | {arm} | skipped: {data['skipped']} | |")
                continue
            diff = data.get("max_rel_diff_vs_ordinary")
            cell = "(reference)" if diff is None else f"{diff:.2e}"
            lines.append(f"| {row['optim']} | {arm} | {cell} | {data['grad_bytes']:,} |")
    (out / "gpu_optimizer_checks.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
