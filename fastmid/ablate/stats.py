"""Statistics of ``fastmid ablate``: bootstrap intervals over problems, the paired bootstrap test,
Holm's step-down correction.

The unit of resampling is the test problem: every arm answers the same problems, so the arms'
scores are paired by problem. Each arm's seeds are first averaged per problem (the seed-averaged
correctness ``c_i``, in [0, 1]); its accuracy is ``mean_i c_i`` (= the mean of the per-seed
accuracies), and the difference of two arms is ``mean_i (c_i^A - c_i^B)``.

* :func:`bootstrap_ci`: percentile bootstrap interval of a mean (Efron & Tibshirani 1993, "An
  Introduction to the Bootstrap", ch. 13): draw ``n`` problems with replacement ``B`` times, take
  the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled means.
* :func:`paired_bootstrap`: the same interval for the mean paired difference ``d_i``, and a
  two-sided p-value for "mean difference = 0" from the bootstrap distribution recentred on the
  null (Efron & Tibshirani 1993, sec. 16.4; the ``+1`` terms as in Davison & Hinkley 1997,
  "Bootstrap Methods and their Application", eq. 4.11, so that ``p > 0``):
  ``p = (1 + #{b : |mean*_b - mean| >= |mean|}) / (1 + B)``; when every ``d_i`` is 0 it is 1.
* :func:`holm`: Holm (1979), "A simple sequentially rejective multiple test procedure", Scand.
  J. Statist. 6:65-70: with the ``m`` p-values sorted ascending, ``p_(j)`` becomes
  ``max_{k <= j} min(1, (m - k + 1) p_(k))``.

Resampling uses ``numpy.random.default_rng(seed)``, so every number is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fastmid.ablate.defaults import DEFAULT_BOOTSTRAP

DEFAULT_CONFIDENCE = 0.95
# Resampled means are computed this many resamples at a time (memory: chunk x n indices).
_CHUNK = 1_000


def _as_vector(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-d sequence, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} must be finite")
    return x


def _check(b: int, confidence: float) -> None:
    if b < 1:
        raise ValueError(f"the number of bootstrap resamples must be >= 1, got {b}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_means(
    values: Sequence[float] | np.ndarray, b: int = DEFAULT_BOOTSTRAP, seed: int = 0
) -> np.ndarray:
    """Means of ``b`` resamples (``n`` draws with replacement) of ``values``.

    Args:
        values: shape ``(n,)``, any finite floats (here: seed-averaged correctness in [0, 1]).
        b: resamples.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        float64 array of shape ``(b,)``.

    Raises:
        ValueError: empty, multi-dimensional or non-finite ``values``; ``b < 1``.
    """
    x = _as_vector(values, "values")
    _check(b, DEFAULT_CONFIDENCE)
    rng = np.random.default_rng(seed)
    out = np.empty(b, dtype=np.float64)
    for start in range(0, b, _CHUNK):
        size = min(_CHUNK, b - start)
        idx = rng.integers(0, x.size, size=(size, x.size))
        out[start : start + size] = x[idx].mean(axis=1)
    return out


def _interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    b: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile bootstrap interval.

    Args:
        values: shape ``(n,)``: one number per problem (seed-averaged correctness, in [0, 1]).
        b: resamples (default 10,000).
        seed: resampling seed.
        confidence: interval coverage (default 0.95).

    Returns:
        ``(mean, low, high)``, same units as ``values`` (a fraction for correctness). Identical
        values give ``low == mean == high``.

    Raises:
        ValueError: as :func:`bootstrap_means`; ``confidence`` outside (0, 1).
    """
    _check(b, confidence)
    x = _as_vector(values, "values")
    lo, hi = _interval(bootstrap_means(x, b, seed), confidence)
    return float(x.mean()), lo, hi


@dataclass(frozen=True)
class PairedResult:
    """A paired comparison of two arms over the same problems.

    Attributes:
        difference: ``mean_i (a_i - b_i)`` (a fraction: 0.05 is 5 accuracy points).
        low, high: its percentile bootstrap interval.
        p: two-sided bootstrap p-value of "mean difference = 0" (unadjusted).
        n: problems.
    """

    difference: float
    low: float
    high: float
    p: float
    n: int


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    resamples: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> PairedResult:
    """Paired bootstrap over problems of the mean difference ``a - b``.

    Args:
        a, b: shape ``(n,)`` each, problem ``i`` in both at index ``i`` (seed-averaged
            correctness of two arms).
        resamples: bootstrap resamples ``B``.
        seed: resampling seed.
        confidence: interval coverage.

    Returns:
        :class:`PairedResult`; the p-value is ``(1 + #{|mean* - mean| >= |mean|}) / (1 + B)``
        (see the module docstring), 1 when every difference is 0.

    Raises:
        ValueError: shapes differ, or as :func:`bootstrap_ci`.
    """
    x, y = _as_vector(a, "a"), _as_vector(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired samples need the same problems: {x.size} vs {y.size}")
    _check(resamples, confidence)
    d = x - y
    mean = float(d.mean())
    means = bootstrap_means(d, resamples, seed)
    lo, hi = _interval(means, confidence)
    # Floating sums of the same values in another order differ in the last bits: compare with
    # a tolerance, so that resamples equal to the mean count as "at least as far" when mean = 0.
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    extreme = int(np.count_nonzero(np.abs(means - mean) >= abs(mean) - tol))
    p = (1 + extreme) / (1 + resamples)
    return PairedResult(mean, lo, hi, min(1.0, p), int(x.size))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``m`` p-values (family-wise error control).

    Args:
        pvalues: ``m >= 0`` p-values in [0, 1], in any order.

    Returns:
        Adjusted p-values in the input order: sorted ascending, ``p_(j)`` becomes
        ``max_{k <= j} min(1, (m - k + 1) p_(k))`` (1-based ``k``). E.g. ``[0.01, 0.04, 0.03]``
        gives ``[0.03, 0.06, 0.06]``.

    Raises:
        ValueError: a p-value outside [0, 1] or not finite.
    """
    p = [float(v) for v in pvalues]
    if any(not (0.0 <= v <= 1.0) for v in p):
        raise ValueError(f"p-values must be in [0, 1], got {p}")
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted
