"""Swap a model's modules for kernel-backed ones, and the family-agnostic causal-LM loss.

``patch_model(model, enabled, rms_norm=..., swiglu=..., geglu=..., rope=..., fused_loss=...)``
follows the family table (:data:`fastmid.models.families.FAMILIES`: where transformers defines
each family's RMSNorm class, MLP class and ``apply_rotary_pos_emb``), with one switch per op as
Liger-Kernel's ``apply_liger_kernel_to_*`` functions have. It swaps:

* every RMSNorm instance (layer norms, final norm, q/k norms) for :class:`KernelRMSNorm`, which
  holds the *same* ``weight`` Parameter (optimizer state, ``requires_grad`` and state-dict keys are
  unchanged) and calls :func:`fastmid.kernels.rms_norm` (``offset=1`` for Gemma's ``1 + w``);
* every gated MLP whose activation is SiLU for :class:`KernelSwiGLUMLP` (same ``gate_proj`` /
  ``up_proj`` / ``down_proj`` children) calling :func:`fastmid.kernels.swiglu`, and every one whose
  activation is tanh-GELU (Gemma, Gemma 2, Gemma 3: ``gelu_pytorch_tanh``) for
  :class:`KernelGeGLUMLP` calling :func:`fastmid.kernels.geglu`; other activations are left alone
  and listed in ``skipped``;
* the modeling module's ``apply_rotary_pos_emb`` for :func:`fastmid.kernels.rope`. transformers
  calls it as a module-level function, so this swap is global to that modeling module (every
  model of the family in the process); the kernel computes the same function, and
  :func:`unpatch_model` restores the original.

The kernel modules dispatch per call (Triton on CUDA, torch reference elsewhere, see
``fastmid.kernels``), so a patched model stays correct on CPU.

:func:`fastmid.models.loss.causal_lm_loss_sum` runs the fused loss kernel when the report says
``loss == "fused_linear_cross_entropy"``.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from fastmid import kernels
from fastmid.errors import FastmidError
from fastmid.models.families import FamilySpec, family_of

KernelsFlag = Literal["auto", "on", "off"]


class KernelsUnavailableError(FastmidError, ValueError):
    """``--kernels`` asks for what this machine cannot run (``on`` without CUDA and Triton) or is
    not one of auto, on, off; the message names ``--kernels`` and the value to use instead."""


# Original apply_rotary_pos_emb per modeling module, kept to undo the global swap.
_ORIGINAL_ROPE: dict[str, Any] = {}


class KernelRMSNorm(nn.Module):
    """RMSNorm module backed by :func:`fastmid.kernels.rms_norm`, replacing a transformers one.

    Holds the original module's ``weight`` Parameter itself, so parameter identity, dtype,
    ``requires_grad`` and the state-dict key (``...norm.weight``) are unchanged. The eps attribute
    keeps the original's name (``variance_epsilon`` or ``eps``).

    Input (..., H); output (..., H) in the input dtype (``promote`` families: the promotion of the
    input and weight dtypes, as transformers' Llama norm does).
    """

    def __init__(self, original: nn.Module, eps_attr: str, offset: float, out_dtype: str) -> None:
        super().__init__()
        self.weight = original.weight
        self.eps_attr = eps_attr
        setattr(self, eps_attr, float(getattr(original, eps_attr)))
        self.offset = offset
        self.out_dtype = out_dtype
        # Not a submodule: the state dict must keep only `weight`.
        object.__setattr__(self, "_fastmid_original", original)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """RMSNorm of ``hidden_states`` (..., H) over H."""
        y = kernels.rms_norm(
            hidden_states, self.weight, getattr(self, self.eps_attr), offset=self.offset
        )
        if self.out_dtype == "promote" and self.weight.dtype != hidden_states.dtype:
            y = y.to(torch.promote_types(hidden_states.dtype, self.weight.dtype))
        return y  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return (
            f"{tuple(self.weight.shape)}, eps={getattr(self, self.eps_attr)}, offset={self.offset}"
        )


class _KernelGatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x), up_proj(x)))`` with the original MLP's own linears and a
    kernel ``act``; the children keep their names, so state-dict keys are unchanged."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.gate_proj = original.gate_proj
        self.up_proj = original.up_proj
        self.down_proj = original.down_proj
        object.__setattr__(self, "_fastmid_original", original)


class KernelSwiGLUMLP(_KernelGatedMLP):
    """``down_proj(swiglu(gate_proj(x), up_proj(x)))`` with the original MLP's own linears.

    The children keep their names, so state-dict keys (``...mlp.gate_proj.weight``) are unchanged.
    Input (..., hidden_size); output (..., hidden_size).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The gated MLP on ``x`` (..., hidden_size)."""
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class KernelGeGLUMLP(_KernelGatedMLP):
    """``down_proj(geglu(gate_proj(x), up_proj(x)))``: Gemma's MLP (tanh-GELU gate) with the
    original MLP's own linears, calling :func:`fastmid.kernels.geglu`.

    The children keep their names, so state-dict keys (``...mlp.gate_proj.weight``) are unchanged.
    Input (..., hidden_size); output (..., hidden_size).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The gated MLP on ``x`` (..., hidden_size)."""
        return self.down_proj(kernels.geglu(self.gate_proj(x), self.up_proj(x)))


def _kernel_apply_rotary_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for transformers' ``apply_rotary_pos_emb`` backed by :func:`fastmid.kernels.rope`."""
    return kernels.rope(q, k, cos, sin, unsqueeze_dim)


@dataclass
class PatchReport:
    """What :func:`patch_model` did (JSON-ready through :meth:`to_dict`).

    Attributes:
        enabled: kernels were requested.
        model_type: ``config.model_type``.
        norms: number of RMSNorm modules swapped.
        mlps: number of MLP modules swapped.
        rope: the modeling module whose ``apply_rotary_pos_emb`` now uses the kernel, or None.
        loss: ``fused_linear_cross_entropy`` or ``eager`` (what :func:`causal_lm_loss_sum` should
            be called with: ``fused = (report.loss == "fused_linear_cross_entropy")``).
        attention: ``config._attn_implementation`` (``sdpa``, ``flash_attention_2``, ``eager``).
        skipped: human-readable reasons for parts left unpatched.
    """

    enabled: bool
    model_type: str
    norms: int = 0
    mlps: int = 0
    rope: str | None = None
    loss: str = "eager"
    attention: str | None = None
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``summary.json``."""
        return asdict(self)


def _swap(model: nn.Module, cls: type, make: Any) -> int:
    """Replace every instance of ``cls`` inside ``model`` by ``make(instance)``; returns count."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is cls
    ]
    for parent, name, child in targets:
        setattr(parent, name, make(child))
    return len(targets)


def patch_model(
    model: nn.Module,
    enabled: bool = True,
    *,
    rms_norm: bool = True,
    swiglu: bool = True,
    geglu: bool = True,
    rope: bool = True,
    fused_loss: bool = True,
) -> PatchReport:
    """Swap the supported modules of ``model`` (a ``*ForCausalLM``) for kernel-backed ones.

    Args:
        model: a transformers causal LM of a family in ``fastmid.models.families``.
        enabled: False leaves the model untouched and reports the eager loss path (the CLI's
            ``--kernels off``); the per-op switches below apply when it is True.
        rms_norm: swap the family's RMSNorm modules.
        swiglu: swap the family's SiLU-gated MLPs.
        geglu: swap the family's tanh-GELU-gated MLPs (Gemma's).
        rope: swap the modeling module's ``apply_rotary_pos_emb`` (global to that module).
        fused_loss: report the fused linear cross-entropy as the loss path.

    Returns:
        A :class:`PatchReport`. Families without kernel targets in the table (gpt2, gpt_neox,
        phi3) are left unpatched with a reason in ``skipped``; the fused loss still applies.

    Raises:
        UnsupportedModelError: the model's ``model_type`` is not in the family table.
    """
    spec = family_of(model)
    report = PatchReport(
        enabled=enabled,
        model_type=spec.model_type,
        attention=getattr(model.config, "_attn_implementation", None),
    )
    if not enabled:
        return report
    if fused_loss:
        report.loss = "fused_linear_cross_entropy"
    if spec.modeling_module is None:
        report.skipped.append(
            f"{spec.model_type}: no kernel targets (norm kind {spec.norm_kind}); "
            "only the loss is fused"
        )
        return report
    modeling = importlib.import_module(spec.modeling_module)
    if rms_norm and spec.norm_class is not None:
        offset = 1.0 if spec.norm_kind == "rms_gemma" else 0.0
        report.norms = _swap(
            model,
            getattr(modeling, spec.norm_class),
            lambda m: KernelRMSNorm(m, spec.norm_eps_attr, offset, spec.norm_out_dtype),
        )
    if (swiglu or geglu) and spec.mlp_class is not None:
        report.mlps = _patch_mlps(
            model, spec, getattr(modeling, spec.mlp_class), report, swiglu=swiglu, geglu=geglu
        )
    if rope:
        if spec.modeling_module not in _ORIGINAL_ROPE:
            _ORIGINAL_ROPE[spec.modeling_module] = modeling.apply_rotary_pos_emb
            modeling.apply_rotary_pos_emb = _kernel_apply_rotary_pos_emb
        report.rope = spec.modeling_module
    return report


def _activation_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(SiLU module classes, tanh-GELU module classes) of torch and this transformers version."""
    from transformers import activations

    silu: tuple[type, ...] = (nn.SiLU,)
    gelu_tanh: tuple[type, ...] = ()
    # transformers 5 names its tanh GELU `GELUTanh` (keeping `PytorchGELUTanh` as an alias);
    # earlier versions had only `PytorchGELUTanh`.
    for name, kind in (
        ("SiLUActivation", "silu"),
        ("GELUTanh", "gelu"),
        ("PytorchGELUTanh", "gelu"),
    ):
        cls = getattr(activations, name, None)
        if isinstance(cls, type):
            if kind == "silu":
                silu += (cls,)
            else:
                gelu_tanh += (cls,)
    return silu, gelu_tanh


def _is_gelu_tanh(act: Any, gelu_tanh_types: tuple[type, ...]) -> bool:
    """True for transformers' tanh GELU module and for ``nn.GELU(approximate="tanh")``."""
    if isinstance(act, nn.GELU):
        return act.approximate == "tanh"
    return isinstance(act, gelu_tanh_types)


def _patch_mlps(
    model: nn.Module,
    spec: FamilySpec,
    mlp_cls: type,
    report: PatchReport,
    *,
    swiglu: bool = True,
    geglu: bool = True,
) -> int:
    if not spec.gated_mlp:
        report.skipped.append(f"{spec.model_type}: MLP is not a separate gate/up/down gated MLP")
        return 0
    silu_types, gelu_tanh_types = _activation_types()
    skipped_acts: set[str] = set()
    swapped = 0

    def make(mlp: nn.Module) -> nn.Module:
        nonlocal swapped
        act = getattr(mlp, "act_fn", None)
        if isinstance(act, silu_types):
            if not swiglu:
                return mlp
            swapped += 1
            return KernelSwiGLUMLP(mlp)
        if _is_gelu_tanh(act, gelu_tanh_types):
            if not geglu:
                return mlp
            swapped += 1
            return KernelGeGLUMLP(mlp)
        skipped_acts.add(type(act).__name__)
        return mlp

    _swap(model, mlp_cls, make)
    if skipped_acts:
        report.skipped.append(
            f"{spec.model_type}: MLP activation {', '.join(sorted(skipped_acts))} is neither "
            "SiLU nor tanh-GELU (no kernel); MLPs left eager"
        )
    return swapped


def unpatch_model(model: nn.Module) -> None:
    """Undo :func:`patch_model`: put the original modules back and restore every modeling module's
    ``apply_rotary_pos_emb`` (global: other patched models then use the eager RoPE too)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            original = child.__dict__.get("_fastmid_original")
            if original is not None:
                setattr(parent, name, original)
    for module_name, original in _ORIGINAL_ROPE.items():
        importlib.import_module(module_name).apply_rotary_pos_emb = original
    _ORIGINAL_ROPE.clear()


def resolve_kernels_flag(flag: KernelsFlag, device: torch.device | str) -> bool:
    """Turn the CLI's ``--kernels auto|on|off`` into ``patch_model``'s ``enabled``.

    ``auto``: on when ``device`` is CUDA, Triton imports, and ``FASTMID_KERNELS`` is not ``off``.
    ``on``: the same requirements, enforced. ``off``: False.

    Raises:
        KernelsUnavailableError: unknown flag, or ``on`` without CUDA + Triton (the message says
            to use ``--kernels auto`` or ``off``); a ``ValueError`` too.
    """
    if flag not in ("auto", "on", "off"):
        raise KernelsUnavailableError(f"--kernels must be auto, on or off; got {flag!r}")
    if flag == "off":
        return False
    usable = torch.device(device).type == "cuda" and kernels.triton_available()
    if flag == "on" and not usable:
        hint = " (TRITON_INTERPRET=1 is for tests only)" if kernels.interpreter_enabled() else ""
        raise KernelsUnavailableError(
            f"--kernels on needs a CUDA device and triton; device is {device}, triton "
            f"{'installed' if kernels.triton_available() else 'missing'}{hint}: use --kernels auto or off"
        )
    return usable and (flag == "on" or not kernels.kernels_disabled_by_env())
