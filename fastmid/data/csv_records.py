"""Read a CSV file record by record, with the 1-based line of each row and byte offsets for errors.

CSV sources are read with the standard library's :mod:`csv` rather than through ``datasets``
(pandas), for three reasons: every cell stays a string (pandas would turn a numeric answer column
into int64 and the cells ``NA``, ``None`` or ``null`` into missing values); each row keeps the
physical line it starts on (a quoted cell may span lines), so messages can say ``line N``; and a
line that is not UTF-8, or has more cells than the header, is one bad row that
``--skip-bad-rows`` can skip and count, not a failure of the whole file.

The first non-blank record is the header. An empty cell is the empty string; a row with fewer
cells than the header has None for the missing ones (like a missing JSON key). Blank lines are
ignored.
"""

from __future__ import annotations

import contextlib
import csv
import sys
from collections.abc import Iterator
from pathlib import Path

from fastmid.data.textfile import UTF8_BOM, ReadResult, open_data_file, utf8_message

# csv's default cap of 131,072 characters per cell is far below a long SFT answer
_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


@contextlib.contextmanager
def _field_limit() -> Iterator[None]:
    """Lift csv's per-cell size cap while reading, and put the caller's cap back afterwards."""
    previous = csv.field_size_limit(_FIELD_LIMIT)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


class _LineFeeder:
    """Feeds decoded lines to :func:`csv.reader` and remembers, per line, where it starts and
    the first byte that is not UTF-8 (csv pulls exactly the lines of one record at a time)."""

    def __init__(self, handle: Iterator[bytes]) -> None:
        self.handle = handle
        self.offset = 0
        self.count = 0
        # line number -> (file offset of its first bad byte, that byte), for the current record
        self.bad: dict[int, tuple[int, int]] = {}

    def __iter__(self) -> Iterator[str]:
        for raw in self.handle:
            self.count += 1
            body = raw[len(UTF8_BOM) :] if self.count == 1 and raw.startswith(UTF8_BOM) else raw
            offset, self.offset = self.offset, self.offset + len(raw)
            try:
                yield body.decode("utf-8")
            except UnicodeDecodeError as err:
                at = offset + len(raw) - len(body) + err.start
                self.bad[self.count] = (at, body[err.start])
                # csv still has to see the line to know where the record ends
                yield body.decode("utf-8", errors="surrogateescape")

    def first_bad(self, first: int, last: int) -> tuple[int, int, int] | None:
        """``(line, byte offset, byte)`` of the first bad byte on lines ``first..last``."""
        if not self.bad:
            return None
        for line in range(first, last + 1):
            if line in self.bad:
                return (line, *self.bad[line])
        return None


def _header(fields: list[str]) -> list[str]:
    # pandas' name for a nameless column (the index column of DataFrame.to_csv) reads better
    # in messages than an empty string
    return [name.strip() or f"Unnamed: {i}" for i, name in enumerate(fields)]


def read_csv_records(path: str | Path) -> ReadResult:
    """Read a CSV file with a header line.

    Args:
        path: the ``.csv`` file (optionally compressed, see :mod:`fastmid.data.textfile`).

    Returns:
        A :class:`~fastmid.data.textfile.ReadResult`: ``columns`` is the header, each record a
        dict column -> cell, ``lines`` the 1-based line each record starts on. A row with bytes
        that are not UTF-8 (kind ``invalid_utf8``) or with non-empty cells beyond the header
        (``invalid_csv``) is left out and listed in ``bad_lines``; a header that names a column
        twice, or a line the csv parser rejects, is ``fatal``.
    """
    path = Path(path)
    result = ReadResult()
    with open_data_file(path) as handle, _field_limit():
        feeder = _LineFeeder(handle)
        reader = csv.reader(feeder)
        last_line = 0
        try:
            for fields in reader:
                first, last_line = last_line + 1, reader.line_num
                if fields:
                    _take(result, path, feeder, fields, first, last_line)
                    if result.fatal:
                        break
                feeder.bad.clear()
        except csv.Error as err:
            result.stop(f"{path}: line {feeder.count}: the CSV cannot be parsed: {err}")
        result.line_count = feeder.count
    return result


def _take(
    result: ReadResult,
    path: Path,
    feeder: _LineFeeder,
    fields: list[str],
    first: int,
    last: int,
) -> None:
    """Add one record (lines ``first..last``) to ``result``: the header, a row or a bad row."""
    bad = feeder.first_bad(first, last)
    if bad is not None:
        line, byte, value = bad
        place = f"line {first} (byte {byte})"
        if line != first:  # a quoted cell spans lines: say which of them holds the byte
            place = f"line {first} (line {line}, byte {byte})"
        message = utf8_message(path, place, value)
        if not result.columns:  # without a header no row can be read: nothing to skip to
            result.stop(message)
        else:
            result.skip(first - 1, "invalid_utf8", message)
        return
    if not result.columns:
        columns = _header(fields)
        seen: set[str] = set()
        for name in columns:
            if name in seen:
                result.stop(
                    f"{path}: line {first}: the header names the column {name!r} twice; "
                    "rename one of them"
                )
                return
            seen.add(name)
        result.columns = columns
        return
    width = len(result.columns)
    if len(fields) > width and any(cell.strip() for cell in fields[width:]):
        result.skip(
            first - 1,
            "invalid_csv",
            f"{path}: line {first} has {len(fields)} cells but the header names {width} "
            'columns; quote cells that contain a comma ("a, b")',
        )
        return
    record: dict[str, str | None] = dict.fromkeys(result.columns)
    record.update(zip(result.columns, fields, strict=False))
    result.records.append(record)
    result.lines.append(first)
