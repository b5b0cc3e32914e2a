"""Tokenization progress of large data: a rich bar on a terminal, plain lines in a log, nothing
for small data or without a console."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from rich.console import Console

from fastmid.config import TrainConfig
from fastmid.data import build_sft_examples, inspect_data
from fastmid.data import pipeline as pipeline_module

ANSI = "\x1b["
# "tokenizing --data 20/200 elapsed 0:00:00 ETA 0:00:01" (the ETA is left off at 0 done)
PLAIN = re.compile(r"^tokenizing --data (\d+)/(\d+) elapsed \d+:\d\d:\d\d( ETA \d+:\d\d:\d\d)?$")


@pytest.fixture
def small_threshold(monkeypatch: pytest.MonkeyPatch) -> int:
    """Progress from 100 conversations on, so the tests tokenize hundreds, not 10,000."""
    monkeypatch.setattr(pipeline_module, "PROGRESS_MIN_CONVERSATIONS", 100)
    return 100


def _console(terminal: bool) -> tuple[Console, StringIO]:
    out = StringIO()
    return Console(file=out, force_terminal=terminal, width=120), out


def _qa_rows(n: int, long_every: int = 0) -> list[dict]:
    """``n`` one-turn conversations; with ``long_every``, every such row has a 400-word answer."""
    rows = []
    for i in range(n):
        answer = "word " * 400 if long_every and i % long_every == 0 else f"answer {i}"
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows


def test_the_default_threshold_keeps_the_default_run_quiet():
    # fastmid train's default 2,000 examples tokenize in about a second: no progress for them.
    assert TrainConfig().max_examples == 2000
    assert pipeline_module.PROGRESS_MIN_CONVERSATIONS == 10_000


def test_a_log_gets_a_plain_line_per_tenth_and_one_at_the_end(
    small_threshold, smol_tokenizer, write_rows
):
    path = write_rows("chat.jsonl", _qa_rows(200))
    console, out = _console(terminal=False)
    examples, _ = build_sft_examples(str(path), smol_tokenizer, console=console)
    assert len(examples) == 200
    lines = out.getvalue().splitlines()
    assert ANSI not in out.getvalue()
    assert all(PLAIN.match(line) for line in lines), lines
    done = [int(PLAIN.match(line).group(1)) for line in lines]
    # chunks of 64 conversations cross the 20-conversation steps at 64, 128, 192; then the end
    assert done == [64, 128, 192, 200]
    assert {PLAIN.match(line).group(2) for line in lines} == {"200"}
    assert " ETA " in lines[0]


def test_a_terminal_gets_the_rich_bar_not_plain_lines(small_threshold, smol_tokenizer, write_rows):
    path = write_rows("chat.jsonl", _qa_rows(200))
    console, out = _console(terminal=True)
    build_sft_examples(str(path), smol_tokenizer, console=console)
    text = out.getvalue()
    assert ANSI in text and "tokenizing --data" in text and "━" in text
    assert "elapsed" not in text  # the plain lines' word; the bar shows only the clock


@pytest.mark.parametrize("terminal", [False, True])
def test_small_data_and_no_console_stay_quiet(
    small_threshold, smol_tokenizer, write_rows, terminal
):
    path = write_rows("chat.jsonl", _qa_rows(99))
    console, out = _console(terminal)
    build_sft_examples(str(path), smol_tokenizer, console=console)
    assert out.getvalue() == ""
    # a large source of which max_examples keeps fewer than the threshold is small work
    path = write_rows("big.jsonl", _qa_rows(300))
    build_sft_examples(str(path), smol_tokenizer, max_examples=99, console=console)
    assert out.getvalue() == ""
    build_sft_examples(str(path), smol_tokenizer)  # console=None: the default shows nothing
    assert out.getvalue() == ""


def test_a_binding_max_examples_counts_kept_examples(small_threshold, smol_tokenizer):
    console, out = _console(terminal=False)
    examples, _ = build_sft_examples(
        "builtin:arith", smol_tokenizer, max_examples=150, console=console
    )
    assert len(examples) == 150
    lines = out.getvalue().splitlines()
    assert [PLAIN.match(line).group(1, 2) for line in lines] == [
        ("64", "150"),
        ("128", "150"),
        ("150", "150"),
    ]


def test_a_capped_source_that_runs_dry_ends_its_progress_where_it_stopped(
    small_threshold, smol_tokenizer, write_rows
):
    # 240 rows, every second one too long for --truncation drop: 120 examples of 200 wanted
    path = write_rows("half.jsonl", _qa_rows(240, long_every=2))
    console, out = _console(terminal=False)
    examples, stats = build_sft_examples(
        str(path),
        smol_tokenizer,
        max_examples=200,
        max_seq_len=128,
        truncation="drop",
        console=console,
    )
    assert len(examples) == 120 and sum(stats.dropped.values()) == 120
    last = PLAIN.match(out.getvalue().splitlines()[-1])
    assert last is not None and last.group(1, 2) == ("120", "120")


def test_data_inspect_shows_the_progress_of_large_data(small_threshold, smol_tokenizer):
    console, out = _console(terminal=False)
    inspect_data("builtin:arith", smol_tokenizer, n=0, max_examples=120, console=console)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("tokenizing --data 64/120 elapsed")
    assert any(line.startswith("tokenizing --data 120/120") for line in lines)
