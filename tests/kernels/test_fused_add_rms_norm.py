"""Residual add + RMSNorm kernel (Triton, interpreted) against a float64 torch reference, and the
reference against transformers' own eager layer code."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest
import torch
from fastmid.kernels import (
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    use_backend,
)
from fastmid.kernels._triton import LazyKernel
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from triton.runtime.interpreter import InterpretedFunction

ROWS, HIDDEN = 37, 123  # odd sizes: not powers of two
RULES = [("llama", 0.0), ("gemma", 1.0)]


def _inputs(dtype, weight_grad=True, seed=0, shape=(ROWS, HIDDEN)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    r = (2 * torch.randn(*shape, generator=g)).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype).requires_grad_(weight_grad)
    return x, r, w


def _f64(t):
    return t.detach().double().requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("casting", "offset"), RULES, ids=[c for c, _ in RULES])
def test_forward_and_all_gradients_match_float64(dtype, casting, offset, rel_err, tol):
    x, r, w = _inputs(dtype)
    g = torch.Generator().manual_seed(1)
    dy, dh = torch.randn(ROWS, HIDDEN, generator=g), torch.randn(ROWS, HIDDEN, generator=g)
    y, h = fused_add_rms_norm(x, r, w, 1e-5, offset=offset, casting=casting, backend="triton")
    # Gradient flows into both outputs: y (the MLP's input) and h (the residual stream).
    ((y.float() * dy).sum() + (h.float() * dh).sum()).backward()
    xd, rd, wd = _f64(x), _f64(r), _f64(w)
    y_ref, h_ref = fused_add_rms_norm_reference(xd, rd, wd, 1e-5, offset=offset, casting=casting)
    ((y_ref * dy.double()).sum() + (h_ref * dh.double()).sum()).backward()
    assert y.dtype == dtype and h.dtype == dtype
    for got, want in ((y, y_ref), (h, h_ref), (x.grad, xd.grad), (r.grad, rd.grad)):
        assert rel_err(got, want) < tol[dtype]
    assert rel_err(w.grad, wd.grad) < tol[dtype]


def test_frozen_weight_and_unused_norm_output(rel_err):
    # The frozen layer's case: w does not train (no dw), and a gradient only through h.
    x, r, w = _inputs(torch.float32, weight_grad=False)
    _y, h = fused_add_rms_norm(x, r, w, 1e-6, backend="triton")
    (3 * h).sum().backward()
    assert w.grad is None
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    torch.testing.assert_close(r.grad, torch.full_like(r, 3.0))


def test_llama_rule_is_transformers_llama_layer_code(rel_err):
    # Independent reference: the eager ops of LlamaDecoderLayer, `residual + attn_out` then its
    # LlamaRMSNorm. float32: the torch reference is bit-equal, the kernel within 1e-5 (its
    # mean-square sum runs in another order).
    x, r, w = (t.detach() for t in _inputs(torch.float32, seed=4, shape=(3, 7, HIDDEN)))
    norm = LlamaRMSNorm(HIDDEN, eps=1e-5)
    norm.weight.data.copy_(w)
    h_eager = r + x
    y_eager = norm(h_eager)
    y_ref, h_ref = fused_add_rms_norm_reference(x, r, w, 1e-5)
    assert torch.equal(y_ref, y_eager) and torch.equal(h_ref, h_eager)
    y, h = fused_add_rms_norm(x, r, w, 1e-5, backend="triton")
    assert torch.equal(h, h_eager) and rel_err(y, y_eager) < 1e-6
    # bf16: the reference (what runs on CPU) keeps eager's roundings (x_hat rounded to bf16,
    # then the bf16 product) and is bit-equal too. The interpreted kernel is only close: Triton's
    # CPU interpreter truncates float32 -> bf16 where a GPU rounds to nearest.
    xb, rb, wb = x.bfloat16(), r.bfloat16(), w.bfloat16()
    norm_b = norm.to(torch.bfloat16)
    y_eager_b = norm_b(rb + xb)
    y_ref_b, h_ref_b = fused_add_rms_norm_reference(xb, rb, wb, 1e-5)
    assert torch.equal(y_ref_b, y_eager_b) and torch.equal(h_ref_b, rb + xb)
    y_b, _ = fused_add_rms_norm(xb, rb, wb, 1e-5, backend="triton")
    assert rel_err(y_b, y_eager_b) < 2e-2


def test_llama_rule_promotes_to_the_weight_dtype(rel_err):
    # A bf16 stream with an fp32 weight (transformers: weight * x_hat.to(bf16) is fp32).
    x, r, w = (t.detach() for t in _inputs(torch.bfloat16, seed=2))
    w32 = w.float()
    y, h = fused_add_rms_norm(x, r, w32, 1e-6, backend="triton")
    y_ref, _ = fused_add_rms_norm_reference(x, r, w32, 1e-6)
    assert y.dtype == torch.float32 and h.dtype == torch.bfloat16 and y_ref.dtype == y.dtype
    assert rel_err(y, y_ref) < 1e-2
    y_g, _ = fused_add_rms_norm(x, r, w32, 1e-6, casting="gemma", backend="triton")
    assert y_g.dtype == torch.bfloat16


def test_strided_rows_of_a_larger_tensor(rel_err, tol):
    # The attention output and residual as row-strided views (e.g. halves of one buffer).
    g = torch.Generator().manual_seed(5)
    big = torch.randn(2, 11, 2 * HIDDEN, generator=g, requires_grad=True)
    w = torch.randn(HIDDEN, generator=g)
    x, r = big[..., :HIDDEN], big[..., HIDDEN:]
    assert not x.is_contiguous()
    y, h = fused_add_rms_norm(x, r, w, 1e-6, backend="triton")
    (y.square().sum() + h.sum()).backward()
    bd = _f64(big)
    y_ref, h_ref = fused_add_rms_norm_reference(bd[..., :HIDDEN], bd[..., HIDDEN:], w.double())
    (y_ref.square().sum() + h_ref.sum()).backward()
    assert y.shape == (2, 11, HIDDEN) and rel_err(y, y_ref) < tol[torch.float32]
    assert rel_err(big.grad, bd.grad) < tol[torch.float32]


def test_wide_hidden_size_and_no_rows():
    x, r, w = torch.randn(3, 2500), torch.randn(3, 2500), torch.randn(2500)
    y, _h = fused_add_rms_norm(x, r, w, backend="triton")
    y_ref, _h_ref = fused_add_rms_norm_reference(x.double(), r.double(), w.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)
    empty = torch.randn(0, 7)
    y0, h0 = fused_add_rms_norm(empty, empty, torch.randn(7), backend="triton")
    assert y0.shape == h0.shape == (0, 7)


def test_forward_only_path_builds_no_graph():
    x, r, w = _inputs(torch.float32)
    with torch.no_grad():
        y, h = fused_add_rms_norm(x, r, w, backend="triton")
    assert y.grad_fn is None and h.grad_fn is None
    y_ref, h_ref = fused_add_rms_norm_reference(x.detach(), r.detach(), w.detach())
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)


def test_mismatched_inputs_are_a_clear_error():
    x, w = torch.randn(2, 5), torch.randn(5)
    with pytest.raises(ValueError, match="residual shape"):
        fused_add_rms_norm(x, torch.randn(2, 4), w)
    with pytest.raises(ValueError, match="residual dtype"):
        fused_add_rms_norm(x, x.bfloat16(), w)
    with pytest.raises(ValueError, match="disagree"):
        fused_add_rms_norm(x, x, torch.randn(4))
    with pytest.raises(ValueError, match="casting"):
        fused_add_rms_norm(x, x, w, casting="olmo")  # type: ignore[arg-type]


def test_kernels_are_built_for_the_interpreter_and_really_run(monkeypatch):
    module = importlib.import_module("fastmid.kernels.fused_add_rms_norm")
    lazy = [v for v in vars(module).values() if isinstance(v, LazyKernel)]
    assert len(lazy) == 2
    assert all(isinstance(k.build(), InterpretedFunction) for k in lazy)

    def refuse(*_a, **_k):
        raise AssertionError("the torch reference ran instead of the Triton kernel")

    monkeypatch.setattr(module, "fused_add_rms_norm_reference", refuse)
    x, r, w = _inputs(torch.float32)
    with use_backend("triton"):
        module.fused_add_rms_norm(x, r, w)


def test_without_triton_every_call_is_the_reference():
    # Triton hidden in a fresh interpreter (see tests/kernels/test_no_triton.py for why).
    script = textwrap.dedent(
        """
        import sys
        for name in ("triton", "triton.language", "triton.runtime"):
            sys.modules[name] = None
        import pytest, torch
        import fastmid.kernels as K
        x, r, w = torch.randn(3, 5, 11), torch.randn(3, 5, 11), torch.randn(11)
        g, u = torch.randn(4, 9), torch.randn(4, 9)
        pairs = [
            (lambda **b: K.fused_add_rms_norm(x, r, w, 1e-6, **b),
             lambda: K.fused_add_rms_norm_reference(x, r, w, 1e-6)),
            (lambda **b: K.geglu(g, u, **b), lambda: K.geglu_reference(g, u)),
        ]
        for op, ref in pairs:
            want = ref()
            got = op()
            same = (lambda a, b: all(torch.equal(p, q) for p, q in zip(a, b))
                    if isinstance(a, tuple) else torch.equal(a, b))
            assert same(got, want)
            with pytest.raises(K.KernelBackendError, match="not installed"):
                op(backend="triton")
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
