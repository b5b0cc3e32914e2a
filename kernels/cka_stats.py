"""Sufficient statistics of one token block for streaming linear CKA (biased and debiased).

For a block of ``n`` tokens with layer outputs ``x`` (n, d1) of one model and ``y`` (n, d2) of
another, and per-layer reference means ``ref_x`` (d1,), ``ref_y`` (d2,), let ``X = x - ref_x``,
``Y = y - ref_y``, ``a_i = ||X_i||^2`` and ``b_i = ||Y_i||^2``. Every statistic that linear CKA
needs (design.md section 6) is an entry of the Gram matrix of the augmented block

    W = [X | Y | 1 | a | b]        (n, d1 + d2 + 3),        G = W^T W,

namely ``X^T X``, ``X^T Y``, ``Y^T Y``, the column sums ``X^T 1`` and ``Y^T 1``, the row-norm
weighted sums ``X^T a``, ``X^T b``, ``Y^T a``, ``Y^T b``, and the scalars ``n``, ``sum a``,
``sum b``, ``sum a^2``, ``sum a b``, ``sum b^2``. Adding the statistics of consecutive blocks gives
the statistics of all tokens, so CKA computed from the sums is the one-shot value.

Subtracting the reference mean first matters: activations of LLMs have outlier channels about 1e4
times the typical size, and the raw ``X^T Y - n mu_x mu_y^T`` loses every digit to cancellation in
fp32. The reference mean is any fixed per-layer vector close to the true mean (the streaming
accumulator uses the first block's mean).

Paths (same signature, same result structure):

* :func:`cka_block_stats_reference`: torch, float64 by default (the CPU path and the test oracle).
* :func:`cka_block_stats_triton`: two Triton kernels. ``_row_sq_norms`` reads ``x`` and ``y``
  once to form ``a`` and ``b``; ``_augmented_gram`` computes the upper tiles of ``G`` with fp32
  accumulation and IEEE-precision ``tl.dot`` (never TF32), loading each tile straight from ``x``
  and ``y`` with the reference mean subtracted on the fly, so the augmented ``W`` is never built
  in memory. Offsets are int64; any ``n``, ``d1``, ``d2`` (not only powers of two) and any
  strides are accepted.
* :func:`syrk_accumulate`: the production CPU path of the streaming accumulator. The float64
  ``W`` of a block (:func:`augmented_rows`) goes through BLAS ``dsyrk`` (scipy), which forms only
  the upper triangle of ``W^T W`` and adds it into the running Gram in place: ``n D^2 / 2``
  multiply-adds, 2/3 of the ``(d1^2 + d1 d2 + d2^2) n`` of three separate products, and no
  temporary (D, D) block.
* :func:`cka_block_stats`: the dispatcher for one block's statistics, with the package-wide rules
  of :func:`fastmid.kernels.resolve_backend`: Triton on CUDA tensors when Triton imports, the
  reference elsewhere; ``FASTMID_KERNELS=off`` forces the reference; ``backend="triton"`` forces
  Triton (on CPU tensors this needs ``TRITON_INTERPRET=1``, which is how the tests run it).

Streaming accumulation (what ``fastmid.analysis.cka.StreamingCKA`` calls): :func:`prepare_cka_block`
chooses the path for a block (:func:`cka_accumulation_path`: Triton where the rules above pick
it, else BLAS ``dsyrk`` on CPU and a float64 torch product on CUDA) and does the per-token work;
:func:`accumulate_cka_block` adds the block into a running Gram (:func:`new_running_gram`) on that
path. The two halves are separate so that callers can prepare many blocks on parallel threads and
then accumulate one at a time, leaving every core to BLAS.

The Triton kernels follow the package convention (:mod:`fastmid.kernels._triton`): compiled at
the first launch, so this module imports where Triton is absent.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

from fastmid.errors import FastmidError

from ._dispatch import Backend, resolve_backend
from ._triton import HAS_TRITON, cdiv, interpreter_enabled, jit, tl


class CKAStatsError(FastmidError, ValueError):
    """Bad input to the CKA statistics op: wrong rank, mismatched token counts or widths."""


@dataclass
class CKABlockStats:
    """Sufficient statistics of linear CKA for a set of tokens (one block, or a running sum).

    With ``X = x - ref_x`` (n, d1), ``Y = y - ref_y`` (n, d2), ``a_i = ||X_i||^2``,
    ``b_i = ||Y_i||^2``. All fields share one dtype (float64 from the reference path, float32
    from the Triton path) and one device.

    Attributes:
        n: () token count.
        sum_x: (d1,) ``X^T 1``.
        sum_y: (d2,) ``Y^T 1``.
        xtx: (d1, d1) ``X^T X``.
        xty: (d1, d2) ``X^T Y``.
        yty: (d2, d2) ``Y^T Y``.
        sum_a: () ``sum_i a_i``.
        sum_b: () ``sum_i b_i``.
        sum_aa: () ``sum_i a_i^2``.
        sum_ab: () ``sum_i a_i b_i``.
        sum_bb: () ``sum_i b_i^2``.
        xa: (d1,) ``X^T a``.
        xb: (d1,) ``X^T b``.
        ya: (d2,) ``Y^T a``.
        yb: (d2,) ``Y^T b``.
    """

    n: torch.Tensor
    sum_x: torch.Tensor
    sum_y: torch.Tensor
    xtx: torch.Tensor
    xty: torch.Tensor
    yty: torch.Tensor
    sum_a: torch.Tensor
    sum_b: torch.Tensor
    sum_aa: torch.Tensor
    sum_ab: torch.Tensor
    sum_bb: torch.Tensor
    xa: torch.Tensor
    xb: torch.Tensor
    ya: torch.Tensor
    yb: torch.Tensor

    def to(self, dtype: torch.dtype) -> CKABlockStats:
        """A copy with every field cast to ``dtype``."""
        return CKABlockStats(**{f.name: getattr(self, f.name).to(dtype) for f in fields(self)})


def _check_inputs(
    x: torch.Tensor, y: torch.Tensor, ref_x: torch.Tensor, ref_y: torch.Tensor
) -> tuple[int, int, int]:
    if x.dim() != 2 or y.dim() != 2:
        raise CKAStatsError(
            f"x and y must be 2-D (tokens, features); got shapes {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0]:
        raise CKAStatsError(
            f"x and y must hold the same tokens: x has {x.shape[0]} rows, y has {y.shape[0]}"
        )
    if ref_x.shape != (x.shape[1],) or ref_y.shape != (y.shape[1],):
        raise CKAStatsError(
            f"reference means must have shapes ({x.shape[1]},) and ({y.shape[1]},); got "
            f"{tuple(ref_x.shape)} and {tuple(ref_y.shape)}"
        )
    return x.shape[0], x.shape[1], y.shape[1]


def cka_block_stats_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    ref_x: torch.Tensor,
    ref_y: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> CKABlockStats:
    """Statistics of one token block in torch (the reference path).

    Args:
        x: (n, d1) layer output of model A, any float dtype, any device.
        y: (n, d2) layer output of model B on the same tokens.
        ref_x: (d1,) reference mean subtracted from ``x`` before any product.
        ref_y: (d2,) reference mean subtracted from ``y``.
        dtype: accumulation dtype; float64 (the default) is the oracle precision.

    Returns:
        :class:`CKABlockStats` in ``dtype`` on ``x.device``.

    Raises:
        CKAStatsError: wrong ranks, different token counts, reference means of the wrong width.
    """
    n, _, _ = _check_inputs(x, y, ref_x, ref_y)
    X = x.to(dtype) - ref_x.to(device=x.device, dtype=dtype)
    Y = y.to(dtype) - ref_y.to(device=x.device, dtype=dtype)
    a = X.square().sum(1)
    b = Y.square().sum(1)
    return CKABlockStats(
        n=torch.tensor(float(n), dtype=dtype, device=x.device),
        sum_x=X.sum(0),
        sum_y=Y.sum(0),
        xtx=X.T @ X,
        xty=X.T @ Y,
        yty=Y.T @ Y,
        sum_a=a.sum(),
        sum_b=b.sum(),
        sum_aa=a @ a,
        sum_ab=a @ b,
        sum_bb=b @ b,
        xa=X.T @ a,
        xb=X.T @ b,
        ya=Y.T @ a,
        yb=Y.T @ b,
    )


def augmented_width(d1: int, d2: int) -> int:
    """Width ``D = d1 + d2 + 3`` of the augmented block ``W = [X | Y | 1 | a | b]``."""
    return d1 + d2 + 3


def augmented_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    ref_x: torch.Tensor,
    ref_y: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The augmented block ``W = [x - ref_x | y - ref_y | 1 | a | b]`` of one token block.

    Args:
        x: (n, d1) layer output of model A, any float dtype.
        y: (n, d2) layer output of model B on the same tokens.
        ref_x: (d1,) reference mean subtracted from ``x``.
        ref_y: (d2,) reference mean subtracted from ``y``.
        dtype: dtype of ``W`` (float64 for the CPU path).

    Returns:
        (n, d1 + d2 + 3) C-contiguous ``W`` on ``x.device``: column ``d1 + d2`` is all ones,
        ``d1 + d2 + 1`` holds ``a_i = ||X_i||^2`` and ``d1 + d2 + 2`` holds ``b_i = ||Y_i||^2``.
        A NaN/inf anywhere in row i of ``x`` (``y``) makes ``a_i`` (``b_i``) non-finite, so one
        sum over a column checks a whole side.

    Raises:
        CKAStatsError: wrong ranks, different token counts, reference means of the wrong width.
    """
    n, d1, d2 = _check_inputs(x, y, ref_x, ref_y)
    o = d1 + d2
    W = torch.empty(n, augmented_width(d1, d2), dtype=dtype, device=x.device)
    # A widening copy, then an in-place subtraction: measured faster than one promoting
    # torch.sub(..., out=) into the strided slice.
    W[:, :d1].copy_(x).sub_(ref_x.to(device=x.device, dtype=dtype))
    W[:, d1:o].copy_(y).sub_(ref_y.to(device=x.device, dtype=dtype))
    W[:, o] = 1.0
    W[:, o + 1] = torch.linalg.vector_norm(W[:, :d1], dim=1).square_()
    W[:, o + 2] = torch.linalg.vector_norm(W[:, d1:o], dim=1).square_()
    return W


def new_running_gram(d1: int, d2: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A zero float64 (D, D) running Gram, ``D = d1 + d2 + 3``, stored column-major.

    Column-major (the transpose of a contiguous tensor) is Fortran order, so
    :func:`syrk_accumulate` adds into this memory in place. Any path may also ``add_`` a full
    block into it; readers use only the upper triangle (:func:`gram_to_stats`).
    """
    D = augmented_width(d1, d2)
    return torch.zeros(D, D, dtype=torch.float64, device=device).T


def syrk_accumulate(W: torch.Tensor, gram: torch.Tensor) -> None:
    """Add the upper triangle of ``W^T W`` into ``gram`` in place with BLAS ``dsyrk`` (scipy).

    ``dsyrk`` forms one triangle only: ``n D^2 / 2`` multiply-adds for ``n`` tokens, and no
    temporary (D, D) block. It runs on BLAS's own threads (all cores unless
    ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS`` say otherwise); call it from one thread at a
    time.

    Args:
        W: (n, D) float64 C-contiguous CPU tensor (:func:`augmented_rows`).
        gram: (D, D) float64 column-major CPU tensor (:func:`new_running_gram`); its upper
            triangle gains ``W^T W``, its strict lower triangle is left as it was.

    Raises:
        CKAStatsError: not float64 CPU tensors, shapes that do not match, or the wrong layouts.
    """
    import numpy as np
    from scipy.linalg.blas import dsyrk

    if W.dim() != 2 or gram.shape != (W.shape[1], W.shape[1]):
        raise CKAStatsError(
            f"syrk_accumulate needs W (n, D) and gram (D, D); got {tuple(W.shape)} and "
            f"{tuple(gram.shape)}"
        )
    if W.dtype != torch.float64 or gram.dtype != torch.float64 or W.is_cuda or gram.is_cuda:
        raise CKAStatsError("syrk_accumulate is the CPU path: W and gram must be float64 on CPU")
    if not W.is_contiguous() or not gram.T.is_contiguous():
        raise CKAStatsError(
            "syrk_accumulate needs a C-contiguous W (augmented_rows) and a column-major gram "
            "(new_running_gram)"
        )
    if W.shape[0] == 0:
        return
    c = gram.numpy()
    # Row-major W (n, D) is W^T (D, n) in Fortran order: dsyrk with trans=0 forms W^T W.
    out = dsyrk(1.0, W.numpy().T, beta=1.0, c=c, trans=0, lower=0, overwrite_c=1)
    if not np.shares_memory(out, c):  # scipy copied instead of writing in place
        c[...] = out


def gram_to_stats(gram: torch.Tensor, d1: int, d2: int) -> CKABlockStats:
    """The CKA statistics in the upper triangle of an augmented Gram ``G = W^T W``.

    Args:
        gram: (D, D), ``D = d1 + d2 + 3``; only entries on and above the diagonal are read.
        d1: width of ``x``.
        d2: width of ``y``.

    Returns:
        :class:`CKABlockStats` in ``gram``'s dtype, with the symmetric ``X^T X`` and ``Y^T Y``
        rebuilt from their upper triangles.
    """
    upper = torch.triu(gram)
    return _unpack_gram(upper + torch.triu(gram, 1).T, d1, d2)


# ---- Triton path --------------------------------------------------------------------------------


@jit
def _row_sq_norms(
    x_ptr,
    y_ptr,
    rx_ptr,
    ry_ptr,
    a_ptr,
    b_ptr,
    n,
    d1,
    d2,
    sxn,
    sxd,
    syn,
    syd,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per block of BLOCK_N tokens: a = ||x - ref_x||^2, b = ||y - ref_y||^2 (fp32).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    acc_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, d1, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < d1
        m = rmask[:, None] & cmask[None, :]
        v = tl.load(
            x_ptr + rows64[:, None] * sxn + cols.to(tl.int64)[None, :] * sxd, mask=m, other=0.0
        ).to(tl.float32)
        r = tl.load(rx_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        v = tl.where(m, v - r[None, :], 0.0)
        acc_a += tl.sum(v * v, axis=1)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, d2, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < d2
        m = rmask[:, None] & cmask[None, :]
        v = tl.load(
            y_ptr + rows64[:, None] * syn + cols.to(tl.int64)[None, :] * syd, mask=m, other=0.0
        ).to(tl.float32)
        r = tl.load(ry_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        v = tl.where(m, v - r[None, :], 0.0)
        acc_b += tl.sum(v * v, axis=1)
    tl.store(a_ptr + rows, acc_a, mask=rmask)
    tl.store(b_ptr + rows, acc_b, mask=rmask)


@jit
def _load_w_tile(
    x_ptr,
    y_ptr,
    rx_ptr,
    ry_ptr,
    a_ptr,
    b_ptr,
    rows,
    cols,
    n,
    d1,
    d2,
    sxn,
    sxd,
    syn,
    syd,
):
    # A (BLOCK_N, BLOCK_D) tile of W = [x - ref_x | y - ref_y | 1 | a | b], zero outside W.
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    in_x = cols < d1
    in_y = (cols >= d1) & (cols < d1 + d2)
    ycols = tl.where(in_y, cols - d1, 0).to(tl.int64)
    xcols = tl.where(in_x, cols, 0).to(tl.int64)
    mx = rmask[:, None] & in_x[None, :]
    my = rmask[:, None] & in_y[None, :]
    xv = tl.load(x_ptr + rows64[:, None] * sxn + xcols[None, :] * sxd, mask=mx, other=0.0)
    yv = tl.load(y_ptr + rows64[:, None] * syn + ycols[None, :] * syd, mask=my, other=0.0)
    rx = tl.load(rx_ptr + xcols, mask=in_x, other=0.0).to(tl.float32)
    ry = tl.load(ry_ptr + ycols, mask=in_y, other=0.0).to(tl.float32)
    w = tl.where(mx, xv.to(tl.float32) - rx[None, :], 0.0)
    w += tl.where(my, yv.to(tl.float32) - ry[None, :], 0.0)
    av = tl.load(a_ptr + rows, mask=rmask, other=0.0)
    bv = tl.load(b_ptr + rows, mask=rmask, other=0.0)
    extra = d1 + d2
    w += tl.where(rmask[:, None] & (cols == extra)[None, :], 1.0, 0.0)
    w += tl.where((cols == extra + 1)[None, :], av[:, None], 0.0)
    w += tl.where((cols == extra + 2)[None, :], bv[:, None], 0.0)
    return w


@jit
def _augmented_gram(
    x_ptr,
    y_ptr,
    rx_ptr,
    ry_ptr,
    a_ptr,
    b_ptr,
    g_ptr,
    n,
    d1,
    d2,
    sxn,
    sxd,
    syn,
    syd,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program (i, j) computes the tile G[i-block, j-block] of G = W^T W for i <= j only; the
    # lower tiles are the transposes and are filled on the host.
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_i <= pid_j:
        D = d1 + d2 + 3
        ci = pid_i * BLOCK_D + tl.arange(0, BLOCK_D)
        cj = pid_j * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        for n0 in range(0, n, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            wi = _load_w_tile(
                x_ptr, y_ptr, rx_ptr, ry_ptr, a_ptr, b_ptr, rows, ci, n, d1, d2, sxn, sxd, syn, syd
            )
            wj = _load_w_tile(
                x_ptr, y_ptr, rx_ptr, ry_ptr, a_ptr, b_ptr, rows, cj, n, d1, d2, sxn, sxd, syn, syd
            )
            # IEEE fp32 products by default: TF32 keeps 10 mantissa bits, far too few for these
            # sums; "tf32x3" (three TF32 products per product, about 21 bits) is offered for
            # measurement against it (bench/gpu/cka_precision.py).
            acc = tl.dot(tl.trans(wi), wj, acc, input_precision=PRECISION)
        gmask = (ci < D)[:, None] & (cj < D)[None, :]
        offs = ci.to(tl.int64)[:, None] * D + cj.to(tl.int64)[None, :]
        tl.store(g_ptr + offs, acc, mask=gmask)


def _triton_can_run(t: torch.Tensor) -> bool:
    """True when the Triton path can run on ``t``: Triton imports, and ``t`` is on CUDA or the
    Triton interpreter is on (``TRITON_INTERPRET=1``)."""
    return HAS_TRITON and (t.is_cuda or interpreter_enabled())


def cka_block_stats_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    ref_x: torch.Tensor,
    ref_y: torch.Tensor,
    block_n: int = 32,
    block_d: int = 64,
    input_precision: str = "ieee",
) -> CKABlockStats:
    """Statistics of one token block with the Triton kernels (fp32, IEEE dot products).

    Args and errors as :func:`augmented_gram_triton`.

    Returns:
        :class:`CKABlockStats` in float32 on ``x.device``.
    """
    _n, d1, d2 = _check_inputs(x, y, ref_x, ref_y)
    G = augmented_gram_triton(x, y, ref_x, ref_y, block_n, block_d, input_precision)
    return _unpack_gram(G, d1, d2)


def augmented_gram_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    ref_x: torch.Tensor,
    ref_y: torch.Tensor,
    block_n: int = 32,
    block_d: int = 64,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """``G = W^T W`` of one token block with the Triton kernels (fp32, IEEE dot products).

    Args:
        x: (n, d1) float32/bfloat16/float16, any strides, on CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        y: (n, d2) on the same device.
        ref_x: (d1,) reference mean subtracted inside the kernel.
        ref_y: (d2,) reference mean.
        block_n: tokens per inner step (a power of two, >= 16).
        block_d: output tile width (a power of two, >= 16).
        input_precision: ``tl.dot``'s product precision: ``"ieee"`` (fp32 products, the
            default and what every caller uses) or ``"tf32x3"`` (three TF32 tensor-core products
            per product, about 21 mantissa bits; for measurement, bench/gpu/cka_precision.py).

    Returns:
        (D, D) symmetric float32 ``G`` on ``x.device``, ``D = d1 + d2 + 3``.

    Raises:
        CKAStatsError: as :func:`cka_block_stats_reference`; no Triton, or a CPU tensor without
            ``TRITON_INTERPRET=1``.
    """
    n, d1, d2 = _check_inputs(x, y, ref_x, ref_y)
    if not _triton_can_run(x):
        raise CKAStatsError(
            "the Triton CKA kernel needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU "
            "tensors); use backend='torch' or set FASTMID_KERNELS=off"
        )
    if y.device != x.device:
        raise CKAStatsError(f"x is on {x.device} but y is on {y.device}")
    if input_precision not in ("ieee", "tf32x3"):
        raise CKAStatsError(f"input_precision must be 'ieee' or 'tf32x3', got {input_precision!r}")
    dev = x.device
    rx = ref_x.to(device=dev, dtype=torch.float32).contiguous()
    ry = ref_y.to(device=dev, dtype=torch.float32).contiguous()
    a = torch.empty(n, dtype=torch.float32, device=dev)
    b = torch.empty(n, dtype=torch.float32, device=dev)
    D = d1 + d2 + 3
    G = torch.zeros(D, D, dtype=torch.float32, device=dev)
    if n > 0:
        _row_sq_norms[(cdiv(n, block_n),)](
            x,
            y,
            rx,
            ry,
            a,
            b,
            n,
            d1,
            d2,
            *x.stride(),
            *y.stride(),
            BLOCK_N=block_n,
            BLOCK_D=block_d,
        )
        tiles = cdiv(D, block_d)
        _augmented_gram[(tiles, tiles)](
            x,
            y,
            rx,
            ry,
            a,
            b,
            G,
            n,
            d1,
            d2,
            *x.stride(),
            *y.stride(),
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            PRECISION=input_precision,
        )
        tile = torch.arange(D, device=dev) // block_d
        G = torch.where(tile[:, None] > tile[None, :], G.T, G)
    return G


def _unpack_gram(G: torch.Tensor, d1: int, d2: int) -> CKABlockStats:
    o, ia, ib = d1 + d2, d1 + d2 + 1, d1 + d2 + 2
    sx, sy = slice(0, d1), slice(d1, d1 + d2)
    return CKABlockStats(
        n=G[o, o].clone(),
        sum_x=G[sx, o].clone(),
        sum_y=G[sy, o].clone(),
        xtx=G[sx, sx].clone(),
        xty=G[sx, sy].clone(),
        yty=G[sy, sy].clone(),
        sum_a=G[o, ia].clone(),
        sum_b=G[o, ib].clone(),
        sum_aa=G[ia, ia].clone(),
        sum_ab=G[ia, ib].clone(),
        sum_bb=G[ib, ib].clone(),
        xa=G[sx, ia].clone(),
        xb=G[sx, ib].clone(),
        ya=G[sy, ia].clone(),
        yb=G[sy, ib].clone(),
    )


def cka_block_stats(
    x: torch.Tensor,
    y: torch.Tensor,
    ref_x: torch.Tensor,
    ref_y: torch.Tensor,
    backend: Backend = "auto",
) -> CKABlockStats:
    """Statistics of one token block for streaming CKA, on the best path for the device.

    Dispatch follows :func:`fastmid.kernels.resolve_backend` like every other op:
    ``auto`` runs Triton on CUDA tensors (unless ``FASTMID_KERNELS=off`` or a
    ``use_backend("torch")`` block) and the float64 reference elsewhere; ``triton`` forces the
    kernel (CPU tensors need ``TRITON_INTERPRET=1``); ``torch`` forces the reference.

    Args:
        x: (n, d1) layer output of model A.
        y: (n, d2) layer output of model B on the same tokens.
        ref_x: (d1,) reference mean subtracted before any product.
        ref_y: (d2,) reference mean.
        backend: ``auto``, ``triton`` or ``torch``.

    Returns:
        :class:`CKABlockStats`: float64 from the reference path, float32 from Triton.

    Raises:
        CKAStatsError: as the two paths.
        ValueError: an unknown ``backend``.
        KernelBackendError: Triton forced where it cannot run.
    """
    if resolve_backend(backend, x, y) == "triton":
        return cka_block_stats_triton(x, y, ref_x, ref_y)
    return cka_block_stats_reference(x, y, ref_x, ref_y)


# ---- streaming accumulation: one path per block ----------------------------------------------

CKAPath = Literal["blas", "torch", "triton"]


def cka_accumulation_path(backend: Backend, x: torch.Tensor, *others: torch.Tensor) -> CKAPath:
    """The path on which :func:`prepare_cka_block` and :func:`accumulate_cka_block` treat a block.

    * ``"triton"`` where :func:`fastmid.kernels.resolve_backend` picks Triton (``auto`` on CUDA
      tensors, or ``triton`` forced): fp32 kernels with IEEE dot products
      (:func:`augmented_gram_triton`), added into the float64 running Gram.
    * ``"blas"`` otherwise, when ``x`` is on the CPU: float64 ``W`` (:func:`augmented_rows`) and
      BLAS ``dsyrk`` into the running Gram in place (:func:`syrk_accumulate`).
    * ``"torch"`` otherwise (``x`` on CUDA with the reference backend): float64 ``W`` and torch's
      ``W^T W``.

    Args:
        backend: ``auto``, ``triton`` or ``torch``.
        x: (n, d1) layer output of model A; its device decides between ``blas`` and ``torch``.
        others: the block's other tensors (``y``), which join ``x`` in the backend choice.

    Raises:
        ValueError: an unknown ``backend``.
        KernelBackendError: Triton forced where it cannot run (not installed, or CPU tensors
            without ``TRITON_INTERPRET=1``).
    """
    if resolve_backend(backend, x, *others) == "triton":
        return "triton"
    return "blas" if x.device.type == "cpu" else "torch"


@dataclass
class CKABlock:
    """One token block made ready by :func:`prepare_cka_block` for :func:`accumulate_cka_block`.

    Attributes:
        path: ``"blas"``, ``"torch"`` or ``"triton"`` (:func:`cka_accumulation_path`).
        n: tokens in the block.
        ref_x: (d1,) reference mean subtracted from ``x``.
        ref_y: (d2,) reference mean subtracted from ``y``.
        W: (n, d1 + d2 + 3) float64 augmented rows on ``x``'s device (``blas`` and ``torch``
            paths; :func:`augmented_rows`), else None.
        x: (n, d1) the block's rows of model A as given (``triton`` path), else None.
        y: (n, d2) the block's rows of model B (``triton`` path), else None.
    """

    path: CKAPath
    n: int
    ref_x: torch.Tensor
    ref_y: torch.Tensor
    W: torch.Tensor | None = None
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        """The device the block's tensors (and its running Gram) live on."""
        held = self.W if self.W is not None else self.x
        assert held is not None  # prepare_cka_block sets W or x
        return held.device

    def finite(self) -> tuple[bool, bool]:
        """``(x_finite, y_finite)``: whether every value of ``x``, of ``y``, is finite.

        On the ``W`` paths one sum over the row-norm column checks a whole side (a NaN/inf in row
        ``i`` makes ``a_i`` or ``b_i`` non-finite), so no second pass over the block is needed.
        """
        if self.W is None:
            assert self.x is not None and self.y is not None
            return bool(torch.isfinite(self.x).all()), bool(torch.isfinite(self.y).all())
        o = self.W.shape[1] - 3
        return bool(torch.isfinite(self.W[:, o + 1].sum())), bool(
            torch.isfinite(self.W[:, o + 2].sum())
        )


def prepare_cka_block(
    x: torch.Tensor,
    y: torch.Tensor,
    ref_x: torch.Tensor,
    ref_y: torch.Tensor,
    backend: Backend = "auto",
) -> CKABlock:
    """Choose the accumulation path for one token block and do its per-token work.

    Safe to call from several threads at once for different blocks on the ``blas`` and ``torch``
    paths (only torch ops; no BLAS-threaded product). On the ``triton`` path nothing is computed
    here: the kernels read ``x`` and ``y`` in :func:`accumulate_cka_block`.

    Args:
        x: (n, d1) layer output of model A, any float dtype (float32/bfloat16/float16 on the
            Triton path); masked tokens already dropped.
        y: (n, d2) layer output of model B on the same tokens.
        ref_x: (d1,) reference mean, float64 in the analysis (any float dtype works).
        ref_y: (d2,) reference mean.
        backend: ``auto``, ``triton`` or ``torch`` (:func:`cka_accumulation_path`).

    Returns:
        :class:`CKABlock`; check :meth:`CKABlock.finite` before accumulating it.

    Raises:
        CKAStatsError: wrong ranks, different token counts, reference means of the wrong width.
        ValueError: an unknown ``backend``.
        KernelBackendError: Triton forced where it cannot run.
    """
    path = cka_accumulation_path(backend, x, y)
    n, _, _ = _check_inputs(x, y, ref_x, ref_y)
    if path == "triton":
        return CKABlock(path, n, ref_x, ref_y, x=x, y=y)
    return CKABlock(path, n, ref_x, ref_y, W=augmented_rows(x, y, ref_x, ref_y, torch.float64))


def accumulate_cka_block(block: CKABlock, gram: torch.Tensor) -> None:
    """Add ``W^T W`` of a prepared block into a running Gram, on the block's path.

    ``blas``: :func:`syrk_accumulate` (upper triangle only, in place; BLAS uses every core, so
    call it from one thread at a time). ``torch``: ``gram += W^T W`` in float64. ``triton``:
    ``gram += G`` with the fp32 ``G`` of :func:`augmented_gram_triton`. Readers use only the upper
    triangle (:func:`gram_to_stats`), which every path fills.

    Args:
        block: from :func:`prepare_cka_block`.
        gram: (D, D) float64 running Gram, ``D = d1 + d2 + 3``, on ``block.device``; from
            :func:`new_running_gram` (the ``blas`` path needs its column-major layout).

    Raises:
        CKAStatsError: a ``gram`` of the wrong shape, dtype or layout (``blas`` path), or Triton
            that cannot run (``triton`` path).
    """
    if block.path == "triton":
        assert block.x is not None and block.y is not None
        gram.add_(augmented_gram_triton(block.x, block.y, block.ref_x, block.ref_y))
        return
    assert block.W is not None
    if block.path == "blas":
        syrk_accumulate(block.W, gram)
    else:
        gram.add_(block.W.T @ block.W)
