"""The Triton CKA statistics kernel (interpreted on CPU) against the float64 torch path."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from fastmid.kernels import (
    CKAStatsError,
    KernelBackendError,
    accumulate_cka_block,
    augmented_rows,
    cka_accumulation_path,
    cka_block_stats,
    cka_block_stats_reference,
    cka_block_stats_triton,
    gram_to_stats,
    new_running_gram,
    prepare_cka_block,
    syrk_accumulate,
    use_backend,
)


def naive_stats(x: torch.Tensor, y: torch.Tensor, rx: torch.Tensor, ry: torch.Tensor) -> dict:
    """Each statistic by an explicit float64 loop over tokens (independent of both paths)."""
    X, Y = x.double() - rx.double(), y.double() - ry.double()
    out: dict[str, torch.Tensor] = {}
    a = torch.stack([X[i] @ X[i] for i in range(X.shape[0])])
    b = torch.stack([Y[i] @ Y[i] for i in range(Y.shape[0])])
    out["n"] = torch.tensor(float(X.shape[0]), dtype=torch.float64)
    out["sum_x"], out["sum_y"] = X.sum(0), Y.sum(0)
    out["xtx"] = sum(torch.outer(X[i], X[i]) for i in range(X.shape[0]))
    out["xty"] = sum(torch.outer(X[i], Y[i]) for i in range(X.shape[0]))
    out["yty"] = sum(torch.outer(Y[i], Y[i]) for i in range(X.shape[0]))
    out["sum_a"], out["sum_b"] = a.sum(), b.sum()
    out["sum_aa"], out["sum_ab"], out["sum_bb"] = (a * a).sum(), (a * b).sum(), (b * b).sum()
    out["xa"], out["xb"] = (X * a[:, None]).sum(0), (X * b[:, None]).sum(0)
    out["ya"], out["yb"] = (Y * a[:, None]).sum(0), (Y * b[:, None]).sum(0)
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize(
    ("n", "d1", "d2", "dtype"),
    [(37, 48, 80, torch.float32), (5, 17, 3, torch.float32), (70, 33, 33, torch.bfloat16)],
)
def test_triton_matches_float64(n, d1, d2, dtype):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, d1, generator=g) * 3 + 1).to(dtype)
    y = torch.randn(n, d2, generator=g).to(dtype)
    rx, ry = torch.randn(d1, generator=g), torch.randn(d2, generator=g)
    want = naive_stats(x, y, rx, ry)
    ref = cka_block_stats_reference(x, y, rx, ry)
    tri = cka_block_stats_triton(x, y, rx, ry, block_n=16, block_d=16)
    assert tri.xtx.dtype == torch.float32
    for f in fields(ref):
        assert rel_err(getattr(ref, f.name), want[f.name]) < 1e-12, f.name
        assert rel_err(getattr(tri, f.name), want[f.name]) < 1e-5, f.name


def test_tf32x3_products_match_float64():
    # The interpreter computes tl.dot in fp32 whatever the precision, so on CPU this checks the
    # argument's path through both functions; the GPU's error is in
    # bench/results/gpu_h200_cka_precision.json (at most 9.4e-7 at the 8B shape).
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(29, 21, generator=g) * 3 + 1, torch.randn(29, 11, generator=g)
    rx, ry = torch.randn(21, generator=g), torch.randn(11, generator=g)
    want = naive_stats(x, y, rx, ry)
    tri = cka_block_stats_triton(x, y, rx, ry, block_n=16, block_d=16, input_precision="tf32x3")
    for f in fields(tri):
        assert rel_err(getattr(tri, f.name), want[f.name]) < 1e-5, f.name
    with pytest.raises(CKAStatsError, match="input_precision must be 'ieee' or 'tf32x3'"):
        cka_block_stats_triton(x, y, rx, ry, input_precision="tf32")


def test_triton_accepts_non_contiguous_input():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(48, 37, generator=g).T  # (37, 48), column-major
    y = torch.randn(37, 160, generator=g)[:, ::2]  # (37, 80), stride 2
    rx, ry = torch.zeros(48), torch.full((80,), 0.5)
    assert not x.is_contiguous() and not y.is_contiguous()
    want = naive_stats(x, y, rx, ry)
    tri = cka_block_stats(x, y, rx, ry, backend="triton")
    for f in fields(tri):
        assert rel_err(getattr(tri, f.name), want[f.name]) < 1e-5, f.name


def test_dispatch_uses_reference_on_cpu_and_when_disabled(monkeypatch):
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    zx, zy = torch.zeros(4), torch.zeros(3)
    assert cka_block_stats(x, y, zx, zy).xtx.dtype == torch.float64
    with use_backend("triton"):
        assert cka_block_stats(x, y, zx, zy).xtx.dtype == torch.float32
        monkeypatch.setenv("FASTMID_KERNELS", "off")
        assert cka_block_stats(x, y, zx, zy, backend="torch").xtx.dtype == torch.float64
    assert cka_block_stats(x, y, zx, zy).xtx.dtype == torch.float64


def test_bad_shapes_are_rejected():
    with pytest.raises(CKAStatsError, match="same tokens"):
        cka_block_stats_reference(
            torch.randn(5, 4), torch.randn(6, 4), torch.zeros(4), torch.zeros(4)
        )
    with pytest.raises(CKAStatsError, match="reference means"):
        cka_block_stats_reference(
            torch.randn(5, 4), torch.randn(5, 4), torch.zeros(3), torch.zeros(4)
        )
    with pytest.raises(ValueError, match="backend"):
        cka_block_stats(
            torch.randn(5, 4), torch.randn(5, 4), torch.zeros(4), torch.zeros(4), "cuda"
        )  # type: ignore[arg-type]


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(CKAStatsError, match="TRITON_INTERPRET"):
        cka_block_stats_triton(torch.randn(5, 4), torch.randn(5, 4), torch.zeros(4), torch.zeros(4))


@pytest.mark.parametrize(("d1", "d2"), [(48, 80), (17, 3)])
def test_blas_running_gram_matches_float64_over_blocks(d1, d2):
    # The production CPU path: float64 W per block, dsyrk into one running Gram, unpacked once.
    g = torch.Generator().manual_seed(d1)
    x = torch.randn(61, d1, generator=g) * 3 + 1
    y = torch.randn(61, d2, generator=g)
    rx, ry = torch.randn(d1, generator=g), torch.randn(d2, generator=g)
    want = naive_stats(x, y, rx, ry)
    gram = new_running_gram(d1, d2)
    for lo, hi in ((0, 37), (37, 38), (38, 61)):  # odd, unequal blocks, one of a single token
        syrk_accumulate(augmented_rows(x[lo:hi], y[lo:hi], rx, ry), gram)
    got = gram_to_stats(gram, d1, d2)
    for f in fields(got):
        assert rel_err(getattr(got, f.name), want[f.name]) < 1e-12, f.name


def test_augmented_rows_flag_non_finite_rows_and_syrk_checks_layouts():
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    x[2, 1] = float("inf")
    W = augmented_rows(x, y, torch.zeros(4), torch.zeros(3))
    assert not torch.isfinite(W[:, 8].sum()) and torch.isfinite(W[:, 9].sum())
    with pytest.raises(CKAStatsError, match="column-major"):
        syrk_accumulate(W, torch.zeros(10, 10, dtype=torch.float64))
    with pytest.raises(CKAStatsError, match="C-contiguous"):
        syrk_accumulate(W.T.contiguous().T, new_running_gram(4, 3))
    with pytest.raises(CKAStatsError, match="float64"):
        syrk_accumulate(W.float(), new_running_gram(4, 3))
    with pytest.raises(CKAStatsError, match=r"\(D, D\)"):
        syrk_accumulate(W, new_running_gram(4, 4))


def test_accumulation_path_follows_the_backend_rules(monkeypatch):
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    assert cka_accumulation_path("auto", x, y) == "blas"  # CPU tensors: float64 rows + dsyrk
    assert cka_accumulation_path("torch", x, y) == "blas"
    assert cka_accumulation_path("triton", x, y) == "triton"  # the interpreter is on in tests
    with use_backend("triton"):
        assert cka_accumulation_path("auto", x, y) == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        cka_accumulation_path("cuda", x, y)  # type: ignore[arg-type]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelBackendError, match="TRITON_INTERPRET=1"):
        cka_accumulation_path("triton", x, y)


@pytest.mark.parametrize(
    ("backend", "path", "tol"), [("torch", "blas", 1e-12), ("triton", "triton", 1e-5)]
)
def test_prepared_blocks_accumulate_to_the_statistics_of_all_tokens(backend, path, tol):
    # The op StreamingCKA calls: prepare each block (the path is chosen here), then add it into
    # one running Gram; unequal blocks, one of a single token.
    g = torch.Generator().manual_seed(5)
    d1, d2 = 33, 17
    x = torch.randn(61, d1, generator=g) * 3 + 1
    y = torch.randn(61, d2, generator=g)
    rx, ry = x[:20].double().mean(0), y[:20].double().mean(0)
    want = naive_stats(x, y, rx, ry)
    gram = new_running_gram(d1, d2)
    for lo, hi in ((0, 37), (37, 38), (38, 61)):
        block = prepare_cka_block(x[lo:hi], y[lo:hi], rx, ry, backend=backend)
        assert block.path == path and block.n == hi - lo and block.finite() == (True, True)
        assert block.device == x.device
        accumulate_cka_block(block, gram)
    got = gram_to_stats(gram, d1, d2)
    assert got.xtx.dtype == torch.float64
    for f in fields(got):
        assert rel_err(getattr(got, f.name), want[f.name]) < tol, f.name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prepared_block_reports_each_non_finite_side(backend):
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    rx, ry = torch.zeros(4), torch.zeros(3)
    x[1, 2] = float("nan")
    assert prepare_cka_block(x, y, rx, ry, backend).finite() == (False, True)
    y[4, 0] = float("-inf")
    x[1, 2] = 0.0
    assert prepare_cka_block(x, y, rx, ry, backend).finite() == (True, False)
    with pytest.raises(CKAStatsError, match="same tokens"):
        prepare_cka_block(x, y[:5], rx, ry, backend)
