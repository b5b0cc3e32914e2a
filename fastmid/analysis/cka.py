"""Streaming linear CKA between two models' layer outputs over the same tokens.

Linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019,
eq. 2-4) compares X (n, d1) and Y (n, d2) through their linear kernels ``K = X X^T``,
``L = Y Y^T``:

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).

Biased: ``HSIC_b(K, L) = tr(K H L H) / (n - 1)^2`` with ``H = I - 11^T / n``; in feature space
(Kornblith et al. eq. 4) ``CKA_b = ||X_c^T Y_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` with
column-centred ``X_c``, ``Y_c``. With ``d >> n`` it drifts towards 1 even for unrelated X and Y.

Debiased: the unbiased HSIC of Song et al., "Feature Selection via Dependence Maximization"
(JMLR 2012), eq. 5, with ``K~``, ``L~`` the kernels with zeroed diagonals:

    HSIC_u = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3)).

For linear kernels every term is a function of running sums over tokens (``a_i = ||x_i||^2``,
``b_i = ||y_i||^2``, ``S_x = X^T 1``, ``S_y = Y^T 1``, ``M = X^T Y``):

    tr(K~ L~)    = ||M||_F^2 - sum_i a_i b_i
    1^T K~ 1     = ||S_x||^2 - sum_i a_i
    1^T K~ L~ 1  = S_x^T M S_y - S_y^T (Y^T a) - S_x^T (X^T b) + sum_i a_i b_i

so the streamed result is the one-shot value on all tokens, not an average of minibatch estimates.
Both estimators are unchanged by a constant shift of X or Y (Song et al. Theorem 2; Kornblith et
al. centre explicitly), which is why subtracting a per-layer reference mean before accumulating is
exact; it is done because LLM activations have outlier channels ~1e4x the typical size whose raw
sums cancel catastrophically.

Precision (design.md section 6): products in float64 on CPU (BLAS ``dsyrk`` adding into the
running sums in place); in fp32 with IEEE dot products on CUDA (Triton, never TF32); the running
sums are float64 on the input's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastmid.errors import FastmidError
from fastmid.kernels import (
    Backend,
    CKABlock,
    CKABlockStats,
    accumulate_cka_block,
    augmented_width,
    gram_to_stats,
    new_running_gram,
    prepare_cka_block,
)


class CKAError(FastmidError, ValueError):
    """Invalid CKA input or state; the message names the layer (the accumulator's ``name``)."""


@dataclass(frozen=True)
class CKAResult:
    """Linear CKA of one layer pair over all tokens seen.

    Attributes:
        debiased: CKA from the unbiased HSIC (Song et al. 2012, eq. 5); in about [-1, 1], near 0
            for independent representations. NaN when one side is constant.
        biased: CKA from the biased HSIC (Kornblith et al. 2019); in [0, 1].
        n_tokens: number of tokens accumulated.
    """

    debiased: float
    biased: float
    n_tokens: int


def _hsic_biased(m: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, n: float) -> float:
    # ||X_c^T Y_c||_F^2 with X_c^T Y_c = M - S_x S_y^T / n; the 1/(n-1)^2 cancels in CKA.
    return float((m - torch.outer(sx, sy) / n).square().sum())


def _hsic_unbiased(
    m: torch.Tensor,
    sx: torch.Tensor,
    sy: torch.Tensor,
    sum_a: torch.Tensor,
    sum_b: torch.Tensor,
    sum_ab: torch.Tensor,
    ya: torch.Tensor,
    xb: torch.Tensor,
    n: float,
) -> float:
    # Song et al. 2012 eq. 5 in feature space (see the module docstring for each term).
    tr_kl = m.square().sum() - sum_ab
    k1 = sx @ sx - sum_a
    l1 = sy @ sy - sum_b
    kl1 = sx @ (m @ sy) - sy @ ya - sx @ xb + sum_ab
    value = (tr_kl + k1 * l1 / ((n - 1) * (n - 2)) - 2.0 * kl1 / (n - 2)) / (n * (n - 3))
    return float(value)


def cka_from_stats(stats: CKABlockStats, name: str = "CKA") -> CKAResult:
    """Biased and debiased linear CKA from accumulated statistics.

    Args:
        stats: running sums of :mod:`fastmid.kernels.cka_stats` (any float dtype; cast to
            float64 here).
        name: used in error messages (e.g. ``"layer 7"``).

    Returns:
        :class:`CKAResult`.

    Raises:
        CKAError: fewer than 4 tokens (the unbiased HSIC divides by ``n (n - 3)``).
    """
    s = stats.to(torch.float64)
    n = float(s.n)
    if n < 4:
        raise CKAError(
            f"{name}: CKA needs at least 4 tokens, got {int(n)}; raise --max-tokens or check "
            "that the mask keeps tokens"
        )
    hb_xy = _hsic_biased(s.xty, s.sum_x, s.sum_y, n)
    hb_xx = _hsic_biased(s.xtx, s.sum_x, s.sum_x, n)
    hb_yy = _hsic_biased(s.yty, s.sum_y, s.sum_y, n)
    hu_xy = _hsic_unbiased(s.xty, s.sum_x, s.sum_y, s.sum_a, s.sum_b, s.sum_ab, s.ya, s.xb, n)
    hu_xx = _hsic_unbiased(s.xtx, s.sum_x, s.sum_x, s.sum_a, s.sum_a, s.sum_aa, s.xa, s.xa, n)
    hu_yy = _hsic_unbiased(s.yty, s.sum_y, s.sum_y, s.sum_b, s.sum_b, s.sum_bb, s.yb, s.yb, n)
    denom_b = math.sqrt(hb_xx * hb_yy)
    biased = hb_xy / denom_b if denom_b > 0 else math.nan
    # The unbiased self-HSIC is an estimate of ||Cov||_F^2 and may dip below 0 for tiny n.
    denom_u = math.sqrt(hu_xx * hu_yy) if hu_xx > 0 and hu_yy > 0 else 0.0
    debiased = hu_xy / denom_u if denom_u > 0 else math.nan
    return CKAResult(debiased=debiased, biased=biased, n_tokens=int(n))


@dataclass
class PreparedBlock:
    """One token block made ready for :meth:`StreamingCKA.accumulate` (masked, checked).

    Attributes:
        n: tokens in the block.
        rows: the kernel op's prepared block (:func:`fastmid.kernels.prepare_cka_block`: float64
            augmented rows, or the kept rows for the Triton path), or None when ``n == 0``.
        owner: ``id`` of the :class:`StreamingCKA` that prepared it (its reference mean is baked
            into ``rows``); another accumulator refuses it.
        used: set once accumulated; a second accumulate is refused.
    """

    n: int
    rows: CKABlock | None = None
    owner: int = 0
    used: bool = False


class StreamingCKA:
    """Running sums for linear CKA of one layer pair, fed one token block at a time.

    ``update`` may be called with blocks of any (unequal) sizes; ``compute`` gives exactly the
    CKA of all tokens seen, as if computed in one shot.

    The state is the running augmented Gram ``G = sum over blocks of W^T W`` with
    ``W = [X | Y | 1 | a | b]`` (:mod:`fastmid.kernels.cka_stats`), float64 on the input's
    device. The kernel op chooses the path per block (:func:`fastmid.kernels.prepare_cka_block`,
    :func:`fastmid.kernels.accumulate_cka_block`): on CPU, float64 ``W`` and BLAS ``dsyrk`` adding
    its upper triangle into ``G`` in place; on CUDA, the Triton kernel (fp32, IEEE dot products)
    and a float64 add; ``backend="torch"`` on CUDA, float64 ``W^T W`` in torch.

    ``update`` is :meth:`prepare` (masking, checks, building ``W``: per-token work) followed by
    :meth:`accumulate` (the (D, D) product). ``fastmid analyze`` runs ``prepare`` for many layers
    on parallel threads and then ``accumulate`` one layer at a time, so BLAS gets every core.

    Args:
        name: label used in error messages, e.g. ``"layer 7"``.
        backend: ``auto`` = Triton on CUDA, float64 torch/BLAS elsewhere; ``torch`` never uses
            Triton; ``triton`` forces it (CPU tensors need ``TRITON_INTERPRET=1``).

    Memory: ``8 (d1 + d2 + 3)^2`` bytes of running sums on the input's device, plus a prepared
    block's float64 ``W`` (``8 n (d1 + d2 + 3)`` bytes) until it is accumulated.
    """

    def __init__(self, name: str = "CKA", backend: Backend = "auto") -> None:
        self.name = name
        self.backend: Backend = backend
        self._gram: torch.Tensor | None = None
        self._widths: tuple[int, int] | None = None
        self._n = 0
        self._ref_x: torch.Tensor | None = None
        self._ref_y: torch.Tensor | None = None

    @staticmethod
    def state_bytes(d1: int, d2: int) -> int:
        """Bytes of float64 running sums for widths ``d1`` and ``d2``."""
        return 8 * augmented_width(d1, d2) ** 2

    @staticmethod
    def block_bytes(n: int, d1: int, d2: int) -> int:
        """Bytes of one prepared block of ``n`` tokens (its float64 ``W``)."""
        return 8 * n * augmented_width(d1, d2)

    @property
    def n_tokens(self) -> int:
        """Tokens accumulated so far."""
        return self._n

    def _non_finite(self, side: str) -> CKAError:
        return CKAError(
            f"{self.name}: {side} holds NaN or inf values; the model's activations "
            "overflowed (try float32 instead of float16) or its weights are broken"
        )

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
    ) -> PreparedBlock:
        """Mask and check a block and build what :meth:`accumulate` needs; sums stay as they are.

        Args:
            x: (n, d1) outputs of model A (any float dtype); leading dims beyond one are
                flattened, so (batch, seq, d1) works too.
            y: (n, d2) outputs of model B on the same tokens (same leading shape as ``x``).
            mask: optional bool (n,) (or the leading shape); True keeps a token. Padding and,
                optionally, the first position are masked by the caller this way.

        Returns:
            :class:`PreparedBlock` (``n == 0`` when the mask keeps nothing).

        Raises:
            CKAError: ``x``/``y`` leading shapes differ, a width differs from earlier updates, a
                mask of the wrong shape, or NaN/inf in a kept token (names the layer and side).
        """
        if x.shape[:-1] != y.shape[:-1]:
            raise CKAError(
                f"{self.name}: x and y must cover the same tokens; leading shapes "
                f"{tuple(x.shape[:-1])} and {tuple(y.shape[:-1])} differ"
            )
        if x.dim() < 2:
            raise CKAError(f"{self.name}: x must be (tokens, features), got {tuple(x.shape)}")
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.reshape(-1, y.shape[-1])
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise CKAError(
                    f"{self.name}: mask shape {tuple(mask.shape)} does not match the token shape "
                    f"{tuple(x.shape[:-1])}"
                )
            keep = mask.reshape(-1).to(device=x2.device, dtype=torch.bool)
            x2, y2 = x2[keep], y2[keep]
        d1, d2 = x2.shape[1], y2.shape[1]
        if self._widths is not None and (d1, d2) != self._widths:
            raise CKAError(
                f"{self.name}: feature widths changed between updates: got ({d1}, {d2}), "
                f"earlier {self._widths}"
            )
        n = x2.shape[0]
        if n == 0:
            return PreparedBlock(0, owner=id(self))
        # The first block's mean is the fixed reference: close to the true mean, so later sums
        # stay small and do not cancel. It is kept only once the block has passed the checks.
        ref_x = self._ref_x if self._ref_x is not None else x2.to(torch.float64).mean(0)
        ref_y = self._ref_y if self._ref_y is not None else y2.to(torch.float64).mean(0)
        rows = prepare_cka_block(x2, y2, ref_x, ref_y, self.backend)
        x_finite, y_finite = rows.finite()
        if not x_finite:
            raise self._non_finite("x (base)")
        if not y_finite:
            raise self._non_finite("y (tuned)")
        self._ref_x, self._ref_y, self._widths = ref_x, ref_y, (d1, d2)
        return PreparedBlock(n, rows, owner=id(self))

    def accumulate(self, block: PreparedBlock) -> None:
        """Add a block from :meth:`prepare` (of this accumulator) into the running sums.

        Raises:
            CKAError: the block came from another accumulator or was already accumulated.
        """
        if block.owner != id(self):
            raise CKAError(f"{self.name}: this block was prepared by another StreamingCKA")
        if block.used:
            raise CKAError(f"{self.name}: this block was already accumulated")
        block.used = True
        if block.rows is None:
            return
        assert self._widths is not None
        if self._gram is None:
            self._gram = new_running_gram(*self._widths, device=block.rows.device)
        accumulate_cka_block(block.rows, self._gram)
        self._n += block.n

    def update(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a block of tokens: :meth:`prepare` then :meth:`accumulate` (same arguments and
        errors as :meth:`prepare`)."""
        self.accumulate(self.prepare(x, y, mask))

    def stats(self) -> CKABlockStats:
        """The accumulated statistics (float64), unpacked from the running Gram.

        Raises:
            CKAError: nothing accumulated yet.
        """
        if self._gram is None or self._widths is None:
            raise CKAError(f"{self.name}: CKA needs at least 4 tokens, got 0")
        return gram_to_stats(self._gram, *self._widths)

    def compute(self) -> CKAResult:
        """Biased and debiased CKA over all tokens seen.

        Raises:
            CKAError: fewer than 4 tokens.
        """
        return cka_from_stats(self.stats(), self.name)
