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

JSON files that ``datasets`` cannot read are re-read with :mod:`fastmid.data.json_records`, which
names the byte offset of the problem and, with ``skip_bad_rows``, keeps the complete records of a
truncated file (counted as one ``truncated_file`` bad row) or skips unparsable JSON lines (counted
as ``invalid_json``).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmid.data import builtin
from fastmid.data.json_records import JsonReadResult, read_json_array, read_json_lines
from fastmid.data.schema import DataError

BUILTIN_PREFIX = "builtin:"
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
DATA_HELP = (
    "--data takes builtin:arith[:train|test], a .json/.jsonl/.parquet/.csv file, a folder "
    "written by save_to_disk, or several of these joined by commas"
)


@dataclass
class SourceRows:
    """The rows of one source.

    Attributes:
        name: the source as the user wrote it (``[split]`` appended for multi-split folders).
        rows: one dict per row (column name -> value), in source order.
        columns: the column names.
        bad_rows: bad-row kind -> count of rows this reader skipped (only with ``skip_bad_rows``).
    """

    name: str
    rows: list[dict[str, Any]]
    columns: list[str]
    bad_rows: dict[str, int] = field(default_factory=dict)


def split_data_spec(data: str) -> list[str]:
    """Split a ``--data`` string at commas.

    Args:
        data: e.g. ``"builtin:arith"`` or ``"a.jsonl,b.parquet"``.

    Returns:
        The non-empty, whitespace-stripped parts, in order.

    Raises:
        DataError: nothing is named.
    """
    if not isinstance(data, str):
        raise DataError(f"--data must be a string, got {type(data).__name__}; {DATA_HELP}")
    parts = [part.strip() for part in data.split(",") if part.strip()]
    if not parts:
        raise DataError(f"--data is empty; {DATA_HELP}")
    return parts


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence datasets' progress bars for the duration (they would interleave with our report)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _json_looks_cut(path: Path) -> bool:
    """A plain ``.json`` file whose last non-blank byte closes no array/object is cut off."""
    if path.suffix.lower() != ".json":
        return False
    with path.open("rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - 64))
        tail = handle.read().rstrip()
    return not tail.endswith((b"]", b"}"))


def _from_json_reader(path: Path, name: str, skip_bad_rows: bool) -> SourceRows:
    with path.open("rb") as handle:
        first = handle.read(4096).lstrip()
    if path.suffix.lower() == ".json" and first.startswith(b"["):
        result: JsonReadResult = read_json_array(path)
    else:
        result = read_json_lines(path)
    bad: dict[str, int] = {}
    if result.error is not None:
        recoverable = result.truncated or (result.bad_lines and result.records)
        if not (skip_bad_rows and recoverable):
            raise DataError(result.error)
        if result.truncated:
            bad["truncated_file"] = 1
        if result.bad_lines:
            bad["invalid_json"] = len(result.bad_lines)
    rows: list[dict[str, Any]] = []
    for index, record in enumerate(result.records):
        if not isinstance(record, dict):
            raise DataError(
                f"{name}, row {index}: expected a JSON object (one record), got "
                f"{type(record).__name__}"
            )
        rows.append(record)
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    return SourceRows(name, rows, columns, bad)


def _csv_columns(path: Path) -> list[str]:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle), [])


def _load_file(path: Path, name: str, skip_bad_rows: bool) -> SourceRows:
    import datasets

    suffix = _suffix(path)
    builder = _BUILDERS.get(suffix)
    if builder is None:
        raise DataError(f"{name}: unknown file type {suffix or '(no suffix)'!r}; {DATA_HELP}")
    if builder == "json" and _json_looks_cut(path):
        return _from_json_reader(path, name, skip_bad_rows)
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        # read every cell as a string: a numeric answer column must not become int64
        kwargs["features"] = datasets.Features(
            {col: datasets.Value("string") for col in _csv_columns(path)}
        )
    try:
        with _quiet_datasets():
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as exc:
        if builder == "json":
            return _from_json_reader(path, name, skip_bad_rows)
        raise DataError(f"{name}: datasets could not read this {suffix} file: {exc}") from exc
    return SourceRows(name, dataset.to_list(), list(dataset.column_names))


def _is_saved_dataset(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def _load_folder(path: Path, name: str, split: str) -> SourceRows:
    import datasets

    if _is_saved_dataset(path):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"{name}: load_from_disk failed: {exc}") from exc
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(
                    f"{name}: no split {split!r} in this saved DatasetDict (it has "
                    f"{sorted(loaded)}); pass --split with one of them"
                )
            return SourceRows(
                f"{name}[{split}]", loaded[split].to_list(), loaded[split].column_names
            )
        return SourceRows(name, loaded.to_list(), list(loaded.column_names))
    try:
        with _quiet_datasets():
            dataset = datasets.load_dataset(str(path), split=split)
    except Exception as exc:
        raise DataError(
            f"{name}: not a save_to_disk folder, and datasets could not read it as a folder of "
            f"data files with split {split!r}: {exc}"
        ) from exc
    return SourceRows(f"{name}[{split}]", dataset.to_list(), list(dataset.column_names))


def load_source(source: str, *, split: str = "train", skip_bad_rows: bool = False) -> SourceRows:
    """Read every row of one source.

    Args:
        source: one part of a ``--data`` string (see the module docstring).
        split: split of a built-in set, saved ``DatasetDict`` or data folder; ignored for files.
        skip_bad_rows: recover the complete records of a truncated JSON file and skip JSON
            lines that do not parse, counting them in ``SourceRows.bad_rows``.

    Returns:
        The :class:`SourceRows`.

    Raises:
        DataError: unknown builtin, missing path, unknown file type, a split that does not
            exist, or a file that cannot be parsed (naming the file and the byte offset).
    """
    if source.startswith(BUILTIN_PREFIX):
        name, _, builtin_split = source[len(BUILTIN_PREFIX) :].partition(":")
        rows = builtin.builtin_rows(name, builtin_split or split)
        label = f"{BUILTIN_PREFIX}{name}:{builtin_split or split}"
        return SourceRows(label, rows, list(rows[0]) if rows else [])
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, source, split)
    if path.is_file():
        return _load_file(path, source, skip_bad_rows)
    raise DataError(f"{source}: no such file or folder; {DATA_HELP}")
