"""Optimizers and learning-rate schedules for the band.

* ``adamw8bit`` (default): bitsandbytes ``AdamW8bit`` with blockwise-quantized 8-bit states
  (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"); runs on CPU from
  bitsandbytes 0.50. Tensors under 4096 elements (norm weights, biases) keep 32-bit state
  (``min_8bit_size=4096``).
* ``paged_adamw8bit``: the same with paged (CUDA unified-memory) states; CUDA only.
* ``adamw``: ``torch.optim.AdamW`` with fp32 states, ``fused`` on CUDA, ``foreach`` elsewhere.

States exist only for the parameters handed in (the band's). Weight decay never applies to norm
weights or biases (parameters with fewer than 2 dimensions), following common practice (e.g.
nanoGPT, torchtune). bitsandbytes 0.50 dropped percentile clipping: the loop clips gradients by
global norm itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch

from fastmid.errors import FastmidError

MIN_8BIT_SIZE = 4096


class OptimizerError(FastmidError, ValueError):
    """An optimizer that cannot run here (named, with what to use instead)."""


def param_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float
) -> list[dict]:
    """Split parameters into a decayed group (matrices) and an undecayed one (norms, biases).

    Returns:
        Two param-group dicts (empty groups are dropped) with ``weight_decay`` set.
    """
    decay, no_decay = [], []
    for _name, p in named_params:
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Build the optimizer over the trainable parameters.

    Args:
        named_params: ``(name, parameter)`` pairs; only those with ``requires_grad`` get state.
        name: ``adamw8bit``, ``paged_adamw8bit`` or ``adamw``.
        lr: peak learning rate.
        weight_decay: decoupled weight decay (AdamW, Loshchilov & Hutter 2019) for matrices.

    State memory per trained element: 2 bytes (8-bit m and v) plus one fp32 absmax per block
    and state for ``adamw8bit``; 8 bytes (fp32 m and v) for ``adamw``.

    Raises:
        OptimizerError: unknown name; ``paged_adamw8bit`` without CUDA; bitsandbytes missing.
    """
    named_params = list(named_params)
    groups = param_groups(named_params, weight_decay)
    if not groups:
        raise OptimizerError("no trainable parameters: the band is empty or everything is frozen")
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    if name == "adamw":
        kwargs = {"fused": True} if on_cuda else {"foreach": True}
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)
    if name in ("adamw8bit", "paged_adamw8bit"):
        if name == "paged_adamw8bit" and not on_cuda:
            raise OptimizerError(
                "--optim paged_adamw8bit needs CUDA (paged states live in CUDA unified memory); "
                "use --optim adamw8bit on CPU"
            )
        # On AVX512-BF16 CPUs bitsandbytes' import looks for a 4-bit CPU matmul in the `kernels`
        # hub package and logs a warning when it is absent; fastmid never runs 4-bit matmuls, and
        # the stray line would break the one-line errors that follow.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise OptimizerError(
                f"--optim {name} needs bitsandbytes>=0.50 ({exc}); pip install bitsandbytes, "
                "or use --optim adamw"
            ) from None
        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
        return cls(groups, lr=lr, betas=betas, eps=eps, min_8bit_size=MIN_8BIT_SIZE)
    raise OptimizerError(f"--optim: unknown optimizer '{name}' (adamw8bit, paged_adamw8bit, adamw)")


def lr_factor(
    step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warm-up from ``1/(warmup+1)`` to 1 over ``warmup_steps`` steps, then ``constant`` (1) or
    ``cosine`` decay to ``min_ratio`` at ``total_steps - 1`` (Loshchilov & Hutter 2017, SGDR
    eq. 5 without restarts).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    min_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` following :func:`lr_factor`; step it once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, total_steps, warmup_steps, schedule, min_ratio),
    )
