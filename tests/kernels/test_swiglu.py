"""SwiGLU kernel (Triton, interpreted) against a float64 torch reference."""

from __future__ import annotations

import pytest
import torch
from fastmid.kernels import swiglu, swiglu_reference

ROWS, INTER = 37, 123


def _f64(t):
    return t.detach().double().requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradients_match_float64(dtype, rel_err, tol):
    g = torch.Generator().manual_seed(0)
    gate = (3 * torch.randn(ROWS, INTER, generator=g)).to(dtype).requires_grad_()
    up = torch.randn(ROWS, INTER, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(ROWS, INTER, generator=g)
    out = swiglu(gate, up, backend="triton")
    (out.float() * dy).sum().backward()
    gd, ud = _f64(gate), _f64(up)
    ref = swiglu_reference(gd, ud)
    (ref * dy.double()).sum().backward()
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol[dtype]
    assert rel_err(gate.grad, gd.grad) < tol[dtype]
    assert rel_err(up.grad, ud.grad) < tol[dtype]


def test_gradient_formula_against_autograd_of_silu(rel_err):
    # Independent check of the hand-written backward: torch autograd of F.silu in float64.
    g = torch.Generator().manual_seed(3)
    gate = torch.randn(5, 33, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 33, generator=g, dtype=torch.float64, requires_grad=True)
    (torch.nn.functional.silu(gate) * up).sum().backward()
    gate32 = gate.detach().float().requires_grad_()
    up32 = up.detach().float().requires_grad_()
    swiglu(gate32, up32, backend="triton").sum().backward()
    assert rel_err(gate32.grad, gate.grad) < 1e-5
    assert rel_err(up32.grad, up.grad) < 1e-5


def test_non_contiguous_halves_of_a_fused_projection(rel_err, tol):
    # gate/up as the two halves of one (rows, 2I) tensor: row stride 2I, unit column stride.
    g = torch.Generator().manual_seed(1)
    fused = torch.randn(2, ROWS, 2 * INTER, generator=g, requires_grad=True)
    gate, up = fused[..., :INTER], fused[..., INTER:]
    assert not gate.is_contiguous()
    swiglu(gate, up, backend="triton").square().sum().backward()
    fd = _f64(fused)
    swiglu_reference(fd[..., :INTER], fd[..., INTER:]).square().sum().backward()
    assert rel_err(fused.grad, fd.grad) < tol[torch.float32]


def test_wide_rows_use_several_column_blocks(rel_err):
    gate, up = torch.randn(3, 2500), torch.randn(3, 2500)  # > one 1024-wide block, ragged end
    assert (
        rel_err(swiglu(gate, up, backend="triton"), swiglu_reference(gate.double(), up.double()))
        < 1e-5
    )


def test_forward_only_path_builds_no_graph():
    gate = torch.randn(4, 9, requires_grad=True)
    up = torch.randn(4, 9, requires_grad=True)
    with torch.no_grad():
        out = swiglu(gate, up, backend="triton")
    assert out.grad_fn is None
    torch.testing.assert_close(out, swiglu_reference(gate.detach(), up.detach()))


def test_mismatched_inputs_are_a_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="dtype"):
        swiglu(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.bfloat16))
