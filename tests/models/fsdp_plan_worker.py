"""One rank of ``test_plan_fsdp_measured.py``: FSDP2 on CPU (gloo), one training step, and what
this rank holds, measured with torch's own storage accounting.

Run by ``torch.distributed.run`` (``WORLD_SIZE``, ``RANK``... in the environment), never
collected by pytest (its name does not start with ``test_``)::

    python -m torch.distributed.run --standalone --nproc-per-node 2 fsdp_plan_worker.py \
        CONFIG_JSON OUT_DIR CASES_JSON

``CASES_JSON`` is a list of ``{"name", "precision", "optim", "layers", "grad_accum",
"seq_len", "micro_batch"}``. For each case the rank builds the tiny model of ``CONFIG_JSON`` (seed
0, the recipe's setup: weights in the precision's dtype, ``apply_band``, ``cast_trainable``,
``install_execution_policy`` with checkpointing, then
:func:`fastmid.train.distributed.shard_model` and :func:`fastmid.train.optim.build_optimizer`),
runs ``grad_accum`` micro-batches (all but the last without gradient sync, as the recipe does) and
one optimizer step, and writes ``OUT_DIR/<name>.rank<R>.json`` with, in bytes:

* ``parameter_shards``: distinct storages of every parameter's local shard (``to_local()``),
  after the step;
* ``gradient_shards``: distinct storages of the local gradient shards after the last backward;
* ``optimizer_states``: distinct storages in the optimizer's state (local tensors of DTensors,
  torchao's quantized states through ``__tensor_flatten__``, the ``step`` counters);
* ``root_unsharded``: the most bytes of unsharded (plain tensor) root weights (final norm,
  ``lm_head``) seen while the decoder runs;
* ``all_gather_buffers``: the most bytes of unsharded weights of the other units alive at once
  (each parameter's all-gather output and the flat all-gather outputs FSDP2 holds pending or
  kept for the next copy-out), sampled in a forward pre-hook of every module inside the decoder
  layers (in forward and in backward's recomputation);
* ``gradients``: the most gradient bytes held at once in backward (sharded gradients, autograd's
  unsharded ones, the accumulated ones and the kept reduce-scatter inputs), sampled after every
  gradient accumulation into an unsharded parameter and just after every reduction's copy-in;
* ``gradient_accumulation``: with ``grad_accum > 1``, the unsharded gradients FSDP2 keeps
  between micro-batches, after the first micro-batch's backward.

FSDP2 exposes none of its buffers: :class:`FsdpMeter` reads its private state (torch 2.13).
torchao compiles its update with ``torch.compile``; the test sets ``TORCHDYNAMO_DISABLE=1`` so it
runs eagerly (the states are allocated by torchao's ``step()`` itself, the same either way).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from fastmid.models.band import BandPlan, apply_band, install_execution_policy
from fastmid.models.families import decoder_layers
from fastmid.models.loading import load_config
from fastmid.models.loss import batch_loss_sum
from fastmid.models.precision import POLICIES
from fastmid.train import distributed
from fastmid.train.optim import build_optimizer


def _storages(tensors: list[torch.Tensor]) -> dict[int, int]:
    """``{data_ptr: nbytes}`` of the distinct storages under ``tensors`` (DTensors: their local
    tensor; tensor subclasses: their inner tensors)."""
    out: dict[int, int] = {}

    def visit(t: torch.Tensor) -> None:
        if type(t) in (torch.Tensor, torch.nn.Parameter):
            storage = t.untyped_storage()
            if storage.nbytes():
                out[storage.data_ptr()] = storage.nbytes()
            return
        if isinstance(t, DTensor):
            visit(t.to_local())
            return
        names, _ = t.__tensor_flatten__()  # torchao's quantized states: codes, scales, qmap
        for name in names:
            visit(getattr(t, name))

    for t in tensors:
        visit(t)
    return out


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(_storages(tensors).values())


def _unsharded(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters FSDP2 holds unsharded now (a plain tensor instead of the DTensor shard)."""
    return [p for p in params if not isinstance(p, DTensor)]


def _batch(vocab: int, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # the prompt half is not supervised
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class FsdpMeter:
    """Samples what FSDP2 holds beside the shards while a step runs (module docstring).

    FSDP2 exposes none of its buffers, so this reads its private state (torch 2.13): each unit's
    ``FSDPParamGroup`` (``_get_fsdp_state()._fsdp_param_group``), whose ``FSDPParam``s keep the
    unsharded parameters' storage (``all_gather_outputs``, size 0 while resharded) and the
    autograd gradient of the unsharded parameter (``_unsharded_param.grad``); a flat all-gather
    output pending its copy-out (``_all_gather_result``) or kept for the next copy-out
    (``comm_ctx.all_gather_state``); the retained reduce-scatter inputs
    (``comm_ctx.reduce_scatter_states``).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule

        self.root = model
        self.groups = [
            m._get_fsdp_state()._fsdp_param_group
            for m in model.modules()
            if isinstance(m, FSDPModule) and m is not model
        ]
        self.peak = {"all_gather_buffers": 0, "root_unsharded": 0, "gradients": 0}
        self._hooked: set[int] = set()
        root_params = ["model.norm.weight", "lm_head.weight"]
        self.root_params = [
            (owner, name) for owner, _, name in (p.rpartition(".") for p in root_params)
        ]
        for layer in decoder_layers(model):
            for module in layer.modules():
                if module is not layer:  # called in forward and in backward's recomputation
                    module.register_forward_pre_hook(self.sample_weights)

    @property
    def comm(self) -> Any:
        """The root's ``FSDPCommContext``, which FSDP2's lazy init gives every group at the first
        forward (read each time: before it, each group has its own)."""
        return self.groups[0].comm_ctx

    def _flat_outputs(self) -> list[torch.Tensor]:
        out = [g._all_gather_result.all_gather_output for g in self.groups if g._all_gather_result]
        kept = getattr(self.comm, "all_gather_state", None)  # set once the streams are made
        if kept is not None:
            out.append(kept.all_gather_result.all_gather_output)
        return out

    def sample_weights(self, *_: Any) -> None:
        """Unsharded weights of the non-root units (per-parameter buffers and flat all-gather
        outputs) and of the root (its parameters, read from the modules: FSDP2 swaps them)."""
        buffers = [t for g in self.groups for fp in g.fsdp_params for t in fp.all_gather_outputs]
        gathered = _nbytes(buffers + self._flat_outputs())
        self.peak["all_gather_buffers"] = max(self.peak["all_gather_buffers"], gathered)
        root = _unsharded(
            [getattr(self.root.get_submodule(owner), name) for owner, name in self.root_params]
        )
        self.peak["root_unsharded"] = max(self.peak["root_unsharded"], _nbytes(root))
        # The unsharded parameters exist once a unit has been gathered: hook their gradients.
        for g in self.groups:
            for fp in g.fsdp_params:
                param = getattr(fp, "_unsharded_param", None)
                if param is not None and param.requires_grad and id(param) not in self._hooked:
                    self._hooked.add(id(param))
                    param.register_post_accumulate_grad_hook(self.sample_gradients)

    def sample_gradients(self, *_: Any, extra: tuple[torch.Tensor, ...] = ()) -> None:
        """Every gradient this rank holds now: the sharded ones, autograd's unsharded ones, the
        accumulated ones, the kept reduce-scatter inputs, and ``extra`` (what a reduction holds
        while it copies in)."""
        grads = list(extra)
        for g in self.groups:
            for fp in g.fsdp_params:
                param = getattr(fp, "_unsharded_param", None)
                grads += [fp.sharded_param.grad, getattr(param, "grad", None)]
                grads.append(fp.unsharded_accumulated_grad)
        # torch 2.13 keeps a list of kept inputs; earlier releases one (the same one at a time).
        states = getattr(self.comm, "reduce_scatter_states", None)
        if states is None:
            states = [getattr(self.comm, "reduce_scatter_state", None)]
        grads += [state.reduce_scatter_input for state in states if state is not None]
        gradients = _nbytes([t for t in grads if t is not None])
        self.peak["gradients"] = max(self.peak["gradients"], gradients)

    def watch_copy_in(self) -> Any:
        """Sample inside every reduction, just after its copy-in, when the unit's unsharded
        gradients and its reduce-scatter input are both alive; returns a function that undoes
        the patch."""
        from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives

        original = collectives.foreach_reduce_scatter_copy_in

        def copy_in(
            unsharded_grads: list[torch.Tensor], reduce_input: torch.Tensor, *rest: Any
        ) -> Any:
            out = original(unsharded_grads, reduce_input, *rest)
            self.sample_gradients(extra=(*unsharded_grads, reduce_input))
            return out

        collectives.foreach_reduce_scatter_copy_in = copy_in
        return lambda: setattr(collectives, "foreach_reduce_scatter_copy_in", original)

    def accumulated_gradients(self) -> int:
        """Bytes of the unsharded gradients kept between micro-batches without gradient sync."""
        grads = []
        for g in self.groups:
            for fp in g.fsdp_params:
                param = getattr(fp, "_unsharded_param", None)
                grads += [t for t in (getattr(param, "grad", None), fp.unsharded_accumulated_grad)]
        return _nbytes([t for t in grads if t is not None])


def run_case(ctx: distributed.DistContext, config_path: Path, case: dict[str, Any]) -> dict:
    """One case on this rank (module docstring); returns the measured bytes."""
    from transformers import AutoModelForCausalLM

    policy = POLICIES[case["precision"]]
    config = load_config(config_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(policy.weight_dtype)
    plan = BandPlan.parse(config.num_hidden_layers, layers=case["layers"])
    trainable = apply_band(model, plan)
    policy.cast_trainable(trainable)
    install_execution_policy(model, plan, grad_checkpointing=True)
    units = distributed.shard_model(model, ctx, case["precision"])
    model.train()
    meter = FsdpMeter(model)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(named, case["optim"], lr=1e-3)
    accumulation = 0
    unpatch = meter.watch_copy_in()
    try:
        for micro in range(case["grad_accum"]):
            last = micro == case["grad_accum"] - 1
            distributed.set_gradient_sync(model, last)
            batch = _batch(config.vocab_size, case["micro_batch"], case["seq_len"], seed=micro)
            loss, n = batch_loss_sum(model, batch)
            (loss / max(n, 1)).backward()
            if micro == 0 and not last:
                accumulation = meter.accumulated_gradients()
    finally:
        unpatch()
    gradient_shards = _nbytes([p.grad for _, p in named if p.grad is not None])
    optimizer.step()
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "units": units,
        "parameter_shards": _nbytes(list(model.parameters())),
        "gradient_shards": gradient_shards,
        "optimizer_states": _nbytes(states),
        "gradient_accumulation": accumulation,
        **meter.peak,
        "fp32_state_parameters": distributed.fp32_state_parameters(named, case["optim"]),
    }


def main(argv: list[str]) -> None:
    config_path, out, cases = Path(argv[0]), Path(argv[1]), json.loads(Path(argv[2]).read_text())
    torch.set_num_threads(1)  # two ranks on shared cores: one thread each
    ctx = distributed.init_from_env(timeout_s=120)
    assert ctx is not None, "run me under torch.distributed.run with 2 processes"
    try:
        for case in cases:
            result = run_case(ctx, config_path, case)
            path = out / f"{case['name']}.rank{ctx.rank}.json"
            path.write_text(json.dumps(result, indent=1))
            ctx.barrier()
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
