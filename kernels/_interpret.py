"""Run this package's Triton kernels under Triton's CPU interpreter (for tests on machines without
a GPU).

Triton decides at decoration time whether ``@triton.jit`` builds a GPU ``JITFunction`` or an
interpreted function, from ``TRITON_INTERPRET``. A test process may import ``fastmid.kernels``
(through another test module) before the kernel tests set the variable; :func:`enable_interpreter`
then sets it and re-executes the op modules so that their kernels are rebuilt for the interpreter.
Functions already imported elsewhere (``fastmid.kernels.rms_norm`` ...) look the kernels up in
their module's globals at call time, so they pick up the rebuilt ones.
"""

from __future__ import annotations

import importlib
import os
import sys

_OP_MODULES = (
    "fastmid.kernels.rms_norm",
    "fastmid.kernels.swiglu",
    "fastmid.kernels.rope",
    "fastmid.kernels.linear_cross_entropy",
)


def _has_compiled_kernels(module: object) -> bool:
    from triton.runtime.jit import JITFunction

    return any(isinstance(v, JITFunction) for v in vars(module).values())


def enable_interpreter() -> list[str]:
    """Set ``TRITON_INTERPRET=1`` and rebuild already-imported op modules' kernels for it.

    Returns:
        Names of the modules that were re-executed (empty when none had GPU-built kernels).

    Raises:
        ImportError: triton is not installed.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    reloaded = []
    for name in _OP_MODULES:
        module = sys.modules.get(name)
        if module is not None and _has_compiled_kernels(module):
            importlib.reload(module)
            reloaded.append(name)
    return reloaded
