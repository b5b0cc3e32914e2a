"""measure_layers / run_analysis on tiny random llama models: invariants of the whole pipeline."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from analysis_tiny import (
    batches,
    examples,
    perturbed_from,
    shim_build_sft_examples,
    shim_collate_batch,
    tiny_llama,
)
from rich.console import Console
from tiny import save_tiny, tiny_model

import fastmid.data
from fastmid.analysis.analyze import (
    AnalysisError,
    measure_layers,
    plan_layer_groups,
    run_analysis,
    take_token_budget,
)
from fastmid.analysis.capture import layer_outputs


@pytest.fixture(scope="module")
def models():
    base = tiny_llama(5)
    return base, perturbed_from(base, first_layer=3)


@pytest.fixture(scope="module")
def exs():
    return examples(9, seed=4)


def test_capture_matches_output_hidden_states(models):
    base, _ = models
    b = batches(examples(3), 3)[0]
    got = layer_outputs(base, b["input_ids"], b["attention_mask"], [0, 2])
    ref = base(**{k: b[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    # hidden_states[i + 1] is the output of decoder layer i (the last one is final-normed).
    assert set(got) == {0, 2}
    torch.testing.assert_close(got[0], ref.hidden_states[1])
    torch.testing.assert_close(got[2], ref.hidden_states[3])


def test_untouched_layers_are_identical_and_perturbed_ones_differ(models, exs):
    base, tuned = models
    rows, n = measure_layers(base, tuned, batches(exs, 4), backend="torch")
    assert n == sum(len(e["input_ids"]) for e in exs)
    for r in rows[:3]:
        assert r.cka_debiased == pytest.approx(1.0, abs=1e-9)
        assert r.cka_biased == pytest.approx(1.0, abs=1e-9)
        assert r.cosine == pytest.approx(1.0, abs=1e-9)
        assert r.entropy_tuned == pytest.approx(r.entropy_base, rel=1e-9)
        assert r.erank_tuned == pytest.approx(r.erank_base, rel=1e-9)
    for r in rows[3:]:
        assert r.cka_debiased < 0.999
    assert [r.depth_fraction for r in rows] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(0.0 < r.entropy_base <= 1.0 and r.erank_base >= 1.0 for r in rows)


def test_batching_padding_and_layer_groups_do_not_change_results(models, exs):
    base, tuned = models
    one, _ = measure_layers(base, tuned, batches(exs, 1), backend="torch")
    padded, _ = measure_layers(base, tuned, batches(exs, 4), backend="torch")
    grouped, _ = measure_layers(
        base, tuned, batches(exs, 4), memory_budget_bytes=1, backend="torch"
    )
    fields = ["cka_debiased", "cka_biased", "cosine", "entropy_base", "erank_tuned"]
    for a, b, c in zip(one, padded, grouped, strict=True):
        for f in fields:
            assert getattr(b, f) == pytest.approx(getattr(a, f), abs=2e-5), f
            assert getattr(c, f) == pytest.approx(getattr(b, f), abs=1e-12), f


def test_triton_backend_matches_torch(models, exs):
    base, tuned = models
    ref, _ = measure_layers(base, tuned, batches(exs[:4], 2), backend="torch")
    tri, _ = measure_layers(base, tuned, batches(exs[:4], 2), backend="triton")
    for a, b in zip(ref, tri, strict=True):
        assert b.cka_debiased == pytest.approx(a.cka_debiased, abs=1e-5)
        assert b.cka_biased == pytest.approx(a.cka_biased, abs=1e-5)


def test_mask_bos_and_single_model(models, exs):
    base, _ = models
    rows, n = measure_layers(base, None, batches(exs, 4), mask_bos=True)
    assert n == sum(len(e["input_ids"]) - 1 for e in exs)
    assert all(math.isnan(r.cka_debiased) and math.isnan(r.cosine) for r in rows)
    assert all(math.isfinite(r.entropy_base) for r in rows)


def test_depth_mismatch_is_refused(models):
    base, _ = models
    with pytest.raises(AnalysisError, match="same depth"):
        measure_layers(base, tiny_llama(3), batches(examples(2), 2))


def test_width_mismatch_is_refused_naming_both_sizes(models):
    base, _ = models
    wider = tiny_model(
        "llama",
        seed=0,
        vocab_size=base.config.vocab_size,
        num_hidden_layers=base.config.num_hidden_layers,
        hidden_size=48,
        max_position_embeddings=64,
    ).eval()
    with pytest.raises(AnalysisError, match=r"--base has hidden size 32 but --tuned has 48"):
        measure_layers(base, wider, batches(examples(2), 2))


def test_token_budget_is_exact_and_truncates_the_last_example():
    exs = [{"input_ids": [1] * 10, "labels": [1] * 10} for _ in range(5)]
    chosen = take_token_budget(exs, 25, mask_bos=False)
    assert [len(e["input_ids"]) for e in chosen] == [10, 10, 5]
    chosen = take_token_budget(exs, 25, mask_bos=True)  # 9 analysed tokens per example
    assert [len(e["input_ids"]) for e in chosen] == [10, 10, 8]
    assert plan_layer_groups(5, 10, 25) == [[0, 1], [2, 3], [4]]
    assert plan_layer_groups(3, 100, 1) == [[0], [1], [2]]


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory, smol_tokenizer):
    """Tiny llama models with the SmolLM2 tokenizer, saved as HF folders (base, tuned)."""
    tok = smol_tokenizer
    root = tmp_path_factory.mktemp("models")
    base = tiny_llama(4)
    base.config.vocab_size = len(tok)
    base.resize_token_embeddings(len(tok))
    tuned = perturbed_from(base, first_layer=2)
    return [str(save_tiny(root / name, m, tok)) for name, m in (("base", base), ("tuned", tuned))]


@pytest.fixture
def data_api(monkeypatch):
    """The real fastmid.data API when it exists, else the local shim."""
    if not hasattr(fastmid.data, "build_sft_examples"):
        monkeypatch.setattr(
            fastmid.data, "build_sft_examples", shim_build_sft_examples, raising=False
        )
        monkeypatch.setattr(fastmid.data, "collate_batch", shim_collate_batch, raising=False)


def test_run_analysis_writes_report(model_folders, data_api, tmp_path):
    base, tuned = model_folders
    console = Console(record=True, width=160)
    result = run_analysis(
        base,
        tuned,
        "builtin:arith",
        max_tokens=300,
        max_seq_len=64,
        batch_size=4,
        grad_norms=True,
        output_dir=tmp_path / "out",
        console=console,
        device="cpu",
    )
    assert result.n_tokens == 300
    doc = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert len(doc["layers"]) == 4
    assert doc["current_band"] == [1, 2]  # [rhu(0.8), rhu(3.2)) for L = 4
    assert doc["recommended_band"]["rule"] and doc["recommended_band"]["threshold"] == 0.5
    layers = doc["layers"]
    assert layers[0]["cka_debiased"] == pytest.approx(1.0, abs=1e-9)
    assert layers[0]["weight_change"] == 0.0 and layers[3]["weight_change"] > 0.0
    assert all(row["grad_norm"] > 0 for row in layers)
    with (tmp_path / "out" / "analysis.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[2]["cka_debiased"]) < 1.0
    assert (tmp_path / "out" / "analysis.png").stat().st_size > 10_000
    text = console.export_text()
    assert "recommended band" in text and "CKA deb" in text


def test_run_analysis_single_model_and_bad_flags(model_folders, data_api, tmp_path):
    base, _ = model_folders
    result = run_analysis(
        base,
        None,
        "builtin:arith",
        max_tokens=120,
        max_seq_len=64,
        batch_size=4,
        output_dir=None,
        device="cpu",
    )
    assert result.files == {}
    assert all(math.isnan(r.cka_debiased) and math.isfinite(r.entropy_base) for r in result.layers)
    assert result.advice.fallback and result.advice.metric is None
    with pytest.raises(AnalysisError, match="--max-tokens"):
        run_analysis(base, None, "builtin:arith", max_tokens=0, output_dir=None)
    with pytest.raises(AnalysisError, match="--entropy-tokens"):
        run_analysis(base, None, "builtin:arith", entropy_tokens=1, output_dir=None)


def test_layer_parallel_workers_give_the_serial_results(models, exs):
    base, tuned = models
    serial, _ = measure_layers(base, tuned, batches(exs, 4), workers=1)
    parallel, _ = measure_layers(base, tuned, batches(exs, 4), workers=2)
    for a, b in zip(serial, parallel, strict=True):
        for field in ("cka_debiased", "cka_biased", "cosine", "entropy_base", "erank_tuned"):
            assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-9, abs=1e-12)


def test_non_finite_activations_name_the_layer_and_model(models, exs):
    from fastmid.analysis.metrics import MetricsError

    base, tuned = models
    broken = perturbed_from(base, first_layer=5)  # an exact copy, then one NaN weight
    with torch.no_grad():
        broken.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(MetricsError, match="layer 2: the base model's output holds NaN"):
        measure_layers(broken, tuned, batches(exs, 4))
    with pytest.raises(MetricsError, match="layer 2: the tuned model's output holds NaN"):
        measure_layers(base, broken, batches(exs, 4))
    with pytest.raises(MetricsError, match="layer 2: the model's output holds NaN"):
        measure_layers(broken, None, batches(exs, 4))


def test_memory_plan_counts_each_workers_temporaries(models, exs):
    from fastmid.analysis.analyze import layer_state_bytes, worker_temp_bytes

    base, tuned = models
    bs = batches(exs, 4)
    tokens = max(int(b["input_ids"].numel()) for b in bs)
    h = int(base.config.hidden_size)
    per_layer = layer_state_bytes(h, h, tokens, True)
    budget = 2 * per_layer + 2 * worker_temp_bytes(h, h, tokens, True)
    steps = []
    measure_layers(
        base,
        tuned,
        bs,
        memory_budget_bytes=budget,
        workers=2,
        on_batch=lambda done, total: steps.append(total),
    )
    assert steps[-1] == 3 * len(bs)  # 5 layers in groups of 2: 3 groups
    steps.clear()
    measure_layers(
        base,
        tuned,
        bs,
        memory_budget_bytes=budget,
        workers=1,
        on_batch=lambda done, total: steps.append(total),
    )
    assert steps[-1] == 2 * len(bs)  # one worker's temporaries less: 3 layers fit per group
