"""Training configuration: one dataclass, YAML files, ``--flag`` overrides, validation.

:class:`TrainConfig` is the one declaration of every training option. Each field gives the type
(``Literal[...]`` for a fixed set of choices), the default, and in its metadata the help text, the
``--help`` group, the bounds and whether a resumed run must match it. The ``train`` command's flags,
the YAML keys, the validation below and the shared options of ``data inspect``, ``eval`` and
``analyze`` are all derived from it (see :mod:`fastmid.cli`).

Precedence: dataclass defaults < YAML file < command-line flags. YAML keys use the flag names with
``_`` or ``-`` (``micro_batch`` or ``micro-batch``). An unknown key is an error that names the key
and the file and suggests the closest known one; a bad value is an error that names the flag.
YAML is read with a safe loader (no Python tags); a key given twice is an error naming both
lines; a list is accepted where the flag takes a joined string (``band: [0.2, 0.8]`` is
``0.2:0.8``, ``layers: [3, 5]`` is ``3,5``, ``data: [a.jsonl, b.jsonl]`` is ``a.jsonl,b.jsonl``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from fastmid.errors import FastmidError


class ConfigError(FastmidError, ValueError):
    """Invalid configuration; the message names the key or flag and what to do."""


# The --help panels, in the order they are shown.
GROUPS = (
    "model",
    "data",
    "band",
    "adapter",
    "optimization",
    "scale",
    "checkpointing",
    "evaluation",
    "output",
)

Optimizer = Literal["auto", "adamw8bit", "adamw", "paged_adamw8bit", "ao_adamw8bit", "ao_adamw4bit"]
Precision = Literal["auto", "fp32", "bf16-master", "bf16"]
Schedule = Literal["cosine", "constant"]
Truncation = Literal["prompt-left", "drop"]
KernelMode = Literal["auto", "on", "off"]
Placement = Literal["first", "last", "middle", "random"]
# Must equal fastmid.models.lora.LORA_TARGETS (a test checks it); config imports nothing from models.
LoraTargets = Literal["all-linear", "qkvo"]
# Must equal fastmid.data.formats.FORMATS (a test checks it); config imports nothing from data.
DataFormat = Literal["messages", "sharegpt", "alpaca", "prompt-completion", "gsm8k", "text"]

OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
TRUNCATIONS: tuple[str, ...] = get_args(Truncation)
KERNEL_MODES: tuple[str, ...] = get_args(KernelMode)
PRECISIONS: tuple[str, ...] = get_args(Precision)
TRACKERS: tuple[str, ...] = ("none", "tensorboard", "wandb", "trackio")
# The optimizers that write bf16 weights back with stochastic rounding (torchao's, with
# ``bf16_stochastic_round=True``): the only ones --precision bf16 accepts. Must equal
# fastmid.train.optim.STOCHASTIC_ROUNDING (a test checks it); config imports nothing from train.
STOCHASTIC_ROUNDING_OPTIMIZERS: tuple[str, ...] = ("ao_adamw8bit", "ao_adamw4bit")


#: Overrides what ``--precision auto`` picks on a CPU (``fp32`` or ``bf16-master``) instead of
#: :func:`cpu_has_fast_bf16`; the test suite pins it to ``fp32`` so that its results do not depend
#: on the machine it runs on.
AUTO_CPU_PRECISION_ENV = "FASTMID_AUTO_CPU_PRECISION"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX tiles or the AVX512-BF16
    dot-product instructions, with oneDNN's bf16 kernels available to torch).

    There a bf16 matmul runs about 2x to 3x faster than fp32 at SmolLM2's MLP shapes
    (1100x576 @ 576x1536): measured here on a 2-core Xeon with AMX, and 2.3x (4.7 ms vs 10.8 ms)
    on a 2-core AMD EPYC with AVX512-BF16 and no AMX, where a whole `fastmid train` step ran 1.6x
    faster in bf16-master than in fp32 (315 vs 198 tokens/s). Without either, bf16 matmuls are
    emulated and slower than fp32. False when torch cannot say (its probes are private APIs).
    """
    try:
        import torch

        hardware = bool(torch.cpu._is_amx_tile_supported()) or bool(
            torch.cpu._is_avx512_bf16_supported()
        )
        return hardware and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # an older or newer torch without the probes: assume no
        return False


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto`` -> ``bf16-master`` on CUDA and on CPUs with hardware bf16 matmuls
    (:func:`cpu_has_fast_bf16`), ``fp32`` elsewhere; any other value unchanged.

    ``$FASTMID_AUTO_CPU_PRECISION`` (``fp32`` or ``bf16-master``), when set, replaces the CPU
    detection.

    Raises:
        ConfigError: ``$FASTMID_AUTO_CPU_PRECISION`` holds another value.
    """
    if precision != "auto":
        return precision
    if device_type == "cuda":
        return "bf16-master"
    forced = os.environ.get(AUTO_CPU_PRECISION_ENV)
    if forced:
        if forced not in ("fp32", "bf16-master"):
            raise ConfigError(
                f"${AUTO_CPU_PRECISION_ENV}: '{forced}' is not fp32 or bf16-master; "
                "unset it or pass --precision"
            )
        return forced
    return "bf16-master" if cpu_has_fast_bf16() else "fp32"


def resolve_optim(optim: str, precision: str, distributed: bool = False) -> str:
    """``auto`` -> torchao's ``ao_adamw8bit`` under ``bf16`` (stochastic rounding) or with several
    processes (FSDP2's DTensor parameters, which bitsandbytes cannot step), else bitsandbytes'
    ``adamw8bit``; any other value unchanged."""
    if optim != "auto":
        return optim
    return "ao_adamw8bit" if precision == "bf16" or distributed else "adamw8bit"


def resolve_auto(cfg: TrainConfig, device_type: str, distributed: bool = False) -> TrainConfig:
    """A copy of ``cfg`` with ``precision`` and ``optim`` resolved for ``device_type``
    (``"cpu"``, ``"cuda"``) and the number of processes, as ``config.yaml`` records them."""
    precision = resolve_precision(cfg.precision, device_type)
    optim = resolve_optim(cfg.optim, precision, distributed)
    return dataclasses.replace(cfg, precision=precision, optim=optim)


def _meta(
    help: str,
    group: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    note: str = "",
    resume_must_match: bool = False,
    yaml_list: str | None = None,
) -> dict[str, Any]:
    """The metadata of one :class:`TrainConfig` field (every key always present).

    Args:
        help: one phrase for ``--help`` (the choices and the default are added there).
        group: the ``--help`` panel, one of :data:`GROUPS`.
        ge, gt, le, lt: inclusive/exclusive bounds, checked by :func:`validate`.
        note: appended to the bound's error message (e.g. ``(0 disables)``).
        resume_must_match: a run resumed from a checkpoint must have the checkpoint's value.
        yaml_list: a YAML list is joined with this separator (``layers: [3, 5]`` -> ``"3,5"``).
    """
    if group not in GROUPS:
        raise ValueError(f"group {group!r} is not one of {GROUPS}")
    return {
        "help": help,
        "group": group,
        "ge": ge,
        "gt": gt,
        "le": le,
        "lt": lt,
        "note": note,
        "resume_must_match": resume_must_match,
        "yaml_list": yaml_list,
    }


@dataclass
class TrainConfig:
    """Everything one ``fastmid train`` run needs; written out resolved as ``config.yaml``.

    Units: ``lr`` per optimizer step; ``max_seq_len`` in tokens; ``micro_batch`` in sequences;
    steps count optimizer steps (one step = ``grad_accum`` micro-batches).
    """

    # model
    model: str = field(
        default="default",
        metadata=_meta(
            "model: default (SmolLM2-135M-Instruct), an HF folder, a .gguf file or a cached repo id",
            "model",
            resume_must_match=True,
        ),
    )
    kernels: KernelMode = field(
        default="auto",
        metadata=_meta("Triton kernels (auto: on CUDA when Triton imports)", "model"),
    )
    fuse_frozen: bool = field(
        default=False,
        metadata=_meta(
            "frozen layers run packed q/k/v and gate/up GEMMs and a fused residual+RMSNorm "
            "(llama, mistral, qwen2, qwen3; exact; off by default: no speed-up measured on CPU)",
            "model",
        ),
    )
    grad_checkpointing: bool = field(
        default=False,
        metadata=_meta("recompute band and suffix activations in backward (less memory)", "model"),
    )
    trust_remote_code: bool = field(
        default=False,
        metadata=_meta(
            "let a model folder's auto_map run its own Python code (only for folders you trust)",
            "model",
        ),
    )
    # data
    data: str = field(
        default="builtin:arith",
        metadata=_meta(
            "training data: builtin:arith, or files, folders and hub datasets, comma-separated",
            "data",
            resume_must_match=True,
            yaml_list=",",
        ),
    )
    eval_data: str | None = field(
        default=None,
        metadata=_meta(
            "held-out data for the eval loss (default: --eval-fraction of --data)",
            "data",
            resume_must_match=True,
            yaml_list=",",
        ),
    )
    eval_fraction: float = field(
        default=0.05,
        metadata=_meta(
            "share of --data held out for the eval loss when no --eval-data is given",
            "data",
            ge=0,
            lt=1,
            resume_must_match=True,
        ),
    )
    format: DataFormat | None = field(
        default=None,
        metadata=_meta(
            "data format of every source (default: detected)", "data", resume_must_match=True
        ),
    )
    split: str = field(
        default="train", metadata=_meta("dataset split to read", "data", resume_must_match=True)
    )
    max_examples: int | None = field(
        default=2000,
        metadata=_meta("use at most this many examples", "data", ge=1, resume_must_match=True),
    )
    shuffle_seed: int = field(
        default=0,
        metadata=_meta(
            "seed of the shuffle before --max-examples",
            "data",
            ge=0,
            le=2**32 - 1,  # torch seeds are 64-bit: seed * 1_000_003 + epoch fits
            note="(a 32-bit seed: 0 to 4294967295)",
            resume_must_match=True,
        ),
    )
    max_seq_len: int = field(
        default=512,
        metadata=_meta("tokens per sequence", "data", ge=8, note="tokens", resume_must_match=True),
    )
    truncation: Truncation = field(
        default="prompt-left",
        metadata=_meta(
            "over-long examples: cut the prompt's start, or drop them",
            "data",
            resume_must_match=True,
        ),
    )
    train_on_prompt: bool = field(
        default=False,
        metadata=_meta(
            "train every token, not only the assistant's", "data", resume_must_match=True
        ),
    )
    last_turn_only: bool = field(
        default=False,
        metadata=_meta(
            "train only the last assistant turn of each conversation",
            "data",
            resume_must_match=True,
        ),
    )
    skip_bad_rows: bool = field(
        default=False,
        metadata=_meta(
            "skip and count malformed rows instead of stopping", "data", resume_must_match=True
        ),
    )
    group_by_length: bool = field(
        default=False,
        metadata=_meta(
            "batch examples of similar length (less padding)", "data", resume_must_match=True
        ),
    )
    packing: bool = field(
        default=False,
        metadata=_meta(
            "pack several examples into each row of --max-seq-len tokens (best-fit decreasing; "
            "no attention across examples)",
            "data",
            resume_must_match=True,
        ),
    )
    # band
    band: str | None = field(
        default=None,
        metadata=_meta(
            "band as fractions START:END of depth (default 0.2:0.8 when no --layers)",
            "band",
            resume_must_match=True,
            yaml_list=":",
        ),
    )
    layers: str | None = field(
        default=None,
        metadata=_meta(
            "band as layer indices, e.g. 6-23 or 3,5,9",
            "band",
            resume_must_match=True,
            yaml_list=",",
        ),
    )
    placement: Placement | None = field(
        default=None,
        metadata=_meta(
            "move the band's block of layers (ablations)", "band", resume_must_match=True
        ),
    )
    train_embeddings: bool = field(
        default=False,
        metadata=_meta(
            "also train the input embeddings (a tied lm_head too)", "band", resume_must_match=True
        ),
    )
    train_lm_head: bool = field(
        default=False, metadata=_meta("also train lm_head", "band", resume_must_match=True)
    )
    train_final_norm: bool = field(
        default=False, metadata=_meta("also train the final norm", "band", resume_must_match=True)
    )
    # adapter: LoRA on the band's layers instead of full-rank updates (fastmid.models.lora)
    lora_rank: int = field(
        default=0,
        metadata=_meta(
            "LoRA rank r: the band's layers get low-rank adapters and their own weights freeze "
            "(0: full-rank updates of the band, fastmid's method; needs the ablate extra)",
            "adapter",
            ge=0,
            note="(0: full-rank band)",
            resume_must_match=True,
        ),
    )
    lora_alpha: float | None = field(
        default=None,
        metadata=_meta(
            "LoRA alpha of every adapter, whose output is scaled by alpha / rank (default: twice "
            "each adapter's rank, a scale of 2)",
            "adapter",
            gt=0,
            resume_must_match=True,
        ),
    )
    lora_targets: LoraTargets = field(
        default="all-linear",
        metadata=_meta(
            "the band's linear layers that get adapters: every one, or the attention's "
            "q, k, v and o projections",
            "adapter",
            resume_must_match=True,
        ),
    )
    lora_match_budget: bool = field(
        default=False,
        metadata=_meta(
            "raise the rank on the band's layers so the total rank equals uniform LoRA of "
            "--lora-rank over every decoder layer: the source paper's released Mid-Block method",
            "adapter",
            resume_must_match=True,
        ),
    )
    # optimization
    max_steps: int | None = field(
        default=90, metadata=_meta("optimizer steps (overrides --epochs)", "optimization", ge=1)
    )
    epochs: float = field(
        default=1.0,
        metadata=_meta("passes over the data when no --max-steps", "optimization", gt=0),
    )
    micro_batch: int = field(
        default=8,
        metadata=_meta("sequences per micro-batch", "optimization", ge=1, resume_must_match=True),
    )
    grad_accum: int = field(
        default=1,
        metadata=_meta(
            "micro-batches per optimizer step", "optimization", ge=1, resume_must_match=True
        ),
    )
    # The optimizer and schedule settings are stored in the checkpoint's optimizer and scheduler
    # state, which a resume loads: a new value would be written to config.yaml but never used.
    lr: float = field(
        default=3e-4,
        metadata=_meta("peak learning rate", "optimization", gt=0, resume_must_match=True),
    )
    warmup_steps: int = field(
        default=5,
        metadata=_meta("linear warm-up steps", "optimization", ge=0, resume_must_match=True),
    )
    schedule: Schedule = field(
        default="cosine",
        metadata=_meta(
            "learning-rate schedule after warm-up", "optimization", resume_must_match=True
        ),
    )
    min_lr_ratio: float = field(
        default=0.1,
        metadata=_meta(
            "final learning rate of the cosine schedule, as a share of --lr",
            "optimization",
            ge=0,
            le=1,
            resume_must_match=True,
        ),
    )
    weight_decay: float = field(
        default=0.0,
        metadata=_meta(
            "AdamW weight decay (matrices only)", "optimization", ge=0, resume_must_match=True
        ),
    )
    grad_clip: float = field(
        default=1.0,
        metadata=_meta(
            "global gradient-norm clip (0 turns clipping off)",
            "optimization",
            ge=0,
            note="(0 disables clipping)",
        ),
    )
    precision: Precision = field(
        default="auto",
        metadata=_meta(
            "weights and compute (bf16-master: bf16 autocast, fp32 band weights; bf16: all "
            "weights bf16, stochastic rounding; auto: bf16-master on CUDA and on CPUs with "
            "hardware bf16 matmuls (AMX or AVX512-BF16), else fp32)",
            "optimization",
            resume_must_match=True,
        ),
    )
    optim: Optimizer = field(
        default="auto",
        metadata=_meta(
            "optimizer (adamw8bit, paged_adamw8bit: bitsandbytes; ao_*: torchao; adamw: fp32 "
            "states; auto: ao_adamw8bit under --precision bf16, else adamw8bit)",
            "optimization",
            resume_must_match=True,
        ),
    )
    optimizer_in_backward: bool = field(
        default=False,
        metadata=_meta(
            "step each band parameter inside backward and free its gradient at once (needs "
            "--grad-accum 1 and --grad-clip 0)",
            "optimization",
            resume_must_match=True,
        ),
    )
    optimizer_offload: bool = field(
        default=False,
        metadata=_meta(
            "keep optimizer states in pinned CPU memory and step there (CUDA; needs --grad-clip 0)",
            "optimization",
            resume_must_match=True,
        ),
    )
    nproc: int = field(
        default=1,
        metadata=_meta(
            "processes on this node, one per GPU: N > 1 starts torchrun with FSDP2 (same results "
            "as one process with the global batch; README 'Several GPUs')",
            "scale",
            ge=1,
        ),
    )
    seed: int = field(
        default=0,
        metadata=_meta(
            "random seed (data order, eval split, random placement)",
            "optimization",
            ge=0,
            le=2**32 - 1,  # torch seeds are 64-bit: seed * 1_000_003 + epoch fits
            note="(a 32-bit seed: 0 to 4294967295)",
            resume_must_match=True,
        ),
    )
    # checkpointing
    save_every: int = field(
        default=30,
        metadata=_meta(
            "checkpoint every N steps (0: only at the end)",
            "checkpointing",
            ge=0,
            note="(0 saves only at the end)",
        ),
    )
    keep_last: int = field(default=2, metadata=_meta("checkpoints to keep", "checkpointing", ge=1))
    resume: str | None = field(
        default=None,
        metadata=_meta(
            "continue from a checkpoint folder, or 'latest' of --output", "checkpointing"
        ),
    )
    # evaluation
    eval_every: int = field(
        default=30,
        metadata=_meta(
            "eval loss every N steps (0 turns it off)", "evaluation", ge=0, note="(0 disables)"
        ),
    )
    eval_batches: int = field(
        default=8,
        metadata=_meta("micro-batches of held-out data per eval loss", "evaluation", ge=1),
    )
    eval_accuracy: bool = field(
        default=True, metadata=_meta("exact-match accuracy before and after training", "evaluation")
    )
    eval_n: int = field(
        default=100, metadata=_meta("problems in the accuracy eval", "evaluation", ge=1)
    )
    # 96: the longest builtin:arith reference answer is 88 SmolLM2 tokens (train and test splits)
    eval_max_new_tokens: int = field(
        default=96,
        metadata=_meta("generation budget per problem in the accuracy eval", "evaluation", ge=1),
    )
    eval_batch_size: int = field(
        default=50,
        metadata=_meta("prompts per generation batch in the accuracy eval", "evaluation", ge=1),
    )
    eval_accuracy_data: str = field(
        default="builtin:arith:test",
        metadata=_meta(
            "problems of the accuracy eval: builtin:arith:test or a GSM8K-format JSONL",
            "evaluation",
        ),
    )
    # output
    output: str = field(default="runs/default", metadata=_meta("run folder", "output"))
    overwrite: bool = field(
        default=False, metadata=_meta("replace an existing run in --output", "output")
    )
    report_to: str = field(
        default="none",
        metadata=_meta(
            "experiment trackers, comma-separated: none, tensorboard (run folder's tensorboard/), "
            "wandb, trackio (each an optional extra)",
            "output",
            yaml_list=",",
        ),
    )
    log_every: int = field(
        default=10,
        metadata=_meta(
            "a progress line in logs and train.log every N steps (metrics.jsonl keeps every step)",
            "output",
            ge=1,
        ),
    )

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults written out (``dataclasses.asdict``)."""
        return dataclasses.asdict(self)


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES: dict[str, Any] = get_type_hints(TrainConfig)

# Names used by other trainers (HF Trainer, axolotl, litgpt); difflib alone finds none of them.
ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "batch_size": "micro_batch",
    "per_device_train_batch_size": "micro_batch",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_accumulation": "grad_accum",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "warmup": "warmup_steps",
    "num_warmup_steps": "warmup_steps",
    "max_length": "max_seq_len",
    "seq_len": "max_seq_len",
    "sequence_len": "max_seq_len",
    "output_dir": "output",
    "out_dir": "output",
    "model_name_or_path": "model",
    "base_model": "model",
    "dataset": "data",
    "optimizer": "optim",
    "lr_scheduler_type": "schedule",
    "lr_scheduler": "schedule",
    "gradient_checkpointing": "grad_checkpointing",
    "max_grad_norm": "grad_clip",
    "save_steps": "save_every",
    "save_total_limit": "keep_last",
    "eval_steps": "eval_every",
    "logging_steps": "log_every",
    "resume_from_checkpoint": "resume",
}


def field_type(name: str) -> Any:
    """The resolved type of the :class:`TrainConfig` field ``name`` (e.g. ``int | None``)."""
    return _TYPES[name]


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """``(type without None, whether None is allowed)``."""
    args = get_args(tp)
    if get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Union[tuple(rest)]), len(rest) < len(args)
    return tp, False


def choices(name: str) -> tuple[str, ...] | None:
    """The accepted values of a ``Literal`` field, else None."""
    base, _ = _unwrap(field_type(name))
    return tuple(get_args(base)) if get_origin(base) is Literal else None


def flag(name: str) -> str:
    """The command-line flag of field ``name``: ``max_seq_len`` -> ``--max-seq-len``."""
    return "--" + name.replace("_", "-")


def resume_keys() -> tuple[str, ...]:
    """Settings a resumed run must match (fields with ``resume_must_match``), in field order.

    They fix the data order, the band and the loss; a different value would silently continue
    another run.
    """
    return tuple(n for n, f in FIELDS.items() if f.metadata["resume_must_match"])


def _normalize_key(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def suggest(key: str) -> str | None:
    """The field name closest to an unknown key or flag (aliases such as ``learning_rate``
    first, then spelling), or None."""
    norm = _normalize_key(key).lower()
    if norm in ALIASES:
        return ALIASES[norm]
    close = difflib.get_close_matches(norm, sorted(FIELDS), n=1)
    return close[0] if close else None


def _unknown(key: str, where: str) -> ConfigError:
    close = suggest(key)
    hint = f"; did you mean '{close}'?" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


# ---- YAML --------------------------------------------------------------------------------------


class _DuplicateKeyError(FastmidError, yaml.YAMLError):
    """Internal: a YAML mapping repeats ``key``; :func:`load_yaml` turns it into a ConfigError."""

    def __init__(self, key: str, first: int, second: int) -> None:
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python tags) that refuses duplicate keys, which ``safe_load``
    silently resolves to the last one, and keeps ``0:1`` as text, not YAML 1.1's base 60."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = _normalize_key(str(key_node.value))
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKeyError(str(key_node.value), seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep)


def _sexagesimal_as_text(tag: str) -> Any:
    fallback = _Loader.yaml_constructors[tag]

    def construct(loader: _Loader, node: yaml.ScalarNode) -> Any:
        value = loader.construct_scalar(node)
        # YAML 1.1 reads `band: 0:1` as the base-60 number 1: keep what the user wrote.
        if isinstance(value, str) and ":" in value:
            return value
        return fallback(loader, node)

    return construct


for _tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
    _Loader.add_constructor(_tag, _sexagesimal_as_text(_tag))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config into a dict with normalized keys (plain YAML only: no Python tags).

    Raises:
        ConfigError: missing file, a folder, an unreadable file, text that is not UTF-8 (named
            with the line and byte offset), invalid YAML, a duplicate key (named with its lines),
            not a mapping, or an unknown key (named, with the closest known one).
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder, not a config file; pass the YAML file itself")
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = p.read_bytes()
        text = data.decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the config file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        utf16 = " (it starts like UTF-16)" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else ""
        raise ConfigError(
            f"{p}: not UTF-8 text{utf16}: byte 0x{data[exc.start]:02x} at offset {exc.start} "
            f"(line {line}) is not valid UTF-8; save the file as UTF-8"
        ) from None
    try:
        raw = yaml.load(text, Loader=_Loader) or {}
    except _DuplicateKeyError as exc:
        raise ConfigError(
            f"{p}: key '{exc.key}' appears twice (lines {exc.first} and {exc.second}); keep one"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML ({_one_line(exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the config must be a mapping of key: value")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        norm = _normalize_key(str(key))
        if norm not in FIELDS:
            raise _unknown(str(key), str(p))
        out[norm] = value
    return out


def _one_line(exc: yaml.YAMLError) -> str:
    """PyYAML's message (several lines, with a caret drawing) as ``line N: problem``."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    text = " ".join(str(problem if problem else exc).split())
    return f"line {mark.line + 1}: {text}" if mark is not None else text


def config_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML, every default written out (``config.yaml`` of a run and
    ``fastmid train --print-config``).

    ``overwrite`` and ``resume`` describe one invocation, not the run: they are written as
    ``false``/``null`` so that re-running a saved config never wipes or silently resumes a run.
    """
    values = dataclasses.asdict(cfg)
    values["overwrite"] = False
    values["resume"] = None
    return yaml.safe_dump(values, sort_keys=False)


# Fields that may name local files or folders (comma-separated for the data fields).
PATH_FIELDS = ("model", "data", "eval_data", "eval_accuracy_data", "output", "resume")


def resolve_path_value(name: str, value: str | None) -> str | None:
    """``value`` of the path field ``name`` made absolute where it names a local path (see
    :func:`resolve_paths`)."""
    if value is None or (name == "resume" and value == "latest"):
        return value
    if name == "output":
        return str(Path(value).expanduser().resolve())
    parts = [part.strip() for part in value.split(",")]
    return ",".join(
        str(Path(part).expanduser().resolve()) if Path(part).expanduser().exists() else part
        for part in parts
    )


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """A copy of ``cfg`` whose local paths are absolute, so the run folder's ``config.yaml``
    (and a checkpoint's copy of it) works from any working directory.

    ``output`` always becomes absolute; in ``model``, ``data``, ``eval_data``,
    ``eval_accuracy_data`` and ``resume`` each comma-separated part that exists as a path does;
    names such as ``default``, ``builtin:arith`` or a cached repo id stay as written.
    """
    return dataclasses.replace(
        cfg, **{name: resolve_path_value(name, getattr(cfg, name)) for name in PATH_FIELDS}
    )


def dump_yaml(cfg: TrainConfig, path: Path) -> None:
    """Write :func:`config_yaml` of ``cfg`` to ``path``."""
    path.write_text(config_yaml(cfg))


# ---- building and checking ---------------------------------------------------------------------


def build_config(
    yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then the YAML file, then ``overrides`` (flags given on the command line).

    Args:
        yaml_path: optional YAML file.
        overrides: flag values; ``None`` values mean "not given" and are skipped.

    Raises:
        ConfigError: unknown key, wrong type, or a value that fails :func:`validate`.
    """
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values.update(load_yaml(yaml_path))
    from_yaml = set(values)
    for key, value in (overrides or {}).items():
        norm = _normalize_key(key)
        if norm not in FIELDS:
            raise _unknown(key, "command line")
        if value is not None:
            values[norm] = value
            from_yaml.discard(norm)

    def where(name: str) -> str:
        # A bad value from the file is named by file and key, one from a flag by its flag.
        return f"{yaml_path}: key '{name}'" if name in from_yaml else flag(name)

    cfg = TrainConfig()
    for key, value in values.items():
        setattr(cfg, key, _coerce(key, value, where(key)))
    validate(cfg, where)
    return cfg


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(name: str, value: Any, where: str | None = None) -> Any:
    """``value`` (from YAML or a flag) as field ``name``'s type.

    Raises:
        ConfigError: naming ``where`` (default: the flag), the value and the expected type.
    """
    base, optional = _unwrap(field_type(name))
    kind = str if get_origin(base) is Literal else base

    def bad(expected: str | None = None) -> ConfigError:
        return ConfigError(
            f"{where or flag(name)}: invalid value {value!r} "
            f"(expected {expected or _EXPECTED[kind]})"
        )

    if value is None:
        if optional:
            return None
        raise bad()
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("true", "yes", "1", "on"):
                return True
            if low in ("false", "no", "0", "off"):
                return False
        raise bad()
    if isinstance(value, bool):  # YAML `yes` is not a number or a name
        raise bad()
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if kind is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as text.
            try:
                return float(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    # str and Literal fields
    if isinstance(value, (list, tuple)):
        return _join_list(name, value, bad)
    if isinstance(value, (str, int, float)):
        return str(value)
    raise bad()


def _join_list(
    name: str, items: list[Any] | tuple[Any, ...], bad: Callable[..., ConfigError]
) -> str:
    """A YAML list for a field that takes one: ``band: [0.2, 0.8]`` -> ``"0.2:0.8"``."""
    sep = FIELDS[name].metadata["yaml_list"]
    if sep is None or not all(
        isinstance(i, (str, int, float)) and not isinstance(i, bool) for i in items
    ):
        raise bad()
    if name == "band" and (len(items) != 2 or not all(isinstance(i, (int, float)) for i in items)):
        raise bad("START:END or a list of two numbers, e.g. [0.2, 0.8]")
    return sep.join(str(i) for i in items)


def _fmt(x: float) -> str:
    return f"{x:g}"


def _bounds_message(meta: dict[str, Any]) -> str | None:
    lo = ("[", meta["ge"]) if meta["ge"] is not None else ("(", meta["gt"])
    hi = ("]", meta["le"]) if meta["le"] is not None else (")", meta["lt"])
    if lo[1] is None and hi[1] is None:
        return None
    if lo[1] is not None and hi[1] is not None:
        text = f"must be in {lo[0]}{_fmt(lo[1])}, {_fmt(hi[1])}{hi[0]}"
    elif lo[1] is not None:
        text = f"must be {'>=' if lo[0] == '[' else '>'} {_fmt(lo[1])}"
    else:
        text = f"must be {'<=' if hi[0] == ']' else '<'} {_fmt(hi[1])}"
    return f"{text} {meta['note']}" if meta["note"] else text


def _in_bounds(value: float, meta: dict[str, Any]) -> bool:
    return (
        (meta["ge"] is None or value >= meta["ge"])
        and (meta["gt"] is None or value > meta["gt"])
        and (meta["le"] is None or value <= meta["le"])
        and (meta["lt"] is None or value < meta["lt"])
    )


def _band_problem(text: str) -> str | None:
    """What is wrong with a ``--band`` value ``START:END``, or None.

    Only what holds for every model: two finite fractions with ``0 <= START < END <= 1``. Whether
    the band covers a layer of a given depth is :class:`fastmid.models.band.BandPlan`'s check
    (config cannot import models: they are sibling layers), so a bad band is refused here, before
    any model loads.
    """
    parts = text.split(":")
    if len(parts) != 2:
        return f"'{text}' must look like START:END (fractions of depth), e.g. 0.2:0.8"
    try:
        start, end = float(parts[0]), float(parts[1])
    except ValueError:
        return f"'{text}' must hold two numbers, START:END, e.g. 0.2:0.8"
    if not (math.isfinite(start) and math.isfinite(end) and 0 <= start <= 1 and 0 <= end <= 1):
        return f"'{text}': both fractions must be in [0, 1], e.g. 0.2:0.8"
    if start >= end:
        return f"'{text}' is reversed or empty: START must be below END, e.g. 0.2:0.8"
    return None


def _layers_problem(text: str) -> str | None:
    """What is wrong with a ``--layers`` value (``6-23``, ``3,5,9``, ``0-2,7``), or None.

    The syntax only; indices beyond the model's depth are the band's check once the model is known.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        return f"'{text}' is empty; give layer indices such as 6-23 or 3,5,9"
    for item in items:
        lo_s, _, hi_s = item.partition("-")
        if not lo_s.strip().isdigit() or (hi_s and not hi_s.strip().isdigit()):
            return f"'{item}' is not a layer index (0, 1, ...) or a range like 6-23"
        if hi_s and int(hi_s) < int(lo_s):
            return f"range '{item}' is reversed; write it low-high, e.g. 6-23"
    return None


# Fields whose text has a syntax of its own, checked by :func:`field_problem`.
_TEXT_CHECKS: dict[str, Callable[[str], str | None]] = {
    "band": _band_problem,
    "layers": _layers_problem,
}


def field_problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the :class:`TrainConfig` field ``name``, or None.

    ``value`` already has the field's type (as :func:`_coerce` or the CLI's parser gives it).
    Checks the choices, finiteness, the declared bounds and the syntax of ``band``/``layers``.
    The text names no flag, so that a command which spells the option differently (``eval``'s
    ``--n`` for ``eval_n``) can put its own flag in front.
    """
    if value is None:
        return None
    allowed = choices(name)
    if allowed is not None and value not in allowed:
        return f"'{value}' is not one of {', '.join(allowed)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        meta = dict(FIELDS[name].metadata)
        if not _in_bounds(value, meta):
            return _bounds_message(meta)
    if name in _TEXT_CHECKS and isinstance(value, str):
        return _TEXT_CHECKS[name](value)
    return None


def validate(cfg: TrainConfig, where: Callable[[str], str] = flag) -> None:
    """Check every field against its declaration: type, choices, finiteness, bounds, the syntax
    of ``band`` and ``layers``; then the rules that span fields.

    Args:
        where: how a message names field ``name`` (the flag by default; :func:`build_config`
            names the YAML file and key for values that came from the file).

    Raises:
        ConfigError: naming the flag (or file and key) and the accepted values.
    """
    for name in FIELDS:
        problem = field_problem(name, _coerce(name, getattr(cfg, name), where(name)))
        if problem is not None:
            raise ConfigError(f"{where(name)}: {problem}")
    if cfg.band is not None and cfg.layers is not None:
        raise ConfigError("--band: give either --band or --layers, not both")
    for name in ("optimizer_in_backward", "optimizer_offload"):
        # Both step a parameter as soon as its gradient exists (offload: copies it to the host
        # then), before the global norm over the band is known.
        if getattr(cfg, name) and cfg.grad_clip > 0:
            raise ConfigError(
                f"{where(name)}: global gradient-norm clipping (--grad-clip {_fmt(cfg.grad_clip)}) "
                f"needs every gradient of the step before any parameter steps; pass --grad-clip "
                f"0 with {flag(name)}, or drop {flag(name)} to keep clipping"
            )
    if cfg.optimizer_in_backward and cfg.grad_accum > 1:
        raise ConfigError(
            f"{where('optimizer_in_backward')}: the step in backward runs once per backward, so "
            f"it cannot accumulate {cfg.grad_accum} micro-batches; use --grad-accum 1 and raise "
            "--micro-batch instead, or drop --optimizer-in-backward"
        )
    if cfg.optimizer_in_backward and cfg.optimizer_offload:
        raise ConfigError(
            f"{where('optimizer_offload')}: --optimizer-offload already steps on the host while "
            "backward runs; use one of --optimizer-offload and --optimizer-in-backward"
        )
    if cfg.optimizer_offload and cfg.optim == "paged_adamw8bit":
        raise ConfigError(
            f"{where('optim')}: paged_adamw8bit pages its states itself; with "
            "--optimizer-offload use adamw, adamw8bit, ao_adamw8bit or ao_adamw4bit"
        )
    if cfg.lora_rank == 0:
        for name in ("lora_match_budget", "lora_alpha"):
            if getattr(cfg, name) not in (None, False):
                raise ConfigError(
                    f"{where(name)}: applies to LoRA adapters; give --lora-rank R (R >= 1) too, "
                    f"or drop {flag(name)}"
                )
    else:
        # LoRA is built and tested on one process with plain frozen layers.
        if cfg.nproc > 1:
            raise ConfigError(
                f"{where('nproc')}: LoRA adapters (--lora-rank) run on one process; use "
                "--nproc 1, or drop --lora-rank for the full-rank band"
            )
        if cfg.fuse_frozen:
            raise ConfigError(
                f"{where('fuse_frozen')}: --fuse-frozen is not supported with LoRA adapters "
                "(--lora-rank); drop one of them"
            )
    if cfg.packing and cfg.group_by_length:
        raise ConfigError(
            f"{where('packing')}: packed rows are already filled by length; drop "
            "--group-by-length (or --packing)"
        )
    trackers = [t.strip() for t in cfg.report_to.split(",") if t.strip()]
    unknown = [t for t in trackers if t not in TRACKERS]
    if unknown or not trackers or ("none" in trackers and len(trackers) > 1):
        raise ConfigError(
            f"{where('report_to')}: '{cfg.report_to}' is not a tracker list; use none, or one or "
            f"more of {', '.join(t for t in TRACKERS if t != 'none')} separated by commas"
        )
    if cfg.precision == "bf16" and cfg.optim not in ("auto", *STOCHASTIC_ROUNDING_OPTIMIZERS):
        # Round-to-nearest bf16 updates lose most small steps (README, "Precision"): never a
        # silent option.
        raise ConfigError(
            f"{where('optim')}: {cfg.optim} cannot write bf16 weights back with stochastic "
            f"rounding, so under --precision bf16 small updates would be lost; use "
            f"{' or '.join(STOCHASTIC_ROUNDING_OPTIMIZERS)}, or --precision bf16-master"
        )
