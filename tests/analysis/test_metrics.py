"""Per-layer metrics from invariants and independent float64 computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from analysis_tiny import batches, examples, tiny_llama

from fastmid.analysis.metrics import (
    MetricsError,
    PooledCosine,
    SpectralMeans,
    effective_rank,
    layer_grad_norms,
    matrix_entropy,
    weight_change,
)


def test_weight_change_of_scaled_modules():
    base = tiny_llama(4)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.model.layers[1].parameters():
            p.mul_(1.3)  # every kind moves by exactly 30%
        for p in tuned.model.layers[2].self_attn.parameters():
            p.mul_(0.9)  # attention only, 10%
        tuned.model.layers[3].post_attention_layernorm.weight.mul_(-1.0)  # norm: 200%
    rows = weight_change(base, tuned)
    assert [r.layer for r in rows] == [0, 1, 2, 3]
    assert rows[0].total == 0.0 and rows[0].mlp == 0.0
    for v in (rows[1].total, rows[1].attention, rows[1].mlp, rows[1].norm):
        assert v == pytest.approx(0.3, rel=1e-6)
    assert rows[2].attention == pytest.approx(0.1, rel=1e-6)
    assert rows[2].mlp == 0.0 and rows[2].norm == 0.0
    assert 0.0 < rows[2].total < 0.1
    norms = (
        tuned.model.layers[3].input_layernorm.weight,
        tuned.model.layers[3].post_attention_layernorm.weight,
    )
    # one of two equal-norm weights flipped: ||2w|| / sqrt(2 ||w||^2) = sqrt(2)
    assert torch.equal(norms[0].abs(), norms[1].abs())
    assert rows[3].norm == pytest.approx(math.sqrt(2.0), rel=1e-6)


def test_weight_change_rejects_other_architecture():
    with pytest.raises(MetricsError, match="shape"):
        small, wide = tiny_llama(2), tiny_llama(2)
        with torch.no_grad():
            wide.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(50, 32))
        weight_change(small, wide)


def test_pooled_cosine_invariants():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 6, 8, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, :] = False  # a prompt with no kept token is skipped
    same = PooledCosine()
    same.update(h, 2.5 * h, mask)
    assert same.compute() == pytest.approx(1.0, abs=1e-12)
    # pooled vectors u and -u: cosine -1; padding rows hold garbage that must not count
    garbage = h.clone()
    garbage[~mask] = 1e6
    flipped = PooledCosine()
    flipped.update(garbage, -h, mask)
    assert flipped.compute() == pytest.approx(-1.0, abs=1e-9)
    assert math.isnan(PooledCosine().compute())


def svd_reference(z: torch.Tensor) -> tuple[float, float]:
    """Normalized entropy and effective rank of one prompt from torch.linalg.svdvals (float64)."""
    s = torch.linalg.svdvals(z.double())
    lam = s.square() / s.square().sum()
    lam = lam[lam > 0]
    entropy = float(-(lam * lam.log()).sum()) / math.log(min(z.shape))
    p = s / s.sum()
    p = p[p > 0]
    return entropy, math.exp(float(-(p * p.log()).sum()))


def test_entropy_and_erank_extremes():
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    lam = torch.ones(4, dtype=torch.float64)
    assert float(matrix_entropy(lam, torch.tensor(4))) == pytest.approx(1.0)
    assert float(effective_rank(lam)) == pytest.approx(4.0)
    one = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    assert float(matrix_entropy(one, torch.tensor(3))) == pytest.approx(0.0)
    assert float(effective_rank(one)) == pytest.approx(1.0)
    # 4 orthonormal tokens in 10 dims: uniform spectrum
    acc = SpectralMeans()
    acc.update(q[:4][None], torch.ones(1, 4, dtype=torch.bool))
    ent, er = acc.compute()
    assert ent == pytest.approx(1.0) and er == pytest.approx(4.0)


@pytest.mark.parametrize("width", [8, 3])  # T <= D and T > D (the D x D Gram branch)
def test_spectral_means_match_svd_per_prompt_with_padding(width):
    g = torch.Generator().manual_seed(1)
    lengths = [7, 4, 1, 6]  # the length-1 prompt has no entropy (log 1 = 0) and is skipped
    h = torch.randn(4, 7, width, generator=g, dtype=torch.float64)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    h[~mask] = 1e3  # padding garbage
    refs = [svd_reference(h[i, :n]) for i, n in enumerate(lengths) if n >= 2]
    for dtype, rel in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        acc = SpectralMeans(dtype=dtype)
        acc.update(h[:2], mask[:2])
        acc.update(h[2:], mask[2:])
        ent, er = acc.compute()
        assert ent == pytest.approx(sum(r[0] for r in refs) / 3, rel=rel)
        assert er == pytest.approx(sum(r[1] for r in refs) / 3, rel=rel)


def test_spectra_use_each_prompts_first_tokens():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(3, 9, 16, generator=g, dtype=torch.float64)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 1:9] = True  # first position masked (--mask-bos): kept tokens 1..8
    mask[1, 0:3] = True  # shorter than the cap: all 3 kept
    mask[2, 1:6] = True
    cap = 4
    starts = [1, 0, 1]
    refs = [svd_reference(h[i, s : s + min(cap, int(mask[i].sum()))]) for i, s in enumerate(starts)]
    acc = SpectralMeans(max_tokens=cap, dtype=torch.float64)
    acc.update(h, mask)
    ent, er = acc.compute()
    assert ent == pytest.approx(sum(r[0] for r in refs) / 3, rel=1e-9)
    assert er == pytest.approx(sum(r[1] for r in refs) / 3, rel=1e-9)
    # No cap: every kept token of every prompt.
    full = SpectralMeans(max_tokens=None, dtype=torch.float64)
    full.update(h, mask)
    refs = [svd_reference(h[i][mask[i]]) for i in range(3)]
    assert full.compute()[0] == pytest.approx(sum(r[0] for r in refs) / 3, rel=1e-9)


def test_float32_spectra_on_llm_like_activations():
    # One channel ~1e3 times the rest and a position-0 "attention sink" row: the eigenvalue
    # spread of real decoder outputs, where float32 rounding is most visible.
    g = torch.Generator().manual_seed(5)
    h = torch.randn(4, 100, 96, generator=g, dtype=torch.float64)
    h[:, :, 7] += 300.0
    h[:, 0] *= 50.0
    mask = torch.ones(4, 100, dtype=torch.bool)
    ref = SpectralMeans(max_tokens=None, dtype=torch.float64)
    f32 = SpectralMeans(max_tokens=None, dtype=torch.float32)
    ref.update(h, mask)
    f32.update(h.float(), mask)
    (e64, r64), (e32, r32) = ref.compute(), f32.compute()
    # The tolerances documented in prompt_spectra (measured here: 3e-4 relative effective rank).
    assert abs(e32 - e64) < 1e-5
    assert r32 == pytest.approx(r64, rel=1e-3)


def test_grad_norms_match_hf_loss_and_ignore_batching():
    model = tiny_llama(3)
    exs = examples(6, seed=3)
    one_batch = batches(exs, 6)[0]
    # Independent reference: transformers' own token-mean loss on all examples in one batch.
    model.zero_grad()
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    loss = model(**one_batch).loss
    grads = torch.autograd.grad(loss, list(model.model.layers.parameters()))
    it = iter(grads)
    want = []
    for layer in model.model.layers:
        want.append(
            math.sqrt(sum(float(next(it).double().square().sum()) for _ in layer.parameters()))
        )
    got_one = layer_grad_norms(model, [one_batch])
    got_split = layer_grad_norms(model, batches(exs, 4))
    assert got_one == pytest.approx(want, rel=1e-5)
    assert got_split == pytest.approx(want, rel=1e-5)
    assert all(p.grad is None for p in params)
    assert [p.requires_grad for p in params] == flags


def test_grad_norms_need_supervised_tokens():
    model = tiny_llama(2)
    b = batches(examples(2), 2)[0]
    b["labels"].fill_(-100)
    with pytest.raises(MetricsError, match="supervised"):
        layer_grad_norms(model, [b])


def test_nan_in_padding_does_not_reach_the_metrics():
    g = torch.Generator().manual_seed(6)
    h = torch.randn(2, 6, 8, generator=g)
    t = h + 0.1 * torch.randn(2, 6, 8, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    clean = (SpectralMeans(), PooledCosine())
    clean[0].update(h, mask)
    clean[1].update(h, t, mask)
    h[1, 4:], t[1, 4:] = float("nan"), float("inf")  # padding positions only
    dirty = (SpectralMeans(), PooledCosine())
    dirty[0].update(h, mask)
    dirty[1].update(h, t, mask)
    assert dirty[0].compute() == pytest.approx(clean[0].compute(), rel=1e-12)
    assert dirty[1].compute() == pytest.approx(clean[1].compute(), rel=1e-12)
