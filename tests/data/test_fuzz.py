"""Fuzzing the row converters and the JSON/CSV readers (hypothesis).

Whatever a row or a file holds, fastmid either converts it or raises its own
:class:`~fastmid.data.DataError` (one line, naming the source): never a ``KeyError``,
``TypeError``, ``UnicodeDecodeError``, ``RecursionError`` or a traceback from a library.
``derandomize=True`` makes every run try the same examples, so CI failures reproduce.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmid.data import FORMATS, Conversation, DataError, detect_format
from fastmid.data.formats import has_empty_answer, ignored_fields, row_to_conversation
from fastmid.data.schema import ROLES, RowOrigin
from fastmid.data.sharegpt import CLEANUP_COUNTERS
from fastmid.data.sources import load_source

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

KEYS = [
    "messages",
    "conversations",
    "role",
    "content",
    "from",
    "value",
    "instruction",
    "input",
    "output",
    "prompt",
    "completion",
    "question",
    "answer",
    "text",
    "system",
    "name",
]
ROLE_NAMES = [*ROLES, "human", "gpt", "model", "bard", " User ", "wizard", ""]
# text of every kind, lone surrogates ("Cs") included: JSON's \ud800 escapes produce them
TEXT = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["", "  ", "\n", "#### 4", "hi", "\ud800", "a\udc80 b"]
)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
KEY = st.sampled_from(KEYS) | TEXT
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEY, inner, max_size=4),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(ROLE_NAMES) | VALUES,
        "content": TEXT | VALUES,
        "from": st.sampled_from(ROLE_NAMES) | VALUES,
        "value": TEXT | VALUES,
        "name": VALUES,
    },
)
MESSAGES = st.lists(MESSAGE | VALUES, max_size=5)
ANY_ROW = st.dictionaries(KEY, MESSAGES | VALUES, max_size=6)
# mostly strings, sometimes anything: most rows get past the type checks to the deeper rules
STRINGY = st.one_of(TEXT, TEXT, TEXT, VALUES)
TURN = st.one_of(*[TEXT] * 7, VALUES)  # a long conversation needs every turn to be text
ROLE = st.one_of(st.sampled_from(ROLE_NAMES), st.sampled_from(ROLE_NAMES), VALUES)
EXTRA = {"id": VALUES, "meta": VALUES, "system": STRINGY}


@st.composite
def turns(draw: st.DrawFn, role_key: str, content_key: str, names: tuple[str, str]) -> list[Any]:
    """An optional system turn, then user/assistant turns alternating, as real data has."""
    user, assistant = names
    pattern = [user, assistant] * draw(st.integers(1, 3))
    if draw(st.booleans()):
        pattern.insert(0, "system")
    optional = {"name": VALUES, "weight": VALUES}
    return [
        draw(st.fixed_dictionaries({role_key: st.just(role), content_key: TURN}, optional=optional))
        for role in pattern
    ]


def chat(role_key: str, content_key: str) -> st.SearchStrategy[list[Any]]:
    """Message lists: well-formed conversations, or mostly well-typed turns in any order, with
    stray keys and stray items."""
    message = st.fixed_dictionaries(
        {role_key: ROLE, content_key: STRINGY}, optional={"name": VALUES, "weight": VALUES}
    )
    names = ("user", "assistant") if role_key == "role" else ("human", "gpt")
    return st.one_of(
        turns(role_key, content_key, names),
        turns(role_key, content_key, names),
        st.lists(st.one_of(message, message, message, VALUES), max_size=6),
    )


def shaped(required: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(required, optional=EXTRA)


# rows shaped like each format, so that conversion gets past the missing-column check
FORMAT_ROWS = st.one_of(
    shaped({"messages": chat("role", "content")}),
    shaped({"conversations": chat("role", "content")}),
    shaped({"conversations": chat("from", "value")}),
    shaped({"conversations": chat("from", "value")}),  # ShareGPT's cleanup rules have most paths
    st.fixed_dictionaries(
        {"instruction": STRINGY, "output": STRINGY}, optional={"input": STRINGY, **EXTRA}
    ),
    shaped({"prompt": st.one_of(STRINGY, chat("role", "content")), "completion": STRINGY}),
    shaped({"prompt": STRINGY, "completion": chat("role", "content")}),
    shaped({"question": STRINGY, "answer": STRINGY}),
    shaped({"text": STRINGY}),
)
ROWS = st.one_of(ANY_ROW, FORMAT_ROWS, FORMAT_ROWS)

ORIGIN = RowOrigin("fuzz.jsonl", 0, line=1)


def check_conversation(conversation: Conversation | None) -> None:
    """What a converted row guarantees to the tokenizer."""
    if conversation is None:  # a ShareGPT conversation that cleanup left empty
        return
    assert conversation.origin == ORIGIN
    if conversation.is_text:
        assert isinstance(conversation.text, str) and conversation.text.strip()
        conversation.text.encode("utf-8")
        return
    messages = conversation.messages
    assert any(m["role"] == "assistant" for m in messages)
    for position, message in enumerate(messages):
        assert set(message) == {"role", "content"} and message["role"] in ROLES
        assert isinstance(message["content"], str)
        message["content"].encode("utf-8")  # a tokenizer can read it
        assert message["role"] != "system" or position == 0


@FUZZ
@given(row=ROWS)
def test_row_converters_convert_or_raise_data_error(row: dict[str, Any]) -> None:
    for fmt in FORMATS:
        counts = dict.fromkeys(CLEANUP_COUNTERS, 0)
        try:
            conversation = row_to_conversation(row, fmt, ORIGIN, counts)
        except DataError as err:
            assert "\n" not in str(err) and "fuzz.jsonl, line 1" in str(err)
        else:
            check_conversation(conversation)
            if conversation is not None:
                assert isinstance(has_empty_answer(conversation), bool)
        assert all(isinstance(name, str) for name in ignored_fields(row, fmt))
    try:
        assert detect_format(list(row), [row], "fuzz.jsonl") in FORMATS
    except DataError as err:
        assert "fuzz.jsonl" in str(err)


@FUZZ
@given(
    column=st.sampled_from(["messages", "conversations", "prompt", "completion"]),
    messages=MESSAGES,
    extra=ROWS,
)
def test_message_list_columns_convert_or_raise_data_error(
    column: str, messages: list[Any], extra: dict[str, Any]
) -> None:
    # rows built around one message-list column reach deeper into each converter than ROWS
    row = {**extra, column: messages}
    for fmt in ("messages", "sharegpt", "prompt-completion"):
        try:
            check_conversation(
                row_to_conversation(row, fmt, ORIGIN, dict.fromkeys(CLEANUP_COUNTERS, 0))
            )
        except DataError:
            pass


# fragments that steer random bytes into the readers' interesting paths
FRAGMENTS = st.sampled_from(
    [
        b"{",
        b"}",
        b"[",
        b"]",
        b'"',
        b",",
        b":",
        b"\n",
        b"\r\n",
        b" ",
        b'"question"',
        b'"answer"',
        b'"text"',
        b'"messages"',
        b"question,answer\n",
        b"null",
        b"1",
        b"\\u",
        b"\\ud800",
        b"\xe9",
        b"\xc3",
        b"\xef\xbb\xbf",
        b"\x00",
        b"\xff\xfe",
    ]
)


CSV_HEADERS = st.sampled_from(
    [["question", "answer"], ["instruction", "input", "output"], ["prompt", "completion"], ["text"]]
) | st.lists(TEXT, min_size=1, max_size=3)


@st.composite
def file_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, JSON-ish or CSV-ish fragments, or real JSON/CSV files, maybe damaged."""
    kind = draw(st.sampled_from(["random", "fragments", "json lines", "json array", "csv"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "fragments":
        return b"".join(draw(st.lists(FRAGMENTS | st.binary(max_size=3), max_size=40)))
    if kind == "csv":
        header = draw(CSV_HEADERS)
        width = st.integers(max(0, len(header) - 1), len(header) + 1)
        cells = st.lists(STRINGY.map(str), min_size=1, max_size=4)
        table = [header, *[draw(cells)[: draw(width)] for _ in range(draw(st.integers(0, 4)))]]
        out = io.StringIO()
        csv.writer(out).writerows(table)
        # surrogatepass writes lone surrogates as bytes that are not UTF-8
        data = out.getvalue().encode("utf-8", "surrogatepass")
    else:
        rows = draw(st.lists(ROWS, max_size=4))
        ascii_only = draw(st.booleans())
        if kind == "json lines":
            lines = [json.dumps(row, ensure_ascii=ascii_only) + "\n" for row in rows]
            data = "".join(lines).encode("utf-8", "surrogatepass")
        else:
            data = json.dumps(rows, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    if data and draw(st.booleans()):  # damage: cut, or splice in a fragment
        at = draw(st.integers(0, len(data)))
        data = data[:at] + (draw(FRAGMENTS) if draw(st.booleans()) else b"") + data[at:]
    return data


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(
    data=file_bytes(),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".ndjson", ".jsonl.gz", ".csv.gz"]),
    compress=st.booleans(),
    skip=st.booleans(),
)
def test_readers_read_or_raise_data_error(
    fuzz_dir: Path, data: bytes, suffix: str, compress: bool, skip: bool
) -> None:
    path = fuzz_dir / f"data{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") and compress else data)
    try:
        rows = load_source(str(path), skip_bad_rows=skip)
    except DataError as err:
        message = str(err)
        assert "\n" not in message and str(path) in message
        return
    assert rows.rows, "a source without rows is an error"
    for index, row in enumerate(rows.rows):
        assert isinstance(row, dict)
        origin = rows.origin(index)
        assert origin.source == str(path)
        number = origin.line if origin.line is not None else origin.index + 1
        assert number >= 1
    assert all(kind and count > 0 for kind, count in rows.bad_rows.items())
    assert skip or not rows.bad_rows
    # and on through the converters, as load_conversations goes
    try:
        fmt = detect_format(rows.columns, rows.rows, rows.name)
    except DataError:
        return
    for index, row in enumerate(rows.rows):
        try:
            row_to_conversation(row, fmt, rows.origin(index), dict.fromkeys(CLEANUP_COUNTERS, 0))
        except DataError as err:
            assert str(rows.origin(index)) in str(err)
