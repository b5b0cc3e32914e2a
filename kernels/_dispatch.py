"""Backend choice for every op in ``fastmid.kernels``: Triton or the torch reference.

Rules, in order:

1. An explicit ``backend="triton"`` or ``backend="torch"`` argument to an op wins.
2. Otherwise a :func:`use_backend` context (a ``ContextVar``, so it follows the current thread and
   task) wins; tests use it to drive a patched model through the Triton kernels on CPU tensors
   under ``TRITON_INTERPRET=1``.
3. Otherwise (``"auto"``): ``FASTMID_KERNELS=off`` (also ``0``/``false``/``no``) forces the torch
   reference; else Triton runs when it is importable and every tensor is on CUDA; else the torch
   reference runs.

Choosing Triton where Triton is not installed, or for CPU tensors without ``TRITON_INTERPRET=1``
in the environment, raises :class:`KernelBackendError` with what to change rather than failing
deep inside Triton.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import Literal

import torch

from ._triton import HAS_TRITON, KernelBackendError, interpreter_enabled

Backend = Literal["auto", "triton", "torch"]
_BACKENDS = ("auto", "triton", "torch")
_OFF_VALUES = {"off", "0", "false", "no"}

_forced: contextvars.ContextVar[Backend] = contextvars.ContextVar("fastmid_kernels_backend")


def triton_available() -> bool:
    """True when Triton imported (the guarded import in :mod:`fastmid.kernels._triton`)."""
    return HAS_TRITON


def kernels_disabled_by_env() -> bool:
    """True when ``FASTMID_KERNELS`` is ``off``/``0``/``false``/``no`` (case-insensitive)."""
    return os.environ.get("FASTMID_KERNELS", "").strip().lower() in _OFF_VALUES


@contextlib.contextmanager
def use_backend(backend: Backend) -> Iterator[None]:
    """Make every op called inside the ``with`` block use ``backend`` unless the call names one.

    Args:
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: unknown backend name.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    token = _forced.set(backend)
    try:
        yield
    finally:
        _forced.reset(token)


def resolve_backend(backend: Backend, *tensors: torch.Tensor) -> Literal["triton", "torch"]:
    """The backend an op call runs on (see the module docstring for the rules).

    Args:
        backend: the op's ``backend`` argument.
        tensors: the op's tensor inputs (their devices decide ``"auto"``).

    Returns:
        ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: unknown backend name.
        KernelBackendError: Triton requested but not importable, or requested for CPU tensors
            without ``TRITON_INTERPRET=1`` in the environment.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = _forced.get("auto")
    if backend == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        if kernels_disabled_by_env() or not triton_available() or not on_cuda:
            return "torch"
        return "triton"
    # Explicit "triton".
    if not triton_available():
        raise KernelBackendError(
            "backend='triton' requested but triton is not installed (it is Linux-only); use "
            "backend='torch' or 'auto', which run the torch reference"
        )
    if not on_cuda and not interpreter_enabled():
        raise KernelBackendError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment (Triton's "
            "CPU interpreter, for tests); use backend='torch' or move the tensors to CUDA"
        )
    return "triton"
