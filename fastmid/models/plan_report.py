"""`fastmid plan`: the band, its parameter counts and a per-GPU memory estimate, without weights.

:func:`make_plan` builds the model from its config on the meta device (exact parameter counts from
transformers' module tree, no memory used), applies the band and returns a JSON-ready dict;
:func:`print_plan` renders that dict with rich: the layer table (runs of layers with the same role),
the parameter totals and the memory table (Mid-Block beside full fine-tuning and LoRA).
"""

from __future__ import annotations

import os
from typing import Any

from fastmid.models.band import BandPlan, count_parameters
from fastmid.models.families import (
    UnsupportedModelError,
    embeddings_tied,
    family_for_config,
)
from fastmid.models.loading import ModelSourceError, load_config
from fastmid.models.memory import (
    EXACT_ACTIVATION_FAMILIES,
    BlockShape,
    TrainingSetup,
    build_meta_model,
    estimate_all,
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
    ("activations", "activations"),
    ("logits", "logits"),
    ("total", "total"),
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
) -> dict[str, Any]:
    """Plan a Mid-Block run: band, parameter counts and per-GPU memory, loading no weights.

    Args:
        model_source: ``"default"``, a model folder, a ``.gguf`` file, a cached repo id, or a bare
            ``config.json`` (see :func:`fastmid.models.loading.load_config`).
        band: fractions ``"0.2:0.8"`` (the default when ``layers`` is None).
        layers: explicit indices ``"6-23"`` / ``"3,5,9"``.
        seq_len: tokens per sequence.
        micro_batch: sequences per GPU per step.
        gpus: GPUs sharing weights, gradients and optimizer states (FSDP2).
        gpu_memory_gib: memory of one GPU, GiB (2^30 bytes).
        optim: ``auto`` (``ao_adamw8bit`` under ``bf16``, else ``adamw8bit``), ``adamw8bit``,
            ``paged_adamw8bit``, ``adamw``, ``ao_adamw8bit`` or ``ao_adamw4bit`` (Mid-Block and
            full fine-tuning; LoRA uses fp32 AdamW).
        checkpointing: activation checkpointing of every layer that stores activations.
        lora_rank: rank of the LoRA comparison column.
        precision: ``auto`` (``bf16-master``, the CUDA default), ``fp32``, ``bf16-master`` or
            ``bf16`` (Mid-Block and full fine-tuning; LoRA keeps its own setup).
        optimizer_in_backward: ``--optimizer-in-backward``: each trained tensor steps in its
            gradient hook, so one gradient lives at a time (Mid-Block and full fine-tuning).
        optimizer_offload: ``--optimizer-offload``: optimizer states of tensors of >= 4096
            elements in pinned host memory, reported as ``host_memory`` outside the GPU total
            (Mid-Block and full fine-tuning).

    Returns:
        JSON-ready dict with keys ``model`` (source, model_type, sizes), ``band``
        (:meth:`BandPlan.to_dict` plus ``describe``), ``layers`` (per layer: index, role,
        parameters, trainable), ``parameters`` (:meth:`ParameterCounts.to_dict`), ``setup``
        (the settings with ``precision`` and ``optim`` resolved, ``tokens_per_gpu``, the two
        optimizer options), ``memory`` (``mid_block``, ``full``, ``lora``:
        :meth:`MemoryEstimate.to_dict`, bytes and GiB, ``host_memory`` beside ``total``) and
        ``activation_model`` (``exact`` for Llama-style families, else ``approximate``).

    Raises:
        ModelSourceError: the source cannot be read, or its ``model_type`` is unsupported.
        BandError: an invalid ``band`` / ``layers`` string (message names the flag).
        MemoryPlanError: a non-positive size, unknown ``optim`` or ``precision``, ``bf16`` with
            an optimizer that cannot round stochastically, both optimizer options, offload with
            ``paged_adamw8bit``.
    """
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
    )
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
        },
        "memory": {name: est.to_dict() for name, est in memory.items()},
        "activation_model": "exact"
        if spec.model_type in EXACT_ACTIVATION_FAMILIES
        else "approximate",
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
    if setup["gpus"] > 1:
        console.print(
            f"note: the {setup['gpus']}-GPU figures are estimates for FSDP2 sharding, which "
            "`fastmid train` cannot run yet (it trains on one device)"
        )
    if plan_dict.get("activation_model") != "exact":
        console.print(
            f"note: activations use the Llama-style block formulas; {m['model_type']} differs "
            "in detail, so treat them as approximate"
        )
