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
from fastmid.models.loading import quiet_bitsandbytes, quiet_torchao

MIN_8BIT_SIZE = 4096
# The optimizers whose step writes bf16 weights back with stochastic rounding (equals
# fastmid.config.STOCHASTIC_ROUNDING_OPTIMIZERS; a test checks it).
STOCHASTIC_ROUNDING: tuple[str, ...] = ("ao_adamw8bit", "ao_adamw4bit")
TORCHAO_OPTIMIZERS: dict[str, str] = {"ao_adamw8bit": "AdamW8bit", "ao_adamw4bit": "AdamW4bit"}


class OptimizerError(FastmidError, ValueError):
    """An optimizer that cannot run here (named, with what to use instead)."""


def import_torchao_optim() -> Any:
    """``torchao.optim``, imported without its noise on the console.

    Its import notices go to the ``torchao`` logger at WARNING
    (:func:`fastmid.models.loading.quiet_torchao`), Python warnings raised by the import
    included.

    Raises:
        OptimizerError: torchao is not installed or does not import.
    """
    quiet_torchao()
    try:
        # the warnings filters in force decide what is caught: what would have been printed
        with warnings.catch_warnings(record=True) as caught:
            import torchao.optim
    except Exception as exc:  # ImportError, or an extension that fails to initialize
        raise OptimizerError(
            f"the ao_* optimizers need torchao>=0.18 ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
            "pip install 'torchao>=0.18,<0.19', or use --optim adamw8bit"
        ) from None
    for caught_warning in caught:  # held with torchao's other notices, for train.log
        logging.getLogger("torchao").warning(
            "%s: %s", caught_warning.category.__name__, caught_warning.message
        )
    # torch warns once per compiled graph that torchao's state subclasses lack a stable hash for
    # its autograd cache; the optimizer step has no autograd, so the warning says nothing here.
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
    return torchao.optim


def is_compiled_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """True for torchao's AdamW optimizers, whose first step compiles (``torch.compile``), also
    inside :class:`OptimizerInBackward` or torchao's ``CPUOffloadOptimizer``."""
    inner = getattr(optimizer, "optimizers", None) or [
        *getattr(optimizer, "optim_dict", {}).values(),
        *([optimizer.d_opt] if getattr(optimizer, "d_opt", None) is not None else []),
    ]
    if inner:
        return any(is_compiled_optimizer(o) for o in inner[:1])
    return type(optimizer).__module__.startswith("torchao.optim.adam")


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
    offload: bool = False,
) -> torch.optim.Optimizer:
    """Build the optimizer over the trainable parameters.

    Args:
        named_params: ``(name, parameter)`` pairs; only those with ``requires_grad`` get state.
        name: ``adamw8bit``, ``paged_adamw8bit``, ``adamw``, ``ao_adamw8bit`` or
            ``ao_adamw4bit`` (resolved: not ``auto``).
        lr: peak learning rate.
        weight_decay: decoupled weight decay (AdamW, Loshchilov & Hutter 2019) for matrices.
        offload: ``--optimizer-offload``: torchao's ``CPUOffloadOptimizer`` around the same
            optimizer class: tensors of >= 4096 elements get a pinned host copy, a pinned host
            gradient buffer and host-resident states, and step on the host after backward
            (gradients copied as backward produces them, on a side stream); smaller ones step on
            the GPU. CUDA only.

    State memory per trained element: 2 bytes (8-bit m and v) plus one fp32 scale per block and
    state for ``adamw8bit`` and ``ao_adamw8bit`` (blocks of 256); 1 byte plus one fp32 scale per
    128 elements and state for ``ao_adamw4bit``; 8 bytes (fp32 m and v) for ``adamw``. Smaller
    tensors keep fp32 states (module docstring).

    Bf16 parameters: torchao's optimizers round the fp32 update stochastically into them; the
    others round to nearest, which loses small updates, so the recipe never gives them bf16
    parameters (``--precision bf16`` refuses them in :func:`fastmid.config.validate`).

    Raises:
        OptimizerError: unknown name; ``paged_adamw8bit`` or ``offload`` without CUDA;
            bitsandbytes or torchao missing.
    """
    named_params = list(named_params)
    groups = param_groups(named_params, weight_decay)
    if not groups:
        raise OptimizerError("no trainable parameters: the band is empty or everything is frozen")
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    if offload:
        check_offload_device(on_cuda)
    cls, kwargs = _optimizer_class(name, on_cuda and not offload)
    if not offload:
        if name == "adamw8bit" and not on_cuda:
            # bitsandbytes' update and state layout, one fused kernel per step on CPU
            from fastmid.train.adamw8bit_cpu import AdamW8bitCPU

            cls = AdamW8bitCPU
        return cls(groups, lr=lr, betas=betas, eps=eps, **kwargs)
    offload_cls = import_torchao_optim().CPUOffloadOptimizer
    if name == "adamw":
        kwargs = {}  # CPUOffloadOptimizer picks torch's fused CPU AdamW itself
    # offload_gradients=False: the GPU keeps the gradients, so the global norm and the
    # finiteness check see them before the host steps (and accumulation stays possible).
    return offload_cls(
        groups, optimizer_class=cls, offload_gradients=False, lr=lr, betas=betas, eps=eps,
        **kwargs,
    )  # fmt: skip


def check_offload_device(on_cuda: bool) -> None:
    """Refuse ``--optimizer-offload`` without CUDA.

    Raises:
        OptimizerError: ``on_cuda`` is false (one line: on CPU the states live in host memory
            already).
    """
    if not on_cuda:
        raise OptimizerError(
            "--optimizer-offload needs CUDA (it moves optimizer states from the GPU to pinned "
            "host memory); on CPU the states are in host memory already: drop the flag"
        )


def check_compile_toolchain(name: str, on_cuda: bool) -> None:
    """Refuse a torchao optimizer early where ``torch.compile`` cannot build its step: on CPU
    inductor compiles C++ (it needs ``g++`` or ``clang++``, or ``$CXX``), on CUDA Triton.

    Raises:
        OptimizerError: the compiler is missing (one line: what to install, what to use instead).
    """
    instead = "or use --optim adamw8bit (with --precision fp32 or bf16-master)"
    if on_cuda:
        try:
            import triton  # noqa: F401
        except ImportError:
            raise OptimizerError(
                f"--optim {name}: torchao compiles its step with torch.compile, which needs "
                f"Triton on CUDA; pip install triton, {instead}"
            ) from None
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or an inductor too old to have the helper
        raise OptimizerError(
            f"--optim {name}: torchao compiles its step with torch.compile, which needs a C++ "
            f"compiler on CPU and found none (g++, clang++ or $CXX); install one (e.g. "
            f"apt install g++), {instead}"
        ) from None


def _optimizer_class(name: str, on_cuda: bool) -> tuple[type, dict[str, Any]]:
    """The optimizer class of ``name`` and its keyword arguments besides lr, betas and eps."""
    if name == "adamw":
        return torch.optim.AdamW, ({"fused": True} if on_cuda else {"foreach": True})
    if name in ("adamw8bit", "paged_adamw8bit"):
        if name == "paged_adamw8bit" and not on_cuda:
            raise OptimizerError(
                "--optim paged_adamw8bit needs CUDA (paged states live in CUDA unified memory); "
                "use --optim adamw8bit on CPU"
            )
        # its import notices (a missing 4-bit CPU kernel fastmid never uses) to logging, not
        # the console, where a stray line would break the one-line errors that follow
        quiet_bitsandbytes()
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise OptimizerError(
                f"--optim {name} needs bitsandbytes>=0.50 ({exc}); pip install bitsandbytes, "
                "or use --optim adamw"
            ) from None
        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
        return cls, {"min_8bit_size": MIN_8BIT_SIZE}
    if name in TORCHAO_OPTIMIZERS:
        # torchao's default weight decay is 0.01: every group here sets its own.
        cls = getattr(import_torchao_optim(), TORCHAO_OPTIMIZERS[name])
        check_compile_toolchain(name, on_cuda)
        return cls, {"bf16_stochastic_round": True}
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


class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per parameter, each stepped inside backward as soon as that parameter's
    gradient is complete, and the gradient freed at once (``--optimizer-in-backward``).

    The pattern of PyTorch's tutorial "How to save memory by fusing the optimizer step into the
    backward pass" and of torchtune's ``OptimizerInBackwardWrapper``: a
    ``register_post_accumulate_grad_hook`` per parameter runs ``optimizer.step()`` and
    ``zero_grad(set_to_none=True)``, so at most the gradients of the parameters whose hooks are
    running exist at once, instead of the whole band's.

    The hooks act only between :meth:`begin_step` and :meth:`end_step`; a backward outside (a
    test, an analysis) leaves ordinary gradients. Inside, each hook also adds the gradient's
    squared L2 norm (fp32) and a non-finite flag to device tensors, so the global ``grad_norm``
    and the finiteness check cost one host sync per step, after backward, not one per parameter.

    It subclasses :class:`torch.optim.Optimizer` for the learning-rate schedulers only:
    :attr:`param_groups` are the per-parameter optimizers' own group dicts, so ``LambdaLR`` sets
    their ``lr`` directly (in place for torchao's tensor ``lr``). :meth:`step` does nothing (the
    steps ran in backward). ``state_dict()`` is ``{"optimizers": [each one's state_dict()]}``,
    in parameter order.

    Attributes:
        optimizers: the per-parameter optimizers, in the order of ``named_params``.
        grad_bytes_peak: the most bytes of ``.grad`` tensors of these parameters alive at once,
            sampled in the hooks during the last step (storage sizes; 0 before any step).
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], build: Any) -> None:
        """Args:
        named_params: ``(name, parameter)`` pairs; those with ``requires_grad`` get an optimizer.
        build: ``build(named_params) -> Optimizer`` for a one-parameter list (weight decay and
            every other setting decided there, as for the whole band).
        """
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self.params = [p for _n, p in named]
        self.optimizers = [build([(n, p)]) for n, p in named]
        self.defaults: dict[str, Any] = {}
        self.state: dict[Any, Any] = {}
        self._step_hooks: Any = None
        self._active = False
        self._sq_sum: torch.Tensor | None = None
        self._bad: torch.Tensor | None = None
        self._live_grad_bytes = 0
        self.grad_bytes_peak = 0
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook(opt))
            for p, opt in zip(self.params, self.optimizers, strict=True)
        ]

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The per-parameter optimizers' group dicts, read anew each time (``load_state_dict``
        replaces an optimizer's dicts, and the schedule must set the live ones)."""
        return [g for o in self.optimizers for g in o.param_groups]

    def _hook(self, optimizer: torch.optim.Optimizer) -> Any:
        def hook(p: torch.Tensor) -> None:
            if not self._active or p.grad is None:
                return
            grad = p.grad
            live = sum(q.grad.untyped_storage().nbytes() for q in self.params if q.grad is not None)
            self.grad_bytes_peak = max(self.grad_bytes_peak, live)
            sq = grad.detach().float().pow(2).sum()
            self._sq_sum = sq if self._sq_sum is None else self._sq_sum + sq
            bad = ~torch.isfinite(grad).all()
            self._bad = bad if self._bad is None else self._bad | bad
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return hook

    def begin_step(self) -> None:
        """Arm the hooks for one backward: reset the norm, the flag and the byte sampling."""
        for p in self.params:
            p.grad = None
        self._sq_sum, self._bad = None, None
        self.grad_bytes_peak = 0
        self._active = True

    def end_step(self) -> tuple[float, bool]:
        """Disarm the hooks; return ``(grad_norm, all_finite)`` of the backward (one host sync).

        ``grad_norm`` is the global L2 norm over every parameter that received a gradient
        (``sqrt`` of the summed fp32 squares, which equals ``clip_grad_norm_``'s value).
        """
        self._active = False
        if self._sq_sum is None:
            return 0.0, True
        finite = not bool(self._bad)
        return float(self._sq_sum.sqrt()), finite

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Nothing: every parameter stepped in its hook during backward."""
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop any gradient left on the parameters."""
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizers": [state_dict of each per-parameter optimizer]}``."""
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned.

        Raises:
            ValueError: another number of optimizers (another band), or a state that does not fit.
        """
        saved = state_dict.get("optimizers")
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise ValueError(
                f"{len(saved) if isinstance(saved, list) else 'no'} per-parameter optimizer "
                f"states for {len(self.optimizers)} parameters"
            )
        for opt, sd in zip(self.optimizers, saved, strict=True):
            opt.load_state_dict(sd)

    def remove_hooks(self) -> None:
        """Unregister the hooks (the parameters then train like any other)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
