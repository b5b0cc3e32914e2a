"""Band advice: which middle block to tune, read off per-layer change under SFT.

The rule (also written into ``analysis.json``):

1. Per-layer change ``m_i``: ``1 - CKA_debiased(i)`` when a tuned model is given (how far SFT
   moved layer i's output representations); otherwise the gradient norm of the SFT loss at the
   base model (``--grad-norms``); with neither, no advice beyond the default band.
2. Normalize: ``c_i = max(m_i, 0) / max_j max(m_j, 0)``.
3. The band starts at the default start ``round_half_up(0.2 L)`` (the paper's early layers keep
   general features; output change cannot single them out because it accumulates with depth).
4. It ends before the first layer ``e >= start`` whose change reaches ``tau``: ``c_e >= tau``
   (default ``tau = 0.5``: half the largest change), and never includes the last layer
   (``e <= L - 1``). These are the "sensitive final layers" of the paper.
5. If ``e == start`` (the change is already high at the band start: no stable middle), or the
   metric is missing or all zero, the default band ``[rhu(0.2 L), rhu(0.8 L))`` is kept and the
   advice is marked as a fallback.

The depth pattern (``depth_pattern``) compares the mean change inside the default band with the
mean over the final layers ``[rhu(0.8 L), L)``; the paper (Zhao et al. 2026) reports a stable
middle and a sensitive end, i.e. a ratio ``end / middle`` well above 1 (``PATTERN_RATIO = 2``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fastmid.analysis.results import BandAdvice, LayerMetrics
from fastmid.models.band import BandPlan, round_half_up

DEFAULT_THRESHOLD = 0.5
DEFAULT_START = 0.2
DEFAULT_END = 0.8
PATTERN_RATIO = 2.0

RULE = (
    "change m_i = 1 - CKA_debiased (or the base gradient norm without --tuned); "
    "c_i = m_i / max_j m_j; band = [round_half_up(0.2 L), e) where e is the first layer >= the "
    "start with c_e >= tau, capped at L - 1 so the last layer stays frozen; if e equals the start "
    "or no metric exists, keep the default band [round_half_up(0.2 L), round_half_up(0.8 L))"
)


def default_band(num_hidden_layers: int) -> list[int]:
    """Indices of the default Mid-Block band ``[rhu(0.2 L), rhu(0.8 L))`` (design.md section 3).

    Raises:
        BandError: the band is empty (a model with very few layers).
    """
    return list(BandPlan.from_fractions(num_hidden_layers, DEFAULT_START, DEFAULT_END).indices)


def change_metric(rows: Sequence[LayerMetrics]) -> tuple[str | None, list[float]]:
    """The per-layer change the rule uses: ``("1 - cka_debiased", ...)``, ``("grad_norm", ...)``
    or ``(None, [])`` when neither was measured."""
    cka = [1.0 - r.cka_debiased for r in rows]
    if rows and all(math.isfinite(v) for v in cka):
        return "1 - cka_debiased", cka
    grads = [r.grad_norm for r in rows]
    if rows and all(math.isfinite(v) for v in grads):
        return "grad_norm", grads
    return None, []


def recommend_band(
    rows: Sequence[LayerMetrics], threshold: float = DEFAULT_THRESHOLD
) -> BandAdvice:
    """Apply the module's rule to per-layer metrics.

    Args:
        rows: one :class:`LayerMetrics` per decoder layer, in order.
        threshold: tau in (0, 1].

    Returns:
        :class:`BandAdvice`.

    Raises:
        ValueError: ``threshold`` outside (0, 1]; no rows.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"band advice threshold must be in (0, 1], got {threshold}")
    L = len(rows)
    if L == 0:
        raise ValueError("band advice needs at least one layer")
    default = default_band(L)
    start, default_end = default[0], default[-1] + 1
    metric, values = change_metric(rows)

    def fallback(reason: str, norm: list[float]) -> BandAdvice:
        return BandAdvice(start, default_end, metric, threshold, RULE, reason, True, norm)

    if metric is None:
        return fallback("no change metric (pass --tuned or --grad-norms): default band", [])
    clipped = [max(v, 0.0) for v in values]
    top = max(clipped)
    if top <= 0.0:
        return fallback(f"{metric} is zero on every layer: default band", [0.0] * L)
    norm = [v / top for v in clipped]
    found = next((i for i in range(start, L) if norm[i] >= threshold), None)
    end = L - 1 if found is None else min(found, L - 1)
    if end <= start:
        return fallback(
            f"{metric} already reaches {threshold:g} of its maximum at layer {start}: "
            "no stable middle found, default band kept",
            norm,
        )
    if found is None:
        reason = f"normalized {metric} stays below {threshold:g}; the last layer stays frozen"
    else:
        reason = f"normalized {metric} first reaches {threshold:g} at layer {found}"
    return BandAdvice(start, end, metric, threshold, RULE, reason, False, norm)


def depth_pattern(rows: Sequence[LayerMetrics]) -> dict[str, Any]:
    """Mean change inside the default band vs in the final layers, per available metric.

    Metrics: ``1 - cka_debiased``, ``1 - cosine``, ``weight_change`` and ``grad_norm``. For each:
    ``middle`` = mean over ``[rhu(0.2 L), rhu(0.8 L))``, ``end`` = mean over ``[rhu(0.8 L), L)``,
    ``ratio = end / middle`` and ``stable_middle_sensitive_end = ratio >= PATTERN_RATIO`` (2).

    Returns:
        ``{"ratio_threshold": 2.0, "metrics": {name: {...}}}``; a metric is absent when any layer
        lacks it.
    """
    L = len(rows)
    middle = default_band(L)
    tail = list(range(round_half_up(DEFAULT_END * L), L))
    series = {
        "1 - cka_debiased": [1.0 - r.cka_debiased for r in rows],
        "1 - cosine": [1.0 - r.cosine for r in rows],
        "weight_change": [r.weight_change for r in rows],
        "grad_norm": [r.grad_norm for r in rows],
    }
    out: dict[str, Any] = {}
    for name, values in series.items():
        if not tail or not all(math.isfinite(v) for v in values):
            continue
        mid = sum(values[i] for i in middle) / len(middle)
        end = sum(values[i] for i in tail) / len(tail)
        ratio = end / mid if mid > 0 else math.inf
        out[name] = {
            "middle": mid,
            "end": end,
            "ratio": ratio,
            "stable_middle_sensitive_end": bool(ratio >= PATTERN_RATIO),
        }
    return {
        "ratio_threshold": PATTERN_RATIO,
        "middle_layers": middle,
        "end_layers": tail,
        "metrics": out,
    }
