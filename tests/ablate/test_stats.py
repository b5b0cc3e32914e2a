"""The ablation's statistics on hand-computed cases: Holm's adjustment, bootstrap intervals,
the paired bootstrap p-value, seed averaging and the comparison sentences."""

from __future__ import annotations

import numpy as np
import pytest

from fastmid.ablate.report import compute_statistics, seed_averaged
from fastmid.ablate.stats import bootstrap_ci, holm, paired_bootstrap


def test_holm_step_down_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01 = 0.03; 2 x 0.03 = 0.06; max(0.06, 1 x 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # sorted .01 .02 .6 .9 -> .04, .06, min(1, 1.2) = 1, max(1, .9) = 1
    assert holm([0.9, 0.6, 0.01, 0.02]) == pytest.approx([1.0, 1.0, 0.04, 0.06])
    assert holm([0.4, 0.3]) == pytest.approx([0.6, 0.6])
    assert holm([0.5]) == [0.5] and holm([]) == []
    with pytest.raises(ValueError, match="p-values"):
        holm([1.5])


def test_bootstrap_of_identical_values_has_zero_width():
    assert bootstrap_ci([1.0, 1.0, 1.0], b=500) == (1.0, 1.0, 1.0)
    assert bootstrap_ci([0.5] * 10, b=500) == (0.5, 0.5, 0.5)


def test_bootstrap_interval_by_hand():
    # [0, 0, 0, 1]: a resample's mean is k/4, k ~ Binomial(4, 1/4): P(k <= 2) = 0.949,
    # P(k <= 3) = 0.996, so the 97.5% quantile is 3/4; P(k = 0) = 0.316 > 2.5%, so the 2.5% one is 0
    mean, lo, hi = bootstrap_ci([0, 0, 0, 1], b=20_000, seed=1)
    assert (mean, lo, hi) == (0.25, 0.0, 0.75)
    # [0, 1]: resampled means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4
    assert bootstrap_ci([0, 1], b=20_000) == (0.5, 0.0, 1.0)


def test_paired_difference_of_equal_correctness_is_zero_with_p_one():
    a = [1, 0, 1, 1, 0, 0.5]
    result = paired_bootstrap(a, a, resamples=1000)
    assert (result.difference, result.low, result.high, result.p) == (0.0, 0.0, 0.0, 1.0)


def test_paired_bootstrap_p_values_by_hand():
    # every difference 1: every resampled mean is 1, none as far from 1 as 1 is from 0
    result = paired_bootstrap([1, 1, 1, 1], [0, 0, 0, 0], resamples=999)
    assert (result.difference, result.low, result.high) == (1.0, 1.0, 1.0)
    assert result.p == pytest.approx(1 / 1000)
    # d = [1, 0]: mean 1/2; |mean* - 1/2| >= 1/2 when mean* is 0 or 1: probability 1/2
    result = paired_bootstrap([1, 0], [0, 0], resamples=20_000, seed=3)
    assert result.p == pytest.approx(0.5, abs=0.015)
    assert (result.low, result.high) == (0.0, 1.0)
    # d = [1, 0, 0, 0]: mean 1/4; |k/4 - 1/4| >= 1/4 for k = 0 or k >= 2 (k ~ Bin(4, 1/4)):
    # 0.3164 + 0.2109 + 0.0469 + 0.0039 = 0.5781
    result = paired_bootstrap([1, 0, 0, 0], [0, 0, 0, 0], resamples=20_000, seed=4)
    assert result.p == pytest.approx(0.5781, abs=0.015)
    assert paired_bootstrap([0, 0, 0, 1], [1, 0, 0, 0], resamples=10).difference == 0.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same problems"):
        paired_bootstrap([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_ci([1, 0], b=0)


def test_seed_averaged_correctness():
    assert seed_averaged([[1, 0, 1], [1, 1, 0]]).tolist() == [1.0, 0.5, 0.5]
    assert seed_averaged([[True, False]]).tolist() == [1.0, 0.0]


def test_comparisons_against_mid_with_holm_and_sentences():
    n = 20
    rows = [
        {"arm": "base", "correct": [[0] * n]},
        {"arm": "mid", "correct": [[1] * n, [1] * n]},
        {"arm": "early", "correct": [[1] * n]},
        {"arm": "late", "correct": []},  # every seed diverged: no comparison
    ]
    comps = compute_statistics(rows, resamples=999, seed=0)
    assert [c["other"] for c in comps] == ["base", "early"]
    base, early = comps
    # mid - base: every difference 1, p = 1/1000; Holm over two comparisons doubles it
    assert base["difference"] == 1.0 and base["p"] == pytest.approx(1 / 1000)
    assert base["p_holm"] == pytest.approx(2 / 1000) and base["distinguishable"]
    assert "mid is better than base, distinguishable from zero" in base["sentence"]
    assert early["difference"] == 0.0 and early["p_holm"] == 1.0 and not early["distinguishable"]
    assert "not distinguishable from zero at this size (20 test problems" in early["sentence"]
    assert rows[1]["accuracy_mean"] == 1.0 and rows[1]["ci95"] == [1.0, 1.0]
    assert rows[1]["vs_mid"] is None and rows[2]["vs_mid"]["p_holm"] == 1.0
    assert rows[3]["accuracy_mean"] is None and rows[3]["vs_mid"] is None
    assert np.isclose(rows[0]["accuracy_mean"], 0.0)
    # no mid: intervals, but no comparison
    assert compute_statistics([{"arm": "early", "correct": [[1, 0]]}], resamples=10) == []
