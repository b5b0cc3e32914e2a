"""The label convention shared by the data pipeline and the loss.

``IGNORE_INDEX`` marks a position that is not trained (prompt, padding, an untrained turn). It is
PyTorch's ``cross_entropy`` default ``ignore_index`` and transformers' convention, so labels built
here work unchanged with ``model(input_ids, labels=labels)``.

Like :mod:`fastmid.errors`, this module imports nothing from fastmid: every layer may use it.
"""

from __future__ import annotations

IGNORE_INDEX: int = -100
