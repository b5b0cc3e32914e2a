"""Capture decoder-layer outputs with forward hooks, stopping the forward after the last needed layer.

Hooks instead of ``output_hidden_states=True``: only the layers of the current group are kept
(memory stays flat in depth on large models), the outputs are the raw decoder-layer outputs (for
the last layer ``output_hidden_states`` would return the final-normed state instead), and the
forward is cut short after the group's last layer, so neither later layers nor ``lm_head`` run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastmid.errors import FastmidError
from fastmid.models.families import backbone, decoder_layers


class _StopForward(FastmidError):
    """Raised by the hook of the last needed layer to end the forward early (control flow:
    :func:`layer_outputs` always catches it)."""


@torch.no_grad()
def layer_outputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
) -> dict[int, torch.Tensor]:
    """Run the model's backbone and return the outputs of the chosen decoder layers.

    Args:
        model: a ``*ForCausalLM`` model of a family in :mod:`fastmid.models.families`.
        input_ids: (batch, seq) int64, right-padded.
        attention_mask: (batch, seq) int64/bool, 1 for real tokens.
        layers: decoder-layer indices to capture (any order, no duplicates needed).

    Returns:
        ``{i: hidden_states}`` with (batch, seq, hidden_size) tensors in the model's dtype, the
        output of decoder layer ``i`` (before the final norm).

    Raises:
        IndexError: a layer index outside ``[0, num_hidden_layers)``.
    """
    blocks = decoder_layers(model)
    wanted = sorted(set(int(i) for i in layers))
    if not wanted:
        return {}
    if wanted[0] < 0 or wanted[-1] >= len(blocks):
        raise IndexError(f"layer indices {wanted} outside 0..{len(blocks) - 1}")
    last = wanted[-1]
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(i: int):
        def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            captured[i] = hidden.detach()
            if i == last and last < len(blocks) - 1:
                raise _StopForward

        return hook

    for i in wanted:
        handles.append(blocks[i].register_forward_hook(make_hook(i)))
    try:
        backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured
