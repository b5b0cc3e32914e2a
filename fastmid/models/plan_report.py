"""`fastmid plan`: the band, its parameter counts and a per-GPU memory estimate, without weights.

:func:`make_plan` builds the model from its config on the meta device (exact parameter counts from
transformers' module tree, no memory used), applies the band and returns a JSON-ready dict;
:func:`print_plan` renders that dict with rich: the layer table (runs of layers with the same role),
the parameter totals and the memory table (Mid-Block beside full fine-tuning and LoRA).

:func:`recommend_mode` (issue 15) estimates the Mid-Block band once per mode of
:data:`MODE_ORDER` (precision, optimizer, step in backward or offload) and picks the first that
fits the GPU with :func:`default_min_headroom_gib` to spare; :func:`make_plan` returns it as
``recommended``, with the exact ``fastmid train`` flags that select it, and :func:`print_plan`
prints it beside the table of the requested mode.

With ``gpus > 1`` the estimate is FSDP2's arrangement as ``fastmid train --nproc N`` shards the
model (:func:`fastmid.models.memory.fsdp_plan`): :func:`print_plan` adds the units and what the
rank holding the most keeps (parameter shards, the root's unsharded weights, the all-gather
buffers, gradient shards, accumulation and reduce-scatter buffers, optimizer states on its local
shards), and there is no recommendation.

All sizes are bytes, reported in GiB (2^30 bytes). Not counted (as in
:mod:`fastmid.models.memory`): the CUDA context and cuBLAS workspaces (about 0.5-1 GiB),
allocator fragmentation and transient buffers.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from fastmid.models.band import BandPlan, count_parameters
from fastmid.models.families import (
    UnsupportedModelError,
    embeddings_tied,
    family_for_config,
)
from fastmid.models.loading import ModelSourceError, load_config
from fastmid.models.memory import (
    EXACT_ACTIVATION_FAMILIES,
    GIB,
    BlockShape,
    MemoryPlanError,
    TrainingSetup,
    build_meta_model,
    estimate_all,
    estimate_mid_block,
)

ROLE_TEXT = {
    "frozen-prefix": "prefix, no_grad",
    "band": "band, trains",
    "frozen-gap": "gap, frozen",
    "frozen-suffix": "suffix, frozen",
}
METHOD_LABELS = {"mid_block": "Mid-Block", "full": "Full FT", "lora": "LoRA r={rank}"}
MEMORY_ROWS = (
    ("weights", "weights"),
    ("gradients", "gradients"),
    ("optimizer_states", "optimizer states"),
    ("activations", "activations (a)"),
    ("logits", "logits (b)"),
    ("total", "total"),
)
UNITS_NOTE = (
    "note: GiB = 2^30 bytes. Not counted: the CUDA context and cuBLAS workspaces (about 0.5-1 "
    'GiB), allocator fragmentation and transient buffers; an H200 sold as "141 GB" gives '
    "CUDA about 139-140 GiB. (a) activations: the rule measured on CPU with SDPA (q, k, v, "
    "output and an fp32 logsumexp per head saved; tests/models/test_memory_measured.py), "
    "extrapolated to CUDA, whose flash, memory-efficient and cuDNN attention save the same "
    "tensors. (b) logits: without --supervised-fraction a projection at every token, 10 bytes x "
    "vocabulary per token; with it 12 bytes x vocabulary per supervised token (fastmid projects "
    "only those); --fused-loss: the chunked kernel's peak."
)


@dataclass(frozen=True)
class Mode:
    """One training mode the recommendation considers (the flags ``fastmid train`` spells).

    Attributes:
        precision: ``bf16-master`` or ``bf16`` (resolved, never ``auto``).
        optim: a resolved optimizer.
        optimizer_in_backward: ``--optimizer-in-backward``.
        optimizer_offload: ``--optimizer-offload``.
    """

    precision: str
    optim: str
    optimizer_in_backward: bool = False
    optimizer_offload: bool = False

    def describe(self) -> str:
        """``"bf16 + ao_adamw8bit + optimizer in backward"``."""
        extra = (" + optimizer in backward" if self.optimizer_in_backward else "") + (
            " + optimizer offload" if self.optimizer_offload else ""
        )
        return f"{self.precision} + {self.optim}{extra}"

    def train_flags(
        self,
        seq_len: int,
        micro_batch: int,
        band: str | None = None,
        layers: str | None = None,
    ) -> list[str]:
        """The ``fastmid train`` flags that select this mode at the plan's size.

        Both optimizer options are spelled out (``--no-...`` when off), so that a YAML config or
        another tool's default cannot switch one on; the step in backward and offload need
        ``--grad-clip 0`` and the step in backward ``--grad-accum 1`` (the rules of
        :func:`fastmid.config.validate`); ``--grad-checkpointing``, ``--max-seq-len`` and
        ``--micro-batch`` because ``train``'s defaults (off, 512, 8) are not the plan's; the
        band only when the plan was given one (both commands default to ``0.2:0.8``).
        """
        flags = ["--precision", self.precision, "--optim", self.optim]
        flags.append(("--" if self.optimizer_in_backward else "--no-") + "optimizer-in-backward")
        flags.append(("--" if self.optimizer_offload else "--no-") + "optimizer-offload")
        if self.optimizer_in_backward or self.optimizer_offload:
            flags += ["--grad-clip", "0"]
        if self.optimizer_in_backward:
            flags += ["--grad-accum", "1"]
        flags += ["--grad-checkpointing", "--max-seq-len", str(seq_len)]
        flags += ["--micro-batch", str(micro_batch)]
        if band is not None:
            flags += ["--band", band]
        if layers is not None:
            flags += ["--layers", layers]
        return flags


# The recommendation's order of preference: recommend_mode's docstring says why.
MODE_ORDER: tuple[Mode, ...] = (
    Mode("bf16-master", "adamw8bit"),
    Mode("bf16-master", "adamw8bit", optimizer_in_backward=True),
    Mode("bf16", "ao_adamw8bit"),
    Mode("bf16", "ao_adamw8bit", optimizer_in_backward=True),
    Mode("bf16", "ao_adamw4bit", optimizer_in_backward=True),
    Mode("bf16", "ao_adamw8bit", optimizer_offload=True),
    Mode("bf16", "ao_adamw4bit", optimizer_offload=True),
)
# The memory a recommended mode leaves free: at least MIN_HEADROOM_GIB and MIN_HEADROOM_SHARE of
# the GPU (default_min_headroom_gib says why).
MIN_HEADROOM_GIB = 2.0
MIN_HEADROOM_SHARE = 0.03


def default_min_headroom_gib(gpu_memory_gib: float) -> float:
    """GiB a recommended mode must leave free on a GPU of ``gpu_memory_gib``:
    ``max(2, 0.03 * gpu_memory_gib)`` (4.23 GiB of 141, 2.4 of 80, 2 of 24).

    The estimate leaves out what a real step also needs (:mod:`fastmid.models.memory`): the CUDA
    context and cuBLAS workspaces (about 0.5-1 GiB), transients beside the counted lines (under
    ``--optimizer-in-backward`` each hook's norm and finiteness checks, 8 bytes per element of
    the largest trained tensor: 1.05 GiB for Qwen2.5-32B's MLP matrices; torchao's fp32 working
    copies of one tensor while it steps) and the caching allocator's fragmentation, which grows
    with the memory in use. The 2 GiB floor covers the first two; the 3% covers fragmentation
    and the gap between a GPU's nominal size and what CUDA reports: the default ``--gpu-memory``
    is 141 (an H200 sold as "141 GB"), but CUDA reports about 139-140 GiB of it, so the
    recommendation plans against 141 - 4.23 = 136.8 GiB, 2-3 GiB below what CUDA can allocate.
    ``--min-headroom`` (``min_headroom_gib``) sets another minimum.
    """
    return max(MIN_HEADROOM_GIB, MIN_HEADROOM_SHARE * gpu_memory_gib)


def _check_min_headroom(min_headroom_gib: float | None, gpu_memory_gib: float = math.inf) -> None:
    if min_headroom_gib is not None and not (
        min_headroom_gib >= 0 and math.isfinite(min_headroom_gib)
    ):
        raise MemoryPlanError(
            f"--min-headroom: must be a finite number >= 0 (GiB), got {min_headroom_gib}"
        )
    if min_headroom_gib is not None and min_headroom_gib >= gpu_memory_gib:
        raise MemoryPlanError(
            f"--min-headroom: {min_headroom_gib:g} GiB is not below --gpu-memory "
            f"{gpu_memory_gib:g}: no run could leave that much free"
        )


def mode_table(
    model: torch.nn.Module,
    plan: BandPlan,
    setup: TrainingSetup,
    band: str | None = None,
    layers: str | None = None,
) -> list[dict[str, Any]]:
    """The Mid-Block estimate of ``plan`` in every mode of :data:`MODE_ORDER`, in that order.

    Each mode keeps ``setup``'s other settings (sequence length, micro-batch, GPUs, GPU memory
    and whatever else the setup holds), with activation checkpointing on. The modes are one-GPU
    modes: with ``setup.gpus > 1`` the bitsandbytes ones, the step in backward and offload raise
    :class:`MemoryPlanError` (FSDP2 runs none of them; :func:`make_plan` then recommends nothing).

    Args:
        model: the ``*ForCausalLM`` (meta tensors are fine); its ``requires_grad`` flags end as
            the band sets them.
        plan: the band.
        setup: the plan's setup.
        band, layers: the band as the plan was given it (for the ``fastmid train`` flags).

    Returns:
        One JSON-ready dict per mode: ``rank`` (1-based position in the order), ``label``,
        ``precision``, ``optim``, ``optimizer_in_backward``, ``optimizer_offload``, ``flags``
        (:meth:`Mode.train_flags`), ``total_bytes``, ``host_memory_bytes`` and ``memory``
        (:meth:`MemoryEstimate.to_dict`; its ``fits`` compares with the whole GPU).
    """
    rows = []
    for rank, mode in enumerate(MODE_ORDER, start=1):
        mode_setup = dataclasses.replace(
            setup,
            precision=mode.precision,
            optim=mode.optim,
            optimizer_in_backward=mode.optimizer_in_backward,
            optimizer_offload=mode.optimizer_offload,
            checkpointing=True,
        )
        est = estimate_mid_block(model, plan, mode_setup)
        rows.append(
            {
                "rank": rank,
                "label": mode.describe(),
                "precision": mode.precision,
                "optim": mode.optim,
                "optimizer_in_backward": mode.optimizer_in_backward,
                "optimizer_offload": mode.optimizer_offload,
                "flags": mode.train_flags(setup.seq_len, setup.micro_batch, band, layers)
                # The fused loss's figure holds only with the Triton kernels on.
                + (["--kernels", "on"] if setup.fused_loss else []),
                "total_bytes": est.total,
                "host_memory_bytes": est.host_memory,
                "memory": est.to_dict(),
            }
        )
    return rows


def pick_mode(
    modes: list[dict[str, Any]], gpu_memory_gib: float, min_headroom_gib: float | None = None
) -> dict[str, Any] | None:
    """The first of ``modes`` (:func:`mode_table`'s order) whose total leaves
    ``min_headroom_gib`` free on a GPU of ``gpu_memory_gib``, or None when none does.

    Args:
        modes: :func:`mode_table`'s rows.
        gpu_memory_gib: memory of one GPU, GiB.
        min_headroom_gib: GiB to leave free; None: :func:`default_min_headroom_gib`.

    Returns:
        ``{"flags", "command", "total_bytes", "headroom_bytes", "total_gib", "headroom_gib",
        "host_memory_bytes", "precision", "optim", "optimizer_in_backward",
        "optimizer_offload", "rank", "label"}``; ``headroom_bytes`` is what the mode leaves of
        the whole GPU (``gpu_memory_gib * 2^30 - total_bytes``), at least the minimum.

    Raises:
        MemoryPlanError: a negative or non-finite ``min_headroom_gib``.
    """
    _check_min_headroom(min_headroom_gib)
    if min_headroom_gib is None:
        min_headroom_gib = default_min_headroom_gib(gpu_memory_gib)
    gpu_bytes = gpu_memory_gib * GIB
    for row in modes:
        headroom = gpu_bytes - row["total_bytes"]
        if headroom >= min_headroom_gib * GIB:
            keys = ("precision", "optim", "optimizer_in_backward", "optimizer_offload")
            return {
                "flags": list(row["flags"]),
                "command": " ".join(["fastmid", "train", *row["flags"]]),
                "total_bytes": row["total_bytes"],
                "headroom_bytes": int(headroom),
                "total_gib": round(row["total_bytes"] / GIB, 3),
                "headroom_gib": round(headroom / GIB, 3),
                "host_memory_bytes": row["host_memory_bytes"],
                **{k: row[k] for k in keys},
                "rank": row["rank"],
                "label": row["label"],
            }
    return None


def recommend_mode(
    model: torch.nn.Module,
    plan: BandPlan,
    setup: TrainingSetup,
    band: str | None = None,
    layers: str | None = None,
    min_headroom_gib: float | None = None,
) -> dict[str, Any] | None:
    """The first mode, in this order of preference, whose Mid-Block total leaves
    ``min_headroom_gib`` free on ``setup.gpu_memory_gib``: quality first, then speed.

    Every mode runs with activation checkpointing (``--grad-checkpointing``) and keeps
    ``setup``'s sequence length, micro-batch and GPU count:

    1. ``bf16-master`` + ``adamw8bit``: the CUDA default. fp32 master weights, so every update
       accumulates exactly; global-norm clipping available.
    2. ``bf16-master`` + ``adamw8bit`` + ``--optimizer-in-backward``: the same fp32-master
       update with one gradient alive at a time; it gives up clipping (``--grad-clip 0``) and
       accumulation (``--grad-accum 1``), not speed. Before (3): the README's rule is
       ``bf16-master`` whenever it fits, and the step in backward is the ordinary step minus
       clipping (tested equal to 1e-6).
    3. ``bf16`` + ``ao_adamw8bit``: bf16 weights written back with stochastic rounding
       (measured: learns what fp32 learns on the default run, README "Quality of bf16"); keeps
       clipping.
    4. ``bf16`` + ``ao_adamw8bit`` + ``--optimizer-in-backward``: (3) with one gradient alive at
       a time, without clipping.
    5. ``bf16`` + ``ao_adamw4bit`` + ``--optimizer-in-backward``: 4-bit states, half the 8-bit
       ones, the least established of the optimizers here; still a full-speed on-device step.
    6. ``bf16`` + ``ao_adamw8bit`` + ``--optimizer-offload``: states and the step on the host.
       Every step then waits on a host AdamW over the whole band and on PCIe copies of its
       gradients and weights, several times an on-device step for a large band, so offload
       comes after every on-device mode, 4-bit states included.
    7. ``bf16`` + ``ao_adamw4bit`` + ``--optimizer-offload``: less host memory than (6).

    Under today's memory model (:mod:`fastmid.models.memory`) (6) and (7) are never first:
    offload keeps every gradient on the GPU (torchao's ``offload_gradients=False``), which
    outweighs (5)'s 4-bit states, and (7) equals (6) on the GPU (4-bit states only shrink the
    host memory). They stay in the order so the plan reports them, and would be picked if
    gradients moved to the host too.

    Left out: ``fp32`` (no gain over ``bf16-master``, which also accumulates in fp32, at twice
    the frozen weights and activations), ``adamw`` (fp32 states, four times the 8-bit ones; 8-bit
    AdamW matches it, Dettmers et al. 2022), ``paged_adamw8bit`` (the bytes of ``adamw8bit``,
    paged only under pressure), ``bf16-master`` with offload (above (2) on the GPU: it keeps
    every fp32 gradient, so it is never first after (2)), and ``bf16`` + ``ao_adamw4bit``
    without the step in backward (above (4) on the GPU for the same reason after it; before it
    it would trade 8-bit states for clipping, and the 8-bit states are kept).

    Args:
        model: the ``*ForCausalLM`` (meta tensors are fine); its ``requires_grad`` flags end as
            the band sets them.
        plan: the band.
        setup: the plan's setup; its precision, optimizer and options are replaced per mode.
        band, layers: the band as given (for the flags).
        min_headroom_gib: GiB to leave free; None: :func:`default_min_headroom_gib`.

    Returns:
        :func:`pick_mode`'s dict (the ``fastmid train`` flags, totals, the mode), or None when
        no mode fits.

    Raises:
        MemoryPlanError: a negative or non-finite ``min_headroom_gib``.
    """
    return pick_mode(
        mode_table(model, plan, setup, band, layers), setup.gpu_memory_gib, min_headroom_gib
    )


def make_plan(
    model_source: str | os.PathLike[str],
    band: str | None = None,
    layers: str | None = None,
    seq_len: int = 4096,
    micro_batch: int = 1,
    gpus: int = 1,
    gpu_memory_gib: float = 141.0,
    optim: str = "auto",
    checkpointing: bool = True,
    lora_rank: int = 16,
    precision: str = "auto",
    optimizer_in_backward: bool = False,
    optimizer_offload: bool = False,
    recommend: bool = True,
    min_headroom_gib: float | None = None,
    supervised_fraction: float | None = None,
    fused_loss: bool = False,
    grad_accum: int = 1,
) -> dict[str, Any]:
    """Plan a Mid-Block run: band, parameter counts and per-GPU memory, loading no weights.

    Args:
        model_source: ``"default"``, a model folder, a ``.gguf`` file, a cached repo id, or a bare
            ``config.json`` (see :func:`fastmid.models.loading.load_config`).
        band: fractions ``"0.2:0.8"`` (the default when ``layers`` is None).
        layers: explicit indices ``"6-23"`` / ``"3,5,9"``.
        seq_len: tokens per sequence.
        micro_batch: sequences per GPU per step.
        gpus: GPUs sharing weights, gradients and optimizer states: above 1, the FSDP2
            arrangement of ``fastmid train --nproc N``, per rank (:func:`fastmid.models.memory.
            fsdp_plan`; ``memory[...]["fsdp"]``), and no recommendation (its modes are one-GPU
            modes: bitsandbytes optimizers, the step in backward, offload).
        gpu_memory_gib: memory of one GPU, GiB (2^30 bytes).
        optim: ``auto`` (``ao_adamw8bit`` under ``bf16`` or with ``gpus > 1``, else
            ``adamw8bit``), ``adamw8bit``, ``paged_adamw8bit``, ``adamw``, ``ao_adamw8bit`` or
            ``ao_adamw4bit`` (Mid-Block and full fine-tuning; LoRA uses fp32 AdamW); with
            ``gpus > 1`` only ``adamw``, ``ao_adamw8bit`` and ``ao_adamw4bit``.
        checkpointing: activation checkpointing of every layer that stores activations.
        lora_rank: rank of the LoRA comparison column.
        precision: ``auto`` (``bf16-master``, the CUDA default), ``fp32``, ``bf16-master`` or
            ``bf16`` (Mid-Block and full fine-tuning; LoRA keeps its own setup).
        optimizer_in_backward: ``--optimizer-in-backward``: each trained tensor steps in its
            gradient hook, so one gradient lives at a time (Mid-Block and full fine-tuning).
        optimizer_offload: ``--optimizer-offload``: optimizer states of tensors of >= 4096
            elements in pinned host memory, reported as ``host_memory`` outside the GPU total
            (Mid-Block and full fine-tuning).
        recommend: also estimate the band in every mode of :data:`MODE_ORDER` and pick the first
            that fits (:func:`recommend_mode`); ``fastmid plan`` turns it off when a mode flag
            is given.
        supervised_fraction: share of tokens with a label (the loss projects only those); None:
            every token, by the earlier per-token figure (:class:`TrainingSetup`).
        fused_loss: the chunked linear cross-entropy kernel (``--kernels`` on CUDA).
        min_headroom_gib: GiB the recommended mode must leave free; None:
            :func:`default_min_headroom_gib` (``max(2, 3%)`` of ``gpu_memory_gib``).
        grad_accum: micro-batches per step (``--grad-accum``); with ``gpus > 1`` FSDP2 then
            keeps unsharded fp32 band gradients between micro-batches.

    Returns:
        JSON-ready dict with keys ``model`` (source, model_type, sizes), ``band``
        (:meth:`BandPlan.to_dict` plus ``describe``), ``layers`` (per layer: index, role,
        parameters, trainable), ``parameters`` (:meth:`ParameterCounts.to_dict`), ``setup``
        (the settings with ``precision`` and ``optim`` resolved, ``tokens_per_gpu``, the two
        optimizer options, ``grad_accum``), ``memory`` (``mid_block``, ``full``, ``lora``:
        :meth:`MemoryEstimate.to_dict`, bytes and GiB, ``host_memory`` beside ``total``; with
        ``gpus > 1`` Mid-Block and full fine-tuning add ``fsdp``: the units and every rank's
        lines, :meth:`fastmid.models.memory.FsdpPlan.to_dict`) and
        ``activation_model`` (``exact`` for Llama-style families, else ``approximate``),
        ``recommended`` (:func:`pick_mode`'s dict: ``flags``, ``total_bytes``,
        ``headroom_bytes``, ``precision``, ``optim``, ``optimizer_in_backward``,
        ``optimizer_offload``...; None when no mode fits or ``recommend`` is off) and
        ``recommendation``: ``status`` (``fits``, ``none-fits`` or ``off``: also with
        ``gpus > 1``) and, unless off, ``gpu_memory_gib``, ``min_headroom_gib`` and ``modes``
        (:func:`mode_table`).

    Raises:
        ModelSourceError: the source cannot be read, or its ``model_type`` is unsupported.
        BandError: an invalid ``band`` / ``layers`` string (message names the flag).
        MemoryPlanError: a non-positive size, unknown ``optim`` or ``precision``, ``bf16`` with
            an optimizer that cannot round stochastically, both optimizer options, offload with
            ``paged_adamw8bit``, the step in backward with ``grad_accum > 1``, with
            ``gpus > 1`` a bitsandbytes optimizer, the step in backward or offload (what
            ``fastmid train`` refuses), a negative ``min_headroom_gib``.
    """
    _check_min_headroom(min_headroom_gib, gpu_memory_gib)
    setup = TrainingSetup(
        seq_len=seq_len,
        micro_batch=micro_batch,
        gpus=gpus,
        gpu_memory_gib=gpu_memory_gib,
        optim=optim,  # type: ignore[arg-type]
        checkpointing=checkpointing,
        lora_rank=lora_rank,
        precision=precision,  # type: ignore[arg-type]
        optimizer_in_backward=optimizer_in_backward,
        optimizer_offload=optimizer_offload,
        supervised_fraction=supervised_fraction,
        fused_loss=fused_loss,
        grad_accum=grad_accum,
    )
    # The recommendation's modes are one-GPU modes (bitsandbytes optimizers, the step in
    # backward, offload): FSDP2 runs none of them.
    recommend = recommend and gpus == 1
    config = load_config(model_source)
    try:
        spec = family_for_config(config)
    except UnsupportedModelError as exc:
        raise ModelSourceError(f"{model_source}: {exc}") from None
    plan = BandPlan.parse(config.num_hidden_layers, band=band, layers=layers)
    model = build_meta_model(config)
    memory = estimate_all(model, plan, setup)  # leaves the band's requires_grad flags set
    counts = count_parameters(model, plan)
    shape = BlockShape.from_config(config)
    band_dict = plan.to_dict()
    band_dict["describe"] = plan.describe()
    recommended = None
    recommendation: dict[str, Any] = {"status": "off"}
    if recommend:
        headroom = (
            default_min_headroom_gib(gpu_memory_gib)
            if min_headroom_gib is None
            else min_headroom_gib
        )
        modes = mode_table(model, plan, setup, band, layers)
        recommended = pick_mode(modes, setup.gpu_memory_gib, headroom)
        recommendation = {
            "status": "none-fits" if recommended is None else "fits",
            "gpu_memory_gib": setup.gpu_memory_gib,
            "min_headroom_gib": headroom,
            "modes": modes,
        }
    return {
        "model": {
            "source": str(model_source),
            "model_type": spec.model_type,
            "architecture": type(model).__name__,
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": shape.hidden_size,
            "intermediate_size": shape.intermediate_size,
            "num_attention_heads": shape.num_attention_heads,
            "q_width": shape.q_width,
            "kv_width": shape.kv_width,
            "vocab_size": shape.vocab_size,
            "tie_word_embeddings": embeddings_tied(model),
        },
        "band": band_dict,
        "layers": [
            {
                "index": i,
                "role": plan.role(i),
                "parameters": counts.per_layer[i],
                "trainable": i in plan,
            }
            for i in range(plan.num_hidden_layers)
        ],
        "parameters": counts.to_dict(),
        "setup": {
            "seq_len": setup.seq_len,
            "micro_batch": setup.micro_batch,
            "tokens_per_gpu": setup.tokens,
            "gpus": setup.gpus,
            "gpu_memory_gib": setup.gpu_memory_gib,
            "precision": setup.precision,
            "optim": setup.optim,
            "checkpointing": setup.checkpointing,
            "lora_rank": setup.lora_rank,
            "optimizer_in_backward": setup.optimizer_in_backward,
            "optimizer_offload": setup.optimizer_offload,
            "grad_accum": setup.grad_accum,
        },
        "memory": {name: est.to_dict() for name, est in memory.items()},
        "activation_model": "exact"
        if spec.model_type in EXACT_ACTIVATION_FAMILIES
        else "approximate",
        "recommended": recommended,
        "recommendation": recommendation,
    }


def layer_runs(plan_dict: dict[str, Any]) -> list[dict[str, Any]]:
    """Group consecutive layers with the same role and size: ``[{first, last, role, count,
    parameters_per_layer, parameters}]`` (``parameters`` summed over the run)."""
    runs: list[dict[str, Any]] = []
    for layer in plan_dict["layers"]:
        last = runs[-1] if runs else None
        if (
            last is not None
            and last["role"] == layer["role"]
            and last["parameters_per_layer"] == layer["parameters"]
            and last["last"] == layer["index"] - 1
        ):
            last["last"] = layer["index"]
            last["count"] += 1
            last["parameters"] += layer["parameters"]
        else:
            runs.append(
                {
                    "first": layer["index"],
                    "last": layer["index"],
                    "role": layer["role"],
                    "count": 1,
                    "parameters_per_layer": layer["parameters"],
                    "parameters": layer["parameters"],
                }
            )
    return runs


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f} M"


def print_plan(plan_dict: dict[str, Any], console: Any = None) -> None:
    """Print a :func:`make_plan` result with rich: header, layer table, totals, memory table.

    Args:
        plan_dict: the dict :func:`make_plan` returns (or its JSON round trip).
        console: a ``rich.console.Console``; a new one on stdout when None.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m, band, setup = plan_dict["model"], plan_dict["band"], plan_dict["setup"]
    tied = "tied" if m["tie_word_embeddings"] else "untied"
    console.print(
        f"[bold]{m['source']}[/bold]: {m['architecture']} ({m['model_type']}), "
        f"{m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
        f"intermediate {m['intermediate_size']}, vocab {m['vocab_size']} ({tied} embeddings)"
    )
    console.print(f"band: [bold]{band['describe']}[/bold]")

    layers = Table(title="Decoder layers")
    for col, justify in (("layers", "left"), ("role", "left"), ("count", "right")):
        layers.add_column(col, justify=justify)  # type: ignore[arg-type]
    layers.add_column("params / layer", justify="right")
    layers.add_column("params", justify="right")
    for run in layer_runs(plan_dict):
        span = str(run["first"]) if run["count"] == 1 else f"{run['first']}..{run['last']}"
        style = "bold green" if run["role"] == "band" else None
        layers.add_row(
            span,
            ROLE_TEXT[run["role"]],
            str(run["count"]),
            _millions(run["parameters_per_layer"]),
            _millions(run["parameters"]),
            style=style,
        )
    console.print(layers)

    p = plan_dict["parameters"]
    totals = Table(title="Parameters (tied weights counted once)")
    totals.add_column("part")
    totals.add_column("params", justify="right")
    for label, key in (
        (
            "embeddings" + (" (lm_head tied to them)" if m["tie_word_embeddings"] else ""),
            "embeddings",
        ),
        ("lm_head" + (" (tied: counted above)" if m["tie_word_embeddings"] else ""), "lm_head"),
        ("final norm", "final_norm"),
        ("trainable (band)", "trainable"),
        ("frozen", "frozen"),
        ("total", "total"),
    ):
        totals.add_row(label, _millions(p[key]))
    totals.add_row("trainable share", f"{p['trainable_share_percent']:.2f} %")
    console.print(totals)

    mem = plan_dict["memory"]
    ckpt = "on" if setup["checkpointing"] else "off"
    # .get: a plan dict written before these options existed has neither key.
    in_backward = bool(setup.get("optimizer_in_backward"))
    offload = bool(setup.get("optimizer_offload"))
    options = (", optimizer in backward" if in_backward else "") + (
        ", optimizer offload" if offload else ""
    )
    title = (
        f"Memory per GPU, GiB: seq {setup['seq_len']} x micro-batch {setup['micro_batch']}, "
        f"{setup['gpus']} GPU(s), precision {setup['precision']}, {setup['optim']}, "
        f"checkpointing {ckpt}{options}"
    )
    table = Table(title=title)
    table.add_column("")
    order = ("mid_block", "full", "lora")
    for name in order:
        table.add_column(METHOD_LABELS[name].format(rank=setup["lora_rank"]), justify="right")
    table.add_row("trainable params", *(_millions(mem[n]["trainable_parameters"]) for n in order))
    for key, label in MEMORY_ROWS:
        table.add_row(
            label, *(f"{mem[n]['gib'][key]:.2f}" for n in order), end_section=key == "logits"
        )
    table.add_row(
        f"fits in {setup['gpu_memory_gib']:g} GiB",
        *("[green]yes[/green]" if mem[n]["fits"] else "[red]no[/red]" for n in order),
        end_section=offload,
    )
    if offload:
        # Pinned host memory: below the GPU total and the fits row, not part of either. LoRA keeps
        # its own setup (no offload).
        table.add_row(
            "host memory (offload)",
            *("-" if n == "lora" else f"{mem[n]['gib']['host_memory']:.2f}" for n in order),
        )
    console.print(table)
    if offload:
        console.print(
            "note: host memory (offload) is pinned CPU memory per GPU (weight copies, gradient "
            "buffers and optimizer states of tensors of >= 4096 elements), not in the GPU total"
        )
    if setup["gpus"] > 1 and "fsdp" in mem["mid_block"]:
        print_fsdp(plan_dict, console)
    if plan_dict.get("activation_model") != "exact":
        console.print(
            f"note: activations use the Llama-style block formulas; {m['model_type']} differs "
            "in detail, so treat them as approximate"
        )
    console.print(UNITS_NOTE, markup=False, highlight=False)
    recommendation = plan_dict.get("recommendation") or {"status": "off"}
    if recommendation["status"] != "off":
        for line in recommendation_lines(plan_dict):
            # soft_wrap: the command stays one line, to copy.
            console.print(line, markup=False, highlight=False, soft_wrap=True)


FSDP_ROWS = (
    ("parameter_shards", "parameter shards"),
    ("root_unsharded", "root, unsharded"),
    ("all_gather_buffers", "all-gather (2 layers)"),
    ("weights", "= weights"),
    ("gradient_shards", "gradient shards"),
    ("gradient_accumulation", "grad accumulation"),
    ("reduce_scatter", "reduce-scatter"),
    ("gradients", "= gradients"),
    ("optimizer_states", "optimizer states"),
)
_DTYPE = {4: "fp32", 2: "bf16"}


def fsdp_units_line(fsdp: dict[str, Any]) -> str:
    """One line naming the FSDP2 units of a ``memory[...]["fsdp"]`` dict and what each keeps
    between its uses: ``"FSDP2 on 2 GPUs, 66 units: model.layers.0 .. model.layers.63 ..."``."""
    units, n = fsdp["units"], fsdp["world_size"]
    layers = [u for u in units if u["kind"] == "layer"]
    sizes = sorted({u["parameters"] for u in layers})
    size = _millions(sizes[0]) + ("" if len(sizes) == 1 else f" to {_millions(sizes[-1])}")
    parts = [
        f"{layers[0]['name']} .. {layers[-1]['name']} (one unit per decoder layer, {size} "
        "each, resharded after forward)"
    ]
    for u in units:
        if u["kind"] == "embeddings":
            parts.append(f"{u['name']} ({_millions(u['parameters'])}, resharded after forward)")
        elif u["kind"] == "root":
            parts.append(
                f"{u['name']} ({', '.join(u['modules'])}: {_millions(u['parameters'])}, kept "
                "unsharded from forward through backward)"
            )
    return f"FSDP2 on {n} GPUs, {len(units)} units: " + ", ".join(parts)


def fsdp_note(setup: dict[str, Any], fsdp: dict[str, Any]) -> str:
    """What each per-rank line of :func:`print_fsdp` holds, in the plan's dtypes."""
    n, gather = fsdp["world_size"], _DTYPE[fsdp["gather_bytes"]]
    stored = {
        "bf16-master": "band fp32, frozen bf16",
        "fp32": "fp32",
        "bf16": "bf16",
    }[setup["precision"]]
    grad = "bf16" if setup["precision"] == "bf16" else "fp32"
    accumulation = (
        f"; grad accumulation: the unsharded fp32 band gradients FSDP2 keeps between the "
        f"{fsdp['grad_accum']} micro-batches of a step"
        if fsdp["grad_accum"] > 1
        else ""
    )
    return (
        f"note: per rank, as `fastmid train --nproc {n}` shards (fastmid/train/distributed.py). "
        f"parameter shards: 1/{n} of every weight (dim 0, padded to ceil(rows/{n})) in its "
        f"stored dtype ({stored}); root, unsharded: the root unit's weights in {gather}, "
        "resident from forward through backward; all-gather: the current and the prefetched "
        f"layer, unsharded, {gather}; gradient shards: 1/{n} of the band's gradients, {grad}"
        f"{accumulation}; reduce-scatter: what backward holds above those at its peak, one "
        f"layer's unsharded {gather} gradients and FSDP2's fp32 reduce-scatter input kept for "
        "the layer before; optimizer states: on each rank's local shard "
        "(torchao keeps 8/4-bit states only where the local shard has >= 4096 elements and a "
        "multiple of the block, else fp32). Activations and logits: per GPU, not sharded. "
        "Optimizers under FSDP2: adamw, ao_adamw8bit, ao_adamw4bit."
    )


def print_fsdp(plan_dict: dict[str, Any], console: Any) -> None:
    """Print the FSDP2 part of a :func:`make_plan` result with ``gpus > 1``: the units, what
    the rank holding the most keeps (Mid-Block and full fine-tuning), and a note on each line."""
    from rich.table import Table

    setup, mem = plan_dict["setup"], plan_dict["memory"]
    mid = mem["mid_block"]["fsdp"]
    console.print(fsdp_units_line(mid), markup=False, highlight=False)
    order = [name for name in ("mid_block", "full") if "fsdp" in mem[name]]
    peaks = {name: mem[name]["fsdp"]["ranks"][mem[name]["fsdp"]["peak_rank"]] for name in order}
    held = {peaks[name]["rank"] for name in order}
    which = (
        f"rank {held.pop()}"
        if len(held) == 1
        else ", ".join(f"{METHOD_LABELS[name]} rank {peaks[name]['rank']}" for name in order)
    )
    table = Table(
        title=f"Per rank under FSDP2, GiB: {which} of {mid['world_size']} (the one holding most)"
    )
    table.add_column("")
    for name in order:
        table.add_column(METHOD_LABELS[name], justify="right")
    for key, label in FSDP_ROWS:
        if key == "gradient_accumulation" and mid["grad_accum"] == 1:
            continue
        table.add_row(
            label,
            *(f"{peaks[name][key] / GIB:.2f}" for name in order),
            end_section=key in ("weights", "gradients"),
        )
    if setup["optim"] in ("ao_adamw8bit", "ao_adamw4bit"):
        table.add_row(
            "fp32-state tensors",
            *(str(peaks[name]["fp32_state_tensors"]) for name in order),
        )
    console.print(table)
    console.print(fsdp_note(setup, mid), markup=False, highlight=False)


def recommendation_lines(plan_dict: dict[str, Any]) -> list[str]:
    """The recommendation of a :func:`make_plan` result as text: the mode and the ``fastmid
    train`` command that fits, or the smallest mode when none fits; ``[]`` when it is off."""
    info = plan_dict.get("recommendation") or {"status": "off"}
    if info["status"] == "off":
        return []
    gpu, headroom, modes = info["gpu_memory_gib"], info["min_headroom_gib"], info["modes"]
    rec = plan_dict.get("recommended")
    if rec is None:
        smallest = min(modes, key=lambda row: row["total_bytes"])
        return [
            f"no mode fits {gpu:g} GiB leaving at least {headroom:.2f} GiB free: the smallest "
            f"is mode {smallest['rank']} of {len(modes)} ({smallest['label']}) at "
            f"{smallest['total_bytes'] / GIB:.2f} GiB; narrow the band (--band, --layers) or "
            "shorten --seq-len"
        ]
    host = rec["host_memory_bytes"]
    pinned = f", {host / GIB:.2f} GiB pinned host memory" if host else ""
    return [
        f"recommended: mode {rec['rank']} of {len(modes)} ({rec['label']}), the first in the "
        f"order of preference (quality, then speed) that leaves at least {headroom:.2f} GiB free",
        f"fits {gpu:g} GiB: {rec['command']} ({rec['total_bytes'] / GIB:.2f} GiB, "
        f"{rec['headroom_bytes'] / GIB:.2f} GiB headroom{pinned})",
    ]
