"""What the gated MLP activations (SwiGLU, GeGLU) share around their Triton kernels.

``out = act(gate) * up`` elementwise over (..., I) tensors: each op brings its own forward and
backward kernels (the activation and its derivative) and any scalar constants they take after
``n_cols``; this module lays the rows out, sizes the launch, and runs the autograd function that
saves ``gate`` and ``up`` and recomputes the activation in backward. Kernel signatures:

* forward: ``(G, stride_g, U, stride_u, OUT, stride_o, n_rows, n_cols, *consts, BLOCK_R, BLOCK)``
* backward: ``(DY, stride_dy, G, stride_g, U, stride_u, DG, DU, stride_d, n_rows, n_cols,
  *consts, BLOCK_R, BLOCK)``
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._dispatch import Backend, resolve_backend
from ._launch import num_warps_for, rows_per_program
from ._triton import cdiv, next_power_of_2

_BLOCK = 1024


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """A (rows, n_cols) view with unit column stride (copies only when no such view exists)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _geometry(n_rows: int, n_cols: int, t: torch.Tensor) -> tuple[tuple[int, int], int, int]:
    """(grid, rows per program, columns per program) for a (n_rows, n_cols) elementwise op."""
    block = min(_BLOCK, next_power_of_2(max(n_cols, 1)))
    block_r = rows_per_program(block, t, n_rows)
    return (cdiv(n_rows, block_r), cdiv(n_cols, block)), block_r, block


@dataclass(frozen=True)
class GatedOp:
    """One gated activation: its name (for errors), its two kernels and their constants."""

    name: str
    fwd_kernel: Any
    bwd_kernel: Any
    consts: tuple[float, ...] = ()

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """(..., I) ``act(gate) * up`` in the input dtype, through the forward kernel."""
        n_cols = gate.shape[-1]
        g2, u2 = _rows(gate, n_cols), _rows(up, n_cols)
        out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
        if out.numel() > 0:
            grid, block_r, block = _geometry(g2.shape[0], n_cols, gate)
            self.fwd_kernel[grid](
                g2, g2.stride(0), u2, u2.stride(0), out, out.stride(0), g2.shape[0], n_cols,
                *self.consts, BLOCK_R=block_r, BLOCK=block,
                num_warps=num_warps_for(block_r * block),
            )  # fmt: skip
        return out.view(gate.shape)

    def backward(
        self, dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d_gate, d_up)``, each shaped and typed like its input, through the backward kernel."""
        n_cols = gate.shape[-1]
        g2, u2, dy2 = _rows(gate, n_cols), _rows(up, n_cols), _rows(dy, n_cols)
        dg = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
        du = torch.empty(u2.shape, dtype=up.dtype, device=up.device)
        if dg.numel() > 0:
            grid, block_r, block = _geometry(g2.shape[0], n_cols, gate)
            self.bwd_kernel[grid](
                dy2, dy2.stride(0), g2, g2.stride(0), u2, u2.stride(0), dg, du, dg.stride(0),
                g2.shape[0], n_cols, *self.consts, BLOCK_R=block_r, BLOCK=block,
                num_warps=num_warps_for(block_r * block),
            )  # fmt: skip
        return dg.view(gate.shape), du.view(up.shape)


class _GatedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, gate, up):  # type: ignore[override]
        ctx.op = op
        ctx.save_for_backward(gate, up)
        return op.forward(gate, up)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        return None, *ctx.op.backward(dy, gate, up)


def check_pair(name: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``gate`` and ``up`` share a shape (of at least
    one dimension) and a dtype."""
    if gate.shape != up.shape:
        raise ValueError(
            f"{name}: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape"
        )
    if gate.dtype != up.dtype:
        raise ValueError(f"{name}: gate dtype {gate.dtype} != up dtype {up.dtype}")
    if gate.dim() == 0:
        raise ValueError(f"{name}: gate and up need at least one dimension")


def gated(
    op: GatedOp,
    reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    gate: torch.Tensor,
    up: torch.Tensor,
    backend: Backend,
) -> torch.Tensor:
    """``op`` on the backend :func:`resolve_backend` picks: ``reference`` on ``torch``; the kernels
    under autograd when a gradient is wanted; the forward kernel alone (nothing saved) otherwise.

    Args:
        op: the activation's kernels and constants.
        reference: its torch reference, ``(gate, up) -> out``.
        gate: (..., I) float32/bf16/fp16; rows may be strided.
        up: (..., I), same shape and dtype as ``gate``.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        (..., I) ``act(gate) * up`` in the input dtype.

    Raises:
        ValueError: shapes or dtypes of ``gate`` and ``up`` differ (:func:`check_pair`).
        KernelBackendError: ``backend="triton"`` cannot run here.
    """
    check_pair(op.name, gate, up)
    if resolve_backend(backend, gate, up) == "torch":
        return reference(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _GatedFunction.apply(op, gate, up)
    return op.forward(gate, up)
