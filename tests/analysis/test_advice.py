"""Band advice rule and depth pattern on hand-made per-layer metrics."""

from __future__ import annotations

import math

import pytest

from fastmid.analysis.advice import depth_pattern, recommend_band
from fastmid.analysis.results import LayerMetrics


def rows_with_change(change: list[float]) -> list[LayerMetrics]:
    L = len(change)
    return [
        LayerMetrics(index=i, depth_fraction=(i + 1) / L, cka_debiased=1.0 - c)
        for i, c in enumerate(change)
    ]


def test_band_ends_where_change_reaches_half_its_maximum():
    # 10 layers: default band [2, 8); change small, then jumps at layer 7.
    change = [0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.6, 0.8, 1.0]
    adv = recommend_band(rows_with_change(change))
    assert (adv.start, adv.end, adv.fallback) == (2, 7, False)
    assert adv.indices == [2, 3, 4, 5, 6]
    assert adv.metric == "1 - cka_debiased" and "layer 7" in adv.reason
    assert adv.normalized_change[-1] == 1.0


def test_last_layer_always_stays_out_and_threshold_is_used():
    change = [0.0] * 9 + [0.1]  # never reaches tau before the last layer
    adv = recommend_band(rows_with_change(change), threshold=0.5)
    assert (adv.start, adv.end) == (2, 9)
    strict = recommend_band(
        rows_with_change([0.0, 0.1, 0.2, 0.25, 0.35, 0.4, 0.5, 0.6, 0.7, 1.0]), 0.3
    )
    assert strict.end == 4  # 0.35 / 1.0 >= 0.3


def test_fallbacks():
    high_early = recommend_band(rows_with_change([0.9, 1.0, 0.9, 0.8, 0.9, 1.0]))
    assert high_early.fallback and (high_early.start, high_early.end) == (1, 5)
    none = recommend_band([LayerMetrics(index=i, depth_fraction=0.0) for i in range(5)])
    assert none.fallback and none.metric is None
    zero = recommend_band(rows_with_change([0.0] * 5))
    assert zero.fallback
    with pytest.raises(ValueError, match="threshold"):
        recommend_band(rows_with_change([0.1] * 5), threshold=0.0)


def test_grad_norm_is_used_without_a_tuned_model():
    rows = [
        LayerMetrics(index=i, depth_fraction=0.0, grad_norm=g)
        for i, g in enumerate([1, 1, 1, 1, 9, 10])
    ]
    adv = recommend_band(rows)
    assert adv.metric == "grad_norm" and (adv.start, adv.end) == (1, 4)


def test_depth_pattern_means():
    change = [0.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.5, 0.7]  # band [2, 8), end [8, 10)
    pat = depth_pattern(rows_with_change(change))
    m = pat["metrics"]["1 - cka_debiased"]
    assert m["middle"] == pytest.approx(0.1) and m["end"] == pytest.approx(0.6)
    assert m["ratio"] == pytest.approx(6.0) and m["stable_middle_sensitive_end"]
    assert "weight_change" not in pat["metrics"]  # NaN everywhere: not reported
    assert pat["end_layers"] == [8, 9] and not math.isnan(m["ratio"])
