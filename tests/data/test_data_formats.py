"""Formats -> the internal message schema; detection; malformed rows."""

from __future__ import annotations

import pytest

from fastmid.data import DataError, detect_format
from fastmid.data.formats import row_to_conversation
from fastmid.data.schema import BadRowError, RowOrigin
from fastmid.data.sharegpt import CLEANUP_COUNTERS

ORIGIN = RowOrigin("file.jsonl", 7)


def convert(row, fmt):
    counts = dict.fromkeys(CLEANUP_COUNTERS, 0)
    return row_to_conversation(row, fmt, ORIGIN, counts)


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


@pytest.mark.parametrize(
    ("columns", "rows", "expected"),
    [
        (["messages"], [], "messages"),
        (["conversations"], [{"conversations": [{"from": "human", "value": "x"}]}], "sharegpt"),
        (["conversations"], [{"conversations": [{"role": "user", "content": "x"}]}], "messages"),
        (["instruction", "input", "output"], [], "alpaca"),
        (["prompt", "completion"], [], "prompt-completion"),
        (["question", "answer"], [], "gsm8k"),
        (["text", "meta"], [], "text"),
    ],
)
def test_detect_format_from_columns(columns, rows, expected):
    assert detect_format(columns, rows, "src") == expected


def test_detect_format_unknown_columns_names_source_and_columns():
    with pytest.raises(DataError, match=r"my\.csv.*\['a', 'b'\].*--format"):
        detect_format(["a", "b"], [], "my.csv")


def test_messages_format_keeps_messages_and_strips_whitespace():
    row = {
        "messages": [
            {"role": "system", "content": " be brief "},
            {"role": "user", "content": "hi\n"},
            {"role": "assistant", "content": "  hello"},
        ]
    }
    conv = convert(row, "messages")
    assert conv.messages == msgs(("system", "be brief"), ("user", "hi"), ("assistant", "hello"))
    assert conv.origin == ORIGIN and not conv.is_text


def test_sharegpt_format_maps_speakers():
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert convert(row, "sharegpt").messages == msgs(("user", "q"), ("assistant", "a"))


def test_alpaca_with_and_without_input_and_system():
    row = {"instruction": "Add.", "input": "2 and 3", "output": "5", "system": "math"}
    assert convert(row, "alpaca").messages == msgs(
        ("system", "math"), ("user", "Add.\n\n2 and 3"), ("assistant", "5")
    )
    row = {"instruction": "Say hi.", "input": "", "output": "hi"}
    assert convert(row, "alpaca").messages == msgs(("user", "Say hi."), ("assistant", "hi"))


def test_prompt_completion_strings_and_message_lists():
    row = {"prompt": "2+2?", "completion": " 4"}
    assert convert(row, "prompt-completion").messages == msgs(("user", "2+2?"), ("assistant", "4"))
    row = {
        "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        "completion": [{"role": "assistant", "content": "a"}],
    }
    assert convert(row, "prompt-completion").messages == msgs(
        ("system", "s"), ("user", "u"), ("assistant", "a")
    )


def test_gsm8k_format():
    row = {"question": "1+1?", "answer": "1+1=2\n#### 2"}
    assert convert(row, "gsm8k").messages == msgs(("user", "1+1?"), ("assistant", "1+1=2\n#### 2"))


def test_text_format_keeps_raw_text():
    conv = convert({"text": "  raw text  "}, "text")
    assert conv.is_text and conv.text == "  raw text  " and conv.messages == []


@pytest.mark.parametrize(
    ("row", "fmt", "kind"),
    [
        ({"other": 1}, "messages", "missing_column"),
        ({"question": "q"}, "gsm8k", "missing_column"),
        ({"messages": "not a list"}, "messages", "wrong_type"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages", "wrong_type"),
        ({"instruction": ["x"], "output": "y"}, "alpaca", "wrong_type"),
        ({"messages": []}, "messages", "empty_conversation"),
        ({"text": "   "}, "text", "empty_conversation"),
        ({"messages": msgs(("robot", "x"), ("assistant", "y"))}, "messages", "unknown_role"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "unknown_role"),
        (
            {"messages": msgs(("user", "q"), ("assistant", "a"), ("assistant", "b"))},
            "messages",
            "consecutive_assistant",
        ),
        (
            {"messages": msgs(("user", "q"), ("system", "s"), ("assistant", "a"))},
            "messages",
            "misplaced_system",
        ),
        ({"messages": msgs(("assistant", "a"), ("user", "q"))}, "messages", "leading_assistant"),
        ({"messages": msgs(("user", "q"))}, "messages", "no_assistant_turn"),
    ],
)
def test_malformed_rows_raise_with_kind_and_row(row, fmt, kind):
    with pytest.raises(BadRowError) as info:
        convert(row, fmt)
    assert info.value.kind == kind
    assert info.value.origin == ORIGIN
    message = str(info.value)
    assert "file.jsonl, row 8" in message and "--skip-bad-rows" in message


def test_unknown_format_name_is_a_clear_error():
    with pytest.raises(DataError, match="--format 'chatml'"):
        convert({"text": "x"}, "chatml")
