"""How the band runs forward and backward (design section 3).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from fastmid.models.band import BandPlan
from fastmid.models.families import decoder_layers, family_of


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
