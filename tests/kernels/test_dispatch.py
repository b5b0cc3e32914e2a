"""Backend resolution: Triton only on CUDA (or when forced), FASTMID_KERNELS=off, the context;
and the kernel tests really run Triton (interpreted) rather than the torch references."""

from __future__ import annotations

import importlib

import pytest
import torch
from fastmid.kernels import (
    KernelBackendError,
    cka_block_stats,
    linear_cross_entropy,
    resolve_backend,
    rms_norm,
    rms_norm_reference,
    rope,
    swiglu,
    use_backend,
)
from fastmid.kernels._triton import LazyKernel
from triton.runtime.interpreter import InterpretedFunction

OP_MODULES = ("rms_norm", "swiglu", "rope", "linear_cross_entropy", "cka_stats")


def test_auto_uses_the_reference_for_cpu_tensors():
    assert resolve_backend("auto", torch.zeros(1)) == "torch"


def test_explicit_and_context_choices(monkeypatch):
    x = torch.zeros(1)
    assert resolve_backend("triton", x) == "triton"  # interpreter is on in these tests
    assert resolve_backend("torch", x) == "torch"
    with use_backend("triton"):
        assert resolve_backend("auto", x) == "triton"
        assert resolve_backend("torch", x) == "torch"  # an explicit argument still wins
    assert resolve_backend("auto", x) == "torch"


def test_env_off_forces_the_reference_for_auto(monkeypatch):
    monkeypatch.setenv("FASTMID_KERNELS", "off")
    assert resolve_backend("auto", torch.zeros(1)) == "torch"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", torch.zeros(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("fast"):  # type: ignore[arg-type]
            pass


def test_triton_without_interpreter_on_cpu_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelBackendError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.zeros(1))


def test_reference_and_triton_agree_through_the_context():
    x, w = torch.randn(5, 11), torch.randn(11)
    with use_backend("triton"):
        y = rms_norm(x, w)
    torch.testing.assert_close(y, rms_norm_reference(x, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", OP_MODULES)
def test_every_kernel_is_built_for_the_interpreter(name):
    # TRITON_INTERPRET=1 is set only in the root tests/conftest.py; the kernel tests mean nothing
    # on this CPU machine unless every kernel compiles to Triton's interpreter.
    module = importlib.import_module(f"fastmid.kernels.{name}")
    kernels = [v for v in vars(module).values() if isinstance(v, LazyKernel)]
    assert kernels, f"{name} defines no kernel with fastmid.kernels._triton.jit"
    for kernel in kernels:
        assert isinstance(kernel.build(), InterpretedFunction), kernel.__name__


def _call(name: str) -> tuple[str, object]:
    """(name of the op's torch reference, a call of the op on small odd CPU inputs)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    if name == "rms_norm":
        x, w = rand(5, 11), rand(11)
        return "rms_norm_reference", lambda: rms_norm(x, w)
    if name == "swiglu":
        gate, up = rand(4, 9), rand(4, 9)
        return "swiglu_reference", lambda: swiglu(gate, up)
    if name == "rope":
        q, k, cos, sin = rand(2, 3, 7, 10), rand(2, 1, 7, 10), rand(2, 7, 10), rand(2, 7, 10)
        return "rope_reference", lambda: rope(q, k, cos, sin)
    if name == "linear_cross_entropy":
        h, lm, labels = rand(6, 11), rand(13, 11), torch.tensor([1, 0, 12, 3, -100, 7])
        return "linear_cross_entropy_reference", lambda: linear_cross_entropy(h, lm, labels)
    x, y = rand(9, 4), rand(9, 3)
    return "cka_block_stats_reference", lambda: cka_block_stats(x, y, x.mean(0), y.mean(0))


@pytest.mark.parametrize("name", OP_MODULES)
def test_use_backend_triton_runs_the_kernel_not_the_reference(name, monkeypatch):
    reference, call = _call(name)
    module = importlib.import_module(f"fastmid.kernels.{name}")

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError(f"{reference} ran instead of the Triton kernel")

    monkeypatch.setattr(module, reference, refuse)
    with use_backend("triton"):
        assert resolve_backend("auto", torch.zeros(1)) == "triton"
        call()
