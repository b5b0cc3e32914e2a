"""RMSNorm kernel (Triton, interpreted) against a float64 torch reference."""

from __future__ import annotations

import pytest
import torch
from fastmid.kernels import KernelBackendError, rms_norm, rms_norm_reference
from fastmid.kernels.rms_norm import _triton_forward

ROWS, HIDDEN = 37, 123  # odd sizes: not powers of two


def _inputs(dtype, residual, weight_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, HIDDEN, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(HIDDEN, generator=g)).to(dtype).requires_grad_(weight_grad)
    r = torch.randn(ROWS, HIDDEN, generator=g).to(dtype).requires_grad_() if residual else None
    return x, w, r


def _f64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_forward_and_all_gradients_match_float64(dtype, offset, residual, rel_err, tol):
    x, w, r = _inputs(dtype, residual)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(ROWS, HIDDEN, generator=g)
    dh = torch.randn(ROWS, HIDDEN, generator=g)

    out = rms_norm(x, w, 1e-5, offset=offset, residual=r, backend="triton")
    xd, wd, rd = _f64(x), _f64(w), _f64(r)
    ref = rms_norm_reference(xd, wd, 1e-5, offset=offset, residual=rd)
    if residual:
        # Gradient also flows into the returned h = x + residual (the next residual stream).
        (y, h), (y_ref, h_ref) = out, ref
        ((y.float() * dy).sum() + (h.float() * dh).sum()).backward()
        ((y_ref * dy.double()).sum() + (h_ref * dh.double()).sum()).backward()
        assert rel_err(h, h_ref) < tol[dtype]
        assert rel_err(r.grad, rd.grad) < tol[dtype]
    else:
        y, y_ref = out, ref
        (y.float() * dy).sum().backward()
        (y_ref * dy.double()).sum().backward()
    assert y.dtype == dtype
    assert rel_err(y, y_ref) < tol[dtype]
    assert rel_err(x.grad, xd.grad) < tol[dtype]
    assert rel_err(w.grad, wd.grad) < tol[dtype]


def test_matches_closed_form_on_constant_rows():
    # Rows of a constant c have rms |c|: y = sign(c) * w / sqrt(1 + eps / c^2), exactly.
    c = torch.tensor([2.0, -3.0, 0.5]).repeat_interleave(HIDDEN).view(3, HIDDEN)
    w = torch.linspace(0.5, 1.5, HIDDEN)
    y = rms_norm(c, w, 1e-6, backend="triton")
    expected = torch.sign(c[:, :1]) * w / torch.sqrt(1 + 1e-6 / c[:, :1] ** 2)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


def test_non_contiguous_inputs(rel_err, tol):
    g = torch.Generator().manual_seed(2)
    big = torch.randn(ROWS, HIDDEN + 17, generator=g)
    x_rows = big[:, 5 : 5 + HIDDEN].requires_grad_()  # strided rows, unit column stride
    x_t = torch.randn(HIDDEN, ROWS, generator=g).T.requires_grad_()  # column stride != 1
    w = torch.randn(HIDDEN, generator=g, requires_grad=True)
    for x in (x_rows, x_t):
        assert not x.is_contiguous()
        y = rms_norm(x, w, 1e-6, backend="triton")
        y.square().sum().backward()
        xd, wd = _f64(x), _f64(w)
        rms_norm_reference(xd, wd, 1e-6).square().sum().backward()
        assert rel_err(y, rms_norm_reference(xd, wd, 1e-6)) < tol[torch.float32]
        assert rel_err(x.grad, xd.grad) < tol[torch.float32]
        assert rel_err(w.grad, wd.grad) < tol[torch.float32]
        w.grad = None


def test_leading_dimensions_are_kept():
    x = torch.randn(2, 3, HIDDEN)
    w = torch.randn(HIDDEN)
    y = rms_norm(x, w, backend="triton")
    assert y.shape == x.shape
    torch.testing.assert_close(y, rms_norm_reference(x, w), rtol=1e-5, atol=1e-6)


def test_frozen_weight_gets_no_gradient(rel_err, tol):
    x, w, _ = _inputs(torch.float32, False, weight_grad=False)
    rms_norm(x, w, backend="triton").sum().backward()
    assert w.grad is None
    xd = _f64(x)
    rms_norm_reference(xd, w.double()).sum().backward()
    assert rel_err(x.grad, xd.grad) < tol[torch.float32]


def test_forward_only_path_saves_nothing():
    x, w, r = _inputs(torch.float32, True)
    with torch.no_grad():
        y, h = rms_norm(x, w, residual=r, backend="triton")
    assert y.grad_fn is None and h.grad_fn is None
    y_ref, h_ref = rms_norm_reference(x.detach(), w.detach(), residual=r.detach())
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, h_ref)
    _, _, rstd = _triton_forward(x.detach(), w.detach(), None, 1e-6, 0.0, store_rstd=False)
    assert rstd is None


def test_empty_rows():
    x = torch.randn(0, HIDDEN, requires_grad=True)
    w = torch.randn(HIDDEN, requires_grad=True)
    y = rms_norm(x, w, backend="triton")
    y.sum().backward()
    assert y.shape == (0, HIDDEN)
    assert torch.equal(w.grad, torch.zeros(HIDDEN))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"weight \(H,\)"):
        rms_norm(torch.randn(4, 8), torch.randn(7))
    with pytest.raises(ValueError, match="residual shape"):
        rms_norm(torch.randn(4, 8), torch.randn(8), residual=torch.randn(4, 7))


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelBackendError, match="TRITON_INTERPRET=1"):
        rms_norm(torch.randn(2, 8), torch.randn(8), backend="triton")
