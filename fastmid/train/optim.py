"""Optimizers and learning-rate schedules for the band.

* ``adamw8bit`` (default): bitsandbytes ``AdamW8bit`` with blockwise-quantized 8-bit states
  (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"); runs on CPU from
  bitsandbytes 0.50. Tensors under 4096 elements (norm weights, biases) keep 32-bit state
  (``min_8bit_size=4096``).
* ``paged_adamw8bit``: the same with paged (CUDA unified-memory) states; CUDA only.
* ``adamw``: ``torch.optim.AdamW`` with fp32 states, ``fused`` on CUDA, ``foreach`` elsewhere.
* ``ao_adamw8bit`` / ``ao_adamw4bit``: torchao's ``AdamW8bit`` (block-wise 8-bit states, blocks of
  256) and ``AdamW4bit`` (4-bit states, blocks of 128; Li et al. 2023, "Memory Efficient
  Optimizers with 4-bit States"), CPU and CUDA, and the ones that work under FSDP2 (their states
  live inside ``DTensor``). Tensors whose local size is under 4096 elements or not a multiple of
  the block size keep fp32 states (torchao 0.18 ``_AdamBase._new_buffer``). The update is computed
  in fp32 and, for bf16 parameters, written back with stochastic rounding
  (``bf16_stochastic_round=True``): the only optimizers ``--precision bf16`` accepts
  (:data:`STOCHASTIC_ROUNDING`). torchao compiles its per-parameter step with ``torch.compile``
  (``dynamic=False``): the first step compiles one kernel per parameter shape and dtype, about
  40 s on 2 CPU cores (a few seconds once inductor's on-disk cache holds them).

States exist only for the parameters handed in (the band's). Weight decay never applies to norm
weights or biases (parameters with fewer than 2 dimensions), following common practice (e.g.
nanoGPT, torchtune). bitsandbytes 0.50 dropped percentile clipping: the loop clips gradients by
global norm itself.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from fastmid.errors import FastmidError
from fastmid.models.loading import quiet_torchao

MIN_8BIT_SIZE = 4096
# The optimizers whose step writes bf16 weights back with stochastic rounding (equals
# fastmid.config.STOCHASTIC_ROUNDING_OPTIMIZERS; a test checks it).
STOCHASTIC_ROUNDING: tuple[str, ...] = ("ao_adamw8bit", "ao_adamw4bit")
TORCHAO_OPTIMIZERS: dict[str, str] = {"ao_adamw8bit": "AdamW8bit", "ao_adamw4bit": "AdamW4bit"}


class OptimizerError(FastmidError, ValueError):
    """An optimizer that cannot run here (named, with what to use instead)."""


def import_torchao_optim() -> Any:
    """``torchao.optim``, imported without its noise.

    Its import notices are silenced first (:func:`fastmid.models.loading.quiet_torchao`).

    Raises:
        OptimizerError: torchao is not installed or does not import.
    """
    quiet_torchao()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.optim
    except Exception as exc:  # ImportError, or an extension that fails to initialize
        raise OptimizerError(
            f"the ao_* optimizers need torchao>=0.18 ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
            "pip install 'torchao>=0.18,<0.19', or use --optim adamw8bit"
        ) from None
    # torch warns once per compiled graph that torchao's state subclasses lack a stable hash for
    # its autograd cache; the optimizer step has no autograd, so the warning says nothing here.
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
    return torchao.optim


def is_compiled_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """True for torchao's optimizers, whose first step compiles (``torch.compile``)."""
    return type(optimizer).__module__.startswith("torchao.")


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
        name: ``adamw8bit``, ``paged_adamw8bit``, ``adamw``, ``ao_adamw8bit`` or
            ``ao_adamw4bit`` (resolved: not ``auto``).
        lr: peak learning rate.
        weight_decay: decoupled weight decay (AdamW, Loshchilov & Hutter 2019) for matrices.

    State memory per trained element: 2 bytes (8-bit m and v) plus one fp32 scale per block and
    state for ``adamw8bit`` and ``ao_adamw8bit`` (blocks of 256); 1 byte plus one fp32 scale per
    128 elements and state for ``ao_adamw4bit``; 8 bytes (fp32 m and v) for ``adamw``. Smaller
    tensors keep fp32 states (module docstring).

    Bf16 parameters: torchao's optimizers round the fp32 update stochastically into them; the
    others round to nearest, which loses small updates, so the recipe never gives them bf16
    parameters (``--precision bf16`` refuses them in :func:`fastmid.config.validate`).

    Raises:
        OptimizerError: unknown name; ``paged_adamw8bit`` without CUDA; bitsandbytes or
            torchao missing.
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
    if name in TORCHAO_OPTIMIZERS:
        cls = getattr(import_torchao_optim(), TORCHAO_OPTIMIZERS[name])
        # torchao's default weight decay is 0.01: every group here sets its own.
        return cls(groups, lr=lr, betas=betas, eps=eps, bf16_stochastic_round=True)
    raise OptimizerError(
        f"--optim: unknown optimizer '{name}' "
        "(adamw8bit, paged_adamw8bit, adamw, ao_adamw8bit, ao_adamw4bit)"
    )


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
