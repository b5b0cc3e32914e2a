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

from ._dispatch import Backend
from ._gated import GatedOp, check_pair, gated
from ._triton import jit, tl


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


_OP = GatedOp("swiglu", _swiglu_fwd_kernel, _swiglu_bwd_kernel)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`swiglu`: float32 math (float64 for float64 input), input dtype out."""
    check_pair("swiglu", gate, up)
    compute = torch.promote_types(gate.dtype, torch.float32)
    g = gate.to(compute)
    return (g * torch.sigmoid(g) * up.to(compute)).to(gate.dtype)


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
    return gated(_OP, swiglu_reference, gate, up, backend)
