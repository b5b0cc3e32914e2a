"""Token-sum causal-LM loss, family-agnostic, with logits only where a label is.

The training step normalizes by the number of supervised tokens in a whole accumulation window
(design section 4), so this function returns the *sum* of token losses and the supervised-token count
rather than a mean. Positions are shifted as in transformers: the logits at ``t`` predict
``labels[t + 1]``.

The decoder runs once, then only the positions whose shifted label is not ``-100`` are projected
with ``lm_head``: prompt and padding positions never become vocabulary-sized rows, which for
chat SFT (answers a fraction of the sequence) saves most of the logits memory and FLOPs while the
result equals the full-logits cross-entropy exactly.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any

import torch
import torch.nn.functional as F

from fastmid.labels import IGNORE_INDEX
from fastmid.models.families import backbone, family_of, output_head


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits: ``labels[:, 1:]`` padded with ``-100`` at the end.

    Args:
        labels: (B, T) int64, ``-100`` where not trained.

    Returns:
        (B, T) int64: position ``t`` holds the token that the logits at ``t`` must predict.
    """
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def count_supervised(labels: torch.Tensor) -> int:
    """Number of supervised (predicted) tokens in a (B, T) label batch, after the shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum().item())


def decoder_hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final-norm hidden states of the decoder, (B, T, H), without the vocabulary projection.

    With ``position_ids`` the batch is packed (:mod:`fastmid.data.packing`): the attention is
    block-diagonal per example (:func:`packed_attention_mask`).
    """
    base = backbone(model)
    kwargs = {"attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
        kwargs["attention_mask"] = packed_attention_mask(model, position_ids, attention_mask)
    out = base(input_ids=input_ids, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def packed_attention_path(model: torch.nn.Module) -> str:
    """How a packed batch's attention runs for ``model``'s attention implementation:
    ``"sdpa, block-diagonal boolean mask"``, ``"eager, block-diagonal additive mask"`` or
    ``"flash_attention_2, variable length from position_ids"`` (``summary.json`` records it).

    Raises:
        ValueError: another implementation (flex attention...), for which packing is not checked.
    """
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    paths = {
        "sdpa": "sdpa, block-diagonal boolean mask",
        "eager": "eager, block-diagonal additive mask",
        "flash_attention_2": "flash_attention_2, variable length from position_ids",
    }
    if impl not in paths:
        raise ValueError(
            f"--packing: attention implementation {impl!r} is not supported with packing; "
            f"fastmid packs for {', '.join(paths)}"
        )
    return paths[impl]


def packed_attention_mask(
    model: torch.nn.Module, position_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """The block-diagonal causal attention of packed rows, in the form ``model``'s attention
    implementation reads.

    An example starts where ``position_ids`` is 0; a query attends to the keys of its own example
    at or before it. Padding positions (``attention_mask`` 0) attend to themselves only, so no
    softmax row is empty (their outputs carry no label).

    Args:
        position_ids: (B, T) int64, 0.. per example (:func:`fastmid.data.collate_packed`).
        attention_mask: (B, T) 0/1, or None (no padding).

    Returns:
        SDPA: (B, 1, T, T) bool, True = attend. Eager: (B, 1, T, T) float32, 0 = attend and the
        float32 minimum elsewhere (eager attention adds the mask to the scores; a boolean would be
        added as 0/1). FlashAttention-2: None (transformers reads the examples' boundaries from
        ``position_ids`` and runs the variable-length kernel).
    """
    path = packed_attention_path(model)
    if path.startswith("flash_attention_2"):
        return None
    b, t = position_ids.shape
    doc = torch.cumsum(position_ids == 0, dim=1)  # (B, T): example number within the row
    if attention_mask is not None:
        own = -torch.arange(1, t + 1, device=doc.device).expand(b, t)  # padding: its own block
        doc = torch.where(attention_mask.bool(), doc, own)
    causal = torch.ones(t, t, dtype=torch.bool, device=doc.device).tril()
    allowed = (doc[:, :, None] == doc[:, None, :]) & causal  # (B, T, T)
    allowed = allowed[:, None]
    if path.startswith("sdpa"):
        return allowed
    return torch.zeros(allowed.shape, dtype=torch.float32, device=doc.device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min
    )


def logit_softcap(model: torch.nn.Module) -> float | None:
    """The family's final-logit softcap (Gemma 2/3: ``cap * tanh(logits / cap)``), or None."""
    attr = family_of(model).final_logit_softcapping_attr
    value = getattr(model.config, attr, None) if attr else None
    return float(value) if value else None


def causal_lm_loss_sum(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies (fp32, nats) and the number of supervised tokens.

    Runs the decoder stack (ending with the final norm), keeps the positions whose shifted label
    is not ``-100``, and scores only those: eagerly (``lm_head`` + float32
    ``cross_entropy(reduction="sum")``) or, with ``fused``, through
    :func:`fastmid.kernels.linear_cross_entropy` (chunked; a frozen ``lm_head`` gets no weight
    gradient). The family's final-logit softcap (Gemma 2/3) is applied in both.

    Args:
        model: a ``*ForCausalLM`` of a family in :mod:`fastmid.models.families`.
        input_ids: (B, T) int64. attention_mask: (B, T) {0, 1} or None.
        labels: (B, T) int64, unshifted (aligned with ``input_ids``), ``-100`` where untrained.
        position_ids: (B, T) int64 or None.
        fused: use the fused kernel path.

    Returns:
        ``(loss_sum, n)``: float32 scalar (0 with a graph to the trainable weights when ``n == 0``,
        never NaN) and an int64 scalar tensor.

    Raises:
        ValueError: ``labels`` and ``input_ids`` shapes differ.
    """
    if getattr(model, "_fastmid_loss_through_forward", False) and not _IN_FORWARD.get():
        return model(
            fastmid_loss=dict(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                position_ids=position_ids,
                fused=fused,
            )
        )
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the shape of input_ids "
            f"{tuple(input_ids.shape)}"
        )
    hidden = decoder_hidden_states(model, input_ids, attention_mask, position_ids)
    target = shifted_labels(labels)
    keep = target != IGNORE_INDEX
    n = keep.sum()
    if int(n) == 0:
        return hidden.float().sum() * 0.0, n
    selected = hidden[keep]  # (n, H)
    head = output_head(model)
    cap = logit_softcap(model)
    if fused and getattr(head, "bias", None) is None:
        from fastmid.kernels import linear_cross_entropy

        loss_sum, _ = linear_cross_entropy(
            selected, head.weight, target[keep], ignore_index=IGNORE_INDEX, softcap=cap
        )
        return loss_sum, n
    logits = head(selected).float()
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits, target[keep], reduction="sum"), n


# Set while route_loss_through_forward's forward runs the loss, so the loss does not route again.
_IN_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fastmid_in_forward", default=False
)


def route_loss_through_forward(model: torch.nn.Module) -> None:
    """Make :func:`causal_lm_loss_sum` run inside ``model``'s own ``__call__``.

    The loss calls the decoder stack and ``lm_head`` apart (to project only the supervised
    positions), so the forward hooks of ``model`` itself would never fire. A wrapper that works
    through those hooks needs them: FSDP2's root unit gathers its weights (the final norm,
    ``lm_head``) in its pre-forward hook. After this call, ``model(fastmid_loss={...})`` computes
    the loss (``{...}``: the keyword arguments of :func:`causal_lm_loss_sum`) and any other call is
    the model's ordinary forward (``generate`` included; ``inspect.signature`` still shows it).
    """
    if getattr(model, "_fastmid_loss_through_forward", False):
        return
    original = model.forward

    @functools.wraps(original)
    def forward(*args: Any, fastmid_loss: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        if fastmid_loss is None:
            return original(*args, **kwargs)
        token = _IN_FORWARD.set(True)
        try:
            return causal_lm_loss_sum(model, **fastmid_loss)
        finally:
            _IN_FORWARD.reset(token)

    model.forward = forward
    model._fastmid_loss_through_forward = True


def batch_loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], fused: bool = False
) -> tuple[torch.Tensor, int]:
    """:func:`causal_lm_loss_sum` of a collated batch, under bf16 autocast on CUDA.

    Args:
        model: as :func:`causal_lm_loss_sum`.
        batch: ``input_ids``, ``attention_mask``, ``labels`` (B, T) on the model's device, and
            optionally ``position_ids``.
        fused: use the fused linear cross-entropy kernel.

    Returns:
        ``(loss_sum, n)``: float32 scalar tensor (nats) and the supervised-token count.
    """
    device = batch["input_ids"].device
    # bf16 compute with fp32 master weights on CUDA (design section 4); fp32 on CPU.
    ctx = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    with ctx:
        loss_sum, n = causal_lm_loss_sum(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            position_ids=batch.get("position_ids"),
            fused=fused,
        )
    return loss_sum, int(n)
