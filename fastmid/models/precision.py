"""Precision policies: the dtypes of the weights, of what trains, of the compute and of the export.

``--precision`` (design section 4; README "Precision"):

=============  ============  =============  ==================  ============  ==============
policy         frozen        trained        compute             gradients     ``final/``
=============  ============  =============  ==================  ============  ==============
``fp32``       fp32          fp32           fp32                fp32          fp32
``bf16-master`` bf16         fp32 master    bf16 autocast       fp32          bf16
``bf16``       bf16          bf16           bf16                bf16          bf16
=============  ============  =============  ==================  ============  ==============

Under ``bf16-master`` each matmul casts the fp32 band weight to bf16 (``torch.autocast`` caches the
copy for the forward and backward of a step); the optimizer updates the fp32 master, so small
updates accumulate. Under ``bf16`` there is no master: the optimizer computes the update in fp32
and writes it back into the bf16 weight with stochastic rounding (torchao's optimizers,
``bf16_stochastic_round=True``), which keeps the expected value of every update; plain
round-to-nearest would drop each update smaller than half a bf16 step of the weight (about
``2^-9 |w|``), so :func:`fastmid.config.validate` refuses the optimizers that cannot round
stochastically. The loss is computed in fp32 under every policy (:mod:`fastmid.models.loss`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrecisionPolicy:
    """The dtypes of one ``--precision`` mode.

    Attributes:
        name: ``fp32``, ``bf16-master`` or ``bf16`` (resolved; not ``auto``).
        weight_dtype: the dtype the model is loaded in (every frozen weight).
        trained_dtype: the dtype of the trainable parameters (and so of their gradients and of
            the band tensors in checkpoints).
        autocast_dtype: ``torch.autocast`` dtype around forward passes, or None for none.
        export_dtype: the dtype of ``final/`` (``save_pretrained``), the model's dtype in the run.
    """

    name: str
    weight_dtype: torch.dtype
    trained_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    export_dtype: torch.dtype

    @classmethod
    def from_name(cls, name: str) -> PrecisionPolicy:
        """The policy of a resolved ``--precision`` value.

        Raises:
            ValueError: ``name`` is not ``fp32``, ``bf16-master`` or ``bf16`` (``auto`` is resolved
                by :func:`fastmid.config.resolve_precision` first).
        """
        if name not in POLICIES:
            raise ValueError(f"--precision: '{name}' is not one of {', '.join(POLICIES)}")
        return POLICIES[name]

    def cast_trainable(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Give the trainable parameters :attr:`trained_dtype` (in place; before the optimizer
        is built, so its state follows)."""
        for p in params:
            if p.dtype != self.trained_dtype:
                p.data = p.data.to(self.trained_dtype)

    @contextlib.contextmanager
    def autocast(self, device: torch.device) -> Iterator[None]:
        """``torch.autocast`` on ``device`` with :attr:`autocast_dtype`; nothing when None."""
        if self.autocast_dtype is None:
            yield
            return
        with torch.autocast(device_type=device.type, dtype=self.autocast_dtype):
            yield


POLICIES: dict[str, PrecisionPolicy] = {
    "fp32": PrecisionPolicy("fp32", torch.float32, torch.float32, None, torch.float32),
    "bf16-master": PrecisionPolicy(
        "bf16-master", torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16
    ),
    "bf16": PrecisionPolicy("bf16", torch.bfloat16, torch.bfloat16, None, torch.bfloat16),
}
