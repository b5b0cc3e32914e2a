"""Rotary position embedding (RoPE) applied to queries and keys, in the "rotate half" layout.

Formula: Su et al. 2021, "RoFormer", eq. 34, in the layout transformers uses for Llama-like models:
with ``x = [x1, x2]`` split into halves of ``head_dim / 2`` and ``cos``/``sin`` of shape
(..., head_dim) (halves ``c1, c2`` and ``s1, s2``; transformers builds them as
``cat(freqs, freqs)`` so ``c1 == c2``):

* forward: ``y1 = x1 * c1 - x2 * s1``, ``y2 = x2 * c2 + x1 * s2`` (``x * cos + rotate_half(x) * sin``)
* backward: the transpose, ``dx1 = dy1 * c1 + dy2 * s2``, ``dx2 = dy2 * c2 - dy1 * s1``; for the
  duplicated halves of real models this is the inverse rotation (the same kernel with ``-sin``).

Math in float32, output in the input dtype. Gradients flow to ``q`` and ``k`` only; ``cos`` and
``sin`` come from a frequency buffer and must not require grad.
"""

from __future__ import annotations

import torch

from ._dispatch import Backend, resolve_backend
from ._launch import num_warps_for, rows_per_program
from ._triton import cdiv, jit, next_power_of_2, tl


@jit
def _rope_kernel(
    X,
    sx_b,
    sx_s,
    sx_h,
    Y,
    sy_b,
    sy_s,
    sy_h,
    COS,
    SIN,
    sc_b,
    sc_s,
    seq_len,
    n_heads,
    half,
    BACKWARD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Rows are the (position, head) pairs of one sequence, flattened; each gathers its cos/sin.
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    s = r // n_heads
    h = r % n_heads
    d = tl.arange(0, BLOCK_D)
    mask = (r < seq_len * n_heads)[:, None] & (d < half)[None, :]
    cs = b * sc_b + s[:, None] * sc_s + d[None, :]
    c1 = tl.load(COS + cs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cs + half, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cs + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # Transpose of the forward map: swap the sine halves and negate them.
        s1, s2 = -s2, -s1
    x_off = b * sx_b + s[:, None] * sx_s + h[:, None] * sx_h + d[None, :]
    y_off = b * sy_b + s[:, None] * sy_s + h[:, None] * sy_h + d[None, :]
    x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + half, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2
    tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_off + half, y2.to(Y.dtype.element_ty), mask=mask)


def _new_like(x: torch.Tensor) -> torch.Tensor:
    """Uninitialized tensor like ``x`` whose last dimension has unit stride."""
    if x.stride(-1) == 1:
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _bshd(x: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """View of q/k indexed (batch, seq, heads, head_dim) whatever the caller's layout."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.transpose(1, 2) if unsqueeze_dim == 1 else x


def _cos_sin_3d(t: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    """(Bc, S, D) view of cos/sin with unit last stride and its batch stride (0 when shared)."""
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, (0 if t.shape[0] == 1 and batch != 1 else t.stride(0))


def _launch(
    x: torch.Tensor,
    out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int,
    backward: bool,
) -> None:
    xv, yv = _bshd(x, unsqueeze_dim), _bshd(out, unsqueeze_dim)
    batch, seq_len, n_heads, head_dim = xv.shape
    cos3, sc_b = _cos_sin_3d(cos, batch)
    sin3, _ = _cos_sin_3d(sin, batch)
    if cos3.stride() != sin3.stride():
        sin3 = sin3.contiguous()
        cos3 = cos3.contiguous()
        sc_b = 0 if cos3.shape[0] == 1 and batch != 1 else cos3.stride(0)
    if xv.numel() == 0:
        return
    half = head_dim // 2
    block_d = next_power_of_2(half)
    n_rows = seq_len * n_heads
    block_r = rows_per_program(block_d, x, n_rows)
    _rope_kernel[(batch, cdiv(n_rows, block_r))](
        xv,
        xv.stride(0),
        xv.stride(1),
        xv.stride(2),
        yv,
        yv.stride(0),
        yv.stride(1),
        yv.stride(2),
        cos3,
        sin3,
        sc_b,
        cos3.stride(1),
        seq_len,
        n_heads,
        half,
        BACKWARD=backward,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=num_warps_for(block_r * block_d),
    )


class _RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):  # type: ignore[override]
        q_out, k_out = _new_like(q), _new_like(k)
        _launch(q, q_out, cos, sin, unsqueeze_dim, backward=False)
        _launch(k, k_out, cos, sin, unsqueeze_dim, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        dq_in = dk_in = None
        if dq is not None and ctx.needs_input_grad[0]:
            dq_in = _new_like(dq)
            _launch(dq, dq_in, cos, sin, ctx.unsqueeze_dim, backward=True)
        if dk is not None and ctx.needs_input_grad[1]:
            dk_in = _new_like(dk)
            _launch(dk, dk_in, cos, sin, ctx.unsqueeze_dim, backward=True)
        return dq_in, dk_in, None, None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`rope` (float32 math, float64 for float64 input; input dtype out)."""
    _check(q, k, cos, sin, unsqueeze_dim)
    compute = torch.promote_types(q.dtype, torch.float32)
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    c = cos.to(compute).unsqueeze(unsqueeze_dim)
    s = sin.to(compute).unsqueeze(unsqueeze_dim)
    qf, kf = q.to(compute), k.to(compute)
    q_out = qf * c + _rotate_half(qf) * s
    k_out = kf * c + _rotate_half(kf) * s
    return q_out.to(q.dtype), k_out.to(k.dtype)


def _check(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int
) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"rope: q and k must be 4-D (batch, heads, seq, head_dim) or (batch, seq, heads, "
            f"head_dim); got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"rope: unsqueeze_dim must be 1 or 2, got {unsqueeze_dim}")
    head_dim = q.shape[-1]
    if head_dim % 2 or k.shape[-1] != head_dim:
        raise ValueError(
            f"rope: head_dim must be even and equal for q and k; got {head_dim} and {k.shape[-1]}"
        )
    seq_axis = 2 if unsqueeze_dim == 1 else 1
    batch, seq_len = q.shape[0], q.shape[seq_axis]
    if k.shape[0] != batch or k.shape[seq_axis] != seq_len:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch/seq")
    if cos.shape != sin.shape:
        raise ValueError(f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    cs = cos if cos.dim() == 3 else cos.unsqueeze(0)
    if cs.dim() != 3 or cs.shape[0] not in (1, batch) or tuple(cs.shape[1:]) != (seq_len, head_dim):
        raise ValueError(
            f"rope: cos/sin must be ({batch} or 1, {seq_len}, {head_dim}) or ({seq_len}, "
            f"{head_dim}); got {tuple(cos.shape)}"
        )
    if cos.requires_grad or sin.requires_grad:
        raise ValueError(
            "rope: cos/sin require grad, but this op gives gradients to q and k only; "
            "compute cos/sin under torch.no_grad() or from a buffer"
        )


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    *,
    inplace: bool = False,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply RoPE to ``q`` and ``k`` (same contract as transformers' ``apply_rotary_pos_emb``).

    Args:
        q: (batch, n_heads, seq, head_dim) when ``unsqueeze_dim=1`` (transformers' layout, usually
            a transposed view, which is read in place through its strides), or
            (batch, seq, n_heads, head_dim) when ``unsqueeze_dim=2``; any even ``head_dim``.
        k: like ``q`` with ``n_kv_heads`` heads.
        cos, sin: (batch, seq, head_dim) per sequence, (1, seq, head_dim) or (seq, head_dim) shared.
        unsqueeze_dim: 1 or 2, the heads axis of ``q``/``k`` as in transformers.
        inplace: write the result into ``q`` and ``k``. Honoured only when autograd cannot observe
            it (no input requires grad or grad mode is off); otherwise new tensors are returned.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        ``(q_embed, k_embed)`` with the shapes and dtypes of ``q`` and ``k``.

    Raises:
        ValueError: bad ranks, odd ``head_dim``, mismatched shapes, or ``cos``/``sin`` requiring
            grad.
        KernelBackendError: ``backend="triton"`` cannot run here.
    """
    _check(q, k, cos, sin, unsqueeze_dim)
    if resolve_backend(backend, q, k, cos, sin) == "torch":
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _RoPEFunction.apply(q, k, cos, sin, unsqueeze_dim)
    if inplace and q.stride(-1) == 1 and k.stride(-1) == 1:
        q_out, k_out = q, k
    else:
        q_out, k_out = _new_like(q), _new_like(k)
    _launch(q, q_out, cos, sin, unsqueeze_dim, backward=False)
    _launch(k, k_out, cos, sin, unsqueeze_dim, backward=False)
    return q_out, k_out
