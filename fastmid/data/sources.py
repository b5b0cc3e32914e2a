"""Turn a ``--data`` string into rows: local files, saved datasets and built-in sets.

A data string names one source or several joined by commas (a path containing a comma cannot be
named). Each source is one of:

* ``builtin:arith`` or ``builtin:arith:<split>`` (see :mod:`fastmid.data.builtin`);
* a ``.json`` (one array of records, or JSON lines), ``.jsonl``/``.ndjson``, ``.parquet`` or
  ``.csv`` file (optionally ``.gz``/``.bz2``/``.xz``/``.zst`` compressed), read with
  ``datasets.load_dataset``; a file is one split, so ``split`` does not apply to it;
* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with
  ``datasets.load_from_disk``; ``split`` picks the split of a ``DatasetDict``);
* any other folder of data files, read with ``datasets.load_dataset(folder, split=split)``.

JSON and CSV files are read by fastmid's own readers (:mod:`fastmid.data.json_records`,
:mod:`fastmid.data.csv_records`), which name the 1-based line (or, in a JSON array, the row) and
the byte offset of every problem; with ``skip_bad_rows`` they keep the complete records of a
truncated JSON file (counted as one ``truncated_file`` bad row) and skip lines that do not parse
(``invalid_json``, ``invalid_csv``) or are not UTF-8 (``invalid_utf8``). Parquet files and folders
go through ``datasets``, whose own log messages are silenced while it reads (the error fastmid
raises is the one line the user sees).

A source with no rows (an empty file, only blank lines, a CSV header alone, ``[]``) is an error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import lzma
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmid.data import builtin
from fastmid.data.csv_records import read_csv_records
from fastmid.data.json_records import read_json_array, read_json_lines
from fastmid.data.schema import BadRowError, DataError, RowOrigin
from fastmid.data.textfile import (
    COMPRESSIONS,
    UTF8_BOM,
    ReadResult,
    compression_of,
    gc_paused,
    open_data_file,
)

BUILTIN_PREFIX = "builtin:"
_COMPRESSION = COMPRESSIONS
_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


def data_help(flag: str = "--data") -> str:
    """What a data option takes, for the end of an error message.

    Args:
        flag: the option as the command spells it: ``--data``, ``--eval-data``,
            ``--eval-accuracy-data``.
    """
    return (
        f"{flag} takes builtin:arith[:train|test], a .json/.jsonl/.parquet/.csv file, a folder "
        "written by save_to_disk, or several of these joined by commas"
    )


DATA_HELP = data_help()
# what a broken compressed stream raises (gzip.BadGzipFile and bz2's errors are OSErrors)
_DECOMPRESS_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)


@dataclass
class SourceRows:
    """The rows of one source.

    Attributes:
        name: the source as the user wrote it (``[split]`` appended for multi-split folders).
        rows: one dict per row (column name -> value), in source order.
        columns: the column names.
        bad_rows: bad-row kind -> count of rows this reader skipped (only with ``skip_bad_rows``).
        origins: where each row starts (its file and 1-based line for JSON-lines and CSV files,
            its place in a JSON array whose reader skipped records), or None when row ``i`` is
            simply ``RowOrigin(name, i)``.
    """

    name: str
    rows: list[dict[str, Any]]
    columns: list[str]
    bad_rows: dict[str, int] = field(default_factory=dict)
    origins: list[RowOrigin] | None = None

    def origin(self, index: int) -> RowOrigin:
        """The :class:`RowOrigin` of ``rows[index]`` (messages name its line, or its row)."""
        if self.origins is not None:
            return self.origins[index]
        return RowOrigin(self.name, index)


def split_data_spec(data: str, flag: str = "--data") -> list[str]:
    """Split a ``--data`` string at commas.

    Args:
        data: e.g. ``"builtin:arith"`` or ``"a.jsonl,b.parquet"``.
        flag: the option that gave ``data``, named in the error (``--eval-data`` ...).

    Returns:
        The non-empty, whitespace-stripped parts, in order.

    Raises:
        DataError: nothing is named.
    """
    if not isinstance(data, str):
        raise DataError(f"{flag} must be a string, got {type(data).__name__}; {data_help(flag)}")
    parts = [part.strip() for part in data.split(",") if part.strip()]
    if not parts:
        raise DataError(f"{flag} is empty; {data_help(flag)}")
    return parts


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence datasets while it reads or maps: its progress bars would interleave with our
    report, and its logged errors (e.g. "Failed to load JSON ...") would print a second,
    different message before the one line fastmid raises. Every warning raised inside is
    ignored too (fastmid's own warnings must be raised outside)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    verbosity = datasets.utils.logging.get_verbosity()
    datasets.disable_progress_bars()
    # above ERROR: datasets logs the failures it then raises, which we report ourselves
    datasets.utils.logging.set_verbosity(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.enable_progress_bars()


def _one_line(exc: BaseException) -> str:
    """An exception as one line: its type when the message is empty, line breaks joined."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _starts_with_bracket(path: Path) -> bool:
    """True when the file's first non-blank byte (after a UTF-8 BOM) opens a JSON array."""
    with open_data_file(path) as handle:
        head = handle.read(4096)
    return head.removeprefix(UTF8_BOM).lstrip(b" \t\r\n").startswith(b"[")


def _one_object_hint(path: Path, result: ReadResult) -> str | None:
    """For a ``.json`` file read as JSON lines that failed: when the whole file is one JSON
    object (pretty-printed over several lines), say so rather than blame its first line."""
    if _suffix(path) != ".json" or result.records or not result.bad_kinds:
        return None
    try:
        with open_data_file(path) as handle:
            value = json.loads(handle.read().decode("utf-8-sig"))
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict):
        return None
    keys = ", ".join(repr(k) for k in list(value)[:5])
    return (
        f"{path}: the file holds one JSON object (keys {keys}), not records; write the records "
        "as one array [{...}, ...] or as JSON lines (.jsonl), one object per line"
    )


def _empty_message(name: str, result: ReadResult, kind: str) -> str:
    if kind == "csv" and result.columns:
        return f"{name}: the CSV has a header line but no rows; add rows below the header"
    if result.line_count == 0:
        return f"{name}: the file is empty: no rows to read"
    if kind == "json-array":
        return f"{name}: the JSON array is empty ([]): no rows to read"
    return f"{name}: the file holds only blank lines: no rows to read"


def _from_reader(
    path: Path, name: str, kind: str, read: Callable[[Path], ReadResult], skip_bad_rows: bool
) -> SourceRows:
    """Rows of a JSON/CSV file read by fastmid's readers, with bad lines raised or counted."""
    with gc_paused():
        return _rows_of(read(path), path, name, kind, skip_bad_rows)


def _rows_of(
    result: ReadResult, path: Path, name: str, kind: str, skip_bad_rows: bool
) -> SourceRows:
    """Turn a reader's result into rows: raise its first problem (or, with ``skip_bad_rows``,
    only one that skipping cannot get past), refuse a file with no rows, and check that each
    record is an object."""
    if result.error is not None:
        hint = _one_object_hint(path, result)
        if hint is not None:
            raise DataError(hint)
        skippable = bool(result.bad_lines) and result.error == result.bad_lines[0][1]
        if not skip_bad_rows:
            more = ", or pass --skip-bad-rows to skip and count such lines" if skippable else ""
            raise DataError(result.error + more)
        if result.fatal is not None:
            raise DataError(result.fatal)
        if not result.records:
            raise DataError(f"{result.error}; no row of the file could be read")
    bad: dict[str, int] = dict(result.bad_kinds)
    if result.truncated:
        bad["truncated_file"] = 1
    if not result.records and result.error is None:
        raise DataError(_empty_message(name, result, kind))
    rows: list[dict[str, Any]] = []
    origins: list[RowOrigin] = []
    for index, record in enumerate(result.records):
        line = result.lines[index] if result.lines else None
        position = result.positions[index] if result.positions else index
        origin = RowOrigin(name, position, line)
        if not isinstance(record, dict):
            error = BadRowError(
                "wrong_type",
                origin,
                f"expected a JSON object (one record), got {type(record).__name__}",
            )
            if not skip_bad_rows:
                raise error
            bad["wrong_type"] = bad.get("wrong_type", 0) + 1
            continue
        rows.append(record)
        origins.append(origin)
    if not rows:
        skipped = ", ".join(f"{count} {bad_kind}" for bad_kind, count in sorted(bad.items()))
        raise DataError(f"{name}: no readable row left after skipping bad rows ({skipped})")
    return SourceRows(name, rows, _columns(result.columns, rows), bad, origins)


def _columns(header: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """The header's columns, then every other key of the rows in order of appearance."""
    columns = list(header)
    seen = set(columns)
    for row in rows:
        for key in row:
            if key not in seen:
                seen.add(key)
                columns.append(key)
    return columns


def _to_rows(dataset: Any, name: str) -> list[dict[str, Any]]:
    """``dataset.to_list()``; pyarrow stores string bytes unchecked and fails only here."""
    try:
        return dataset.to_list()
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{name}: a text column holds bytes that are not UTF-8 ({_one_line(exc)}); "
            "re-encode the data as UTF-8"
        ) from exc


def _load_file(path: Path, name: str, skip_bad_rows: bool, flag: str = "--data") -> SourceRows:
    suffix = _suffix(path)
    builder = _BUILDERS.get(suffix)
    if builder is None:
        raise DataError(f"{name}: unknown file type {suffix or '(no suffix)'!r}; {data_help(flag)}")
    try:
        if builder == "csv":
            return _from_reader(path, name, "csv", read_csv_records, skip_bad_rows)
        if builder == "json":
            if suffix == ".json" and _starts_with_bracket(path):
                return _from_reader(path, name, "json-array", read_json_array, skip_bad_rows)
            return _from_reader(path, name, "json-lines", read_json_lines, skip_bad_rows)
    except DataError:
        raise
    except _DECOMPRESS_ERRORS as exc:
        what = f"the {compression_of(path)} data" if compression_of(path) else "the file"
        raise DataError(f"{name}: cannot read {what}: {_one_line(exc)}") from exc
    import datasets

    try:
        with quiet_datasets():
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:
        raise DataError(
            f"{name}: datasets could not read this {suffix} file: {_one_line(exc)}"
        ) from exc
    if len(dataset) == 0:
        raise DataError(f"{name}: the file holds no rows")
    return SourceRows(name, _to_rows(dataset, name), list(dataset.column_names))


def _is_saved_dataset(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def _split_files(path: Path, name: str, split: str) -> list[Path] | None:
    """The data files of ``split`` in a folder, by the naming rules of ``datasets``
    (``train.jsonl``, ``data/test-00000.csv``, ...; files named after no split are ``train``).

    Returns:
        The files, or None when ``datasets`` finds no data file in the folder at all.

    Raises:
        DataError: the folder's files name other splits but not ``split``.
    """
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        with quiet_datasets():
            patterns = get_data_patterns(str(path))
            files = DataFilesDict.from_patterns(patterns, base_path=str(path))
    except EmptyDatasetError:
        return None
    except Exception as exc:
        raise DataError(f"{name}: cannot list the data files: {_one_line(exc)}") from exc
    if split not in files:
        raise DataError(
            f"{name}: no data file of split {split!r} in this folder (its files make the splits "
            f"{sorted(map(str, files))}); pass --split with one of them"
        )
    return [Path(file) for file in files[split]]


def _from_folder_files(
    path: Path, name: str, split: str, files: list[Path], skip_bad_rows: bool, flag: str
) -> SourceRows:
    """Read each JSON/CSV/Parquet file of a folder's split, naming rows by file and line."""
    rows: list[dict[str, Any]] = []
    origins: list[RowOrigin] = []
    bad: dict[str, int] = {}
    for file in files:
        label = str(Path(name) / file.relative_to(path))
        part = _load_file(file, label, skip_bad_rows, flag)
        rows.extend(part.rows)
        origins.extend(part.origin(index) for index in range(len(part.rows)))
        for kind, count in part.bad_rows.items():
            bad[kind] = bad.get(kind, 0) + count
    return SourceRows(f"{name}[{split}]", rows, _columns([], rows), bad, origins)


def _load_folder(
    path: Path, name: str, split: str, skip_bad_rows: bool, flag: str = "--data"
) -> SourceRows:
    import datasets

    if _is_saved_dataset(path):
        try:
            with quiet_datasets():
                loaded = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"{name}: load_from_disk failed: {_one_line(exc)}") from exc
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(
                    f"{name}: no split {split!r} in this saved DatasetDict (it has "
                    f"{sorted(loaded)}); pass --split with one of them"
                )
            label = f"{name}[{split}]"
            return SourceRows(label, _to_rows(loaded[split], label), loaded[split].column_names)
        return SourceRows(name, _to_rows(loaded, name), list(loaded.column_names))
    files = _split_files(path, name, split)
    if files is None:
        kind = f" (named like a {_suffix(path)} file)" if _suffix(path) in _BUILDERS else ""
        raise DataError(
            f"{name}: a folder{kind} with no data files (.json, .jsonl, .ndjson, .parquet, "
            f".csv) that is not a save_to_disk folder either; {data_help(flag)}"
        )
    if files and all(_suffix(file) in _BUILDERS for file in files):
        return _from_folder_files(path, name, split, files, skip_bad_rows, flag)
    # other file types (e.g. .txt, which datasets reads as one "text" row per line)
    try:
        with quiet_datasets():
            dataset = datasets.load_dataset(str(path), split=split)
    except Exception as exc:
        raise DataError(
            f"{name}: not a save_to_disk folder, and datasets could not read it as a folder of "
            f"data files with split {split!r}: {_one_line(exc)}"
        ) from exc
    label = f"{name}[{split}]"
    return SourceRows(label, _to_rows(dataset, label), list(dataset.column_names))


def load_source(
    source: str, *, split: str = "train", skip_bad_rows: bool = False, flag: str = "--data"
) -> SourceRows:
    """Read every row of one source.

    Args:
        source: one part of a ``--data`` string (see the module docstring).
        split: split of a built-in set, saved ``DatasetDict`` or data folder; ignored for files.
        skip_bad_rows: recover the complete records of a truncated JSON file and skip lines
            (JSON array records) that do not parse or are not UTF-8, counting them in
            ``SourceRows.bad_rows``.
        flag: the option that named ``source`` (``--data``, ``--eval-data``,
            ``--eval-accuracy-data``): errors that say what the option takes name this one.

    Returns:
        The :class:`SourceRows`.

    Raises:
        DataError: unknown builtin, missing path, unknown file type, a split that does not
            exist, a source with no rows, or a file that cannot be parsed (naming the file, the
            1-based line or row and the byte offset).
    """
    if source.startswith(BUILTIN_PREFIX):
        name, _, builtin_split = source[len(BUILTIN_PREFIX) :].partition(":")
        rows = builtin.builtin_rows(name, builtin_split or split)
        label = f"{BUILTIN_PREFIX}{name}:{builtin_split or split}"
        return SourceRows(label, rows, list(rows[0]) if rows else [])
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, source, split, skip_bad_rows, flag)
    if path.is_file():
        return _load_file(path, source, skip_bad_rows, flag)
    if path.exists():
        raise DataError(f"{source}: not a regular file or folder; {data_help(flag)}")
    raise DataError(f"{source}: no such file or folder; {data_help(flag)}")


def source_files(source: str) -> list[Path] | None:
    """The files whose bytes make up one source's rows (what the tokenization cache hashes).

    Args:
        source: one part of a ``--data`` string.

    Returns:
        ``[]`` for a built-in set (its rows come from fastmid's code alone); ``[file]`` for a
        file; every regular file under a folder, recursively, sorted by path (a superset of
        what :func:`load_source` reads, so that no change to the folder goes unnoticed); None
        when ``source`` names nothing readable (:func:`load_source` then raises the error that
        says why).
    """
    if source.startswith(BUILTIN_PREFIX):
        return []
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return None
