"""Per-layer metrics besides CKA: weight change, pooled cosine, matrix entropy, effective rank,
gradient norms.

The metrics follow the source paper's analysis (Zhao et al., "A Layer-wise Analysis of Supervised
Fine-Tuning", arXiv 2604.11838): information-theoretic (matrix entropy), geometric (cosine, CKA,
effective rank) and optimization (gradient norm, weight change) views of each decoder layer.
Streaming accumulators (``update`` per batch, ``compute`` at the end) keep memory flat in the
number of tokens. All reductions run in float64; the per-prompt Gram matrices and their
eigenvalues in float32 (see :func:`prompt_spectra`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from fastmid.errors import FastmidError
from fastmid.labels import IGNORE_INDEX
from fastmid.models.families import decoder_layers, family_of, layer_index_of, module_kind
from fastmid.models.loss import causal_lm_loss_sum


class MetricsError(FastmidError, ValueError):
    """Models or inputs a metric cannot compare (architecture mismatch, bad shapes, no data)."""


# ---- weight change ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightChange:
    """Relative Frobenius change of one decoder layer's weights, base -> tuned.

    For a group of parameters P (all of the layer, or one module kind),
    ``sqrt(sum_p ||W_t,p - W_b,p||_F^2) / sqrt(sum_p ||W_b,p||_F^2)`` (dimensionless): the paper's
    per-layer weight change ``||theta_T - theta_0||`` (Zhao et al. 2026, optimization metrics),
    made relative so layers of different size compare. NaN for a kind the layer lacks.

    Attributes:
        layer: decoder-layer index.
        total: over every parameter of the layer.
        attention: over the attention submodule (q/k/v/o projections, biases).
        mlp: over the MLP submodule.
        norm: over the layer's norm weights (input/post-attention norms, q/k norms).
    """

    layer: int
    total: float
    attention: float
    mlp: float
    norm: float


def weight_change(base: torch.nn.Module, tuned: torch.nn.Module) -> list[WeightChange]:
    """Per-layer relative weight change between two models of the same architecture.

    Args:
        base: the base ``*ForCausalLM`` model.
        tuned: the fine-tuned model (same ``model_type``, parameter names and shapes).

    Returns:
        One :class:`WeightChange` per decoder layer, in order.

    Raises:
        MetricsError: different ``model_type``, parameter names, or shapes (names the first
            differing parameter).
        UnsupportedModelError: a ``model_type`` outside the family table.
    """
    spec = family_of(base)
    if family_of(tuned).model_type != spec.model_type:
        raise MetricsError(
            f"weight change needs one architecture: base is {spec.model_type}, tuned is "
            f"{family_of(tuned).model_type}"
        )
    num_layers = len(decoder_layers(base))
    tuned_params = dict(tuned.named_parameters())
    kinds = ("total", "attention", "mlp", "norm")
    diff_sq = [dict.fromkeys(kinds, 0.0) for _ in range(num_layers)]
    base_sq = [dict.fromkeys(kinds, 0.0) for _ in range(num_layers)]
    seen = [dict.fromkeys(kinds, False) for _ in range(num_layers)]
    for name, wb in base.named_parameters():
        layer = layer_index_of(name, spec)
        if layer is None:
            continue
        wt = tuned_params.get(name)
        if wt is None:
            raise MetricsError(f"tuned model has no parameter '{name}': not the same architecture")
        if wt.shape != wb.shape:
            raise MetricsError(
                f"parameter '{name}' has shape {tuple(wt.shape)} in the tuned model and "
                f"{tuple(wb.shape)} in the base model"
            )
        b64 = wb.detach().to(torch.float64)
        d = float((wt.detach().to(device=wb.device, dtype=torch.float64) - b64).square().sum())
        n = float(b64.square().sum())
        kind = module_kind(name, spec)
        for k in ("total", kind):
            if k in diff_sq[layer]:
                diff_sq[layer][k] += d
                base_sq[layer][k] += n
                seen[layer][k] = True

    def ratio(i: int, k: str) -> float:
        if not seen[i][k] or base_sq[i][k] == 0.0:
            return math.nan
        return math.sqrt(diff_sq[i][k]) / math.sqrt(base_sq[i][k])

    return [
        WeightChange(i, ratio(i, "total"), ratio(i, "attention"), ratio(i, "mlp"), ratio(i, "norm"))
        for i in range(num_layers)
    ]


# ---- pooled cosine ----------------------------------------------------------------------------


def _masked_mean(h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask.to(device=h.device, dtype=torch.bool)
    count = m.sum(1).to(torch.float64)
    kept = torch.where(m[..., None], h, 0.0)  # not a product: 0 * NaN in padding is NaN
    pooled = kept.sum(1, dtype=torch.float64) / count.clamp_min(1.0)[:, None]
    return pooled, count > 0


class PooledCosine:
    """Mean over prompts of the cosine similarity of mean-pooled hidden states, base vs tuned.

    For prompt p with kept tokens T_p: ``u_p = mean_{t in T_p} h^base_t``,
    ``v_p = mean_{t in T_p} h^tuned_t``, ``cos_p = u_p . v_p / (||u_p|| ||v_p||)``; the result is
    ``mean_p cos_p`` (dimensionless, in [-1, 1]). Source: the paper's geometric metrics (cosine
    similarity of pooled states, Zhao et al. 2026).
    """

    def __init__(self) -> None:
        self._sum = 0.0
        self._count = 0

    def update(self, h_base: torch.Tensor, h_tuned: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a batch.

        Args:
            h_base: (batch, seq, d) hidden states of the base model.
            h_tuned: (batch, seq, d) hidden states of the tuned model on the same tokens.
            mask: (batch, seq) bool, True for kept tokens; prompts with none are skipped.

        Raises:
            MetricsError: shapes differ.
        """
        if h_base.shape != h_tuned.shape or h_base.shape[:2] != mask.shape:
            raise MetricsError(
                f"pooled cosine needs equal shapes: base {tuple(h_base.shape)}, tuned "
                f"{tuple(h_tuned.shape)}, mask {tuple(mask.shape)}"
            )
        u, valid = _masked_mean(h_base, mask)
        v, _ = _masked_mean(h_tuned, mask)
        cos = torch.nn.functional.cosine_similarity(u[valid], v[valid], dim=1, eps=1e-300)
        self._sum += float(cos.sum())
        self._count += int(valid.sum())

    def compute(self) -> float:
        """Mean cosine over prompts; NaN when no prompt had a kept token."""
        return self._sum / self._count if self._count else math.nan


# ---- matrix entropy and effective rank --------------------------------------------------------


ENTROPY_TOKENS = 128
"""Default tokens per prompt for matrix entropy and effective rank: the source paper truncates
sequences to 128 tokens (Zhao et al. 2026); it also bounds the per-token cost of the
eigenvalues, which grows with the square of the prompt length."""


def first_kept(mask: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """(batch, seq) bool: the first ``max_tokens`` True entries of each row of ``mask`` (all of
    them when ``max_tokens`` is None or 0)."""
    if not max_tokens:
        return mask.to(torch.bool)
    m = mask.to(torch.bool)
    return m & (m.to(torch.int64).cumsum(1) <= max_tokens)


def prompt_spectra(
    h: torch.Tensor,
    mask: torch.Tensor,
    max_tokens: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues of each prompt's token Gram matrix ``Z Z^T`` (Z = kept token rows).

    Masked rows are zeroed; a zero row adds only zero eigenvalues, so one batched
    ``eigvalsh`` serves prompts of different lengths. The smaller of ``Z Z^T`` (T x T) and
    ``Z^T Z`` (D x D) is decomposed (same non-zero spectrum).

    Args:
        h: (batch, seq, D) token representations.
        mask: (batch, seq) bool, True for kept tokens.
        max_tokens: keep only each prompt's first ``max_tokens`` kept tokens (None/0: all).
        dtype: dtype of the Gram matrix and the eigensolver. float32 (the default) is about 1.5x
            faster than float64 on CPU and matches the float32 activations' own precision: on
            SmolLM2 decoder outputs the normalized entropy moves by < 1e-6 and the effective rank
            by < 2e-5 relative; on a synthetic spectrum spanning 8 orders of magnitude (outlier
            channel plus attention sink) by < 1e-5 and < 1e-3 (tests/analysis/test_metrics.py).

    Returns:
        ``(eigenvalues, lengths)``: (batch, k) float64, clipped at 0, ``k <= min(seq, D)``, and
        (batch,) int64 numbers of kept tokens (after ``max_tokens``).
    """
    keep = first_kept(mask.to(h.device), max_tokens)
    if max_tokens and keep.shape[1] > 0:
        # Right padding puts every kept token of a truncated prompt before the last position any
        # prompt still uses, so the Gram matrices shrink to that many rows.
        used = int(torch.nonzero(keep.any(0)).max()) + 1 if bool(keep.any()) else 1
        h, keep = h[:, :used], keep[:, :used]
    # where, not a product: 0 * NaN in a padded position would still be NaN.
    z = torch.where(keep[..., None], h.to(dtype), 0.0)
    gram = z @ z.transpose(1, 2) if z.shape[1] <= z.shape[2] else z.transpose(1, 2) @ z
    eig = torch.linalg.eigvalsh(gram).to(torch.float64).clamp_min(0.0)
    return eig, keep.sum(1).to(torch.int64)


def matrix_entropy(eigenvalues: torch.Tensor, rank_bound: torch.Tensor) -> torch.Tensor:
    """Normalized matrix-based Rényi entropy of order 1 of a Gram matrix.

    ``p_k = lambda_k / sum_j lambda_j`` (eigenvalues of the trace-normalized Gram matrix),
    ``H = -sum_k p_k log p_k / log(rank_bound)``, in [0, 1]. Source: matrix-based entropy of
    Giraldo et al. (2014) as the "prompt entropy" of Skean et al., "Layer by Layer" (ICML 2025),
    used by Zhao et al. 2026 with ``rank_bound = min(T, D)``.

    Args:
        eigenvalues: (..., k) non-negative eigenvalues.
        rank_bound: (...) ``min(T, D)`` per matrix; entries < 2 give NaN (log 1 = 0).

    Returns:
        (...) float64 normalized entropies.
    """
    lam = eigenvalues.to(torch.float64)
    p = lam / lam.sum(-1, keepdim=True)
    h = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(-1)
    bound = rank_bound.to(torch.float64)
    return torch.where(bound >= 2, h / torch.log(bound.clamp_min(2.0)), torch.nan)


def effective_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """Effective rank of Roy & Vetterli, "The effective rank: a measure of effective
    dimensionality" (EUSIPCO 2007), eq. 3: ``exp(-sum_k p_k log p_k)``, ``p_k = s_k / sum_j s_j``.

    Args:
        singular_values: (..., k) non-negative singular values.

    Returns:
        (...) float64 effective ranks in [1, k] (NaN for an all-zero matrix).
    """
    s = singular_values.to(torch.float64)
    p = s / s.sum(-1, keepdim=True)
    h = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(-1)
    return torch.exp(h)


class SpectralMeans:
    """Means over prompts of normalized matrix entropy and effective rank of one layer's tokens.

    Per prompt with T kept tokens (at most ``max_tokens``, the first ones) and width D:
    eigenvalues ``lambda`` of ``Z Z^T``; entropy = :func:`matrix_entropy` with rank bound
    ``min(T, D)``; effective rank = :func:`effective_rank` of the singular values
    ``sqrt(lambda)``. Prompts with fewer than 2 kept tokens are skipped.

    Args:
        max_tokens: tokens per prompt (default :data:`ENTROPY_TOKENS` = 128, the paper's
            truncation); None or 0 uses every kept token.
        dtype: Gram/eigensolver dtype (:func:`prompt_spectra`); float32 by default.
    """

    def __init__(
        self, max_tokens: int | None = ENTROPY_TOKENS, dtype: torch.dtype = torch.float32
    ) -> None:
        self.max_tokens = max_tokens
        self.dtype = dtype
        self._entropy_sum = 0.0
        self._erank_sum = 0.0
        self._count = 0

    def update(self, h: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a batch: ``h`` (batch, seq, D) float, ``mask`` (batch, seq) bool."""
        eig, lengths = prompt_spectra(h, mask, self.max_tokens, self.dtype)
        bound = lengths.clamp(max=h.shape[-1])
        ok = (lengths >= 2) & (eig.sum(-1) > 0)
        if not bool(ok.any()):
            return
        ent = matrix_entropy(eig[ok], bound[ok])
        er = effective_rank(eig[ok].sqrt())
        self._entropy_sum += float(ent.sum())
        self._erank_sum += float(er.sum())
        self._count += int(ok.sum())

    def compute(self) -> tuple[float, float]:
        """``(mean normalized entropy, mean effective rank)``; NaNs when no prompt qualified."""
        if not self._count:
            return math.nan, math.nan
        return self._entropy_sum / self._count, self._erank_sum / self._count


# ---- gradient norms ---------------------------------------------------------------------------


def layer_grad_norms(
    model: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    on_batch: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Per-layer L2 norm of the gradient of the SFT loss at the model's current weights.

    The loss is the token mean over the whole data set (design.md section 4): the sum of
    next-token cross-entropies of all supervised tokens (``labels != -100``, shifted by one as in
    transformers) divided by their total count, so the result does not depend on batching. The
    norm of layer i is ``sqrt(sum_{p in layer i} ||dL/dp||_F^2)`` (the paper's per-layer gradient
    norm, Zhao et al. 2026, optimization metrics). Only decoder-layer parameters get gradients;
    ``requires_grad`` flags and ``.grad`` are restored afterwards.

    Args:
        model: a ``*ForCausalLM`` model.
        batches: dicts with ``input_ids``, ``attention_mask``, ``labels`` (batch, seq) int64.
        on_batch: called as ``on_batch(done, total)`` after each batch's backward pass.

    Returns:
        One float per decoder layer (units of loss per parameter unit).

    Raises:
        MetricsError: no supervised token in the data.
    """
    batches = list(batches)
    total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    if total == 0:
        raise MetricsError(
            "--grad-norms needs supervised tokens (labels != -100); the data has none"
        )
    layers = decoder_layers(model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for p in layers.parameters():
        p.requires_grad_(True)
    device = next(model.parameters()).device
    try:
        for done, batch in enumerate(_on_device(batches, device), 1):
            loss_sum, _ = causal_lm_loss_sum(
                model, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            (loss_sum / total).backward()
            if on_batch is not None:
                on_batch(done, len(batches))
        norms = []
        for layer in layers:
            sq = sum(
                float(p.grad.detach().to(torch.float64).square().sum())
                for p in layer.parameters()
                if p.grad is not None
            )
            norms.append(math.sqrt(sq))
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(flags[id(p)])
    return norms


def _on_device(
    batches: Iterable[dict[str, torch.Tensor]], device: torch.device
) -> Iterable[dict[str, torch.Tensor]]:
    for b in batches:
        yield {k: v.to(device) for k, v in b.items()}
