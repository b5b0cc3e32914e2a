"""Worker of ``test_frozen_weights_are_never_reduced`` (run by torchrun, 2 processes, gloo).

Builds a tiny random Llama of 5 layers with the default band (layers 1..3), shards it with
:func:`fastmid.train.distributed.shard_model`, runs two steps of :func:`train_step` with 2
accumulated micro-batches per rank, and counts FSDP2's reduce-scatter calls per step by wrapping
``torch.distributed.reduce_scatter_single`` (what FSDP2's default reduce-scatter calls). Rank 0
writes what it saw to the JSON file named by the first argument.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny.py

from tiny import tiny_model

from fastmid.models.band import BandPlan, apply_band, install_execution_policy
from fastmid.train.distributed import init_from_env, shard_model, shutdown
from fastmid.train.optim import build_optimizer, build_scheduler
from fastmid.train.recipe import train_step


def main(out: Path) -> None:
    ctx = init_from_env()
    assert ctx is not None and ctx.world_size == 2
    model = tiny_model("llama", seed=0, num_hidden_layers=5)
    plan = BandPlan.parse(5, None, None, None, 0)
    apply_band(model, plan)
    install_execution_policy(model, plan)
    band = [n for n, p in model.named_parameters() if p.requires_grad]
    shard_model(model, ctx, "fp32")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(named, "adamw", 1e-3, 0.0)
    scheduler = build_scheduler(optimizer, 2, 0, "constant", 0.0)

    calls = [0]
    original = dist.reduce_scatter_single

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    dist.reduce_scatter_single = counting
    gen = torch.Generator().manual_seed(ctx.rank)
    per_step = []
    model.train()
    for _ in range(2):
        batches = []
        for _ in range(2):
            ids = torch.randint(0, 64, (2, 9), generator=gen)
            batches.append(
                {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
            )
        calls[0] = 0
        train_step(model, batches, optimizer, scheduler, [p for _, p in named], 1.0, dist=ctx)
        per_step.append(calls[0])
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    if ctx.is_main:
        result = {
            "reduce_scatters_per_step": per_step,
            "band": sorted(band),
            "band_with_grad": sorted(with_grad & set(band)),
            "frozen_with_grad": sorted(with_grad - set(band)),
            "grad_types": sorted({type(p.grad).__name__ for _, p in named if p.grad is not None}),
        }
        out.write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
