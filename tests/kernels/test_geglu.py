"""GeGLU kernel (Triton, interpreted) against a float64 torch reference and Gemma's eager MLP."""

from __future__ import annotations

import importlib

import pytest
import torch
from fastmid.kernels import geglu, geglu_reference, use_backend
from fastmid.kernels._triton import LazyKernel
from transformers.activations import ACT2FN
from triton.runtime.interpreter import InterpretedFunction

ROWS, INTER = 37, 123


def _f64(t):
    return t.detach().double().requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradients_match_float64(dtype, rel_err, tol):
    g = torch.Generator().manual_seed(0)
    gate = (3 * torch.randn(ROWS, INTER, generator=g)).to(dtype).requires_grad_()
    up = torch.randn(ROWS, INTER, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(ROWS, INTER, generator=g)
    out = geglu(gate, up, backend="triton")
    (out.float() * dy).sum().backward()
    gd, ud = _f64(gate), _f64(up)
    ref = geglu_reference(gd, ud)
    (ref * dy.double()).sum().backward()
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol[dtype]
    assert rel_err(gate.grad, gd.grad) < tol[dtype]
    assert rel_err(up.grad, ud.grad) < tol[dtype]


def test_gradient_formula_against_autograd_of_the_tanh_formula(rel_err):
    # Independent check of the hand-written backward: autograd of the written-out formula
    # (Hendrycks & Gimpel's tanh approximation) in float64, over a wide range including
    # saturation (|g| up to ~20).
    g = torch.Generator().manual_seed(3)
    gate = (6 * torch.randn(5, 33, generator=g, dtype=torch.float64)).requires_grad_()
    up = torch.randn(5, 33, generator=g, dtype=torch.float64, requires_grad=True)
    k0 = (2.0 / torch.pi) ** 0.5
    act = 0.5 * gate * (1 + torch.tanh(k0 * (gate + 0.044715 * gate**3)))
    (act * up).sum().backward()
    gate32 = gate.detach().float().requires_grad_()
    up32 = up.detach().float().requires_grad_()
    out = geglu(gate32, up32, backend="triton")
    out.sum().backward()
    assert rel_err(out, act * up) < 1e-5
    assert rel_err(gate32.grad, gate.grad) < 1e-5
    assert rel_err(up32.grad, up.grad) < 1e-5


def test_reference_is_gemmas_eager_activation():
    # transformers' "gelu_pytorch_tanh" (Gemma's hidden_activation) times up: bit-equal in fp32.
    g = torch.Generator().manual_seed(2)
    gate, up = torch.randn(4, 7, 19, generator=g), torch.randn(4, 7, 19, generator=g)
    eager = ACT2FN["gelu_pytorch_tanh"](gate) * up
    assert torch.equal(geglu_reference(gate, up), eager)
    torch.testing.assert_close(geglu(gate, up, backend="triton"), eager, rtol=1e-5, atol=1e-6)


def test_non_contiguous_halves_of_a_fused_projection(rel_err, tol):
    # gate/up as the two halves of one (rows, 2I) tensor: row stride 2I, unit column stride.
    g = torch.Generator().manual_seed(1)
    fused = torch.randn(2, ROWS, 2 * INTER, generator=g, requires_grad=True)
    gate, up = fused[..., :INTER], fused[..., INTER:]
    assert not gate.is_contiguous()
    geglu(gate, up, backend="triton").square().sum().backward()
    fd = _f64(fused)
    geglu_reference(fd[..., :INTER], fd[..., INTER:]).square().sum().backward()
    assert rel_err(fused.grad, fd.grad) < tol[torch.float32]


def test_wide_rows_use_several_column_blocks(rel_err):
    gate, up = torch.randn(3, 2500), torch.randn(3, 2500)  # > one 1024-wide block, ragged end
    ref = geglu_reference(gate.double(), up.double())
    assert rel_err(geglu(gate, up, backend="triton"), ref) < 1e-5


def test_forward_only_path_builds_no_graph():
    gate = torch.randn(4, 9, requires_grad=True)
    up = torch.randn(4, 9, requires_grad=True)
    with torch.no_grad():
        out = geglu(gate, up, backend="triton")
    assert out.grad_fn is None
    torch.testing.assert_close(out, geglu_reference(gate.detach(), up.detach()))


def test_mismatched_inputs_are_a_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        geglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="dtype"):
        geglu(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.bfloat16))


def test_kernels_are_built_for_the_interpreter_and_really_run(monkeypatch):
    module = importlib.import_module("fastmid.kernels.geglu")
    lazy = [v for v in vars(module).values() if isinstance(v, LazyKernel)]
    assert len(lazy) == 3  # forward, backward, and the tanh device function
    assert all(isinstance(k.build(), InterpretedFunction) for k in lazy)

    def refuse(*_a, **_k):
        raise AssertionError("the torch reference ran instead of the Triton kernel")

    monkeypatch.setattr(module, "geglu_reference", refuse)
    with use_backend("triton"):
        module.geglu(torch.randn(4, 9), torch.randn(4, 9))
