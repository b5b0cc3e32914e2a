"""Case 5 of the prepared GPU run: FSDP2 at world size 1 with NCCL on the 8B shape (issue 24).

    python bench/gpu/fsdp2_8b.py [--results-json R.json] [--steps 3] [--smoke]

The code path of ``fastmid train --nproc N`` on one GPU, not its scaling: a process group of one
rank (NCCL on CUDA, gloo with ``--smoke``; an in-process ``HashStore``, so no port and no
``torchrun``), a :class:`fastmid.train.distributed.DistContext` for it, the Llama-3.1-8B-shaped
random model built on the GPU (``fit_32b.materialize``), band, precision, execution policy and
kernels set up as ``MidBlockRecipe.setup`` does, then
:func:`fastmid.train.distributed.shard_model` (``fully_shard`` per decoder layer, embeddings, the
root with the final norm and ``lm_head``; the loss routed through the root's forward) and
``--steps`` steps of ``fastmid.train.recipe.train_step(..., dist=ctx)`` (global token count by
all-reduce, one reduce-scatter per step, global-norm clip over DTensor shards).

Mode: ``--precision bf16-master`` (FSDP2 gathers the fp32 band in bf16, reduces in fp32), seq
4096, activation checkpointing on, ``--optim adamw`` by default: torch's AdamW on DTensor
shards; ``ao_adamw8bit`` (what ``--optim auto`` picks with several processes) compiles its step
for every parameter shape first, which does not fit this case's time box; pass
``--optim ao_adamw8bit`` to measure it. Reported per step: time, loss, grad norm, tokens/s, and
peak memory; the FSDP units. Merged into the results file after every step.

``--smoke``: a tiny model of the same architecture on the CPU with gloo, seq 64.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fit_32b as fit  # noqa: E402
import gpu_common as common  # noqa: E402
import gpu_results  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from fastmid.kernels import use_backend  # noqa: E402

from fastmid.models.band import BandPlan, apply_band, install_execution_policy  # noqa: E402
from fastmid.models.families import decoder_layers  # noqa: E402
from fastmid.models.loading import load_config, quiet_torchao  # noqa: E402
from fastmid.models.patching import patch_model  # noqa: E402
from fastmid.models.precision import PrecisionPolicy  # noqa: E402
from fastmid.train.distributed import DistContext, shard_model  # noqa: E402
from fastmid.train.optim import build_optimizer, build_scheduler  # noqa: E402
from fastmid.train.recipe import train_step  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(common.CONFIGS / "llama-3.1-8b.json"))
    p.add_argument("--seq-len", type=int, default=None, help="default 4096 (64 with --smoke)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", default="bf16-master", choices=("bf16-master", "fp32"))
    p.add_argument("--optim", default="adamw", choices=("adamw", "ao_adamw8bit", "ao_adamw4bit"))
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--results-json", default=None)
    p.add_argument("--results-case", default="fsdp2")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    quiet_torchao()
    cuda = not a.smoke
    if cuda and not torch.cuda.is_available():
        raise SystemExit("fsdp2_8b: no CUDA device (use --smoke on a CPU)")
    seq = a.seq_len or (64 if a.smoke else 4096)

    def out(results: dict) -> None:
        gpu_results.merge_case(a.results_json, a.results_case, results)

    backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(0)
    t0 = time.perf_counter()
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    ctx = DistContext(rank=0, local_rank=0, world_size=1, backend=backend, device=device)
    out({"backend": backend, "world_size": 1, "device": str(device), "init_s":
         round(time.perf_counter() - t0, 2)})  # fmt: skip
    try:
        config_path = a.config
        if a.smoke:
            config_path = str(common.smoke_config(a.config, common.scratch_dir()))
        config = load_config(config_path)
        policy = PrecisionPolicy.from_name(a.precision)
        model, _ = fit.materialize(config, policy.weight_dtype, device, a.seed)
        plan = BandPlan.parse(len(decoder_layers(model)), "0.2:0.8", None, None, a.seed)
        trainable = apply_band(model, plan)
        policy.cast_trainable(trainable)
        names = {id(p): n for n, p in model.named_parameters()}
        trainable_names = [names[id(p)] for p in trainable]
        install_execution_policy(model, plan, grad_checkpointing=a.grad_checkpointing)
        report = patch_model(model, True)
        fused_loss = report.loss == "fused_linear_cross_entropy"
        common.reset_peaks(device)
        units = shard_model(model, ctx, a.precision)
        params = dict(model.named_parameters())
        trainable = [params[n] for n in trainable_names]
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = build_optimizer(named, a.optim, 1e-5, 0.0)
        scheduler = build_scheduler(optimizer, 10_000, 0, "constant")
        model.train()
        batch, _ = common.plain_batch(1, seq, int(config.vocab_size), device, a.seed)
        out({
            "mode": {"precision": a.precision, "optim": a.optim, "seq_len": seq,
                     "grad_checkpointing": a.grad_checkpointing, "kernels": report.loss},
            "units": len(units), "first_units": [*units[:3], "...", *units[-2:]],
            "band": plan.describe(), "setup_s": round(time.perf_counter() - t0, 1),
            **{f"after_setup_{k}": v for k, v in common.peaks(device).items()},
        })  # fmt: skip
        steps = []
        for k in range(a.steps):
            common.sync(device)
            ts = time.perf_counter()
            with use_backend("triton") if a.smoke else contextlib.nullcontext():
                result = train_step(
                    model, [batch], optimizer, scheduler, trainable, 1.0, fused_loss, policy, ctx
                )
            common.sync(device)
            dt = time.perf_counter() - ts
            steps.append({
                "step": k + 1, "loss": result.loss, "grad_norm": result.grad_norm,
                "step_time_s": round(dt, 3), "tokens_per_s": round(result.tokens / dt, 1),
                **common.peaks(device),
            })  # fmt: skip
            out({"steps": steps})
            print(f"fsdp2 step {k + 1}: loss {result.loss:.4f}, {dt:.2f} s", flush=True)
        later = steps[1:] or steps
        mean = sum(s["step_time_s"] for s in later) / len(later)
        arm = {
            "arm": f"fsdp2 world 1 ({backend}, {a.optim}, checkpointing "
            f"{'on' if a.grad_checkpointing else 'off'})",
            "status": "ok", "step_time_s": round(mean, 3),
            "tokens_per_s": round(steps[-1]["tokens_per_s"], 1), **common.peaks(device),
        }  # fmt: skip
        out({"arms": {"fsdp2": arm}, "wall_s": round(time.perf_counter() - t0, 1)})
        # The same weights (seeded init) and batch as step_8b.py's first step: the first loss
        # should agree up to bf16 rounding (its first arm runs kernels on, no checkpointing).
        first = (gpu_results.load(Path(a.results_json)) if a.results_json else {}).get("cases", {})
        arms8 = ((first.get("step_8b") or {}).get("results") or {}).get("arms") or {}
        losses = (arms8.get("default") or {}).get("losses") or []
        if losses:
            out({"first_loss_vs_step_8b": {"fsdp2": steps[0]["loss"], "step_8b_default": losses[0],
                 "abs_diff": abs(steps[0]["loss"] - losses[0])}})  # fmt: skip
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
