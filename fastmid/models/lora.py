"""LoRA adapters on the band's layers (``fastmid train --lora-rank R``): the low-rank control.

fastmid's method trains every parameter of the band's decoder layers at full rank. With
``--lora-rank R`` the same band (``--band``/``--layers``) instead gets LoRA adapters (Hu et al.
2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685): each targeted
``nn.Linear`` of weight ``W`` (out x in) computes ``W x + (alpha / r) B A x`` with ``A`` (r x in)
drawn at random and ``B`` (out x r) zero at the start, and only ``A`` and ``B`` train; the band's
own weights (norms included) stay frozen. The band's execution policy is unchanged: the layers
below the band run under ``no_grad``, the frozen layers above pass gradients down.

Targets (``--lora-targets``): ``all-linear`` (every ``nn.Linear`` inside the decoder layer:
attention and MLP projections) or ``qkvo`` (the ``nn.Linear`` modules of the attention submodule:
q, k, v and o for Llama-like families).

Rank budget (``--lora-match-budget``), the source paper's released Mid-Block method. Zhao et al.,
"A Layer-wise Analysis of Supervised Fine-Tuning" (arXiv 2604.11838): its released scripts (as
``/work/shared/paper.md`` of this project describes them) put LoRA on q/k/v/o of the middle
segments of depth only, with the rank raised so that the total rank budget equals that of uniform
LoRA over every layer. Here: the sum of ranks over all adapted modules equals ``R x`` (the number
of targeted modules in *every* decoder layer); that total is spread over the band's modules as
integers differing by at most one (:func:`distribute_ranks`: ``total = q * n + m`` gives the
first ``m`` modules, in layer then module order, rank ``q + 1`` and the rest rank ``q``). The
scripts split depth into five equal segments and adapt the middle ones; for ``L`` layers the
segment bounds are ``round_half_up(k * L / 5)``, so the middle three segments are exactly
fastmid's default band ``[round_half_up(0.2 L), round_half_up(0.8 L))``
(:func:`paper_mid_layers`, which a test checks against the band for every depth up to 256).

Scale: ``--lora-alpha`` fixes alpha for every module (PEFT's convention, scale ``alpha / r``);
by default each module's alpha is twice its rank, so the scale is 2 everywhere, including the
modules whose rank the budget raised.

The adapters are PEFT's (``peft.inject_adapter_in_model`` with ``rank_pattern`` and
``alpha_pattern``), imported only when LoRA is asked for; without peft the run stops with one line
naming ``pip install 'fastmid[ablate]'``. Export merges the adapters into the base weights
(:func:`merged_state_dict`): ``final/`` is an ordinary model with the base model's tensor names.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch

from fastmid.errors import FastmidError
from fastmid.models.band import BandPlan, ParameterCounts
from fastmid.models.families import decoder_layers, family_of, layer_index_of

# Must equal fastmid.config.LoraTargets (a test checks it); config imports nothing from models.
LORA_TARGETS: tuple[str, ...] = ("all-linear", "qkvo")
# Depth segments of the released Mid-Block scripts; the middle ones (1..3 of 0..4) are adapted.
PAPER_SEGMENTS = 5
ADAPTER_NAME = "default"
INSTALL_HINT = "pip install 'fastmid[ablate]'"


class LoraError(FastmidError, ValueError):
    """LoRA cannot run as asked: peft missing, a model without targetable linears, a bad setting."""


def import_peft() -> Any:
    """The ``peft`` module, imported on first use.

    Raises:
        LoraError: peft is not installed; the message names ``pip install 'fastmid[ablate]'``.
    """
    try:
        import peft
    except ImportError:
        raise LoraError(
            f"--lora-rank: LoRA adapters need the peft package, which is not installed; "
            f"install it with `{INSTALL_HINT}`"
        ) from None
    return peft


def paper_mid_layers(num_hidden_layers: int) -> tuple[int, ...]:
    """The layers the released Mid-Block scripts adapt: the middle three of five depth segments.

    Segment ``k`` of ``L`` layers is ``[b_k, b_{k+1})`` with ``b_k = round_half_up(k * L / 5)``,
    computed in integers as ``(2 k L + 5) // 10`` (``k L / 5`` never ends in exactly .5, so no
    tie arises); the middle segments 1..3 are ``[b_1, b_4)``, the same layers as the band
    ``0.2:0.8`` (:meth:`fastmid.models.band.BandPlan.from_fractions`).

    Args:
        num_hidden_layers: ``L >= 1``.

    Returns:
        The layer indices, ascending (empty when ``L`` is too small to have a middle).

    Raises:
        ValueError: ``L < 1``.
    """
    if num_hidden_layers < 1:
        raise ValueError(f"num_hidden_layers must be >= 1, got {num_hidden_layers}")

    def bound(k: int) -> int:
        return (2 * k * num_hidden_layers + PAPER_SEGMENTS) // (2 * PAPER_SEGMENTS)

    return tuple(range(bound(1), bound(PAPER_SEGMENTS - 1)))


def distribute_ranks(total: int, count: int) -> list[int]:
    """Split a total rank over ``count`` modules as integers differing by at most one.

    ``total = q * count + m`` (``0 <= m < count``): the first ``m`` modules get ``q + 1``, the
    others ``q``; the sum is ``total``.

    Raises:
        LoraError: ``count < 1`` or ``total < count`` (a module would get rank 0).
    """
    if count < 1:
        raise LoraError("no module to give a LoRA rank to")
    if total < count:
        raise LoraError(
            f"a total rank of {total} cannot give each of {count} modules a rank of at least 1"
        )
    q, m = divmod(total, count)
    return [q + 1] * m + [q] * (count - m)


def target_linears(
    model: torch.nn.Module, layers: tuple[int, ...] | list[int] | range, targets: str
) -> list[tuple[str, int, int]]:
    """The ``nn.Linear`` modules LoRA adapts in the given decoder layers (works on meta tensors).

    Args:
        model: a ``*ForCausalLM`` of a family in :mod:`fastmid.models.families`, without adapters.
        layers: decoder-layer indices.
        targets: ``all-linear`` (every linear of the layer) or ``qkvo`` (the linears of its
            attention submodule).

    Returns:
        ``(module name, in_features, out_features)`` in layer order, then the layer's module order.

    Raises:
        LoraError: unknown ``targets``; a layer without such a linear (GPT-2's ``Conv1D``
            projections are not ``nn.Linear``).
    """
    if targets not in LORA_TARGETS:
        raise LoraError(f"--lora-targets: '{targets}' is not one of {', '.join(LORA_TARGETS)}")
    spec = family_of(model)
    stack = decoder_layers(model)
    found: list[tuple[str, int, int]] = []
    for i in layers:
        mine = [
            (f"{spec.layers}.{i}.{rel}", mod.in_features, mod.out_features)
            for rel, mod in stack[i].named_modules()
            if isinstance(mod, torch.nn.Linear)
            and (targets == "all-linear" or rel.startswith(spec.attention + "."))
        ]
        if not mine:
            raise LoraError(
                f"--lora-targets {targets}: decoder layer {i} of this {spec.model_type} model has "
                "no nn.Linear module to adapt (LoRA here supports nn.Linear projections)"
            )
        found += mine
    return found


@dataclass(frozen=True)
class LoraPlan:
    """Which modules get adapters, with which rank and alpha.

    Attributes:
        rank: ``--lora-rank``, the uniform rank ``r`` (and the unit of the budget).
        targets: ``all-linear`` or ``qkvo``.
        alpha: ``--lora-alpha`` for every module, or None (each module's alpha is twice its rank).
        match_budget: ranks raised to the budget of uniform rank ``r`` over every layer.
        layers: the band's layer indices (the layers with adapters).
        modules: ``(name, in_features, out_features, rank)`` of each adapted module.
        num_hidden_layers: ``L``.
        uniform_modules: targeted modules in every decoder layer (the budget's module count).
    """

    rank: int
    targets: str
    alpha: float | None
    match_budget: bool
    layers: tuple[int, ...]
    modules: tuple[tuple[str, int, int, int], ...]
    num_hidden_layers: int
    uniform_modules: int

    @property
    def total_rank(self) -> int:
        """Sum of ranks over the adapted modules."""
        return sum(m[3] for m in self.modules)

    @property
    def budget(self) -> int:
        """The total rank of uniform rank ``r`` on the targets of every layer
        (``rank x uniform_modules``)."""
        return self.rank * self.uniform_modules

    @property
    def parameters(self) -> int:
        """Adapter parameters: ``sum over modules of r * (in_features + out_features)``."""
        return sum(r * (i + o) for _, i, o, r in self.modules)

    def alpha_of(self, rank: int) -> float:
        """The alpha of a module of rank ``rank``: ``--lora-alpha``, else ``2 * rank``."""
        return float(self.alpha) if self.alpha is not None else 2.0 * rank

    def describe(self) -> str:
        """Short text, e.g. ``LoRA qkvo ranks 13-14 on 72 modules (total rank 960)``."""
        ranks = sorted({m[3] for m in self.modules})
        shown = f"r={ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        budget = ", budget of uniform r over every layer" if self.match_budget else ""
        return (
            f"LoRA {self.targets} {shown} on {len(self.modules)} modules "
            f"(total rank {self.total_rank}{budget})"
        )

    def to_dict(self, per_module: bool = True) -> dict[str, Any]:
        """JSON-ready description (``plan.json``'s ``lora``; ``per_module=False``: no module list)."""
        out: dict[str, Any] = {
            "rank": self.rank,
            "targets": self.targets,
            "alpha": self.alpha,
            "scale": "alpha / rank" if self.alpha is not None else 2.0,
            "match_budget": self.match_budget,
            "layers": list(self.layers),
            "modules_adapted": len(self.modules),
            "total_rank": self.total_rank,
            "budget_uniform_all_layers": self.budget,
            "rank_min": min(m[3] for m in self.modules),
            "rank_max": max(m[3] for m in self.modules),
            "parameters": self.parameters,
        }
        if per_module:
            out["modules"] = {name: rank for name, _, _, rank in self.modules}
        return out


def plan_lora(
    model: torch.nn.Module,
    band: BandPlan,
    rank: int,
    targets: str = "all-linear",
    alpha: float | None = None,
    match_budget: bool = False,
) -> LoraPlan:
    """The adapters of ``band``'s layers (works on a meta-device model: shapes only).

    Args:
        model: the model without adapters.
        band: the layers that get adapters.
        rank: ``r >= 1``.
        targets: see :func:`target_linears`.
        alpha: see :class:`LoraPlan`.
        match_budget: spread ``r x (targeted modules of every layer)`` over the band's modules
            (:func:`distribute_ranks`) instead of giving each rank ``r``.

    Raises:
        LoraError: ``rank < 1``; as :func:`target_linears`.
    """
    if rank < 1:
        raise LoraError(f"--lora-rank must be >= 1 for LoRA adapters, got {rank}")
    modules = target_linears(model, band.indices, targets)
    L = len(decoder_layers(model))
    uniform = len(target_linears(model, range(L), targets))
    ranks = (
        distribute_ranks(rank * uniform, len(modules)) if match_budget else [rank] * len(modules)
    )
    return LoraPlan(
        rank=rank,
        targets=targets,
        alpha=alpha,
        match_budget=match_budget,
        layers=band.indices,
        modules=tuple((n, i, o, r) for (n, i, o), r in zip(modules, ranks, strict=True)),
        num_hidden_layers=L,
        uniform_modules=uniform,
    )


def lora_counts(counts: ParameterCounts, band: BandPlan, lora: LoraPlan) -> ParameterCounts:
    """``counts`` (of the model without adapters, :func:`fastmid.models.band.count_parameters`)
    for a LoRA run: the band layers' own weights are frozen, the adapters train and add to the
    total."""
    band_own = sum(counts.per_layer[i] for i in band.indices)
    return dataclasses.replace(
        counts,
        trainable=counts.trainable - band_own + lora.parameters,
        total=counts.total + lora.parameters,
    )


def is_adapter_parameter(name: str) -> bool:
    """True for a LoRA adapter tensor's name (``...q_proj.lora_A.default.weight``)."""
    return ".lora_A." in name or ".lora_B." in name


def inject_lora(model: torch.nn.Module, lora: LoraPlan) -> list[torch.nn.Parameter]:
    """Add the planned adapters to ``model`` in place and set what trains.

    Adapters: PEFT's LoRA ``Linear`` (``inject_adapter_in_model``; no dropout, no bias), with
    ``rank_pattern``/``alpha_pattern`` keyed by each module's escaped full name. ``A`` is drawn
    from torch's global generator (the recipe seeds it), ``B`` starts at zero, so the model's
    output is unchanged at step 0.

    What trains afterwards: the adapters, and the parameters outside the decoder layers that
    trained before (``--train-embeddings``, ``--train-lm-head``, ``--train-final-norm``); every
    weight of a decoder layer is frozen.

    Args:
        model: the model with the band applied (:func:`fastmid.models.band.apply_band`).
        lora: from :func:`plan_lora` on the same model.

    Returns:
        The trainable parameters in ``named_parameters`` order.

    Raises:
        LoraError: peft is not installed (names ``pip install 'fastmid[ablate]'``).
    """
    peft = import_peft()
    spec = family_of(model)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    names = [m[0] for m in lora.modules]
    config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha_of(lora.rank),
        target_modules=names,
        # Keys are regular expressions matched against the end of a module's name: escaped
        # full names match exactly that module.
        rank_pattern={re.escape(n): r for n, _, _, r in lora.modules if r != lora.rank},
        alpha_pattern={
            re.escape(n): lora.alpha_of(r) for n, _, _, r in lora.modules if r != lora.rank
        },
        lora_dropout=0.0,
        bias="none",
    )
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    # peft leaves only adapters trainable; put back what trained outside the decoder layers.
    trainable = []
    for name, param in model.named_parameters():
        train = is_adapter_parameter(name) or (
            layer_index_of(name, spec) is None and before.get(name, False)
        )
        param.requires_grad_(train)
        if train:
            trainable.append(param)
    return trainable


def lora_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The PEFT LoRA layers in ``model`` by module name (empty without adapters or peft)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter merged into its base weight, under the base
    model's names (``...q_proj.weight``, no ``base_layer``/``lora_*`` keys); the model itself is
    not changed.

    Merged weight: ``W + scale * B @ A`` (PEFT's ``get_delta_weight``), computed in float32 and
    stored in ``W``'s dtype.

    Returns:
        ``{name: tensor}``, the same keys as the model had before :func:`inject_lora`.
    """
    modules = lora_modules(model)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if is_adapter_parameter(key):
            continue
        out[key.replace(".base_layer.", ".")] = tensor
    for name, module in modules.items():
        key = f"{name}.weight"
        weight = out[key]
        delta = module.get_delta_weight(ADAPTER_NAME)  # type: ignore[operator]
        out[key] = (weight.float() + delta.float()).to(weight.dtype)
    return out
