"""RoPE kernel (Triton, interpreted) against a float64 torch reference and rotation invariants."""

from __future__ import annotations

import pytest
import torch
from fastmid.kernels import rope, rope_reference

BATCH, Q_HEADS, KV_HEADS, SEQ, HEAD_DIM = 2, 5, 3, 7, 18  # head_dim/2 = 9: not a power of two


def _angles(batch, seq, head_dim, seed=0):
    """cos/sin as transformers builds them: cat(freqs, freqs) of per-position angles."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 100, (batch, seq), generator=g).double()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).double() / head_dim))
    freqs = pos[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _qk(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    # transformers' layout: (B, S, H, D) projections viewed as (B, H, S, D) by transpose(1, 2).
    q = torch.randn(BATCH, SEQ, Q_HEADS, HEAD_DIM, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(BATCH, SEQ, KV_HEADS, HEAD_DIM, generator=g).to(dtype).transpose(1, 2)
    return q.requires_grad_(), k.requires_grad_()


def _f64(t):
    return t.detach().double().requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cos_batch", ["per_batch", "shared", "2d"])
def test_forward_and_gradients_match_float64(dtype, cos_batch, rel_err, tol):
    cos, sin = _angles(BATCH if cos_batch == "per_batch" else 1, SEQ, HEAD_DIM)
    if cos_batch == "2d":
        cos, sin = cos[0], sin[0]
    q, k = _qk(dtype)
    assert not q.is_contiguous()
    g = torch.Generator().manual_seed(2)
    dq, dk = torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g)
    q_out, k_out = rope(q, k, cos.to(dtype), sin.to(dtype), backend="triton")
    ((q_out.float() * dq).sum() + (k_out.float() * dk).sum()).backward()
    qd, kd = _f64(q), _f64(k)
    cd, sd = cos.to(dtype).double(), sin.to(dtype).double()
    q_ref, k_ref = rope_reference(qd, kd, cd, sd)
    ((q_ref * dq.double()).sum() + (k_ref * dk.double()).sum()).backward()
    assert q_out.dtype == dtype and q_out.shape == q.shape
    for actual, expected in ((q_out, q_ref), (k_out, k_ref), (q.grad, qd.grad), (k.grad, kd.grad)):
        assert rel_err(actual, expected) < tol[dtype]


def test_bshd_layout_with_unsqueeze_dim_2(rel_err):
    cos, sin = _angles(BATCH, SEQ, HEAD_DIM)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(BATCH, SEQ, Q_HEADS, HEAD_DIM, generator=g, requires_grad=True)
    k = torch.randn(BATCH, SEQ, KV_HEADS, HEAD_DIM, generator=g, requires_grad=True)
    q_out, k_out = rope(q, k, cos.float(), sin.float(), unsqueeze_dim=2, backend="triton")
    (q_out.sum() + k_out.square().sum()).backward()
    qd, kd = _f64(q), _f64(k)
    q_ref, k_ref = rope_reference(qd, kd, cos, sin, unsqueeze_dim=2)
    (q_ref.sum() + k_ref.square().sum()).backward()
    assert rel_err(q_out, q_ref) < 1e-5 and rel_err(k_out, k_ref) < 1e-5
    assert rel_err(q.grad, qd.grad) < 1e-5 and rel_err(k.grad, kd.grad) < 1e-5


def test_rotation_preserves_norms_and_is_inverted_by_negative_angle():
    cos, sin = _angles(BATCH, SEQ, HEAD_DIM)
    cos, sin = cos.float(), sin.float()
    q, k = (t.detach() for t in _qk(torch.float32))
    q_out, k_out = rope(q, k, cos, sin, backend="triton")
    # A rotation keeps each pair's length, hence each head vector's norm.
    torch.testing.assert_close(q_out.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-6)
    q_back, k_back = rope(q_out, k_out, cos, -sin, backend="triton")
    torch.testing.assert_close(q_back, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_back, k, rtol=1e-5, atol=1e-5)


def test_inplace_only_where_autograd_cannot_see_it():
    cos, sin = _angles(1, SEQ, HEAD_DIM)
    cos, sin = cos.float(), sin.float()
    q, k = _qk(torch.float32)
    expected = rope_reference(q.detach(), k.detach(), cos, sin)
    # Grad needed: inplace is ignored, inputs unchanged.
    q_copy = q.detach().clone()
    q_out, _ = rope(q, k, cos, sin, inplace=True, backend="triton")
    assert torch.equal(q.detach(), q_copy)
    torch.testing.assert_close(q_out, expected[0])
    # No grad: the result is written into q and k themselves.
    with torch.no_grad():
        qn, kn = q.detach().clone(), k.detach().clone()
        q_out, k_out = rope(qn, kn, cos, sin, inplace=True, backend="triton")
    assert q_out.data_ptr() == qn.data_ptr() and k_out.data_ptr() == kn.data_ptr()
    torch.testing.assert_close(qn, expected[0])
    torch.testing.assert_close(kn, expected[1])


def test_bad_inputs_are_clear_errors():
    q = torch.randn(1, 2, 3, 6)
    cos = torch.randn(1, 3, 6)
    with pytest.raises(ValueError, match="even"):
        rope(torch.randn(1, 2, 3, 5), torch.randn(1, 2, 3, 5), cos[..., :5], cos[..., :5])
    with pytest.raises(ValueError, match="cos/sin must be"):
        rope(q, q, torch.randn(1, 4, 6), torch.randn(1, 4, 6))
    with pytest.raises(ValueError, match="require grad"):
        rope(q, q, cos.requires_grad_(), cos.detach())
