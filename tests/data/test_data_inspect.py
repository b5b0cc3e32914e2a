"""The `fastmid data inspect` report."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from fastmid.data import inspect_data
from fastmid.data.inspect import label_runs


@pytest.mark.realmodel
def test_inspect_builtin_prints_counts_stats_and_masked_examples(smol_tokenizer):
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, color_system=None)
    stats = inspect_data(
        "builtin:arith", smol_tokenizer, max_seq_len=512, n=2, max_examples=30, console=console
    )
    out = buffer.getvalue()
    for needle in ("format", "gsm8k", "examples kept", "truncated", "dropped", "p50", "p95"):
        assert needle in out
    assert out.count("example 0:") == 1 and "example 1:" in out and "example 2:" not in out
    assert stats.kept == 30


def test_label_runs_split_trained_and_untrained_text(toy_tokenizer):
    tokenizer = toy_tokenizer()
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    labels = [-100] * (len(ids) - 1) + [ids[-1]]
    runs = label_runs(ids, labels, tokenizer)
    assert "".join(text for text, _ in runs) == "hello world"
    assert runs[-1][1] is True and all(not trained for _, trained in runs[:-1])
