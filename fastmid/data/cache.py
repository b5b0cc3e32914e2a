"""The tokenization cache: SFT examples tokenized once, kept on disk as memory-mapped Arrow.

:func:`fastmid.data.build_sft_examples` tokenizes a data string into an *entry* of this cache and
returns an :class:`ExampleTable`, a read-only sequence of examples whose token ids stay in the
entry's Arrow files (memory-mapped: the pages are shared with the page cache, not copied into
Python lists). A second run with the same data, tokenizer and options, and every resume, opens
the entry in well under a second instead of tokenizing again.

Where: ``$HF_DATASETS_CACHE/fastmid-sft/v1/<key>/`` (``HF_DATASETS_CACHE`` read at call time,
else ``datasets.config.HF_DATASETS_CACHE``, by default ``~/.cache/huggingface/datasets``). An
entry holds:

* ``tokens-<w>[_<rank>_of_<n>].arrow``: one row per tokenized conversation, in tokenization
  order (``input_ids`` and ``labels`` as int32 lists, the truncation ``outcome``, the count of
  trained tokens, the kind of a bad row), written by ``datasets.Dataset.map``;
* ``selection.npy``: the table rows of the kept examples, in example order (int64);
* ``meta.json``: the key, what went into it (file sizes, modification times and SHA-256
  digests, the tokenizer's digest, the options), the data statistics and the file list. It is
  written last, atomically: an entry without it is an unfinished build and is rebuilt.

The key is fastmid's own, never ``datasets``' fingerprint of the map function (hashing a
tokenizer has been unstable: datasets issues #5985 and #6179). It is the SHA-256 of:

* every data file's size and SHA-256 of its bytes (every file under a folder; a built-in set
  by its name and split alone, its rows being fastmid's code). Modification times are recorded
  in ``meta.json`` but left out of the key: the bytes decide, so a touched file (or one checked
  out again, or restored from a backup, under the same name) is a hit and an edited one a miss,
  whatever its clock says. The data string itself is part of the key (errors and statistics
  name the sources as written);
* the tokenizer: SHA-256 of its serialized fast tokenizer (vocabulary, merges, normalizer,
  pre-tokenizer, post-processor, added tokens), its chat template, special tokens and the
  behaviour fastmid derives from them (BOS added or not, special ids, ChatML fallback);
* every option that changes the examples: ``split``, ``format``, ``max_seq_len``,
  ``truncation``, ``train_on_prompt``, ``last_turn_only``, ``skip_bad_rows``,
  ``shuffle_seed``, ``max_examples``;
* fastmid's data code (the bytes of ``fastmid/data/*.py`` and ``fastmid/labels.py``) and the
  versions of transformers, tokenizers, jinja2, datasets and pyarrow, so that a change to how
  tokens are made never meets an old entry.

Tokenizing goes through ``datasets.Dataset.map`` (batched, 64 conversations a batch,
:func:`tokenizing_processes` processes), with ``cache_file_name`` and ``new_fingerprint`` set
from the key. The process count never changes the examples and is not in the key. The shuffle
seed and ``max_examples`` are: the order and the cut come before tokenizing, so that a capped
build tokenizes only about ``max_examples`` conversations; another seed or cap tokenizes again.

A changed data file, tokenizer or option therefore makes a new entry; old entries stay until
deleted (``rm -r <cache>/fastmid-sft``). Entries are built under a file lock, so processes that
build the same data at once (the ranks of a distributed run) tokenize it once.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import importlib.metadata
import json
import operator
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fastmid.data.chat_template import ChatTemplateFallbackWarning
from fastmid.data.schema import BadRowError, Conversation, RowOrigin
from fastmid.data.sources import source_files, split_data_spec
from fastmid.data.tokenize import ExampleTokenizer
from fastmid.data.truncate import DROP_REASONS, truncate_example
from fastmid.labels import IGNORE_INDEX

CACHE_VERSION = 1
CACHE_FOLDER = "fastmid-sft"
#: What happened to each tokenized conversation (the ``outcome`` column holds the index).
OUTCOMES: tuple[str, ...] = ("kept", "truncated", *DROP_REASONS, "bad_row")
KEPT, TRUNCATED, BAD_ROW = 0, 1, len(OUTCOMES) - 1

CONVERSATION_SCHEMA = pa.schema(
    [
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("text", pa.string()),
        ("source", pa.int32()),  # index into the build's list of origin sources
        ("index", pa.int64()),
        ("line", pa.int64()),
    ]
)
TOKENS_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("outcome", pa.int8()),
        ("n_trained", pa.int32()),
        ("error_kind", pa.string()),
    ]
)
_HASH_BLOCK = 1 << 20  # bytes read per hashing step
_VERSIONED = ("transformers", "tokenizers", "jinja2", "datasets", "pyarrow")


def cache_root() -> Path:
    """The folder holding every entry: ``<datasets cache>/fastmid-sft/v<CACHE_VERSION>``.

    ``HF_DATASETS_CACHE`` is read now, not when ``datasets`` was imported, so a test (or a
    program) that sets it later is obeyed.
    """
    env = os.environ.get("HF_DATASETS_CACHE")
    if env:
        base = Path(env).expanduser()
    else:
        import datasets.config

        base = Path(datasets.config.HF_DATASETS_CACHE)
    return base / CACHE_FOLDER / f"v{CACHE_VERSION}"


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks (about 0.8 GB/s here)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(data: str, flag: str = "--data") -> list[dict[str, Any]] | None:
    """What the key records of a data string: each source with its files' sizes and digests.

    Args:
        data: a ``--data`` string.
        flag: the option that gave it (named by the error of an empty string).

    Returns:
        One ``{"source", "files": [{"path", "size", "sha256", "mtime_ns"}]}`` per source, in
        order (``path`` relative to a folder source, the file's name for a file source); None
        when a source names nothing readable (the loader then raises the error that says why).

    Raises:
        DataError: ``data`` names nothing (from :func:`split_data_spec`).
    """
    parts = []
    for source in split_data_spec(data, flag):
        files = source_files(source)
        if files is None:
            return None
        base = Path(source).expanduser()
        records = []
        for file in files:
            stat = file.stat()
            name = file.name if file == base else file.relative_to(base).as_posix()
            records.append(
                {
                    "path": name,
                    "size": stat.st_size,
                    "sha256": file_sha256(file),
                    "mtime_ns": stat.st_mtime_ns,
                }
            )
        parts.append({"source": source, "files": records})
    return parts


def tokenizer_fingerprint(tokenizer: Any, encode: ExampleTokenizer) -> dict[str, Any]:
    """Everything about a tokenizer that can change fastmid's tokens and labels.

    The serialized fast tokenizer stands for its files (``tokenizer.json`` is that
    serialization), and also covers a tokenizer changed in memory or loaded from a GGUF file,
    which has no files of its own.

    Args:
        tokenizer: the fast Hugging Face tokenizer.
        encode: the :class:`ExampleTokenizer` built on it (its derived BOS/special-token
            behaviour is recorded too).

    Returns:
        A JSON-serializable dict (about 30 ms for a 49k-token vocabulary).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialized = backend.to_str()
    else:  # pragma: no cover - every fast tokenizer has a backend
        serialized = json.dumps(sorted(tokenizer.get_vocab().items()))
    flags = {}
    for name in ("add_bos_token", "add_eos_token", "split_special_tokens"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, bool | int | str) or value is None:
            flags[name] = value
    return {
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "serialized_sha256": hashlib.sha256(serialized.encode("utf-8")).hexdigest(),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": json.loads(
            json.dumps(getattr(tokenizer, "special_tokens_map", {}), default=str)
        ),
        "bos_id": encode.bos_id,
        "eos_id": encode.eos_id,
        "adds_bos": encode.adds_bos,
        "special_ids": sorted(encode.special_ids),
        "chatml_fallback": encode.renderer.uses_fallback,
        "flags": flags,
    }


@functools.cache
def code_fingerprint() -> dict[str, Any]:
    """SHA-256 of fastmid's data code and the versions of the libraries that make tokens.

    Any edit to ``fastmid/data/*.py`` (or the label convention) changes it, so an entry never
    outlives the code that wrote it. Computed once per process.
    """
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for path in [*sorted(here.glob("*.py")), here.parent / "labels.py"]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - all are installed
            versions[name] = None
    return {"code_sha256": digest.hexdigest(), "versions": versions}


#: Conversations a worker process must have for it to pay for its start (see
#: :func:`tokenizing_processes`).
MIN_CONVERSATIONS_PER_PROCESS = 5000


def idle_cpus() -> int:
    """CPUs this process may use that other work is not already using.

    The usable CPUs (``os.sched_getaffinity``) scaled by the machine's idle share: 1 minus the
    1-minute load average over all CPUs, not counting the one this process keeps busy
    itself. A load average is the whole machine's (a container sees its host's), so this errs
    towards fewer processes on a busy host, which is where extra processes only compete.

    Returns:
        At least 1.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    usable = usable or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # pragma: no cover - no load average (Windows)
        return usable
    total = os.cpu_count() or usable
    idle_share = min(1.0, max(0.0, 1.0 - max(0.0, load - 1.0) / total))
    return max(1, round(usable * idle_share))


def tokenizing_processes(conversations: int, cpus: int | None = None) -> int:
    """How many processes tokenize ``conversations``: one per idle CPU
    (:func:`idle_cpus`), with at least :data:`MIN_CONVERSATIONS_PER_PROCESS` conversations each.

    Measured on this project's 2-core machine while other jobs kept it busy (load average
    4.2-4.9; ``bench/results/data_scale.md``): a worker process costs about 0.3 CPU-seconds to
    start (the tokenizer is sent to it and rebuilt), and with no idle core to run on, 2
    processes were slower than 1 at every size (20,000 conversations: 13.1 s against 11.4 s).
    On idle cores they should add up (the rendering and label code is Python, one core per
    process; not measured here, this machine had no idle core), and a worker pays for its
    start from a few thousand conversations on (one process tokenizes about 2,600 short
    conversations per CPU-second).

    Args:
        conversations: conversations to tokenize.
        cpus: CPUs to use; None asks :func:`idle_cpus`.

    Returns:
        The process count (1 means tokenizing in this process).
    """
    if cpus is None:
        cpus = idle_cpus()
    return max(1, min(cpus, conversations // MIN_CONVERSATIONS_PER_PROCESS))


def write_conversations(path: Path, conversations: Sequence[Conversation]) -> list[str]:
    """Write conversations to an Arrow stream file (the input of the tokenizing ``map``).

    Args:
        path: the file to write.
        conversations: validated conversations.

    Returns:
        The distinct origin sources, in order of first use (the ``source`` column indexes it).
    """
    sources: dict[str, int] = {}
    messages_type = CONVERSATION_SCHEMA.field("messages").type
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, CONVERSATION_SCHEMA) as out:
        for begin in range(0, len(conversations), 4096):
            part = conversations[begin : begin + 4096]
            columns = [
                pa.array([c.messages for c in part], messages_type),
                pa.array([c.text for c in part], pa.string()),
                pa.array(
                    [sources.setdefault(c.origin.source, len(sources)) for c in part], pa.int32()
                ),
                pa.array([c.origin.index for c in part], pa.int64()),
                pa.array([c.origin.line for c in part], pa.int64()),
            ]
            out.write_batch(pa.record_batch(columns, schema=CONVERSATION_SCHEMA))
    return list(sources)


def conversations_of(batch: dict[str, list[Any]], sources: Sequence[str]) -> list[Conversation]:
    """Rebuild :class:`Conversation` objects from a batch of the conversation table."""
    return [
        Conversation(
            messages=list(messages),
            origin=RowOrigin(sources[source], index, line),
            text=text,
        )
        for messages, text, source, index, line in zip(
            batch["messages"],
            batch["text"],
            batch["source"],
            batch["index"],
            batch["line"],
            strict=True,
        )
    ]


def datasets_from_file(path: Path) -> Any:
    """``datasets.Dataset.from_file``: the conversation table, memory-mapped."""
    import datasets

    return datasets.Dataset.from_file(str(path))


@dataclass
class LiveState:
    """Progress of a tokenization running in this process (not in worker processes).

    Attributes:
        cap: stop once this many examples are kept (``max_examples``), or None.
        skip_bad_rows: when False, a bad row met before the cap is raised at once.
        on_batch: called after each batch as ``on_batch(rows_done, kept)`` (this map's rows,
            examples kept over every map of the build).
        kept: examples kept so far.
        rows: rows of the current map done.
        stopped: the cap was reached; later batches are skipped.
    """

    cap: int | None
    skip_bad_rows: bool
    on_batch: Callable[[int, int], None] | None = None
    kept: int = 0
    rows: int = 0
    stopped: bool = False


class TokenizeBatch:
    """The function ``datasets.Dataset.map`` runs on batches of the conversation table.

    Each conversation becomes one row of :data:`TOKENS_SCHEMA`: its truncated ``input_ids``
    and ``labels`` (empty when dropped), the ``outcome`` (index into :data:`OUTCOMES`), its
    trained-token count, and the kind of a bad row (``template_rejected``). Pickled to the
    worker processes (the tokenizer travels with it); ``live`` is only set in this process.

    Args:
        encode: the :class:`ExampleTokenizer`.
        max_seq_len: tokens per example.
        truncation: ``prompt-left`` or ``drop``.
        sources: the origin sources the ``source`` column indexes.
        live: progress and early stop when tokenizing in this process; None in workers.

    Raises:
        BadRowError: (in this process, without ``skip_bad_rows``) a row the chat template
            rejected before the cap.
        TemplatePrefixError, DataError: a template that breaks the prompt-prefix property or
            writes two BOS tokens (from :meth:`ExampleTokenizer.encode_batch`).
    """

    def __init__(
        self,
        encode: ExampleTokenizer,
        max_seq_len: int,
        truncation: str,
        sources: Sequence[str],
        live: LiveState | None = None,
    ) -> None:
        self.encode = encode
        self.max_seq_len = max_seq_len
        self.truncation = truncation
        self.sources = list(sources)
        self.live = live

    def __call__(self, batch: dict[str, list[Any]]) -> pa.Table:
        live = self.live
        if live is not None and live.stopped:
            # the cap was reached in an earlier batch: what follows is never read
            return TOKENS_SCHEMA.empty_table()
        conversations = conversations_of(batch, self.sources)
        with warnings.catch_warnings():
            # the pipeline warns once, in the main process, whether or not it tokenizes
            warnings.simplefilter("ignore", ChatTemplateFallbackWarning)
            results = self.encode.encode_batch(conversations)
        ids: list[list[int]] = []
        labels: list[list[int]] = []
        outcomes: list[int] = []
        trained: list[int] = []
        kinds: list[str | None] = []
        for result in results:
            if isinstance(result, BadRowError):
                if live is not None and not live.skip_bad_rows and not live.stopped:
                    raise result
                ids.append([])
                labels.append([])
                outcomes.append(BAD_ROW)
                trained.append(0)
                kinds.append(result.kind)
                continue
            example, outcome = truncate_example(result, self.max_seq_len, self.truncation)
            outcomes.append(OUTCOMES.index(outcome))
            kinds.append(None)
            if example is None:
                ids.append([])
                labels.append([])
                trained.append(0)
                continue
            ids.append(example["input_ids"])
            labels.append(example["labels"])
            trained.append(len(example["labels"]) - example["labels"].count(IGNORE_INDEX))
            if live is not None:
                live.kept += 1
                if live.cap is not None and live.kept >= live.cap:
                    live.stopped = True
        if live is not None:
            live.rows += len(results)
            if live.on_batch is not None:
                live.on_batch(live.rows, live.kept)
        columns = (ids, labels, outcomes, trained, kinds)
        arrays = [pa.array(c, f.type) for c, f in zip(columns, TOKENS_SCHEMA, strict=True)]
        return pa.Table.from_arrays(arrays, schema=TOKENS_SCHEMA)


@contextlib.contextmanager
def map_progress(on_rows: Callable[[int], None] | None) -> Iterator[None]:
    """Forward the row counts that ``Dataset.map(num_proc=n)`` receives from its workers to
    ``on_rows(rows)`` (its own tqdm bar, which fastmid keeps off, is the only place they go).

    ``datasets`` names its bar ``hf_tqdm`` in ``datasets.arrow_dataset``; when a version does
    not, the map runs without progress rather than failing.
    """
    from datasets import arrow_dataset

    original = getattr(arrow_dataset, "hf_tqdm", None)
    if on_rows is None or original is None:
        yield
        return

    class _Forward:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> _Forward:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def update(self, n: int = 1) -> None:
            on_rows(int(n))

        def close(self) -> None:
            pass

    arrow_dataset.hf_tqdm = _Forward
    try:
        yield
    finally:
        arrow_dataset.hf_tqdm = original


class TokenStore:
    """The memory-mapped token tables of one entry, with each record batch's offsets and
    values as numpy views (no copy: the arrays point into the mapped files).

    Attributes:
        files: the Arrow files, in row order.
        rows: table rows over all files.
        lengths: tokens per table row (int32; 0 for a dropped conversation).
        trained: trained tokens per table row (int32).
        outcomes: index into :data:`OUTCOMES` per table row (int8).

    Raises:
        OSError, pyarrow.ArrowException: a missing or damaged file.
    """

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = [Path(f) for f in files]
        self.tables: list[pa.Table] = []
        self.starts: list[int] = []  # first table row of each (non-empty) record batch
        self.ids: list[tuple[np.ndarray, np.ndarray]] = []  # (offsets, values) per batch
        self.labels: list[tuple[np.ndarray, np.ndarray]] = []
        lengths: list[np.ndarray] = []
        trained: list[np.ndarray] = []
        outcomes: list[np.ndarray] = []
        row = 0
        for file in self.files:
            with pa.memory_map(str(file), "r") as source:
                table = pa.ipc.open_stream(source).read_all()
            self.tables.append(table)
            columns = [table.column(n).chunks for n in ("input_ids", "labels", "n_trained")]
            outcome_chunks = table.column("outcome").chunks
            for ids, labels, n_trained, outcome in zip(*columns, outcome_chunks, strict=True):
                if len(ids) == 0:
                    continue
                id_offsets = ids.offsets.to_numpy(zero_copy_only=True)
                self.starts.append(row)
                self.ids.append((id_offsets, ids.values.to_numpy(zero_copy_only=True)))
                self.labels.append(
                    (
                        labels.offsets.to_numpy(zero_copy_only=True),
                        labels.values.to_numpy(zero_copy_only=True),
                    )
                )
                lengths.append(np.diff(id_offsets))
                trained.append(n_trained.to_numpy(zero_copy_only=True))
                outcomes.append(outcome.to_numpy(zero_copy_only=True))
                row += len(ids)
        self.rows = row
        self.lengths = _concat(lengths, np.int32)
        self.trained = _concat(trained, np.int32)
        self.outcomes = _concat(outcomes, np.int8)

    def error_kinds(self) -> list[str | None]:
        """The ``error_kind`` of every table row (None but for bad rows); read when building."""
        return [k for t in self.tables for k in t.column("error_kind").to_pylist()]

    def example(self, row: int) -> dict[str, list[int]]:
        """Row ``row`` of the tables as ``{"input_ids": [...], "labels": [...]}``."""
        batch = bisect.bisect_right(self.starts, row) - 1
        local = row - self.starts[batch]
        offsets, values = self.ids[batch]
        input_ids = values[offsets[local] : offsets[local + 1]].tolist()
        offsets, values = self.labels[batch]
        labels = values[offsets[local] : offsets[local + 1]].tolist()
        return {"input_ids": input_ids, "labels": labels}


def _concat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


class ExampleTable(Sequence[dict[str, list[int]]]):
    """Tokenized SFT examples read from the cache's memory-mapped Arrow tables.

    A read-only sequence: ``len(table)``; ``table[i]`` is a fresh
    ``{"input_ids": list[int], "labels": list[int]}`` (equal lengths, labels -100 where not
    trained); ``table[a:b]`` and :meth:`select` are views sharing the same files (no tokens are
    copied); iteration yields the examples in order. ``==`` compares example by example with
    any sequence of such dicts (a list, another table).

    Reading an example costs a few microseconds (two slices of the mapped files turned into
    lists); only the examples read are ever in Python memory.
    """

    def __init__(self, store: TokenStore, rows: np.ndarray) -> None:
        self._store = store
        self._rows = rows

    @property
    def files(self) -> list[Path]:
        """The Arrow files the examples are read from."""
        return list(self._store.files)

    @property
    def rows(self) -> np.ndarray:
        """The table row of each example (int64; for code that reads the files itself)."""
        return self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return ExampleTable(self._store, self._rows[key])
        index = operator.index(key)
        if index < 0:
            index += len(self._rows)
        if not 0 <= index < len(self._rows):
            raise IndexError(f"example {key} out of range ({len(self._rows)} examples)")
        return self._store.example(int(self._rows[index]))

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        example = self._store.example
        for row in self._rows.tolist():
            yield example(row)

    def lengths(self) -> np.ndarray:
        """Tokens per example (int64, one per example, in order), read from the Arrow offsets
        without building any example: what length grouping and packing need."""
        return self._store.lengths[self._rows].astype(np.int64)

    def supervised_counts(self) -> np.ndarray:
        """Trained tokens (labels != -100) per example (int64, in order)."""
        return self._store.trained[self._rows].astype(np.int64)

    def select(self, indices: Sequence[int] | np.ndarray) -> ExampleTable:
        """A view of the examples at ``indices`` (positions in this table), in that order.

        Raises:
            IndexError: an index outside ``[-len, len)``.
        """
        positions = np.asarray(indices, dtype=np.int64).reshape(-1)
        if positions.size and (
            positions.max() >= len(self._rows) or positions.min() < -len(self._rows)
        ):
            raise IndexError(f"select: an index is out of range ({len(self._rows)} examples)")
        return ExampleTable(self._store, self._rows[positions])

    def to_list(self) -> list[dict[str, list[int]]]:
        """Every example as a Python dict of lists (copies them all into memory)."""
        return list(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ExampleTable):
            if other._store is self._store and np.array_equal(self._rows, other._rows):
                return True
        elif not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable-sequence semantics: compared by value

    def __repr__(self) -> str:
        where = self._store.files[0].parent if self._store.files else "no files"
        return f"ExampleTable({len(self)} examples, {where})"

    def __getstate__(self) -> dict[str, Any]:
        # the mapped files are reopened on unpickling (a DataLoader worker, a spawned process)
        return {"files": [str(f) for f in self._store.files], "rows": np.asarray(self._rows)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._store = TokenStore([Path(f) for f in state["files"]])
        self._rows = state["rows"]


class CacheEntry:
    """One entry of the cache (a folder named by the key's first 32 hex digits).

    Args:
        material: what the key is made of (JSON-serializable); ``key`` is its SHA-256.
        root: the cache folder; :func:`cache_root` when None.
    """

    def __init__(self, material: dict[str, Any], root: Path | None = None) -> None:
        text = json.dumps(material, sort_keys=True, separators=(",", ":"))
        self.material = material
        self.key = hashlib.sha256(text.encode("utf-8")).hexdigest()
        self.path = (root if root is not None else cache_root()) / self.key[:32]

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the entry's lock file (``<entry>.lock``) while checking or building it; another
        process building the same entry is waited for, then finds it built."""
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            yield

    def load(self) -> tuple[ExampleTable, dict[str, Any]] | None:
        """Open a finished entry: ``(examples, meta)``, or None when it is missing, unfinished
        or unreadable (it is then rebuilt)."""
        try:
            meta = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
            if meta.get("key") != self.key or meta.get("version") != CACHE_VERSION:
                return None
            store = TokenStore([self.path / name for name in meta["files"]])
            if meta["examples"]:
                rows = np.load(self.path / "selection.npy", mmap_mode="r")
            else:  # numpy cannot map a file with no data
                rows = np.zeros(0, np.int64)
            if len(rows) != meta["examples"] or (len(rows) and int(rows.max()) >= store.rows):
                return None
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
            return None
        return ExampleTable(store, rows), meta

    def reset(self) -> None:
        """Empty the entry's folder (what an interrupted build left) and create it."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)

    def discard(self) -> None:
        """Remove the entry's folder (a build that failed)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, selection: np.ndarray, meta: dict[str, Any]) -> None:
        """Write ``selection.npy`` and then, atomically, ``meta.json`` (which makes the entry
        visible to :meth:`load`)."""
        np.save(self.path / "selection.npy", np.asarray(selection, dtype=np.int64))
        meta = {"version": CACHE_VERSION, "key": self.key, **meta}
        scratch = self.path / "meta.json.tmp"
        scratch.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.replace(scratch, self.path / "meta.json")
