"""`fastmid analyze`'s console table stays readable at 80 columns, piped (no colour)."""

from __future__ import annotations

import io

from rich.console import Console

from fastmid.analysis.report import print_table
from fastmid.analysis.results import AnalysisResult, BandAdvice, LayerMetrics


def _result(num_layers: int = 32) -> AnalysisResult:
    layers = [
        LayerMetrics(
            index=i,
            depth_fraction=(i + 1) / num_layers,
            cka_debiased=1.0 - 1.234e-4 * i,
            cka_biased=0.99876 - 1e-4 * i,
            weight_change=1.2345e-3 * (i + 1),
            weight_change_attention=1e-3,
            weight_change_mlp=2e-3,
            weight_change_norm=3e-4,
            cosine=0.999912 - 1e-5 * i,
            entropy_base=0.8123,
            entropy_tuned=0.8124,
            erank_base=123.456,
            erank_tuned=124.5,
            grad_norm=0.0123 * (i + 1),
        )
        for i in range(num_layers)
    ]
    advice = BandAdvice(
        start=6,
        end=26,
        metric="1 - cka_debiased",
        threshold=0.5,
        rule="r",
        reason="x",
        fallback=False,
    )
    return AnalysisResult(
        layers=layers,
        num_hidden_layers=num_layers,
        current_band=list(range(6, 26)),
        advice=advice,
        pattern={},
        config={},
        n_tokens=1000,
        n_prompts=10,
    )


def _print(result: AnalysisResult) -> str:
    buffer = io.StringIO()
    print_table(result, Console(width=80, no_color=True, file=buffer))
    return buffer.getvalue()


def test_key_columns_and_values_untruncated_at_80_columns():
    out = _print(_result())
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    header = next(line for line in out.splitlines() if line.lstrip().startswith("layer"))
    for name in ("layer", "CKA deb", "dW rel", "grad"):
        assert name in header
    assert "1.0000" in out and "0.9988" in out and "0.9962" in out  # debiased CKA, 4 decimals
    assert "0.00123" in out and "0.0395" in out  # weight change of layers 0 and 31
    assert "31 " in out and "25*" in out and "26 " in out  # every layer, the band marked


def test_other_metrics_go_to_a_second_table():
    out = _print(_result())
    assert "more per-layer metrics" in out
    for name in ("CKA bias", "H base", "H tuned", "erank b", "erank t"):
        assert name in out
    assert "0.9988" in out and "123" in out


def test_single_model_run_prints_only_what_it_has():
    result = _result(4)
    for row in result.layers:
        row.cka_debiased = row.cka_biased = row.weight_change = row.cosine = float("nan")
        row.grad_norm = float("nan")
    out = _print(result)
    assert "…" not in out and "CKA deb" not in out and "H base" in out
    assert "recommended band" in out
