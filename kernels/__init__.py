"""fastmid.kernels: fused Triton ops with torch references.

Every op takes a ``backend`` argument (``"auto"`` | ``"triton"`` | ``"torch"``). ``"auto"``
dispatches to Triton for CUDA tensors when Triton is importable and to the torch reference
everywhere else; ``FASTMID_KERNELS=off`` forces the reference; :func:`use_backend` overrides
``"auto"`` inside a ``with`` block (tests use ``use_backend("triton")`` on CPU tensors under
``TRITON_INTERPRET=1``, which must be set before this package is imported).

Ops (one per module, each with its ``*_reference``):

* :func:`rms_norm` - RMSNorm, plain or Gemma ``(1 + w)``, optional fused residual add.
* :func:`swiglu` - ``silu(gate) * up``.
* :func:`rope` - rotary embedding of q and k (transformers' ``apply_rotary_pos_emb`` contract).
* :func:`linear_cross_entropy` - chunked ``lm_head`` + cross-entropy returning
  ``(loss_sum, n_supervised)``.

Ops know no model; patching transformers modules lives in ``fastmid.models.patching``.
"""

from ._dispatch import (
    Backend,
    KernelBackendError,
    interpreter_enabled,
    kernels_disabled_by_env,
    resolve_backend,
    triton_available,
    use_backend,
)
from .linear_cross_entropy import (
    default_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from .rms_norm import rms_norm, rms_norm_reference
from .rope import rope, rope_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "Backend",
    "KernelBackendError",
    "default_chunk_size",
    "interpreter_enabled",
    "kernels_disabled_by_env",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "resolve_backend",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
    "triton_available",
    "use_backend",
]
