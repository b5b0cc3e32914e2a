"""Streaming CKA against invariants and an independent float64 Gram-matrix implementation."""

from __future__ import annotations

import math

import pytest
import torch

from fastmid.analysis.cka import CKAError, StreamingCKA


def gram_cka(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(debiased, biased) CKA from the n x n Gram matrices, float64, straight from the papers.

    Biased: tr(KHLH) (Kornblith et al. 2019 eq. 3). Debiased: Song et al. 2012 eq. 5.
    """
    x, y = x.double(), y.double()
    n = x.shape[0]
    K, L = x @ x.T, y @ y.T
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n

    def hsic_b(A: torch.Tensor, B: torch.Tensor) -> float:
        return float(torch.trace(A @ H @ B @ H))

    def hsic_u(A: torch.Tensor, B: torch.Tensor) -> float:
        A = A - torch.diag(torch.diag(A))
        B = B - torch.diag(torch.diag(B))
        one = torch.ones(n, dtype=torch.float64)
        t1 = torch.trace(A @ B)
        t2 = (one @ A @ one) * (one @ B @ one) / ((n - 1) * (n - 2))
        t3 = 2.0 / (n - 2) * (one @ A @ B @ one)
        return float((t1 + t2 - t3) / (n * (n - 3)))

    deb = hsic_u(K, L) / math.sqrt(hsic_u(K, K) * hsic_u(L, L))
    bia = hsic_b(K, L) / math.sqrt(hsic_b(K, K) * hsic_b(L, L))
    return deb, bia


def stream(x: torch.Tensor, y: torch.Tensor, sizes: list[int] | None = None, backend="torch"):
    acc = StreamingCKA("layer 3", backend=backend)
    sizes = sizes or [x.shape[0]]
    start = 0
    for s in sizes:
        acc.update(x[start : start + s], y[start : start + s])
        start += s
    assert start == x.shape[0]
    return acc.compute()


@pytest.fixture
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 24, generator=g, dtype=torch.float64)
    # y depends on x, plus noise, so CKA is strictly between 0 and 1.
    y = x @ torch.randn(24, 16, generator=g, dtype=torch.float64)
    y = y + 2.0 * torch.randn(90, 16, generator=g, dtype=torch.float64)
    return x, y


def test_matches_gram_matrix_reference(xy):
    x, y = xy
    r = stream(x, y)
    deb, bia = gram_cka(x, y)
    assert r.debiased == pytest.approx(deb, rel=1e-10)
    assert r.biased == pytest.approx(bia, rel=1e-10)
    assert 0.05 < r.debiased < 0.99 and r.n_tokens == 90


def test_self_similarity_is_one(xy):
    x, _ = xy
    r = stream(x, x.clone())
    assert r.debiased == pytest.approx(1.0, abs=1e-12)
    assert r.biased == pytest.approx(1.0, abs=1e-12)


def test_invariances(xy):
    x, y = xy
    base = stream(x, y)
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    shift = 1e3 * torch.randn(16, dtype=torch.float64)
    for y2 in (y @ q, 7.5 * y, y + shift):
        r = stream(x, y2)
        assert r.debiased == pytest.approx(base.debiased, rel=1e-9)
        assert r.biased == pytest.approx(base.biased, rel=1e-9)
    # The shift invariance above must not come only from the accumulator's reference mean: the
    # independent Gram implementation sees the raw shifted data (a modest shift: the n x n Gram
    # route itself cancels catastrophically for large ones, which is why the accumulator does not
    # take it).
    small = shift / 200.0
    assert gram_cka(x, y + small)[0] == pytest.approx(base.debiased, rel=1e-9)
    assert gram_cka(x, y + small)[1] == pytest.approx(base.biased, rel=1e-9)


def test_nonuniform_scaling_changes_cka(xy):
    x, y = xy
    scale = torch.ones(16, dtype=torch.float64)
    scale[:4] = 10.0
    base, scaled = stream(x, y), stream(x, y * scale)
    assert abs(scaled.debiased - base.debiased) > 1e-2
    assert abs(scaled.biased - base.biased) > 1e-2


def test_debiased_near_zero_for_independent_wide_features():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1000, generator=g, dtype=torch.float64)
    y = torch.randn(64, 1000, generator=g, dtype=torch.float64)
    r = stream(x, y)
    assert abs(r.debiased) < 0.05
    assert r.biased > 0.9


def test_streaming_equals_one_shot_over_unequal_chunks(xy):
    x, y = xy
    sizes = [1, 17, 3, 30, 2, 25, 12]
    assert len(sizes) == 7 and sum(sizes) == x.shape[0]
    one, streamed = stream(x, y), stream(x, y, sizes)
    assert abs(streamed.debiased - one.debiased) < 1e-10
    assert abs(streamed.biased - one.biased) < 1e-10


def test_mask_equals_dropping_tokens(xy):
    x, y = xy
    x3, y3 = x.reshape(3, 30, 24), y.reshape(3, 30, 16)
    mask = torch.rand(3, 30, generator=torch.Generator().manual_seed(2)) > 0.3
    acc = StreamingCKA("layer 0", backend="torch")
    acc.update(x3, y3, mask)
    kept = stream(x3[mask], y3[mask])
    r = acc.compute()
    assert r.n_tokens == int(mask.sum())
    assert r.debiased == pytest.approx(kept.debiased, rel=1e-12)


def test_outlier_channels_in_float32_do_not_cancel():
    # LLM-like activations: one channel ~1e4 times the rest, offset far from zero.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 32, generator=g, dtype=torch.float64)
    x[:, 5] = 3e4 + 1e2 * torch.randn(200, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.randn(200, 32, generator=g, dtype=torch.float64)
    deb, bia = gram_cka(x, y)
    r = stream(x.float(), y.float(), [50, 70, 80])
    assert r.debiased == pytest.approx(deb, rel=1e-5)
    assert r.biased == pytest.approx(bia, rel=1e-5)


def test_errors_name_the_layer():
    acc = StreamingCKA("layer 11", backend="torch")
    acc.update(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(CKAError, match=r"layer 11.*at least 4 tokens"):
        acc.compute()
    with pytest.raises(CKAError, match=r"layer 11.*widths changed"):
        acc.update(torch.randn(3, 6), torch.randn(3, 5))
    bad = torch.randn(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(CKAError, match=r"layer 11.*NaN or inf"):
        acc.update(bad, torch.randn(3, 5))
    inf = torch.randn(3, 5)
    inf[0, 0] = float("inf")
    with pytest.raises(CKAError, match=r"layer 11: y"):
        acc.update(torch.randn(3, 4), inf)
    with pytest.raises(CKAError, match="same tokens"):
        acc.update(torch.randn(3, 4), torch.randn(2, 5))
    with pytest.raises(CKAError, match="at least 4 tokens, got 0"):
        StreamingCKA("layer 1").compute()


def test_triton_path_matches_float64_stream(xy):
    # Under TRITON_INTERPRET=1 (the root tests/conftest.py) the kernel runs on CPU tensors.
    x, y = xy
    sizes = [37, 20, 33]
    ref = stream(x, y, sizes, backend="torch")
    tri = stream(x.float(), y.float(), sizes, backend="triton")
    assert tri.debiased == pytest.approx(ref.debiased, rel=1e-5)
    assert tri.biased == pytest.approx(ref.biased, rel=1e-5)


def test_rejected_block_leaves_the_sums_unchanged(xy):
    x, y = xy
    broken = y[40:60].clone()
    broken[3, 2] = float("nan")
    acc = StreamingCKA("layer 2")
    with pytest.raises(CKAError, match="layer 2: y"):
        acc.update(x[40:60], broken)  # a broken first block must not set the reference mean
    acc.update(x[:40], y[:40])
    with pytest.raises(CKAError, match="layer 2: y"):
        acc.update(x[40:60], broken)
    acc.update(x[40:], y[40:])
    r, want = acc.compute(), stream(x, y)
    assert r.n_tokens == 90
    assert abs(r.debiased - want.debiased) < 1e-12 and abs(r.biased - want.biased) < 1e-12


def test_prepare_then_accumulate_equals_update(xy):
    x, y = xy
    a, b = StreamingCKA(), StreamingCKA()
    blocks = [a.prepare(x[i : i + 30], y[i : i + 30]) for i in (0, 30, 60)]
    assert a.n_tokens == 0  # prepared blocks are not counted until accumulated
    for blk in blocks:
        a.accumulate(blk)
    for i in (0, 30, 60):
        b.update(x[i : i + 30], y[i : i + 30])
    ra, rb = a.compute(), b.compute()
    assert ra.n_tokens == rb.n_tokens == 90
    assert ra.debiased == pytest.approx(rb.debiased, rel=1e-13)


def test_prepared_blocks_belong_to_their_accumulator_and_are_used_once(xy):
    x, y = xy
    a, b = StreamingCKA("layer 4"), StreamingCKA("layer 5")
    blk = a.prepare(x, y)
    with pytest.raises(CKAError, match="layer 5: .*another StreamingCKA"):
        b.accumulate(blk)
    a.accumulate(blk)
    with pytest.raises(CKAError, match="layer 4: .*already accumulated"):
        a.accumulate(blk)
    assert a.n_tokens == 90
