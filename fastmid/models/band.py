"""The band plan: which decoder layers Mid-Block tuning trains, and what that costs in parameters.

The default band follows the source paper (Zhao et al., "A Layer-wise Analysis of Supervised
Fine-Tuning", arXiv 2604.11838, Sec. "Mid-Block Efficient Tuning"): the middle 20%-80% of depth.
With ``L = num_hidden_layers`` and fractions ``(a, b)`` the band is
``[round_half_up(a * L), round_half_up(b * L))``: 30 layers give 6..23, 16 give 3..12, 64 give 13..50.

Ablation placements of the same size (the referee's controls): ``first`` (0..k-1), ``last``
(L-k..L-1), ``middle`` (centred), ``random`` (k distinct layers drawn with a seed).

How the band runs forward and backward (design section 3; :func:`install_execution_policy`):
* Frozen prefix (layers below the band): forward under ``torch.no_grad()``. No autograd graph is
  built and no activation is kept for backward; no ``enable_input_require_grads`` hook is needed
  because the band's own parameters start the graph.
* Band: full-rank updates; with ``grad_checkpointing`` each layer runs under non-reentrant
  activation checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``), so only its
  input is stored and its internals are recomputed in backward.
* Frozen suffix (and frozen gaps of a non-contiguous plan): weights frozen, activations pass
  gradients down to the band; optionally checkpointed like the band.

The policy wraps each decoder layer's ``forward`` on the instance, so module names and state-dict
keys stay those of transformers (export and ``from_pretrained`` see an ordinary model).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

import torch
from torch.utils.checkpoint import checkpoint

from fastmid.errors import FastmidError
from fastmid.models.families import FamilySpec, decoder_layers, family_of, layer_index_of

Placement = Literal["fractions", "indices", "first", "last", "middle", "random"]
LayerRole = Literal["frozen-prefix", "band", "frozen-gap", "frozen-suffix"]


class BandError(FastmidError, ValueError):
    """An invalid band: empty, fractions outside [0, 1] or reversed, bad or duplicate indices."""


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up, without binary floating-point surprises.

    ``0.25 * 30 = 7.5`` rounds to 8 and ``0.2 * 64 = 12.8`` to 13. The product is formed in
    decimal from the fraction's shortest repr, so ``0.1 * 5`` is exactly 0.5 and rounds to 1.
    """
    return int(Decimal(repr(x)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@dataclass(frozen=True)
class BandPlan:
    """Which decoder layers train.

    Attributes:
        num_hidden_layers: ``L``, the model's number of decoder layers.
        indices: sorted, distinct layer indices in ``[0, L)`` that train (full-rank).
        placement: how the indices were chosen (``fractions``, ``indices``, ``first``, ``last``,
            ``middle``, ``random``).
        fractions: ``(a, b)`` when built from fractions.
        seed: the seed of a ``random`` placement.
    """

    num_hidden_layers: int
    indices: tuple[int, ...]
    placement: Placement = "indices"
    fractions: tuple[float, float] | None = None
    seed: int | None = None
    _set: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        L = self.num_hidden_layers
        if not isinstance(L, int) or L < 1:
            raise BandError(f"num_hidden_layers must be a positive integer, got {L!r}")
        if len(self.indices) == 0:
            raise BandError("the band is empty: choose fractions or indices that cover a layer")
        if len(set(self.indices)) != len(self.indices):
            dups = sorted({i for i in self.indices if self.indices.count(i) > 1})
            raise BandError(f"duplicate layer indices in the band: {dups}")
        bad = [i for i in self.indices if not 0 <= i < L]
        if bad:
            raise BandError(f"layer indices {bad} out of range: the model has layers 0..{L - 1}")
        object.__setattr__(self, "indices", tuple(sorted(self.indices)))
        object.__setattr__(self, "_set", frozenset(self.indices))

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_fractions(cls, num_hidden_layers: int, start: float, end: float) -> BandPlan:
        """Band ``[round_half_up(start * L), round_half_up(end * L))``.

        Raises:
            BandError: fractions outside [0, 1], ``start >= end``, or an empty result.
        """
        for name, value in (("start", start), ("end", end)):
            if not 0.0 <= value <= 1.0:
                raise BandError(f"band {name} fraction {value} is outside [0, 1]")
        if start >= end:
            raise BandError(
                f"band fractions are reversed or empty: {start}:{end} (need start < end)"
            )
        lo = round_half_up(start * num_hidden_layers)
        hi = round_half_up(end * num_hidden_layers)
        if hi <= lo:
            raise BandError(
                f"band {start}:{end} of {num_hidden_layers} layers is empty "
                f"(round_half_up gives [{lo}, {hi})); widen the fractions"
            )
        return cls(num_hidden_layers, tuple(range(lo, hi)), "fractions", (start, end))

    @classmethod
    def from_indices(cls, num_hidden_layers: int, indices: list[int] | tuple[int, ...]) -> BandPlan:
        """Band of explicit layer indices.

        Raises:
            BandError: empty, duplicate or out-of-range indices.
        """
        return cls(num_hidden_layers, tuple(int(i) for i in indices), "indices")

    @classmethod
    def from_placement(
        cls, num_hidden_layers: int, placement: str, size: int, seed: int = 0
    ) -> BandPlan:
        """A block of ``size`` layers placed ``first``, ``last``, ``middle`` or ``random``.

        ``middle`` centres the block (``start = (L - size) // 2``); ``random`` draws ``size``
        distinct layers with ``random.Random(seed)`` (not necessarily contiguous).

        Raises:
            BandError: unknown placement, ``size`` outside ``[1, L]``.
        """
        L = num_hidden_layers
        if not 1 <= size <= L:
            raise BandError(f"band size {size} must be between 1 and {L}")
        if placement == "first":
            idx: tuple[int, ...] = tuple(range(size))
        elif placement == "last":
            idx = tuple(range(L - size, L))
        elif placement == "middle":
            lo = (L - size) // 2
            idx = tuple(range(lo, lo + size))
        elif placement == "random":
            idx = tuple(sorted(random.Random(seed).sample(range(L), size)))
        else:
            raise BandError(
                f"unknown band placement '{placement}' (choose first, last, middle or random)"
            )
        return cls(L, idx, placement, None, seed if placement == "random" else None)  # type: ignore[arg-type]

    @classmethod
    def parse(
        cls,
        num_hidden_layers: int,
        band: str | None = None,
        layers: str | None = None,
        placement: str | None = None,
        seed: int = 0,
    ) -> BandPlan:
        """Build a plan from CLI strings.

        Args:
            band: ``"0.2:0.8"`` (fractions). Default when nothing is given.
            layers: ``"6-23"``, ``"3,5,9"`` or a mix ``"0-2,7"`` (inclusive ranges).
            placement: with ``band`` or ``layers`` giving the size, move the block to ``first``,
                ``last``, ``middle`` or ``random``.
            seed: seed of a ``random`` placement.

        Raises:
            BandError: both ``band`` and ``layers`` given; unparsable strings; as the constructors.
        """
        if band is not None and layers is not None:
            raise BandError("give either --band (fractions) or --layers (indices), not both")
        try:
            if layers is not None:
                plan = cls.from_indices(num_hidden_layers, parse_layer_list(layers))
            else:
                text = band if band is not None else "0.2:0.8"
                parts = text.split(":")
                if len(parts) != 2:
                    raise BandError(f"--band '{text}' must look like START:END, e.g. 0.2:0.8")
                try:
                    start, end = float(parts[0]), float(parts[1])
                except ValueError:
                    raise BandError(
                        f"--band '{text}' must hold two numbers, e.g. 0.2:0.8"
                    ) from None
                plan = cls.from_fractions(num_hidden_layers, start, end)
        except BandError as exc:
            message = str(exc)
            if "--band" in message or "--layers" in message:
                raise
            # The constructors know depths, not flags: say which flag the user must change.
            flag = f"--layers {layers}" if layers is not None else f"--band {band or '0.2:0.8'}"
            raise BandError(f"{flag}: {message}") from None
        if placement and placement not in ("fractions", "indices"):
            plan = cls.from_placement(num_hidden_layers, placement, plan.size, seed)
        return plan

    # ---- queries ------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of trained layers."""
        return len(self.indices)

    @property
    def first(self) -> int:
        """Lowest trained layer index."""
        return self.indices[0]

    @property
    def last(self) -> int:
        """Highest trained layer index."""
        return self.indices[-1]

    @property
    def contiguous(self) -> bool:
        """True when the band is one block ``first..last``."""
        return self.last - self.first + 1 == self.size

    def __contains__(self, layer: object) -> bool:
        return layer in self._set

    def role(self, layer: int) -> LayerRole:
        """``frozen-prefix`` (below the band: forward only, nothing stored), ``band``,
        ``frozen-gap`` (between band layers of a non-contiguous plan: frozen, passes gradients),
        or ``frozen-suffix`` (above the band: frozen, passes gradients)."""
        if layer in self._set:
            return "band"
        if layer < self.first:
            return "frozen-prefix"
        if layer > self.last:
            return "frozen-suffix"
        return "frozen-gap"

    def describe(self) -> str:
        """Short human text, e.g. ``layers 6..23 (18 of 30)``."""
        span = f"{self.first}..{self.last}" if self.contiguous else ",".join(map(str, self.indices))
        return f"layers {span} ({self.size} of {self.num_hidden_layers})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (the ``plan.json`` ``band`` entry)."""
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "indices": list(self.indices),
            "first": self.first,
            "last": self.last,
            "size": self.size,
            "placement": self.placement,
            "fractions": list(self.fractions) if self.fractions else None,
            "seed": self.seed,
        }


def parse_layer_list(text: str) -> list[int]:
    """Parse ``"6-23"``, ``"1,4,9"`` or ``"0-2,7"`` (inclusive ranges) into a list of indices.

    Raises:
        BandError: empty text, a non-integer item, or a reversed range.
    """
    out: list[int] = []
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise BandError(f"--layers '{text}' is empty; give e.g. 6-23 or 3,5,9")
    for item in items:
        try:
            if "-" in item:
                lo_s, hi_s = item.split("-", 1)
                lo, hi = int(lo_s), int(hi_s)
            else:
                lo = hi = int(item)
        except ValueError:
            raise BandError(
                f"--layers item '{item}' is not an integer or range like 6-23"
            ) from None
        # Checked outside the try: BandError is a ValueError and would be re-worded there.
        if hi < lo:
            raise BandError(f"--layers range '{item}' is reversed; write it low-high, e.g. 6-23")
        out.extend(range(lo, hi + 1))
    return out


# ---- parameter accounting ----------------------------------------------------------------------


@dataclass
class ParameterCounts:
    """Parameter counts of a model under a band plan (tied tensors counted once).

    Attributes:
        per_layer: parameters of each decoder layer, index -> count.
        embeddings: input embedding tables (tied ``lm_head`` included here, once).
        final_norm: the final norm.
        lm_head: the output head when untied, else 0.
        other: any parameter outside the above (should be 0 for supported families).
        trainable: parameters the plan trains.
        total: all distinct parameters.
    """

    per_layer: dict[int, int]
    embeddings: int
    final_norm: int
    lm_head: int
    other: int
    trainable: int
    total: int

    @property
    def frozen(self) -> int:
        """``total - trainable``."""
        return self.total - self.trainable

    @property
    def trainable_share(self) -> float:
        """Trainable share of all parameters, in percent."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counts (``plan.json``)."""
        return {
            "per_layer": {str(k): v for k, v in sorted(self.per_layer.items())},
            "embeddings": self.embeddings,
            "final_norm": self.final_norm,
            "lm_head": self.lm_head,
            "other": self.other,
            "trainable": self.trainable,
            "frozen": self.frozen,
            "total": self.total,
            "trainable_share_percent": round(self.trainable_share, 4),
        }


def _classify(name: str, spec: FamilySpec) -> tuple[str, int | None]:
    idx = layer_index_of(name, spec)
    if idx is not None:
        return "layer", idx
    if name.startswith(spec.final_norm + "."):
        return "final_norm", None
    if name.startswith(spec.embed_tokens + ".") or any(
        name.startswith(p + ".") for p in spec.extra_embeddings
    ):
        return "embeddings", None
    if name.startswith(spec.lm_head + "."):
        return "lm_head", None
    return "other", None


def count_parameters(
    model: torch.nn.Module,
    plan: BandPlan,
    *,
    train_embeddings: bool = False,
    train_lm_head: bool = False,
    train_final_norm: bool = False,
) -> ParameterCounts:
    """Count parameters per decoder layer and in total under ``plan`` (works on meta tensors).

    ``named_parameters()`` yields a tied tensor once, under the embedding's name, so a tied
    ``lm_head`` is counted once, with the embeddings; training either trains both.

    Raises:
        BandError: the plan's ``num_hidden_layers`` differs from the model's.
    """
    spec = family_of(model)
    L = len(model.get_submodule(spec.layers))
    if plan.num_hidden_layers != L:
        raise BandError(f"the plan is for {plan.num_hidden_layers} layers but the model has {L}")
    per_layer = dict.fromkeys(range(L), 0)
    buckets = {"embeddings": 0, "final_norm": 0, "lm_head": 0, "other": 0}
    trainable = 0
    tied = _is_tied(model, spec)
    for name, param in model.named_parameters():
        kind, idx = _classify(name, spec)
        n = param.numel()
        if kind == "layer":
            per_layer[idx] += n  # type: ignore[index]
            trainable += n if idx in plan else 0
            continue
        buckets[kind] += n
        if (
            (kind == "embeddings" and (train_embeddings or (tied and train_lm_head)))
            or (kind == "lm_head" and train_lm_head)
            or (kind == "final_norm" and train_final_norm)
        ):
            trainable += n
    total = sum(per_layer.values()) + sum(buckets.values())
    return ParameterCounts(per_layer, trainable=trainable, total=total, **buckets)


def _is_tied(model: torch.nn.Module, spec: FamilySpec) -> bool:
    head = model.get_submodule(spec.lm_head)
    emb = model.get_submodule(spec.embed_tokens)
    return head.weight is emb.weight


def apply_band(
    model: torch.nn.Module,
    plan: BandPlan,
    *,
    train_embeddings: bool = False,
    train_lm_head: bool = False,
    train_final_norm: bool = False,
) -> list[torch.nn.Parameter]:
    """Freeze everything outside the band and return the trainable parameters.

    Embeddings, final norm and ``lm_head`` stay frozen unless asked. Tied embeddings are one
    tensor: asking to train either trains both, never half. The execution policy (prefix under
    ``no_grad``, checkpointing) is installed separately by
    :func:`fastmid.models.band.install_execution_policy`.

    Args:
        model: a ``*ForCausalLM`` of a supported family.
        plan: the band; ``plan.num_hidden_layers`` must match the model.

    Returns:
        The distinct trainable parameters, in ``named_parameters`` order.

    Raises:
        BandError: layer-count mismatch.
    """
    spec = family_of(model)
    L = len(model.get_submodule(spec.layers))
    if plan.num_hidden_layers != L:
        raise BandError(f"the plan is for {plan.num_hidden_layers} layers but the model has {L}")
    tied = _is_tied(model, spec)
    trainable: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        kind, idx = _classify(name, spec)
        train = (
            (kind == "layer" and idx in plan)
            or (kind == "embeddings" and (train_embeddings or (tied and train_lm_head)))
            or (kind == "lm_head" and train_lm_head)
            or (kind == "final_norm" and train_final_norm)
        )
        param.requires_grad_(train)
        if train:
            trainable.append(param)
    return trainable


# ---- execution policy ---------------------------------------------------------------------------


@dataclass
class ExecutionPolicy:
    """An installed execution policy; :meth:`remove` restores the original forwards.

    Attributes:
        plan: the band.
        grad_checkpointing: band and suffix layers run under non-reentrant checkpointing.
        no_grad_prefix: prefix layers run under ``torch.no_grad()`` (False only when something
            below the band trains, e.g. ``train_embeddings``, which needs the prefix's graph).
        roles: the role of each layer (``frozen-prefix``, ``band``, ``frozen-gap``,
            ``frozen-suffix``).
    """

    plan: BandPlan
    grad_checkpointing: bool
    no_grad_prefix: bool
    roles: list[str]
    _originals: list[tuple[torch.nn.Module, Callable[..., Any]]] = field(
        default_factory=list, repr=False
    )
    _model: torch.nn.Module | None = field(default=None, repr=False, compare=False)

    def remove(self) -> None:
        """Restore every wrapped layer's original ``forward`` and detach from the model, so a
        new policy can be installed."""
        for layer, _original in self._originals:
            if layer.__dict__.get("forward") is not None:
                del layer.forward
        self._originals.clear()
        if self._model is not None:
            self._model._fastmid_execution_policy = None
            self._model = None


def _no_grad_forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        return original(*args, **kwargs)


def _checkpointed_forward(
    layer: torch.nn.Module, original: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    # Recomputation only pays off when a backward will follow; eval and generation run plainly.
    if layer.training and torch.is_grad_enabled():
        return checkpoint(original, *args, use_reentrant=False, **kwargs)
    return original(*args, **kwargs)


def _below_band_trains(model: torch.nn.Module, plan: BandPlan) -> bool:
    spec = family_of(model)
    layers = decoder_layers(model)
    params = list(model.get_submodule(spec.embed_tokens).parameters())
    for path in spec.extra_embeddings:
        params += list(model.get_submodule(path).parameters())
    for i in range(plan.first):
        params += list(layers[i].parameters())
    return any(p.requires_grad for p in params)


def install_execution_policy(
    model: torch.nn.Module, plan: BandPlan, *, grad_checkpointing: bool = False
) -> ExecutionPolicy:
    """Wrap the decoder layers' forwards according to ``plan``; call after ``apply_band``.

    Args:
        model: a ``*ForCausalLM`` of a supported family whose band is already applied
            (``requires_grad`` set).
        plan: the band.
        grad_checkpointing: checkpoint band, gap and suffix layers (non-reentrant).

    Returns:
        The installed :class:`ExecutionPolicy`.

    Raises:
        RuntimeError: a policy is already installed on this model (remove it first).
    """
    if getattr(model, "_fastmid_execution_policy", None) is not None:
        raise RuntimeError("an execution policy is already installed; call .remove() first")
    layers = decoder_layers(model)
    no_grad_prefix = not _below_band_trains(model, plan)
    policy = ExecutionPolicy(plan, grad_checkpointing, no_grad_prefix, [], _model=model)
    for i, layer in enumerate(layers):
        role = plan.role(i)
        policy.roles.append(role)
        original = layer.forward
        if role == "frozen-prefix":
            if not no_grad_prefix:
                continue
            layer.forward = functools.partial(_no_grad_forward, original)
        elif grad_checkpointing:
            layer.forward = functools.partial(_checkpointed_forward, layer, original)
        else:
            continue
        policy._originals.append((layer, original))
    model._fastmid_execution_policy = policy
    return policy
