"""Held-out loss: the token-mean cross-entropy of a model over labelled examples.

One loop for every held-out loss fastmid reports: the periodic ``eval_loss`` of a training run
and the answer loss of ``fastmid eval``. Both use the training tokenization and label rules, so
the numbers compare with the training loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastmid.data import collate_batch
from fastmid.models.loss import batch_loss_sum


@torch.no_grad()
def token_mean_loss(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Sequence[int]]],
    batch_size: int,
    pad_id: int,
    *,
    max_batches: int | None = None,
    fused: bool = False,
) -> float | None:
    """Mean next-token loss over every supervised token of ``examples`` (nats per token).

    ``sum of token losses / number of supervised tokens`` over all batches, not a mean of batch
    means, so the result does not depend on ``batch_size``. The model runs in eval mode and gets
    its previous mode back.

    Args:
        model: a ``*ForCausalLM`` of a supported family.
        examples: ``{"input_ids", "labels"}`` dicts (labels ``-100`` where untrained).
        batch_size: examples per forward pass, in order.
        pad_id: the padding id (:func:`fastmid.data.pad_token_id`).
        max_batches: score only the first this many batches (None: all).
        fused: use the fused linear cross-entropy kernel.

    Returns:
        The token-mean loss, or None when there is no supervised token.
    """
    n_batches = math.ceil(len(examples) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for b in range(n_batches):
            batch = collate_batch(examples[b * batch_size : (b + 1) * batch_size], pad_id)
            loss_sum, n = batch_loss_sum(model, {k: v.to(device) for k, v in batch.items()}, fused)
            total += float(loss_sum)
            count += int(n)
    finally:
        model.train(was_training)
    return total / count if count else None
