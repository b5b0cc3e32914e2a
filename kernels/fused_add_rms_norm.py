"""Residual add fused into RMSNorm: ``h = hidden_states + residual``, ``y = rms_norm(h)``, returning
``(y, h)`` (Liger-Kernel's ``fused_add_rms_norm`` pattern, as vLLM's decoder layers use it).

Formula: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", eq. 4, applied to the sum:
``rstd = 1 / sqrt(mean(h**2) + eps)``, ``y = (h * rstd) * (offset + w)``. One kernel reads
``hidden_states`` and ``residual`` once and writes ``h`` and ``y``, where eager code writes ``h``,
reads it back for the mean square, and again for the scaling.

Two casting rules, chosen to reproduce a family's eager RMSNorm (Liger's ``casting_mode``):

* ``"llama"`` (Llama, Mistral, Qwen2, Qwen3): ``x_hat = h * rstd`` in float32 is rounded to the input
  dtype, then multiplied by the weight; ``y`` has the promotion of the input and weight dtypes
  (transformers' ``weight * hidden_states.to(input_dtype)``). In bf16 this is eager's order of
  roundings; only the order of the mean-square sum differs.
* ``"gemma"`` (Gemma's ``1 + w``, OLMo-2): all in float32, cast once to the input dtype.

``h`` is computed in float32 and rounded to the input dtype (as eager ``residual + hidden_states``
is); the norm is taken of the rounded ``h``, so the backward, which reloads ``h``, agrees.

Gradients (``x_hat = h * rstd``, ``g = dy * (offset + w)``, sums over the last dimension of size H;
the rounding of the ``"llama"`` rule is treated as the identity, as autograd treats ``.to()``):

* ``dh = rstd * (g - x_hat * sum(g * x_hat) / H) + dh_out`` (``dh_out``: the gradient flowing into
  the returned ``h``, the residual stream); it is the gradient of both ``hidden_states`` and
  ``residual``;
* ``dw = sum over rows of dy * x_hat`` (``x_hat`` as rounded in the forward), computed only when the
  weight requires grad; a frozen layer's norm never pays for it.

Forward-only (``torch.no_grad()``, the Mid-Block frozen prefix): no ``rstd`` is stored and nothing
is saved for backward. Everything is computed in float32 inside.

:func:`fastmid.kernels.rms_norm` with ``residual=`` computes the same function with the ``"gemma"``
rounding for every family; this op is the frozen decoder layer's, with each family's own rounding.
"""

from __future__ import annotations

from typing import Literal

import torch

from ._dispatch import Backend, resolve_backend
from ._launch import num_warps_for, persistent_programs, rows_per_program
from ._triton import cdiv, jit, next_power_of_2, tl

Casting = Literal["llama", "gemma"]
_CASTINGS = ("llama", "gemma")


@jit
def _fused_add_rms_norm_fwd_kernel(
    X,
    stride_x,
    R,
    stride_r,
    Y,
    stride_y,
    H_OUT,
    stride_h,
    W,
    RSTD,
    n_rows,
    n_cols,
    eps,
    offset,
    CAST_LLAMA: tl.constexpr,
    STORE_RSTD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
    h = (x.to(tl.float32) + r.to(tl.float32)).to(H_OUT.dtype.element_ty)
    tl.store(H_OUT + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=1) / n_cols + eps)
    x_hat = hf * rstd[:, None]
    if CAST_LLAMA:
        x_hat = x_hat.to(H_OUT.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
    y = x_hat * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(RSTD + rows, rstd, mask=row_mask)


@jit
def _fused_add_rms_norm_bwd_kernel(
    DY,
    stride_dy,
    DH_OUT,
    stride_dho,
    H,
    stride_h,
    W,
    RSTD,
    DX,
    stride_dx,
    DW_PARTIAL,
    n_rows,
    n_cols,
    offset,
    HAS_DH_OUT: tl.constexpr,
    CAST_LLAMA: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Persistent: program p handles row tiles p, p + P, ... and keeps one dw partial sum.
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    n_tiles = tl.cdiv(n_rows, BLOCK_R)
    for tile in range(pid, n_tiles, n_programs):
        rows = (tile * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        x_hat = h.to(tl.float32) * rstd[:, None]
        dy = dy.to(tl.float32)
        g = dy * w[None, :]
        c = tl.sum(g * x_hat, axis=1) / n_cols
        dx = rstd[:, None] * (g - x_hat * c[:, None])
        if HAS_DH_OUT:
            dho = tl.load(DH_OUT + rows[:, None] * stride_dho + cols[None, :], mask=mask, other=0.0)
            dx += dho.to(tl.float32)
        tl.store(
            DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask
        )
        if COMPUTE_DW:
            if CAST_LLAMA:
                # The forward multiplied w by x_hat rounded to the input dtype.
                x_hat = x_hat.to(H.dtype.element_ty).to(tl.float32)
            dw_acc += tl.sum(dy * x_hat, axis=0)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=col_mask)


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """A (rows, n_cols) view with unit column stride (copies only when no such view exists)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, casting: str) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype) if casting == "llama" else x.dtype


def _check(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, casting: str) -> None:
    if casting not in _CASTINGS:
        raise ValueError(f"fused_add_rms_norm: casting must be one of {_CASTINGS}, got {casting!r}")
    if x.dim() < 1 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"fused_add_rms_norm: hidden_states (..., H) and weight (H,) disagree: "
            f"{tuple(x.shape)} vs {tuple(weight.shape)}"
        )
    if residual.shape != x.shape:
        raise ValueError(
            f"fused_add_rms_norm: residual shape {tuple(residual.shape)} != hidden_states shape "
            f"{tuple(x.shape)}"
        )
    if residual.dtype != x.dtype:
        raise ValueError(
            f"fused_add_rms_norm: residual dtype {residual.dtype} != hidden_states dtype {x.dtype}"
        )


def _triton_forward(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float,
    casting: str,
    store_rstd: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the forward kernel; returns (y (rows, H), h (rows, H), rstd (rows,) or None)."""
    n_cols = x.shape[-1]
    x2, r2 = _rows(x, n_cols), _rows(residual, n_cols)
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=_out_dtype(x, weight, casting), device=x.device)
    h = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device) if store_rstd else h
    if n_rows > 0:
        block = next_power_of_2(n_cols)
        block_r = rows_per_program(block, x, n_rows)
        _fused_add_rms_norm_fwd_kernel[(cdiv(n_rows, block_r),)](
            x2,
            x2.stride(0),
            r2,
            r2.stride(0),
            y,
            y.stride(0),
            h,
            h.stride(0),
            weight,
            rstd,
            n_rows,
            n_cols,
            eps,
            offset,
            CAST_LLAMA=casting == "llama",
            STORE_RSTD=store_rstd,
            BLOCK_R=block_r,
            BLOCK=block,
            num_warps=num_warps_for(block_r * block),
        )
    return y, h, (rstd if store_rstd else None)


class _FusedAddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, offset, casting):  # type: ignore[override]
        y, h, rstd = _triton_forward(x, residual, weight, eps, offset, casting, store_rstd=True)
        # Backward needs only the rounded sum h and rstd, not x and residual.
        ctx.save_for_backward(h, weight, rstd)
        ctx.offset, ctx.casting, ctx.shape, ctx.y_dtype = offset, casting, x.shape, y.dtype
        ctx.set_materialize_grads(False)
        return y.view(x.shape), h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh_out):  # type: ignore[override]
        h, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = h.shape
        if dy is None:  # only h was used: the norm contributes nothing
            dy = torch.zeros((n_rows, n_cols), dtype=ctx.y_dtype, device=h.device)
        dy2 = _rows(dy, n_cols)
        dho2 = _rows(dh_out, n_cols) if dh_out is not None else dy2
        compute_dw = ctx.needs_input_grad[2]
        dx = torch.empty((n_rows, n_cols), dtype=h.dtype, device=h.device)
        block = next_power_of_2(n_cols)
        block_r = rows_per_program(block, h, n_rows)
        n_prog = max(1, min(cdiv(n_rows, block_r), persistent_programs(h)))
        dw_partial = (
            torch.empty((n_prog, n_cols), dtype=torch.float32, device=h.device)
            if compute_dw
            else dx
        )
        if n_rows > 0:
            _fused_add_rms_norm_bwd_kernel[(n_prog,)](
                dy2,
                dy2.stride(0),
                dho2,
                dho2.stride(0),
                h,
                h.stride(0),
                weight,
                rstd,
                dx,
                dx.stride(0),
                dw_partial,
                n_rows,
                n_cols,
                ctx.offset,
                HAS_DH_OUT=dh_out is not None,
                CAST_LLAMA=ctx.casting == "llama",
                COMPUTE_DW=compute_dw,
                BLOCK_R=block_r,
                BLOCK=block,
                num_warps=num_warps_for(block_r * block),
            )
        dw = None
        if compute_dw:
            dw = dw_partial.sum(0).to(weight.dtype) if n_rows > 0 else torch.zeros_like(weight)
        dx = dx.view(ctx.shape)
        d_x = dx if ctx.needs_input_grad[0] else None
        d_residual = dx if ctx.needs_input_grad[1] else None
        return d_x, d_residual, dw, None, None, None


def fused_add_rms_norm_reference(
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    casting: Casting = "llama",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`fused_add_rms_norm` (same signature minus ``backend``).

    The eager ops of the family's decoder layer: ``h = hidden_states + residual`` in the input
    dtype, then the norm in float32 (float64 for float64 input, the tests' ground truth) with the
    ``casting`` rule's roundings. In float32 it is bit-equal to transformers' Llama layer code.
    """
    _check(hidden_states, residual, weight, casting)
    h = hidden_states + residual
    compute = torch.promote_types(h.dtype, torch.float32)
    hf = h if h.dtype == compute else h.to(compute)
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    x_hat = hf * rstd
    if casting == "llama":
        # Eager Llama: x_hat rounded to the input dtype, then one product in the promoted dtype
        # (a bf16 x bf16 product is exact in float32 and rounded once, as torch's bf16 mul does).
        # (The dtype tests skip no-op casts: this runs once per frozen layer on CPU.)
        scale = torch.promote_types(compute, weight.dtype)
        if h.dtype != compute:
            x_hat = x_hat.to(h.dtype).to(scale)
        elif scale != compute:
            x_hat = x_hat.to(scale)
        w = weight if weight.dtype == scale else weight.to(scale)
        y = x_hat * (w + offset) if offset else x_hat * w
        out = _out_dtype(h, weight, casting)
        return (y if y.dtype == out else y.to(out)), h
    return (x_hat * (weight.to(compute) + offset)).to(h.dtype), h


def fused_add_rms_norm(
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    casting: Casting = "llama",
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = hidden_states + residual`` and RMSNorm of ``h`` over the last dimension, in one pass.

    Args:
        hidden_states: (..., H) float32/bf16/fp16 (a sublayer's output, e.g. attention's
            ``o_proj``), any H; rows may be strided (a non-unit column stride costs a copy).
        residual: (..., H), same shape and dtype (the residual stream).
        weight: (H,) the norm's scale ``w``, any float dtype.
        eps: added to the mean square (the model's ``rms_norm_eps``), dimensionless.
        offset: 0.0 for ``x_hat * w``, 1.0 for Gemma's ``x_hat * (1 + w)``.
        casting: ``"llama"`` (round ``x_hat`` to the input dtype before the weight; output dtype
            the promotion of input and weight) or ``"gemma"`` (float32 throughout; output in the
            input dtype). See the module docstring.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see ``fastmid.kernels._dispatch``).

    Returns:
        ``(y, h)``: ``y`` (..., H) the normalized sum (dtype per ``casting``), ``h`` (..., H) the
        sum in the input dtype (the next residual stream).

    Raises:
        ValueError: shapes or dtypes of the inputs disagree, or an unknown ``casting``.
        KernelBackendError: ``backend="triton"`` cannot run here.
    """
    _check(hidden_states, residual, weight, casting)
    tensors = (hidden_states, residual, weight)
    if resolve_backend(backend, *tensors) == "torch":
        return fused_add_rms_norm_reference(
            hidden_states, residual, weight, eps, offset=offset, casting=casting
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _FusedAddRMSNormFunction.apply(
            hidden_states, residual, weight, float(eps), float(offset), casting
        )
    y, h, _ = _triton_forward(
        hidden_states, residual, weight, float(eps), float(offset), casting, store_rstd=False
    )
    return y.view(hidden_states.shape), h.view(hidden_states.shape)
