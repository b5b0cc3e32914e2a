"""Packing rows: best-fit decreasing, the packed batch's positions, labels and masks."""

from __future__ import annotations

import re

import pytest
import torch

from fastmid.data import DataError, collate_packed, pack_rows, packing_stats
from fastmid.labels import IGNORE_INDEX


def test_best_fit_decreasing_by_hand() -> None:
    """6, 5, 4, 3, 2 into rows of 10: 6 opens row A (4 left), 5 opens row B (5 left), 4 fits A
    best (exactly), 3 goes to B (2 left), 2 fills B: two full rows (the optimum)."""
    rows = pack_rows([6, 5, 4, 3, 2], 10, seed=0)
    assert sorted(sorted(r) for r in rows) == [[0, 2], [1, 3, 4]]


def test_every_example_once_and_rows_fit() -> None:
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 65, (500,), generator=gen).tolist()
    rows = pack_rows(lengths, 64, seed=7)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    lower = -(-sum(lengths) // 64)  # no packing can use fewer rows
    assert lower <= len(rows) <= 1.1 * lower + 1
    assert pack_rows(lengths, 64, seed=7) == rows  # reproducible
    assert pack_rows(lengths, 64, seed=8) != rows  # the seed orders ties and rows


def test_too_long_example_is_refused() -> None:
    with pytest.raises(DataError, match="example 1 has 9 tokens"):
        pack_rows([3, 9], 8)


def test_collate_packed_positions_labels_masks() -> None:
    a = {"input_ids": [1, 2, 3], "labels": [-100, 12, 13]}
    b = {"input_ids": [4, 5], "labels": [14, 15]}
    c = {"input_ids": [6, 7, 8, 9], "labels": [16, 17, 18, 19]}
    batch = collate_packed([[a, b], [c]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    ignore = IGNORE_INDEX
    # the first label of every example is never trained (it would be predicted across examples)
    assert batch["labels"].tolist() == [[ignore, 12, 13, ignore, 15], [ignore, 17, 18, 19, ignore]]


def test_packing_stats_by_hand() -> None:
    stats = packing_stats([6, 5, 4, 3, 2], 10, micro_batch=2, seed=0)
    assert (stats.rows, stats.tokens, stats.fill_ratio) == (2, 20, 1.0)
    assert stats.padded_tokens_packed == 20  # one micro-batch of two full rows
    # unpacked: 3 micro-batches of (2, 2, 1) examples, each padded to its longest
    assert stats.padded_tokens_unpacked >= 20


@pytest.mark.realmodel
def test_data_inspect_shows_packing(smol_tokenizer) -> None:
    """`data inspect --packing` prints rows, fill ratio and the padding packing saves; the rows
    and the real tokens agree with packing the examples by hand here."""
    from io import StringIO

    from rich.console import Console

    from fastmid.data import build_sft_examples, inspect_data

    out = StringIO()
    inspect_data(
        "builtin:arith",
        smol_tokenizer,
        max_seq_len=512,
        n=0,
        max_examples=200,
        packing=True,
        micro_batch=8,
        console=Console(file=out, width=80),
    )
    text = out.getvalue()
    examples, _ = build_sft_examples(
        "builtin:arith", smol_tokenizer, max_seq_len=512, max_examples=200, shuffle_seed=0
    )
    lengths = [len(e["input_ids"]) for e in examples]
    rows = pack_rows(lengths, 512)
    assert "--packing: rows of 512 tokens" in text
    shown = re.search(r"│ rows\s*│\s*([\d,]+) │", text)
    assert shown is not None and int(shown.group(1).replace(",", "")) == len(rows), text
    assert f"{sum(lengths):,}" in text
    assert "padding saved" in text and "fill ratio" in text
