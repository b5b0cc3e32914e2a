"""Chunked linear + cross-entropy (Triton, interpreted) against float64 full-logits references."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from fastmid.kernels import (
    default_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from fastmid.kernels.linear_cross_entropy import _chunked_forward

# The package re-exports the function under the module's name; fetch the module itself.
lce_module = importlib.import_module("fastmid.kernels.linear_cross_entropy")

TOKENS, HIDDEN, VOCAB = 37, 123, 1031


def _inputs(dtype, weight_grad, seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(TOKENS, HIDDEN, generator=g).to(dtype).requires_grad_()
    w = (0.2 * torch.randn(VOCAB, HIDDEN, generator=g)).to(dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    labels[::ignore_every] = -100
    return h, w, labels


def _f64(t):
    return t.detach().double().requires_grad_(t.requires_grad)


def _float64_loss_by_hand(h, w, labels, softcap):
    """Independent float64 ground truth: explicit log-sum-exp, no F.cross_entropy."""
    logits = h @ w.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    keep = labels != -100
    lse = torch.logsumexp(logits[keep], dim=-1)
    picked = logits[keep].gather(1, labels[keep, None]).squeeze(1)
    return (lse - picked).sum(), keep.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen_head", "trained_head"])
def test_loss_count_and_gradients_match_float64(dtype, softcap, weight_grad, rel_err, tol):
    h, w, labels = _inputs(dtype, weight_grad)
    # 37 tokens in chunks of 8: four full chunks and a ragged one.
    loss, n = linear_cross_entropy(h, w, labels, softcap=softcap, chunk_size=8, backend="triton")
    (3.0 * loss).backward()  # a non-unit upstream gradient must scale both gradients
    hd, wd = _f64(h), _f64(w)
    loss_ref, n_ref = _float64_loss_by_hand(hd, wd, labels, softcap)
    (3.0 * loss_ref).backward()
    assert loss.dtype == torch.float32 and n.dtype == torch.int64
    assert int(n) == int(n_ref) == int((labels != -100).sum())
    assert rel_err(loss, loss_ref) < tol[dtype]
    assert rel_err(h.grad, hd.grad) < tol[dtype]
    if weight_grad:
        assert rel_err(w.grad, wd.grad) < tol[dtype]
    else:
        assert w.grad is None


@pytest.mark.parametrize("chunk_size", [None, 1, 1000], ids=["auto", "single_token", "one_chunk"])
def test_chunk_size_does_not_change_the_result(chunk_size, rel_err):
    h, w, labels = _inputs(torch.float32, True, seed=3)
    loss, _ = linear_cross_entropy(h, w, labels, chunk_size=chunk_size, backend="triton")
    loss.backward()
    hd, wd = _f64(h), _f64(w)
    loss_ref, _ = _float64_loss_by_hand(hd, wd, labels, None)
    loss_ref.backward()
    assert rel_err(loss, loss_ref) < 1e-5
    assert rel_err(h.grad, hd.grad) < 1e-5
    assert rel_err(w.grad, wd.grad) < 1e-5


def test_several_vocab_blocks_and_padded_lanes_masked_after_softcap(monkeypatch, rel_err):
    # 1031 = 4 blocks of 256 + 7: exercises the online log-sum-exp across blocks and the padded
    # lanes of the last block, which must be -inf after the softcap (softcap(-inf) = -softcap).
    monkeypatch.setattr(lce_module, "_VOCAB_BLOCK", 256)
    h, w, labels = _inputs(torch.float32, True, seed=5)
    loss, _ = linear_cross_entropy(h, w, labels, softcap=2.0, backend="triton")
    loss.backward()
    hd, wd = _f64(h), _f64(w)
    loss_ref, _ = _float64_loss_by_hand(hd, wd, labels, 2.0)
    loss_ref.backward()
    assert rel_err(loss, loss_ref) < 1e-5
    assert rel_err(h.grad, hd.grad) < 1e-5
    assert rel_err(w.grad, wd.grad) < 1e-5


def test_uniform_logits_give_log_vocab_per_token():
    # Zero weight: every logit is 0, so each supervised token costs exactly log(V).
    h = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    w = torch.zeros(VOCAB, HIDDEN)
    labels = torch.arange(TOKENS) * 7
    loss, n = linear_cross_entropy(h, w, labels, backend="triton")
    assert int(n) == TOKENS
    assert math.isclose(loss.item(), TOKENS * math.log(VOCAB), rel_tol=1e-6)


def test_all_labels_ignored_gives_zero_loss_and_zero_gradients():
    h, w, labels = _inputs(torch.float32, True)
    labels[:] = -100
    loss, n = linear_cross_entropy(h, w, labels, softcap=3.0, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and int(n) == 0
    assert torch.equal(h.grad, torch.zeros_like(h))
    assert torch.equal(w.grad, torch.zeros_like(w))
    ref, n_ref = linear_cross_entropy_reference(h.detach(), w.detach(), labels)
    assert ref.item() == 0.0 and int(n_ref) == 0


def test_frozen_head_computes_no_weight_gradient():
    h, w, labels = _inputs(torch.float32, False)
    _, grad_h, grad_w = _chunked_forward(h.detach(), w, labels, -100, None, 8, True, False)
    assert grad_w is None and grad_h is not None
    loss, _ = linear_cross_entropy(h, w, labels, backend="triton")
    assert loss.grad_fn is not None
    loss.backward()
    assert w.grad is None and h.grad is not None


def test_forward_only_and_batched_input(rel_err):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(3, 11, HIDDEN, generator=g)
    w = 0.2 * torch.randn(VOCAB, HIDDEN, generator=g)
    labels = torch.randint(0, VOCAB, (3, 11), generator=g, dtype=torch.int32)
    labels[0, :4] = -100
    with torch.no_grad():
        loss, n = linear_cross_entropy(h, w, labels, backend="triton")
    loss_ref, n_ref = _float64_loss_by_hand(
        h.reshape(-1, HIDDEN).double(), w.double(), labels.reshape(-1).long(), None
    )
    assert loss.grad_fn is None and int(n) == int(n_ref) == 29
    assert rel_err(loss, loss_ref) < 1e-5


def test_non_contiguous_hidden_states(rel_err):
    g = torch.Generator().manual_seed(8)
    h = torch.randn(HIDDEN, TOKENS, generator=g).T.requires_grad_()
    w = 0.2 * torch.randn(VOCAB, HIDDEN, generator=g)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    loss, _ = linear_cross_entropy(h, w, labels, backend="triton")
    loss.backward()
    hd = _f64(h)
    loss_ref, _ = _float64_loss_by_hand(hd, w.double(), labels, None)
    loss_ref.backward()
    assert rel_err(loss, loss_ref) < 1e-5 and rel_err(h.grad, hd.grad) < 1e-5


def test_default_chunk_size_rule():
    # Published Liger rule: next_pow2(ceil(N / ceil(V / H))); Llama-3 8B at 16384 tokens: 512.
    assert default_chunk_size(16384, 4096, 128256) == 512
    assert default_chunk_size(37, 123, 1031) == 8


def test_bad_labels_and_arguments_are_clear_errors():
    h, w, labels = _inputs(torch.float32, False)
    labels[5] = VOCAB
    with pytest.raises(ValueError, match="flat position 5"):
        linear_cross_entropy(h, w, labels, backend="triton")
    with pytest.raises(ValueError, match="shift them first"):
        linear_cross_entropy(h, w, labels[:-1])
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(h, w, labels.clamp(0), softcap=0.0)
    with pytest.raises(ValueError, match="int64/int32"):
        linear_cross_entropy(h, w, labels.float())
