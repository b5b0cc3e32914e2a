"""The one way the op modules reach Triton: a guarded import and kernels compiled at first launch.

Triton is a Linux-with-GPU dependency; ``import fastmid.kernels`` must work without it (macOS), and
every op then runs its torch reference. So every op module follows one convention:

* ``from ._triton import jit, tl`` (plus :func:`cdiv` / :func:`next_power_of_2` for launch
  geometry): ``triton`` and ``tl`` are the modules, or None where Triton does not import. The
  module starts with ``from __future__ import annotations``, so a kernel's ``BLOCK: tl.constexpr``
  stays a string and nothing touches ``tl`` at import.
* Kernels and the device functions they call are decorated with :func:`jit`, not ``triton.jit``.
  It compiles nothing at import; ``kernel[grid](...)`` calls ``triton.jit`` at the first launch,
  once per value of ``TRITON_INTERPRET``. ``triton.jit`` chooses a GPU ``JITFunction`` or the CPU
  interpreter when it runs, so compiling late means that the interpreter switch (the tests set it
  in ``tests/conftest.py``) only has to precede the first launch, not the first import.
* Host code never touches ``triton``: the op's dispatcher (:mod:`fastmid.kernels._dispatch`)
  sends a call to Triton only when :data:`HAS_TRITON` is true.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from typing import Any

from fastmid.errors import FastmidError

try:
    import triton
    import triton.language as tl
except (
    ImportError
):  # pragma: no cover - exercised in a subprocess by tests/kernels/test_no_triton.py
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

HAS_TRITON = triton is not None


# Defined in this bottom module (re-exported by _dispatch and the package) because both an
# unlaunchable kernel here and the dispatcher raise it.
class KernelBackendError(FastmidError, RuntimeError):
    """The requested kernel backend cannot run here; the message says what to change."""


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set (Triton kernels then run on CPU tensors in numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b`` (``triton.cdiv``, without needing Triton)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` for ``n >= 1`` (0 for 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


class LazyKernel:
    """A Triton kernel (or device function) that :func:`jit` compiles at its first launch.

    ``kernel[grid](*args, **meta)`` launches it like a ``triton.jit`` kernel. :meth:`build` gives
    the compiled ``JITFunction`` (or ``InterpretedFunction`` under ``TRITON_INTERPRET=1``).

    Attributes:
        fn: the plain Python function holding the kernel's source.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._built: dict[bool, Any] = {}
        self.__name__ = fn.__name__
        self.__qualname__ = fn.__qualname__
        self.__doc__ = fn.__doc__
        self.__module__ = fn.__module__

    def build(self) -> Any:
        """The kernel compiled for the current ``TRITON_INTERPRET`` setting (built once for each).

        Raises:
            KernelBackendError: Triton is not installed.
        """
        mode = interpreter_enabled()
        kernel = self._built.get(mode)
        if kernel is None:
            if triton is None:
                raise KernelBackendError(
                    f"{self.__name__} is a Triton kernel but triton is not installed; use "
                    "backend='torch' (the ops' 'auto' backend already does)"
                )
            kernel = triton.jit(self._bound_function())
            self._built[mode] = kernel
        return kernel

    def _bound_function(self) -> Callable[..., Any]:
        # Triton finds a kernel's callees in the function's globals and accepts only compiled
        # ones there; the module's globals hold LazyKernels. The kernel is therefore compiled from
        # a copy of the function whose globals map each LazyKernel it names to the compiled
        # callee of the same TRITON_INTERPRET setting, leaving the module untouched.
        fn = self.fn
        namespace = dict(fn.__globals__)
        for name in fn.__code__.co_names:
            value = namespace.get(name)
            if isinstance(value, LazyKernel) and value is not self:
                namespace[name] = value.build()
        bound = types.FunctionType(
            fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__
        )
        # Triton reads tl.constexpr parameters from the annotations (and names from these).
        bound.__annotations__ = dict(fn.__annotations__)
        bound.__kwdefaults__ = fn.__kwdefaults__
        bound.__module__ = fn.__module__
        bound.__qualname__ = fn.__qualname__
        bound.__doc__ = fn.__doc__
        return bound

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        return self.build()[grid]


def jit(fn: Callable[..., Any]) -> LazyKernel:
    """Decorator for every Triton kernel and device function in ``fastmid.kernels``.

    Use it where ``@triton.jit`` would go; see the module docstring for why compiling waits for the
    first launch.
    """
    return LazyKernel(fn)
