"""Fused ``lm_head`` projection + cross-entropy that never holds the full (tokens x vocab) logits.

For each chunk of ``C`` tokens: ``logits = hidden_states[chunk] @ weight.T`` (C x V, float32), then
one Triton program per row computes, in float32 with an online log-sum-exp (Milakov & Gimelshein
2018, "Online normalizer calculation for softmax", alg. 3):

* optional softcap (Gemma 2): ``z = softcap * tanh(logits / softcap)``; vocabulary lanes past
  ``V`` in the last block are set to ``-inf`` after the softcap (a softcapped ``-inf`` would be
  ``-softcap``, not ``-inf``);
* ``loss_row = logsumexp(z) - z[label]`` (0 for ``label == ignore_index``);
* when a gradient is needed, it overwrites the chunk's logits in place with
  ``d loss_row / d logits = (softmax(z) - onehot(label)) * (1 - (z / softcap)**2)`` (the last
  factor only with softcap; all zeros for ignored rows).

The chunk's gradient is then folded at once into ``d hidden_states[chunk] = dlogits @ weight`` and,
only if ``weight`` requires grad, ``d weight += dlogits.T @ hidden_states[chunk]`` (float32
buffer). Backward just scales these by the incoming gradient of ``loss_sum``. Peak extra memory is
one C x V float32 chunk (plus a weight-dtype copy of it) and the (N, H) input gradient, against
several N x V tensors for the eager path.

Returns the token sum of the loss and the number of supervised tokens, so the training loop can
normalize over a whole accumulation window exactly (sum / count, not a mean of means).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._dispatch import Backend, resolve_backend
from ._launch import num_warps_for, rows_per_program
from ._triton import cdiv, jit, next_power_of_2, tl

_VOCAB_BLOCK = 4096


@jit
def _softcap(x, softcap):
    # tanh(t) = 2 * sigmoid(2t) - 1: Triton's interpreter has no tanh, and this form saturates
    # cleanly to +-1 for large |t|.
    return softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)


@jit
def _cross_entropy_rows_kernel(
    LOGITS,
    stride_l,
    LABELS,
    LOSS,
    n_rows,
    n_vocab,
    ignore_index,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    base = LOGITS + rows[:, None] * stride_l
    labels = tl.load(LABELS + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    supervised = row_mask & (labels != ignore_index)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    d = tl.zeros((BLOCK_R,), tl.float32)
    for start in range(0, n_vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = supervised[:, None] & (cols < n_vocab)[None, :]
        z = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = _softcap(z, softcap)
        # Lanes past the vocabulary (and ignored rows) are -inf *after* the softcap.
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # Rows with no finite lane yet keep m = -inf; use 0 there to avoid (-inf) - (-inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new
    lse = tl.where(supervised, m + tl.log(tl.where(supervised, d, 1.0)), 0.0)
    z_label = tl.load(
        base + tl.where(supervised, labels, 0)[:, None], mask=supervised[:, None], other=0.0
    )
    z_label = tl.sum(z_label.to(tl.float32), axis=1)
    if HAS_SOFTCAP:
        z_label = _softcap(z_label, softcap)
    tl.store(LOSS + rows, tl.where(supervised, lse - z_label, 0.0), mask=row_mask)
    if COMPUTE_GRAD:
        for start in range(0, n_vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = row_mask[:, None] & (cols < n_vocab)[None, :]
            z = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = _softcap(z, softcap)
            g = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
            if HAS_SOFTCAP:
                t = z / softcap
                g = g * (1.0 - t * t)
            # Ignored rows get an all-zero gradient.
            g = tl.where(supervised[:, None], g, 0.0)
            tl.store(base + cols[None, :], g, mask=mask)


@functools.cache
def _mm_out_dtype_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs for this device and input dtype."""
    try:
        a = torch.zeros(2, 2, dtype=dtype, device=device_type)
        torch.mm(a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def _logits_fp32(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``h @ weight.T`` as float32; low-precision inputs get a float32 GEMM output where possible."""
    if h.dtype == torch.float32:
        return h @ weight.T
    if _mm_out_dtype_supported(h.device.type, h.dtype):
        return torch.mm(h, weight.T, out_dtype=torch.float32)
    return (h @ weight.T).float()


def default_chunk_size(n_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's logits are about as large as ``hidden_states``.

    ``next_power_of_2(ceil(N / ceil(V / H)))`` (the rule Liger-Kernel uses): 16384 tokens of an
    8B Llama (H=4096, V=128256) give 512-token chunks (a 256 MiB float32 logits chunk).
    """
    ratio = cdiv(vocab_size, max(hidden_size, 1))
    return next_power_of_2(max(1, cdiv(max(n_tokens, 1), ratio)))


def _chunked_forward(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    chunk_size: int,
    need_dh: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss sum (fp32 scalar), d loss_sum / d h (N, H) or None, d loss_sum / d weight or None."""
    n_tokens = h.shape[0]
    n_vocab = weight.shape[0]
    compute_grad = need_dh or need_dw
    loss_rows = torch.empty(n_tokens, dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_dh else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_dw else None
    block = min(_VOCAB_BLOCK, next_power_of_2(n_vocab))
    block_r = rows_per_program(block, h, min(chunk_size, n_tokens))
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        h_chunk = h[start:end]
        logits = _logits_fp32(h_chunk, weight)
        _cross_entropy_rows_kernel[(cdiv(end - start, block_r),)](
            logits,
            logits.stride(0),
            labels[start:end],
            loss_rows[start:end],
            end - start,
            n_vocab,
            ignore_index,
            float(softcap) if softcap is not None else 1.0,
            HAS_SOFTCAP=softcap is not None,
            COMPUTE_GRAD=compute_grad,
            BLOCK_R=block_r,
            BLOCK=block,
            num_warps=num_warps_for(block_r * block),
        )
        if not compute_grad:
            continue
        if grad_h is not None:
            torch.mm(logits.to(weight.dtype), weight, out=grad_h[start:end])
        if grad_w is not None:
            # float32 GEMM into the float32 buffer: exact accumulation across chunks.
            grad_w.addmm_(logits.T, h_chunk.float())
    return loss_rows.sum(), grad_h, grad_w


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index, softcap, chunk_size):  # type: ignore[override]
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss_sum, grad_h, grad_w = _chunked_forward(
            h, weight, labels, ignore_index, softcap, chunk_size, need_dh, need_dw
        )
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        dh = dw = None
        if grad_h is not None:
            dh = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            dw = (grad_w * grad_loss).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None


def _check(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated (N, H) hidden states and (N,) labels (leading dimensions flattened)."""
    if weight.dim() != 2:
        raise ValueError(f"linear_cross_entropy: weight must be (V, H), got {tuple(weight.shape)}")
    if hidden_states.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden_states (..., {hidden_states.shape[-1]}) does not match "
            f"weight (V, H) = {tuple(weight.shape)}"
        )
    if hidden_states.shape[:-1] != labels.shape:
        raise ValueError(
            f"linear_cross_entropy: labels {tuple(labels.shape)} must match the leading "
            f"dimensions of hidden_states {tuple(hidden_states.shape)} (shift them first)"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: labels must be int64/int32, got {labels.dtype}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be > 0 or None, got {softcap}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    h2 = hidden_states.reshape(-1, hidden_states.shape[-1])
    y = labels.reshape(-1)
    bad = (y != ignore_index) & ((y < 0) | (y >= weight.shape[0]))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"linear_cross_entropy: label {int(y[first])} at flat position {first} is outside "
            f"[0, {weight.shape[0]}) and is not ignore_index={ignore_index}; check the tokenizer "
            f"vocabulary against the model's lm_head"
        )
    return h2, y


def linear_cross_entropy_reference(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference of :func:`linear_cross_entropy`: full (N, V) logits in float32.

    Same arguments and returns (``chunk_size`` is accepted and ignored). Computes in float32, or
    float64 when ``hidden_states`` is float64 (the tests' ground truth).
    """
    h2, y = _check(hidden_states, weight, labels, ignore_index, softcap, chunk_size)
    compute = torch.promote_types(h2.dtype, torch.float32)
    logits = h2.to(compute) @ weight.to(compute).T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss_sum = F.cross_entropy(logits, y.long(), ignore_index=ignore_index, reduction="sum")
    return loss_sum, (y != ignore_index).sum()


def linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_size: int | None = None,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies of ``softcap(hidden_states @ weight.T)`` against ``labels``.

    Args:
        hidden_states: (N, H) (or (..., H)) final-norm outputs already shifted so that row ``i``
            predicts ``labels[i]``; float32/bf16/fp16.
        weight: (V, H) the ``lm_head`` weight (no bias). When it does not require grad (the
            Mid-Block default, also for tied embeddings) no weight gradient is computed at all.
        labels: (N,) (or the leading shape of ``hidden_states``) int64/int32 token ids; positions
            equal to ``ignore_index`` count neither in the loss nor in the count.
        ignore_index: label value to skip (transformers' -100).
        softcap: Gemma 2 final-logit softcap (``config.final_logit_softcapping``), or None.
        chunk_size: tokens per chunk; None picks :func:`default_chunk_size`.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (torch = full-logits reference).

    Returns:
        ``(loss_sum, n_supervised)``: float32 scalar sum of token losses in nats (differentiable;
        0 with zero gradients when no token is supervised) and int64 scalar count of supervised
        tokens.

    Raises:
        ValueError: mismatched shapes, non-integer labels, a label outside ``[0, V)`` that is not
            ``ignore_index`` (names its position), ``softcap <= 0`` or ``chunk_size < 1``.
        KernelBackendError: ``backend="triton"`` cannot run here.
    """
    h2, y = _check(hidden_states, weight, labels, ignore_index, softcap, chunk_size)
    if resolve_backend(backend, h2, weight, y) == "torch":
        return linear_cross_entropy_reference(
            hidden_states, weight, labels, ignore_index, softcap, chunk_size
        )
    n_supervised = (y != ignore_index).sum()
    h2 = h2 if h2.stride(-1) == 1 else h2.contiguous()
    weight_c = weight if weight.is_contiguous() else weight.contiguous()
    y = y.contiguous()
    chunk = chunk_size or default_chunk_size(h2.shape[0], h2.shape[1], weight.shape[0])
    if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad):
        loss_sum = _LinearCrossEntropyFunction.apply(
            h2, weight_c, y, int(ignore_index), softcap, int(chunk)
        )
    else:
        loss_sum, _, _ = _chunked_forward(
            h2, weight_c, y, int(ignore_index), softcap, int(chunk), False, False
        )
    return loss_sum, n_supervised
