"""RMSNorm: ``y = x * rstd * (offset + w)``, ``rstd = 1 / sqrt(mean(x**2) + eps)``, optional fused
residual add (``h = x + residual; y = rms_norm(h)``, returning both).

Formula: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", eq. 4. ``offset=0`` is the
Llama/Mistral/Qwen/OLMo-2 form (``x * rstd * w``); ``offset=1`` is Gemma's (``x * rstd * (1 + w)``,
weights stored as deviations from 1). Everything is computed in float32 inside and cast once to the
input dtype, which is exactly Gemma's eager order; Llama's eager code casts ``x * rstd`` to the input
dtype before multiplying by ``w``, so in bf16 the two differ by one bf16 rounding (fp32 is
identical).

Gradients (``x_hat = x * rstd``, ``g = dy * (offset + w)``, sums over the last dimension of size H):

* ``dx = rstd * (g - x_hat * sum(g * x_hat) / H)``
* ``dw = sum over rows of dy * x_hat`` (skipped entirely when ``w`` does not require grad, the
  frozen-layer case)

With a residual, the gradient of ``h`` (the sum of the norm's ``dx`` and any gradient flowing into
the returned ``h``) is the gradient of both ``x`` and ``residual``.

Forward-only path: under ``torch.no_grad()`` (or when no input requires grad) the kernel runs
without storing ``rstd`` and nothing is saved for backward (the Mid-Block frozen prefix).
"""

from __future__ import annotations

import torch

from ._dispatch import Backend, resolve_backend
from ._launch import num_warps_for, persistent_programs, rows_per_program
from ._triton import cdiv, jit, next_power_of_2, tl


@jit
def _rms_norm_fwd_kernel(
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
    HAS_RESIDUAL: tl.constexpr,
    STORE_RSTD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        h = x.to(tl.float32) + r.to(tl.float32)
        h_stored = h.to(H_OUT.dtype.element_ty)
        tl.store(H_OUT + rows[:, None] * stride_h + cols[None, :], h_stored, mask=mask)
        # Normalize the rounded h, as eager code does, so backward (which reloads h) agrees.
        xf = h_stored.to(tl.float32)
    else:
        xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
    y = xf * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(RSTD + rows, rstd, mask=row_mask)


@jit
def _rms_norm_bwd_kernel(
    DY,
    stride_dy,
    X,
    stride_x,
    W,
    RSTD,
    DX,
    stride_dx,
    DH,
    stride_dh,
    DW_PARTIAL,
    n_rows,
    n_cols,
    offset,
    HAS_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Persistent: program p handles row tiles p, p + P, p + 2P, ... and keeps one dw partial sum.
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
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        x_hat = x.to(tl.float32) * rstd[:, None]
        dy = dy.to(tl.float32)
        g = dy * w[None, :]
        c = tl.sum(g * x_hat, axis=1) / n_cols
        dx = rstd[:, None] * (g - x_hat * c[:, None])
        if HAS_DH:
            dh = tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0)
            dx += dh.to(tl.float32)
        tl.store(
            DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask
        )
        if COMPUTE_DW:
            dw_acc += tl.sum(dy * x_hat, axis=0)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=col_mask)


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """A (rows, n_cols) view with unit column stride (copies only when no such view exists)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _block(n_cols: int) -> int:
    return next_power_of_2(n_cols)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> int:
    if x.dim() < 1 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"rms_norm: hidden_states (..., H) and weight (H,) disagree: "
            f"{tuple(x.shape)} vs {tuple(weight.shape)}"
        )
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"rms_norm: residual shape {tuple(residual.shape)} != hidden_states shape "
            f"{tuple(x.shape)}"
        )
    return x.shape[-1]


def _triton_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    eps: float,
    offset: float,
    store_rstd: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run the forward kernel; returns (y (rows, H), h (rows, H) or None, rstd (rows,) or None)."""
    n_cols = x.shape[-1]
    x2 = _rows(x, n_cols)
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    r2 = _rows(residual, n_cols) if residual is not None else x2
    h = torch.empty_like(y) if residual is not None else y
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device) if store_rstd else y
    if n_rows > 0:
        block = _block(n_cols)
        block_r = rows_per_program(block, x, n_rows)
        _rms_norm_fwd_kernel[(cdiv(n_rows, block_r),)](
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
            HAS_RESIDUAL=residual is not None,
            STORE_RSTD=store_rstd,
            BLOCK_R=block_r,
            BLOCK=block,
            num_warps=num_warps_for(block_r * block),
        )
    return y, (h if residual is not None else None), (rstd if store_rstd else None)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps, offset):  # type: ignore[override]
        y, h, rstd = _triton_forward(x, weight, residual, eps, offset, store_rstd=True)
        # Backward re-reads the normalized input: x itself, or h when a residual was added.
        ctx.save_for_backward(h if h is not None else _rows(x, x.shape[-1]), weight, rstd)
        ctx.offset = offset
        ctx.shape = x.shape
        ctx.has_residual = residual is not None
        ctx.set_materialize_grads(False)
        if h is None:
            return y.view(x.shape)
        return y.view(x.shape), h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh=None):  # type: ignore[override]
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        if dy is None:
            dy = torch.zeros(ctx.shape, dtype=x2.dtype, device=x2.device)
        dy2 = _rows(dy, n_cols)
        dh2 = _rows(dh, n_cols) if dh is not None else dy2
        compute_dw = ctx.needs_input_grad[1]
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
        block = _block(n_cols)
        block_r = rows_per_program(block, x2, n_rows)
        n_prog = max(1, min(cdiv(n_rows, block_r), persistent_programs(x2)))
        dw_partial = (
            torch.empty((n_prog, n_cols), dtype=torch.float32, device=x2.device)
            if compute_dw
            else dx
        )
        if n_rows > 0:
            _rms_norm_bwd_kernel[(n_prog,)](
                dy2,
                dy2.stride(0),
                x2,
                x2.stride(0),
                weight,
                rstd,
                dx,
                dx.stride(0),
                dh2,
                dh2.stride(0),
                dw_partial,
                n_rows,
                n_cols,
                ctx.offset,
                HAS_DH=dh is not None,
                COMPUTE_DW=compute_dw,
                BLOCK_R=block_r,
                BLOCK=block,
                num_warps=num_warps_for(block_r * block),
            )
        dw = None
        if compute_dw:
            dw = dw_partial.sum(0).to(weight.dtype) if n_rows > 0 else torch.zeros_like(weight)
        dx = dx.view(ctx.shape)
        d_residual = dx if ctx.has_residual and ctx.needs_input_grad[2] else None
        return dx, dw, d_residual, None, None


def rms_norm_reference(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`rms_norm` (same signature minus ``backend``; autograd by torch).

    Computes in float32 (float64 when the input is float64, which is what the tests use as the
    ground truth) and casts the result to ``hidden_states.dtype``.
    """
    _check(hidden_states, weight, residual)
    compute = torch.promote_types(hidden_states.dtype, torch.float32)
    h = hidden_states
    if residual is not None:
        h = hidden_states + residual
    hf = h.to(compute)
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    y = (hf * rstd * (weight.to(compute) + offset)).to(hidden_states.dtype)
    return (y, h) if residual is not None else y


def rms_norm(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    residual: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension, optionally after adding a residual.

    Args:
        hidden_states: (..., H) float32/bf16/fp16, any H (not only powers of two); the last
            dimension may be strided rows of a larger tensor (a non-unit column stride costs a copy).
        weight: (H,) the norm's scale (``w``).
        eps: added to the mean square (the model's ``rms_norm_eps``), dimensionless.
        offset: 0.0 for ``x * rstd * w`` (Llama family), 1.0 for Gemma's ``x * rstd * (1 + w)``.
        residual: optional (..., H) tensor added to ``hidden_states`` first.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see ``fastmid.kernels._dispatch``).

    Returns:
        ``y`` (..., H) in ``hidden_states.dtype``; with ``residual``, the pair ``(y, h)`` where
        ``h = hidden_states + residual`` (input dtype).

    Raises:
        ValueError: shapes of ``hidden_states``, ``weight`` and ``residual`` disagree.
        KernelBackendError: ``backend="triton"`` cannot run here.
    """
    _check(hidden_states, weight, residual)
    tensors = [hidden_states, weight] + ([residual] if residual is not None else [])
    if resolve_backend(backend, *tensors) == "torch":
        return rms_norm_reference(hidden_states, weight, eps, offset=offset, residual=residual)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not needs_grad:
        y, h, _ = _triton_forward(hidden_states, weight, residual, eps, offset, store_rstd=False)
        y = y.view(hidden_states.shape)
        return (y, h.view(hidden_states.shape)) if h is not None else y
    return _RMSNormFunction.apply(hidden_states, weight, residual, float(eps), float(offset))
