"""The arms of ``fastmid ablate``: which layers train, and how (full rank or LoRA).

With ``L`` decoder layers and the ``mid`` band of ``k`` layers (``--band``/``--layers``, default
``0.2:0.8``: ``[round_half_up(0.2 L), round_half_up(0.8 L))``):

* ``mid``: the band, full-rank (fastmid's method).
* ``early``: layers ``0..k-1``; ``late``: layers ``L-k..L-1``: the same number of layers at the
  bottom and at the top of the stack, full-rank.
* ``random``: ``k`` distinct layers drawn with ``random.Random(--random-arm-seed)``
  (:meth:`fastmid.models.band.BandPlan.from_placement`), full-rank; the draw is recorded.
* ``full``: every decoder layer, full-rank.
* ``lora``: LoRA of rank ``r`` (``--lora-rank``) on every linear of every decoder layer.
* ``lora-mid``: the source paper's released Mid-Block method (Zhao et al., arXiv 2604.11838, as
  ``/work/shared/paper.md`` describes its scripts): LoRA on q/k/v/o of the middle three of five
  depth segments (:func:`fastmid.models.lora.paper_mid_layers`, the same layers as the default
  band), the total rank of uniform q/k/v/o LoRA of rank ``r`` over every layer concentrated there
  (``--lora-match-budget``, :func:`fastmid.models.lora.distribute_ranks`).

Embeddings, final norm and head are frozen in every arm unless the shared base config trains them
(``--train-embeddings`` ...), and then they train in every arm alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastmid.ablate.defaults import ARMS, FULL_RANK_ARMS, LORA_ARMS
from fastmid.errors import FastmidError
from fastmid.models.band import BandPlan, count_parameters
from fastmid.models.lora import lora_counts, paper_mid_layers, plan_lora

# The learning-rate families: each arm takes its grid from its family unless given its own.
FAMILIES: dict[str, str] = {
    **dict.fromkeys(FULL_RANK_ARMS, "full-rank"),
    **dict.fromkeys(LORA_ARMS, "lora"),
}
BASE_ROW = "base"  # the untrained model: a row of every table, no runs


class AblateError(FastmidError, ValueError):
    """Bad ablation input; the message names the flag or file (one line, exit 2)."""


@dataclass(frozen=True)
class Arm:
    """One arm: the layers that train and how.

    Attributes:
        name: one of :data:`ARMS`.
        layers: the decoder layers that train (full rank) or carry adapters, ascending.
        num_hidden_layers: ``L``.
        lora_rank: 0 for full-rank arms, else ``r``.
        lora_targets: ``all-linear`` or ``qkvo`` (LoRA arms).
        lora_match_budget: ranks raised to uniform LoRA's budget over every layer (``lora-mid``).
        seed: the draw's seed (``random``), else None.
    """

    name: str
    layers: tuple[int, ...]
    num_hidden_layers: int
    lora_rank: int = 0
    lora_targets: str = "all-linear"
    lora_match_budget: bool = False
    seed: int | None = None

    @property
    def family(self) -> str:
        """``full-rank`` or ``lora`` (which learning-rate grid applies)."""
        return FAMILIES[self.name]

    @property
    def layers_text(self) -> str:
        """The layers as ``--layers`` takes them: ascending runs as ``a-b``, e.g. ``0-5,9``."""
        return format_layers(self.layers)

    def overrides(self) -> dict[str, Any]:
        """The :class:`~fastmid.config.TrainConfig` fields this arm sets over the shared base."""
        return {
            "band": None,
            "layers": self.layers_text,
            "placement": None,
            "lora_rank": self.lora_rank,
            "lora_targets": self.lora_targets,
            "lora_match_budget": self.lora_match_budget,
        }

    def describe(self) -> str:
        """Short text, e.g. ``layers 6-23, full rank`` or ``layers 6-23, LoRA qkvo r=8 (budget)``."""
        how = "full rank"
        if self.lora_rank:
            budget = ", rank budget of every layer" if self.lora_match_budget else ""
            how = f"LoRA {self.lora_targets} r={self.lora_rank}{budget}"
        return f"layers {self.layers_text}, {how}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {
            "arm": self.name,
            "layers": list(self.layers),
            "num_layers": len(self.layers),
            "num_hidden_layers": self.num_hidden_layers,
            "lora_rank": self.lora_rank,
            "lora_targets": self.lora_targets if self.lora_rank else None,
            "lora_match_budget": self.lora_match_budget,
            "random_seed": self.seed,
            "description": self.describe(),
        }


def format_layers(layers: tuple[int, ...] | list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (what ``--layers`` parses back)."""
    parts: list[str] = []
    items = sorted(layers)
    start = prev = None
    for i in [*items, None]:
        if start is not None and (i is None or i != prev + 1):  # type: ignore[operator]
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ",".join(parts)


def parse_arms(text: str) -> list[str]:
    """``--arms`` (comma-separated) -> arm names in :data:`ARMS` order, duplicates removed.

    Raises:
        AblateError: empty, or an unknown name (named, with the known ones).
    """
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise AblateError(f"--arms: empty; choose from {', '.join(ARMS)}")
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise AblateError(
            f"--arms: unknown arm '{unknown[0]}'; the arms are {', '.join(ARMS)} "
            f"(the untrained '{BASE_ROW}' row is always in the table)"
        )
    return [a for a in ARMS if a in names]


def plan_arms(
    names: list[str],
    mid: BandPlan,
    lora_rank: int,
    random_seed: int = 0,
) -> list[Arm]:
    """The arms ``names`` for a model of ``mid.num_hidden_layers`` layers.

    Args:
        names: arm names (:func:`parse_arms`).
        mid: the ``mid`` band (from ``--band``/``--layers``; its size ``k`` sizes ``early``,
            ``late`` and ``random``).
        lora_rank: ``r`` of the LoRA arms (>= 1 when a LoRA arm is asked for).
        random_seed: seed of the ``random`` arm's draw.

    Raises:
        AblateError: a LoRA arm with ``lora_rank < 1``; an arm with no layer.
    """
    L, k = mid.num_hidden_layers, mid.size
    if lora_rank < 1 and any(n in LORA_ARMS for n in names):
        raise AblateError(
            f"--lora-rank: the LoRA arms ({', '.join(n for n in names if n in LORA_ARMS)}) need "
            f"a rank >= 1, got {lora_rank}"
        )
    arms: list[Arm] = []
    for name in names:
        if name == "mid":
            arm = Arm(name, mid.indices, L)
        elif name == "early":
            arm = Arm(name, tuple(range(k)), L)
        elif name == "late":
            arm = Arm(name, tuple(range(L - k, L)), L)
        elif name == "random":
            drawn = BandPlan.from_placement(L, "random", k, random_seed)
            arm = Arm(name, drawn.indices, L, seed=random_seed)
        elif name == "full":
            arm = Arm(name, tuple(range(L)), L)
        elif name == "lora":
            arm = Arm(name, tuple(range(L)), L, lora_rank, "all-linear", False)
        else:  # lora-mid
            arm = Arm(name, paper_mid_layers(L), L, lora_rank, "qkvo", True)
        if not arm.layers:
            raise AblateError(
                f"--band: the '{name}' arm would train no layer of this {L}-layer model; widen "
                "the band (--band or --layers)"
            )
        arms.append(arm)
    return arms


def trainable_parameters(
    model: torch.nn.Module,
    arm: Arm,
    *,
    lora_alpha: float | None = None,
    train_embeddings: bool = False,
    train_lm_head: bool = False,
    train_final_norm: bool = False,
) -> int:
    """Trainable parameters of ``arm`` on ``model`` (a meta-device model is enough: shapes only).

    Full-rank arms: every parameter of the arm's layers
    (:func:`fastmid.models.band.count_parameters`); LoRA arms: ``sum r (in + out)`` over the
    adapted linears (:func:`fastmid.models.lora.plan_lora`); plus the embeddings, head or final
    norm when the shared config trains them (tied tensors once).
    """
    plan = BandPlan.from_indices(arm.num_hidden_layers, arm.layers)
    extras = dict(
        train_embeddings=train_embeddings,
        train_lm_head=train_lm_head,
        train_final_norm=train_final_norm,
    )
    counts = count_parameters(model, plan, **extras)
    if not arm.lora_rank:
        return counts.trainable
    lora = plan_lora(
        model, plan, arm.lora_rank, arm.lora_targets, lora_alpha, arm.lora_match_budget
    )
    return lora_counts(counts, plan, lora).trainable
