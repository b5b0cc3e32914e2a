"""Plain result records of ``fastmid analyze``: one row per decoder layer plus run metadata."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerMetrics:
    """Every metric of one decoder layer (NaN where not computed; all dimensionless).

    Attributes:
        index: decoder-layer index ``i`` in ``[0, L)``.
        depth_fraction: ``(i + 1) / L``, the share of decoder layers applied to produce this
            layer's output.
        cka_debiased: linear CKA of base vs tuned outputs, unbiased HSIC (Song et al. 2012).
        cka_biased: linear CKA, biased HSIC (Kornblith et al. 2019).
        weight_change: relative Frobenius change of all the layer's weights.
        weight_change_attention: same, attention submodule only.
        weight_change_mlp: same, MLP only.
        weight_change_norm: same, norm weights only.
        cosine: mean over prompts of cos(mean-pooled base, mean-pooled tuned).
        entropy_base: mean normalized prompt matrix entropy, base model.
        entropy_tuned: same, tuned model.
        erank_base: mean prompt effective rank (Roy & Vetterli 2007), base model.
        erank_tuned: same, tuned model.
        grad_norm: L2 norm of the layer's gradient of the SFT loss at the base model.
    """

    index: int
    depth_fraction: float
    cka_debiased: float = math.nan
    cka_biased: float = math.nan
    weight_change: float = math.nan
    weight_change_attention: float = math.nan
    weight_change_mlp: float = math.nan
    weight_change_norm: float = math.nan
    cosine: float = math.nan
    entropy_base: float = math.nan
    entropy_tuned: float = math.nan
    erank_base: float = math.nan
    erank_tuned: float = math.nan
    grad_norm: float = math.nan

    @staticmethod
    def columns() -> list[str]:
        """Column names in CSV order."""
        return list(LayerMetrics.__dataclass_fields__)


@dataclass(frozen=True)
class BandAdvice:
    """A recommended band and how it was chosen.

    Attributes:
        start: first layer of the band.
        end: one past the last layer (the band is ``[start, end)``).
        metric: the per-layer change metric used (``1 - cka_debiased`` or ``grad_norm``), or
            ``None`` when none was available.
        threshold: the normalized-change threshold tau.
        rule: the rule in words (also written to ``analysis.json``).
        reason: what the rule found on this run (e.g. where the sensitive end starts, or why it
            fell back to the default band).
        fallback: True when the rule could not place the end and the default band was kept.
        normalized_change: ``c_i`` per layer (empty without a metric).
    """

    start: int
    end: int
    metric: str | None
    threshold: float
    rule: str
    reason: str
    fallback: bool
    normalized_change: list[float] = field(default_factory=list)

    @property
    def indices(self) -> list[int]:
        """Layer indices of the recommended band."""
        return list(range(self.start, self.end))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with ``indices`` and the fractions ``start / L``-style bounds."""
        d = asdict(self)
        d["indices"] = self.indices
        return d


@dataclass
class AnalysisResult:
    """Everything ``fastmid analyze`` measured.

    Attributes:
        layers: one :class:`LayerMetrics` per decoder layer.
        num_hidden_layers: ``L``.
        current_band: indices of the default Mid-Block band ``[rhu(0.2 L), rhu(0.8 L))``.
        advice: the recommended band.
        pattern: per metric, mean change inside the current band vs in the final layers.
        config: the inputs (model sources, data, token budget, flags).
        n_tokens: tokens every per-token metric saw (padding and masked positions excluded).
        n_prompts: prompts (examples) analysed.
        seconds: wall-clock seconds per phase (``load``, ``data``, ``stats``, ``grad_norms``,
            ``total``).
        files: paths written (``json``, ``csv``, ``png``), when an output folder was given.
    """

    layers: list[LayerMetrics]
    num_hidden_layers: int
    current_band: list[int]
    advice: BandAdvice
    pattern: dict[str, Any]
    config: dict[str, Any]
    n_tokens: int
    n_prompts: int
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN stays NaN; the JSON writer maps it to null)."""
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "current_band": self.current_band,
            "recommended_band": self.advice.to_dict(),
            "pattern": self.pattern,
            "config": self.config,
            "n_tokens": self.n_tokens,
            "n_prompts": self.n_prompts,
            "seconds": self.seconds,
            "files": self.files,
            "layers": [asdict(row) for row in self.layers],
        }
