"""Worker of ``test_frozen_weights_are_never_reduced`` (run by torchrun, 2 processes, gloo).

Builds a tiny random Llama of 5 layers with the default band (layers 1..3), shards it with
:func:`fastmid.train.distributed.shard_model`, runs two steps of :func:`train_step` with 2
accumulated micro-batches per rank, and counts FSDP2's reduce-scatter calls per step by wrapping
``torch.distributed.reduce_scatter_single`` (what FSDP2's default reduce-scatter calls). Rank 0
writes what it saw to the JSON file named by the first argument. With a second argument ``nan``
it runs :func:`nan_on_one_rank` instead.
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


def nan_on_one_rank(out: Path) -> None:
    """Rank 1's forward returns NaN hidden states: both ranks must stop in the same step with a
    NonFiniteStep (rank 1 naming its micro-batch, rank 0 naming the other rank), and neither may
    hang in a collective. Each rank writes what it raised to ``out.<rank>``."""
    from fastmid.train.recipe import NonFiniteStep

    ctx = init_from_env()
    assert ctx is not None
    model = tiny_model("llama", seed=0, num_hidden_layers=5)
    plan = BandPlan.parse(5, None, None, None, 0)
    apply_band(model, plan)
    install_execution_policy(model, plan)
    if ctx.rank == 1:
        model.model.layers[3].register_forward_hook(
            lambda m, i, o: (
                (o[0] * float("nan"), *o[1:]) if isinstance(o, tuple) else o * float("nan")
            )
        )
    shard_model(model, ctx, "fp32")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(named, "adamw", 1e-3, 0.0)
    scheduler = build_scheduler(optimizer, 2, 0, "constant", 0.0)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(ctx.rank))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    before = [p.detach().clone() for _, p in named]
    try:
        train_step(
            model, [batch, batch], optimizer, scheduler, [p for _, p in named], 1.0, dist=ctx
        )
        raised = None
    except NonFiniteStep as exc:
        raised = {"what": exc.what, "micro_batch": exc.micro_batch, "stepped": exc.stepped}
    unchanged = all(torch.equal(b, p.detach()) for b, (_, p) in zip(before, named, strict=True))
    Path(f"{out}.{ctx.rank}").write_text(json.dumps({"raised": raised, "unchanged": unchanged}))
    ctx.barrier()  # both ranks are done with the step's collectives before the group goes
    shutdown()


if __name__ == "__main__":
    if sys.argv[2:] == ["nan"]:
        nan_on_one_rank(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
