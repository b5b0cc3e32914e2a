"""Backend resolution: Triton only on CUDA (or when forced), FASTMID_KERNELS=off, the context."""

from __future__ import annotations

import sys

import pytest
import torch
from fastmid.kernels import (
    KernelBackendError,
    resolve_backend,
    rms_norm,
    rms_norm_reference,
    use_backend,
)
from fastmid.kernels._interpret import enable_interpreter


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


def test_enable_interpreter_leaves_interpreted_kernels_alone():
    assert enable_interpreter() == []  # already interpreted: nothing to rebuild
    module = sys.modules["fastmid.kernels.rms_norm"]
    assert type(module._rms_norm_fwd_kernel).__name__ == "InterpretedFunction"


def test_reference_and_triton_agree_through_the_context():
    x, w = torch.randn(5, 11), torch.randn(11)
    with use_backend("triton"):
        y = rms_norm(x, w)
    torch.testing.assert_close(y, rms_norm_reference(x, w), rtol=1e-5, atol=1e-6)
