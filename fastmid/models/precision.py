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
updates accumulate. The masters hold the weights files' own values (:func:`restore_stored_values`),
not the bf16-rounded ones the model was loaded with: a master that starts exactly on the bf16 grid
hides every update smaller than half a bf16 step from the forward pass (the autocast copy rounds
it back to the same value) until updates of one sign add up past it, while a master off the grid
crosses a rounding boundary for a share of its elements proportional to the update. Measured on
the default run (SmolLM2-135M, lr warming up to 5e-5 at step 1): the loss after the first step was
0.954 with masters from the bf16 load, 0.775 with masters from the files, 0.727 under ``fp32``.
Under ``bf16`` there is no master: the optimizer computes the update in fp32
and writes it back into the bf16 weight with stochastic rounding (torchao's optimizers,
``bf16_stochastic_round=True``), which keeps the expected value of every update; plain
round-to-nearest would drop each update smaller than half a bf16 step of the weight (about
``2^-9 |w|``), so :func:`fastmid.config.validate` refuses the optimizers that cannot round
stochastically. The loss is computed in fp32 under every policy (:mod:`fastmid.models.loss`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

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


def restore_stored_values(params: Mapping[str, torch.nn.Parameter], folder: Path) -> int:
    """Copy the values the weights files store into ``params`` (fp32 masters loaded through a
    lower-precision model), so each master starts where the checkpoint is, not on the bf16 grid.

    Each name is looked up in ``folder``'s safetensors files (``model.safetensors.index.json``'s
    ``weight_map`` when present, else every ``*.safetensors``); a name the files do not hold (a
    LoRA adapter, a key the model class renames) or hold with another shape is left as it is, and
    so is one stored in bf16 (the load lost nothing). Tensors are
    read one at a time (``safe_open``), so the extra memory is one tensor.

    Args:
        params: parameter name (``model.named_parameters()``) -> parameter, e.g. the band's fp32
            masters under ``bf16-master``.
        folder: the Hugging Face folder the model was loaded from
            (:func:`fastmid.models.loading.weights_folder`).

    Returns:
        How many parameters were overwritten with their stored values.
    """
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files: dict[str, list[str]] = {}
        for name in params:
            if name in weight_map:
                files.setdefault(weight_map[name], []).append(name)
    else:
        files = {f.name: list(params) for f in sorted(folder.glob("*.safetensors"))}
    restored: set[str] = set()
    for file, names in files.items():
        with safe_open(str(folder / file), framework="pt") as handle:
            keys = set(handle.keys())
            for name in names:
                if name in restored or name not in keys:
                    continue
                p = params[name]
                stored = handle.get_slice(name)
                if stored.get_dtype() == "BF16" or tuple(stored.get_shape()) != tuple(p.shape):
                    continue
                with torch.no_grad():
                    p.copy_(handle.get_tensor(name).to(p.dtype))
                restored.add(name)
    return len(restored)
