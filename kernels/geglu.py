"""GeGLU activation with the tanh GELU: ``out = gelu_tanh(gate) * up``.

Formula: Shazeer 2020, "GLU Variants Improve Transformer", eq. 5 (GEGLU), with the tanh
approximation of GELU of Hendrycks & Gimpel 2016, "Gaussian Error Linear Units", sec. 2:
``gelu_tanh(g) = 0.5 * g * (1 + tanh(k0 * (g + k1 * g**3)))``, ``k0 = sqrt(2 / pi)``,
``k1 = 0.044715``. This is Gemma's MLP activation (``hidden_activation="gelu_pytorch_tanh"``,
transformers' ``GELUTanh`` = ``torch.nn.functional.gelu(approximate="tanh")``) between
``gate_proj``/``up_proj`` and ``down_proj``.

Gradients (``u = k0 * (g + k1 * g**3)``, ``t = tanh(u)``), recomputed in backward from the saved
``gate`` and ``up`` instead of storing ``gelu_tanh(gate)`` or the product:

* ``d_up = dy * gelu_tanh(gate)``
* ``d_gate = dy * up * (0.5 * (1 + t) + 0.5 * g * (1 - t**2) * k0 * (1 + 3 * k1 * g**2))``

Inside the kernels ``tanh(u) = sign(u) * (1 - e) / (1 + e)`` with ``e = exp(-2|u|)`` (Triton's
portable ops, no overflow for any ``u``; absolute error at float32 rounding, which is what the
product ``0.5 * g * (1 + t)`` needs). Everything is computed in float32 inside and
cast to the input dtype. Forward-only (no grad): nothing is saved.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import Backend
from ._gated import GatedOp, check_pair, gated
from ._triton import jit, tl

_K0 = math.sqrt(2.0 / math.pi)
_K1 = 0.044715


@jit
def _tanh(x):
    # tanh(x) = sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|) <= 1: never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@jit
def _geglu_fwd_kernel(
    G,
    stride_g,
    U,
    stride_u,
    OUT,
    stride_o,
    n_rows,
    n_cols,
    k0,
    k1,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    t = _tanh(k0 * (g + k1 * g * g * g))
    out = 0.5 * g * (1.0 + t) * u
    tl.store(
        OUT + rows[:, None] * stride_o + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask
    )


@jit
def _geglu_bwd_kernel(
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
    k0,
    k1,
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
    t = _tanh(k0 * (g + k1 * g * g * g))
    du = dy * 0.5 * g * (1.0 + t)
    d_act = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k0 * (1.0 + 3.0 * k1 * g * g)
    dg = dy * u * d_act
    tl.store(DG + rows[:, None] * stride_d + cols[None, :], dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows[:, None] * stride_d + cols[None, :], du.to(DU.dtype.element_ty), mask=mask)


_OP = GatedOp("geglu", _geglu_fwd_kernel, _geglu_bwd_kernel, (_K0, _K1))


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`geglu`: ``F.gelu(gate, approximate="tanh") * up`` in float32
    (float64 for float64 input), input dtype out. In float32 it is bit-equal to Gemma's eager
    ``act_fn(gate_proj(x)) * up_proj(x)``."""
    check_pair("geglu", gate, up)
    compute = torch.promote_types(gate.dtype, torch.float32)
    g = gate.to(compute)
    return (F.gelu(g, approximate="tanh") * up.to(compute)).to(gate.dtype)


def geglu(gate: torch.Tensor, up: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """``gelu_tanh(gate) * up``, elementwise (Gemma's gated MLP activation).

    Args:
        gate: (..., I) output of ``gate_proj`` (float32/bf16/fp16); rows may be strided (e.g. the
            first half of a packed gate/up projection).
        up: (..., I) output of ``up_proj``, same shape and dtype.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        (..., I) tensor in the input dtype.

    Raises:
        ValueError: shapes or dtypes of ``gate`` and ``up`` differ.
        KernelBackendError: ``backend="triton"`` cannot run here.
    """
    return gated(_OP, geglu_reference, gate, up, backend)
