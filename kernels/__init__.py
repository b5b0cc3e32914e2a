"""fastmid.kernels: fused Triton ops with torch references.

Every op takes a ``backend`` argument (``"auto"`` | ``"triton"`` | ``"torch"``). ``"auto"``
dispatches to Triton for CUDA tensors when Triton is importable and to the torch reference
everywhere else; ``FASTMID_KERNELS=off`` forces the reference; :func:`use_backend` overrides
``"auto"`` inside a ``with`` block (tests use ``use_backend("triton")`` on CPU tensors under
``TRITON_INTERPRET=1``, Triton's CPU interpreter).

Triton is imported guarded and every kernel compiles at its first launch
(:mod:`fastmid.kernels._triton`), so this package imports where Triton is absent (macOS) and every
op runs its torch reference there.

Ops (one per module, each with its ``*_reference``):

* :func:`rms_norm` - RMSNorm, plain or Gemma ``(1 + w)``, optional fused residual add.
* :func:`fused_add_rms_norm` - ``h = x + residual`` and RMSNorm of ``h`` with a family's own
  roundings (``casting="llama"`` or ``"gemma"``): the frozen decoder layer's add + norm.
* :func:`swiglu` - ``silu(gate) * up``.
* :func:`geglu` - ``gelu_tanh(gate) * up`` (Gemma's MLP).
* :func:`rope` - rotary embedding of q and k (transformers' ``apply_rotary_pos_emb`` contract).
* :func:`linear_cross_entropy` - chunked ``lm_head`` + cross-entropy returning
  ``(loss_sum, n_supervised)``.
* :func:`cka_block_stats` - the sufficient statistics of linear CKA for one token block, and the
  streaming accumulation into a running augmented Gram (:func:`prepare_cka_block`,
  :func:`accumulate_cka_block`: Triton on CUDA, BLAS ``dsyrk`` on CPU).

Ops know no model; patching transformers modules lives in ``fastmid.models.patching``.

This folder is the top-level ``kernels/`` of a checkout, installed as ``fastmid.kernels``. When a
checkout's root is on ``sys.path`` (``python -m pytest``, ``python -c`` or a notebook started
there), ``import kernels`` would find this folder instead of the PyPI package ``kernels``, which
transformers (5.25 on) imports. Imported under that name, this module hands the import over to
the installed package, so both can live side by side.
"""

import sys as _sys

if __name__ != "fastmid.kernels":  # imported as top-level `kernels` from a checkout's root
    import importlib.util as _util
    from importlib.machinery import PathFinder as _PathFinder
    from pathlib import Path as _Path

    _root = _Path(__file__).resolve().parent.parent
    _elsewhere = [p for p in _sys.path if _Path(p or ".").resolve() != _root]
    _spec = _PathFinder.find_spec(__name__, _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _installed = _util.module_from_spec(_spec)
        # The import system returns sys.modules[name] once this body ends: the installed package.
        _sys.modules[__name__] = _installed
        _spec.loader.exec_module(_installed)
    # Without an installed package this module stays a second name for fastmid.kernels' API
    # (transformers < 5.25 imports it while probing, finds no version and leaves it unused).

from fastmid.kernels._dispatch import (
    Backend,
    KernelBackendError,
    interpreter_enabled,
    kernels_disabled_by_env,
    resolve_backend,
    triton_available,
    use_backend,
)
from fastmid.kernels.cka_stats import (
    CKABlock,
    CKABlockStats,
    CKAPath,
    CKAStatsError,
    accumulate_cka_block,
    augmented_gram_triton,
    augmented_rows,
    augmented_width,
    cka_accumulation_path,
    cka_block_stats,
    cka_block_stats_reference,
    cka_block_stats_triton,
    gram_to_stats,
    new_running_gram,
    prepare_cka_block,
    syrk_accumulate,
)
from fastmid.kernels.fused_add_rms_norm import fused_add_rms_norm, fused_add_rms_norm_reference
from fastmid.kernels.geglu import geglu, geglu_reference
from fastmid.kernels.linear_cross_entropy import (
    default_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from fastmid.kernels.rms_norm import rms_norm, rms_norm_reference
from fastmid.kernels.rope import rope, rope_reference
from fastmid.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "Backend",
    "CKABlock",
    "CKABlockStats",
    "CKAPath",
    "CKAStatsError",
    "KernelBackendError",
    "accumulate_cka_block",
    "augmented_gram_triton",
    "augmented_rows",
    "augmented_width",
    "cka_accumulation_path",
    "cka_block_stats",
    "cka_block_stats_reference",
    "cka_block_stats_triton",
    "default_chunk_size",
    "fused_add_rms_norm",
    "fused_add_rms_norm_reference",
    "geglu",
    "geglu_reference",
    "gram_to_stats",
    "interpreter_enabled",
    "kernels_disabled_by_env",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "new_running_gram",
    "prepare_cka_block",
    "resolve_backend",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
    "syrk_accumulate",
    "triton_available",
    "use_backend",
]
