"""SwiGLU activation: ``out = silu(gate) * up`` with ``silu(g) = g * sigmoid(g)``.

Formula: Shazeer 2020, "GLU Variants Improve Transformer", eq. 6 (SwiGLU with beta = 1, the form
Llama/Mistral/Qwen/OLMo-2 use between ``gate_proj``/``up_proj`` and ``down_proj``).

Gradients (``s = sigmoid(gate)``), recomputed in backward from the saved ``gate`` and ``up`` instead
of storing ``silu(gate)`` or the product:

* ``d_up = dy * gate * s``
* ``d_gate = dy * up * s * (1 + gate * (1 - s))``

Everything is computed in float32 inside and cast to the input dtype. Forward-only (no grad):
nothing is saved.
"""

from __future__ import annotations

import torch

from ._dispatch import Backend, resolve_backend
from ._launch import num_warps_for, rows_per_program
from ._triton import cdiv, jit, next_power_of_2, tl

_BLOCK = 1024


@jit
def _swiglu_fwd_kernel(
    G,
    stride_g,
    U,
    stride_u,
    OUT,
    stride_o,
    n_rows,
    n_cols,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(
        OUT + rows[:, None] * stride_o + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask
    )


@jit
def _swiglu_bwd_kernel(
    DY,
    stride_dy,
    G,
    stride_g,
    U,
    stride_u,
    DG,
    DU,
    stride_d,
    n_rows,
    n_cols,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = dy.to(tl.float32)
    s = tl.sigmoid(g)
    du = dy * g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(DG + rows[:, None] * stride_d + cols[None, :], dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows[:, None] * stride_d + cols[None, :], du.to(DU.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """A (rows, n_cols) view with unit column stride (copies only when no such view exists)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _geometry(n_rows: int, n_cols: int, t: torch.Tensor) -> tuple[tuple[int, int], int, int]:
    """(grid, rows per program, columns per program) for a (n_rows, n_cols) elementwise op."""
    block = min(_BLOCK, next_power_of_2(max(n_cols, 1)))
    block_r = rows_per_program(block, t, n_rows)
    return (cdiv(n_rows, block_r), cdiv(n_cols, block)), block_r, block


def _triton_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    n_cols = gate.shape[-1]
    g2, u2 = _rows(gate, n_cols), _rows(up, n_cols)
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() > 0:
        grid, block_r, block = _geometry(g2.shape[0], n_cols, gate)
        _swiglu_fwd_kernel[grid](
            g2,
            g2.stride(0),
            u2,
            u2.stride(0),
            out,
            out.stride(0),
            g2.shape[0],
            n_cols,
            BLOCK_R=block_r,
            BLOCK=block,
            num_warps=num_warps_for(block_r * block),
        )
    return out.view(gate.shape)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return _triton_forward(gate, up)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        n_cols = gate.shape[-1]
        g2, u2, dy2 = _rows(gate, n_cols), _rows(up, n_cols), _rows(dy, n_cols)
        dg = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
        du = torch.empty(u2.shape, dtype=up.dtype, device=up.device)
        if dg.numel() > 0:
            grid, block_r, block = _geometry(g2.shape[0], n_cols, gate)
            _swiglu_bwd_kernel[grid](
                dy2,
                dy2.stride(0),
                g2,
                g2.stride(0),
                u2,
                u2.stride(0),
                dg,
                du,
                dg.stride(0),
                g2.shape[0],
                n_cols,
                BLOCK_R=block_r,
                BLOCK=block,
                num_warps=num_warps_for(block_r * block),
            )
        return dg.view(gate.shape), du.view(up.shape)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`swiglu`: float32 math (float64 for float64 input), input dtype out."""
    _check(gate, up)
    compute = torch.promote_types(gate.dtype, torch.float32)
    g = gate.to(compute)
    return (g * torch.sigmoid(g) * up.to(compute)).to(gate.dtype)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(
            f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape"
        )
    if gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate dtype {gate.dtype} != up dtype {up.dtype}")
    if gate.dim() == 0:
        raise ValueError("swiglu: gate and up need at least one dimension")


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """``silu(gate) * up``, elementwise.

    Args:
        gate: (..., I) output of ``gate_proj`` (float32/bf16/fp16); rows may be strided.
        up: (..., I) output of ``up_proj``, same shape and dtype.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        (..., I) tensor in the input dtype.

    Raises:
        ValueError: shapes or dtypes of ``gate`` and ``up`` differ.
        KernelBackendError: ``backend="triton"`` cannot run here.
    """
    _check(gate, up)
    if resolve_backend(backend, gate, up) == "torch":
        return swiglu_reference(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLUFunction.apply(gate, up)
    return _triton_forward(gate, up)
