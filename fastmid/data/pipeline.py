"""The SFT data pipeline: sources -> conversations -> tokenized, truncated examples.

``build_sft_examples`` is what ``fastmid train`` calls; ``load_conversations`` is the first half
(no tokenizer), shared with evaluation. Examples are tokenized once into the tokenization cache
(:mod:`fastmid.data.cache`) and read back from its memory-mapped Arrow files; a later build with
the same data, tokenizer and options (a second run, a resume) reads them without tokenizing.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from fastmid.data.cache import (
    BAD_ROW,
    OUTCOMES,
    TOKENS_SCHEMA,
    TRUNCATED,
    CacheEntry,
    ExampleTable,
    LiveState,
    TokenizeBatch,
    TokenStore,
    code_fingerprint,
    conversations_of,
    data_fingerprint,
    datasets_from_file,
    map_progress,
    tokenizer_fingerprint,
    tokenizing_processes,
    write_conversations,
)
from fastmid.data.chat_template import ChatRenderer
from fastmid.data.formats import (
    FORMATS,
    check_format_columns,
    detect_format,
    has_empty_answer,
    ignored_fields,
    row_to_conversation,
)
from fastmid.data.schema import BadRowError, Conversation, DataError
from fastmid.data.sources import load_source, quiet_datasets, split_data_spec
from fastmid.data.stats import DataStats
from fastmid.data.tokenize import ExampleTokenizer
from fastmid.data.truncate import TRUNCATION_MODES
from fastmid.progress import make_progress

if TYPE_CHECKING:
    from rich.console import Console

TOKENIZE_CHUNK = 64  # conversations per batched tokenizer call (one `map` batch)
# build_sft_examples shows progress only from this many conversations to tokenize (``max_examples``
# when it is smaller). fastmid train's default 2,000 arith examples take about a second with
# SmolLM2's tokenizer on 2 cores, where a bar or log lines would only be noise; at 0.3-3 ms per
# conversation (short problems to long multi-turn chats), 10,000 take seconds to half a minute,
# long enough for a silent wait to look like a hang.
PROGRESS_MIN_CONVERSATIONS = 10_000
# Plain progress lines (a console that is not a terminal) per tokenization: one per tenth of the
# work, besides the one printed at least every minute.
PROGRESS_PLAIN_LINES = 10


def load_conversations(
    data: str,
    *,
    split: str = "train",
    format: str | None = None,
    skip_bad_rows: bool = False,
    shuffle_seed: int | None = None,
    stats: DataStats | None = None,
    flag: str = "--data",
) -> list[Conversation]:
    """Read every source of a data string and convert its rows to conversations.

    Args:
        data: ``"builtin:arith"``, ``"builtin:arith:test"``, a path (json/jsonl/parquet/csv or a
            ``save_to_disk`` folder), or several joined by commas.
        split: split of built-in sets and dataset folders (files are one split each).
        format: force a format (one of :data:`fastmid.data.formats.FORMATS`) for every source;
            None detects each source's format from its columns.
        skip_bad_rows: skip malformed rows and count them in ``stats.bad_rows`` instead of raising.
        shuffle_seed: shuffle the conversations of all sources together with
            ``random.Random(shuffle_seed)``; None keeps source order.
        stats: a :class:`DataStats` to fill (sources, formats, rows read, bad rows, ShareGPT
            cleanup counts, ignored fields, conversations); a fresh one is used when None.
        flag: the option that gave ``data`` (``--data``, ``--eval-data``,
            ``--eval-accuracy-data``), named by errors about the data string itself.

    Returns:
        The conversations, in source order (or shuffled).

    Raises:
        DataError: an unreadable or empty source, an unknown format, a forced ``format`` whose
            columns a source lacks; without ``skip_bad_rows``, a
            :class:`fastmid.data.schema.BadRowError` naming the first malformed row (1-based
            line of a JSON-lines/CSV file, else 1-based row).
    """
    if format is not None and format not in FORMATS:
        raise DataError(f"--format {format!r} is not a format; choose one of {', '.join(FORMATS)}")
    stats = stats if stats is not None else DataStats()
    conversations: list[Conversation] = []
    for source in split_data_spec(data, flag):
        rows = load_source(source, split=split, skip_bad_rows=skip_bad_rows, flag=flag)
        stats.sources.append(rows.name)
        if format is not None:
            check_format_columns(format, rows.columns, rows.name)
        fmt = format or detect_format(rows.columns, rows.rows, rows.name)
        stats.formats[rows.name] = fmt
        stats.rows_read += len(rows.rows)
        for kind, count in rows.bad_rows.items():
            stats.bad_rows[kind] = stats.bad_rows.get(kind, 0) + count
        for index, row in enumerate(rows.rows):
            try:
                conversation = row_to_conversation(row, fmt, rows.origin(index), stats.sharegpt)
            except BadRowError as err:
                if not skip_bad_rows:
                    raise
                stats.count_bad_row(err.kind)
                continue
            stats.count_ignored(ignored_fields(row, fmt))
            if conversation is not None:
                conversations.append(conversation)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(conversations)
    stats.conversations = len(conversations)
    return conversations


def build_sft_examples(
    data: str,
    tokenizer: Any,
    *,
    split: str = "train",
    max_seq_len: int = 2048,
    format: str | None = None,
    max_examples: int | None = None,
    shuffle_seed: int | None = None,
    truncation: str = "prompt-left",
    train_on_prompt: bool = False,
    last_turn_only: bool = False,
    skip_bad_rows: bool = False,
    require_examples: bool = True,
    progress: Callable[[int, int], None] | None = None,
    flag: str = "--data",
    console: Console | None = None,
    num_proc: int | None = None,
) -> tuple[ExampleTable, DataStats]:
    """Build tokenized SFT examples with labels, through the tokenization cache.

    The first build of a data string tokenizes it with ``datasets.Dataset.map`` (batches of
    64 conversations, :func:`fastmid.data.cache.tokenizing_processes` processes) into an entry
    of the cache (:mod:`fastmid.data.cache`); a build with the same data files (by content),
    tokenizer and options opens that entry instead, in well under a second, and returns the
    same examples in the same order. ``stats.cache`` says which happened and where.

    Args:
        data: see :func:`load_conversations`.
        tokenizer: a fast Hugging Face tokenizer; its chat template is used (ChatML, with a
            warning, when it has none).
        split: see :func:`load_conversations`.
        max_seq_len: the most tokens per example.
        format: see :func:`load_conversations`.
        max_examples: stop once this many examples are kept (after shuffling); None keeps all.
        shuffle_seed: see :func:`load_conversations`.
        truncation: ``"prompt-left"`` or ``"drop"`` (see :mod:`fastmid.data.truncate`).
        train_on_prompt: train every token, not only the assistant's.
        last_turn_only: train only the last assistant turn of each conversation.
        skip_bad_rows: skip and count malformed rows (including rows the chat template
            rejects) instead of raising.
        require_examples: raise when no example is left (``fastmid data inspect`` passes False).
        progress: called as ``progress(conversations_done, conversations_total)`` while
            tokenizing: after each batch of 64 conversations when tokenizing in this process,
            as the worker processes report otherwise; never on a cache hit.
        flag: the option that gave ``data``, named in its errors: ``--data`` (training data),
            ``--eval-data`` (the held-out loss data) or ``--eval-accuracy-data``.
        console: where to show tokenization progress (:func:`fastmid.progress.make_progress`:
            a transient rich bar on a terminal, else a plain line per tenth of the work and at
            least one a minute, e.g. ``tokenizing --data 2048/20000 elapsed 0:00:02 ETA
            0:00:17``), only when at least :data:`PROGRESS_MIN_CONVERSATIONS` (10,000)
            conversations are to be tokenized (``max_examples`` when smaller: then the count is
            of examples kept); None (the default) shows nothing. A cache hit shows nothing.
        num_proc: tokenizing processes; None picks
            :func:`fastmid.data.cache.tokenizing_processes` (one per CPU, at least 5,000
            conversations each). It never changes the examples, so it is not part of the key.

    Returns:
        ``(examples, stats)``: ``examples`` is an :class:`fastmid.data.cache.ExampleTable`, a
        read-only sequence whose items are ``{"input_ids": list[int], "labels": list[int]}`` of
        equal length <= ``max_seq_len``, labels -100 where not trained and at position 0,
        with at least one trained token (``examples.lengths()`` gives every length without
        reading the examples); ``stats`` is the :class:`DataStats`, ``stats.cache`` the cache
        record. A conversation with an empty (or whitespace-only) assistant message is never an
        example: it is counted in ``stats.dropped["empty_answer"]``.

    Raises:
        DataError: bad options (naming the flag), unreadable data, a malformed row (without
            ``skip_bad_rows``), a chat template that breaks the prompt-prefix property, or no
            example left (with ``require_examples``), or a cache folder that cannot be
            written (a full disk, no permission).
    """
    started = time.perf_counter()
    if truncation not in TRUNCATION_MODES:
        raise DataError(f"--truncation {truncation!r}: choose one of {', '.join(TRUNCATION_MODES)}")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise DataError(f"--max-seq-len must be an integer >= 2, got {max_seq_len!r}")
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    ):
        raise DataError(f"--max-examples must be a positive integer, got {max_examples!r}")
    if num_proc is not None and (
        isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1
    ):
        raise DataError(f"num_proc must be a positive integer or None, got {num_proc!r}")
    if format is not None and format not in FORMATS:
        raise DataError(f"--format {format!r} is not a format; choose one of {', '.join(FORMATS)}")
    encode = ExampleTokenizer(
        tokenizer, train_on_prompt=train_on_prompt, last_turn_only=last_turn_only
    )
    sources = data_fingerprint(data, flag)
    if sources is None:
        # a source names nothing readable: the loader raises the error that says why
        load_conversations(data, split=split, format=format, skip_bad_rows=skip_bad_rows, flag=flag)
        raise DataError(f"{flag} {data}: a source cannot be read")  # pragma: no cover
    options = {
        "split": split,
        "format": format,
        "max_seq_len": max_seq_len,
        "truncation": truncation,
        "train_on_prompt": train_on_prompt,
        "last_turn_only": last_turn_only,
        "skip_bad_rows": skip_bad_rows,
        "shuffle_seed": shuffle_seed,
        "max_examples": max_examples,
    }
    material = {
        # sizes and digests decide; modification times are recorded in meta.json only
        "data": [
            {"source": s["source"], "files": [_without_mtime(f) for f in s["files"]]}
            for s in sources
        ],
        "tokenizer": tokenizer_fingerprint(tokenizer, encode),
        "options": options,
        "code": code_fingerprint(),
    }
    entry = CacheEntry(material)
    try:
        with entry.locked():
            found = entry.load()
            status = "cached"
            if found is None:
                status = "tokenized"
                build = _Build(entry, encode, options, flag, progress, console, num_proc)
                found = build.run(data, sources)
    except OSError as exc:  # the data readers turn their own OSErrors into DataErrors
        raise DataError(
            f"the tokenization cache {entry.path.parent} cannot be written: {exc}; free some "
            "space there or point HF_DATASETS_CACHE at a writable folder"
        ) from exc
    examples, meta = found
    stats = _stats_from_meta(meta, examples)
    if meta["chatml_warning"]:
        # once per build, from this process, whether tokenized here, in workers or not at all
        ChatRenderer(tokenizer).render([], add_generation_prompt=False)
    stats.cache = {
        "status": status,
        "path": str(entry.path),
        "seconds": round(time.perf_counter() - started, 3),
        "num_proc": 0 if status == "cached" else int(meta["num_proc"]),
    }
    if require_examples and not examples:
        what = "training example" if flag == "--data" else "example"
        named = f"{data}: no {what} left" if flag == "--data" else f"{flag} {data}: no {what} left"
        raise DataError(
            f"{named} ({stats.rows_read} rows read, "
            f"{stats.bad_rows_skipped} bad rows skipped, {stats.conversations} conversations, "
            f"dropped: {stats.dropped}); check --max-seq-len and the data with "
            "`fastmid data inspect`"
        )
    return examples, stats


def _without_mtime(file: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in file.items() if k != "mtime_ns"}


# DataStats fields rebuilt from the table rather than stored in meta.json
_TABLE_FIELDS = ("tokens", "supervised_tokens", "cache")


def _stats_record(stats: DataStats) -> dict[str, Any]:
    return {
        f.name: getattr(stats, f.name)
        for f in dataclasses.fields(stats)
        if f.name not in _TABLE_FIELDS
    }


def _stats_from_meta(meta: dict[str, Any], examples: ExampleTable) -> DataStats:
    known = {f.name for f in dataclasses.fields(DataStats)} - set(_TABLE_FIELDS)
    stats = DataStats(**{k: v for k, v in meta["stats"].items() if k in known})
    stats.tokens = examples.lengths().tolist()
    stats.supervised_tokens = examples.supervised_counts().tolist()
    return stats


def _trim_heap() -> None:
    """Give the memory of the freed conversations back to the system (glibc keeps freed heap
    pages mapped otherwise, and they would count as this process's memory for the whole run)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # pragma: no cover - not glibc
            pass


def _window(wanted: int, rows_done: int, kept: int) -> int:
    """Conversations to tokenize next for ``wanted`` more examples (``max_examples``): at first
    ``wanted`` plus one batch (most conversations become examples); later as many as the keep
    rate so far predicts, plus a tenth and a batch; twice the rows so far when none was kept."""
    if rows_done == 0:
        return wanted + TOKENIZE_CHUNK
    if kept == 0:
        return 2 * rows_done + TOKENIZE_CHUNK
    return int(wanted * rows_done / kept * 1.1) + TOKENIZE_CHUNK


class _WorkerProgress:
    """Progress of a map in worker processes: they report conversations done, not examples
    kept, so a capped build's bar counts every conversation as kept until the window ends (and
    is then set to the exact count)."""

    def __init__(self, show: Callable[[int, int], None], start: int, kept: int) -> None:
        self.show, self.start, self.kept, self.rows = show, start, kept, 0

    def __call__(self, rows: int) -> None:
        self.rows += rows
        self.show(self.start + self.rows, self.kept + self.rows)


class _Build:
    """One tokenization into a cache entry (the first build of a key).

    Conversations are read (:func:`load_conversations`), shuffled, stripped of empty answers
    and written to an Arrow file in the entry; ``Dataset.map`` tokenizes them in *windows*
    (all of them at once, or, with a binding ``max_examples``, a little more than the examples
    still wanted, then more if drops left too few). The outcomes are then walked in order
    exactly as the sequential loop of earlier versions did: the examples up to the
    ``max_examples``-th kept one, the bad rows before it (counted, or the first raised), the
    drops.
    """

    def __init__(
        self,
        entry: CacheEntry,
        encode: ExampleTokenizer,
        options: dict[str, Any],
        flag: str,
        progress: Callable[[int, int], None] | None,
        console: Console | None,
        num_proc: int | None,
    ) -> None:
        self.entry = entry
        self.encode = encode
        self.options = options
        self.flag = flag
        self.progress = progress
        self.console = console
        self.num_proc = num_proc

    def run(self, data: str, sources: list[dict[str, Any]]) -> tuple[ExampleTable, dict[str, Any]]:
        """Tokenize, commit the entry and open it.

        Raises:
            DataError: as :func:`build_sft_examples`; the unfinished entry is removed.
        """
        opts, started = self.options, time.perf_counter()
        stats = DataStats()
        stats.chat_template = (
            "chatml-fallback" if self.encode.renderer.uses_fallback else "tokenizer"
        )
        conversations = load_conversations(
            data,
            split=opts["split"],
            format=opts["format"],
            skip_bad_rows=opts["skip_bad_rows"],
            shuffle_seed=opts["shuffle_seed"],
            stats=stats,
            flag=self.flag,
        )
        # dropped here, not in load_conversations: evaluation reads the same rows and must
        # report an empty reference answer (no_reference_answer) rather than lose the problem
        answered = [c for c in conversations if not has_empty_answer(c)]
        for _ in range(len(conversations) - len(answered)):
            stats.count_dropped("empty_answer")
        is_chat = np.fromiter((not c.is_text for c in answered), dtype=bool, count=len(answered))
        entry = self.entry
        entry.reset()
        table_path = entry.path / "conversations.arrow"
        try:
            origin_sources = write_conversations(table_path, answered)
            # The rows now live in the Arrow file: free the Python copies before tokenizing
            # (and before forking workers), so a large set is not held twice.
            del conversations, answered
            _trim_heap()
            with quiet_datasets():
                table = datasets_from_file(table_path)
            files, procs = self._tokenize(table, origin_sources)
            selection, end = self._walk(files, stats, table, origin_sources)
            del table
            entry.commit(
                selection,
                {
                    "examples": int(selection.size),
                    "files": files,
                    "stats": _stats_record(stats),
                    "chatml_warning": bool(
                        self.encode.renderer.uses_fallback and is_chat[:end].any()
                    ),
                    "num_proc": procs,
                    "tokenize_seconds": round(time.perf_counter() - started, 3),
                    "data": sources,  # with modification times, which the key leaves out
                    "material": entry.material,
                },
            )
        except BaseException:
            entry.discard()
            raise
        finally:
            with contextlib.suppress(OSError):  # (Windows keeps a mapped file)
                table_path.unlink(missing_ok=True)
        found = entry.load()
        if found is None:  # pragma: no cover - only a concurrent deletion gets here
            raise DataError(f"the tokenization cache entry {entry.path} vanished while built")
        return found

    def _tokenize(self, table: Any, origin_sources: list[str]) -> tuple[list[str], int]:
        """Map the conversation table to token rows, window by window, showing progress.

        Returns:
            ``(token files in row order, most processes used)``.
        """
        cap, total = self.options["max_examples"], len(table)
        capped = cap is not None and cap < total
        # With a binding max_examples the work ends when that many examples are kept, so that
        # count is the progress (an ETA over every conversation of a large source would be
        # wrong).
        work = cap if capped else total
        shown = self.console if work >= PROGRESS_MIN_CONVERSATIONS else None
        bar = make_progress(
            shown,
            label="tokenizing {task.description}",
            eta=True,
            transient=True,
            plain_lines=PROGRESS_PLAIN_LINES,
        )
        live = LiveState(cap=cap if capped else None, skip_bad_rows=self.options["skip_bad_rows"])
        files: list[str] = []
        procs_used = 1
        with bar:
            task = bar.add_task(self.flag, total=work)
            done = 0

            def show(converted: int, kept: int) -> None:
                nonlocal done
                done = min(kept, work) if capped else converted
                bar.update(task, completed=done)
                if self.progress is not None:
                    self.progress(converted, total)

            start, window = 0, 0
            while start < total and not live.stopped:
                end = total if not capped else start + _window(cap - live.kept, start, live.kept)
                end = min(end, total)
                procs = max(1, min(self.num_proc or tokenizing_processes(end - start), end - start))
                files += self._map_window(
                    table, start, end, window, procs, origin_sources, live, show
                )
                procs_used = max(procs_used, procs)
                start, window = end, window + 1
            if done < work:  # a capped source ran dry (dropped examples): end the bar there
                bar.update(task, total=done, completed=done)
        return files, procs_used

    def _map_window(
        self,
        table: Any,
        start: int,
        end: int,
        window: int,
        procs: int,
        origin_sources: list[str],
        live: LiveState,
        show: Callable[[int, int], None],
    ) -> list[str]:
        """Tokenize conversations ``[start, end)`` with one ``Dataset.map`` in ``procs``
        processes into ``tokens-<window>*.arrow``; update ``live`` (examples kept, stop).

        Returns:
            The names of the files written, in row order (one per process).
        """
        import datasets

        opts, key = self.options, self.entry.key
        part = table
        if (start, end) != (0, len(table)):
            part = table.select(range(start, end), new_fingerprint=f"{key[:40]}-in{window}")
        function = TokenizeBatch(
            self.encode, opts["max_seq_len"], opts["truncation"], origin_sources
        )
        on_rows = None
        if procs == 1:  # in this process: exact progress per batch, early stop at the cap
            live.rows = 0
            live.on_batch = lambda rows, kept: show(start + rows, kept)
            function.live = live
        else:  # workers report rows done, not examples kept: close enough for a bar
            on_rows = _WorkerProgress(show, start, live.kept)
        with quiet_datasets(), map_progress(on_rows):
            mapped = part.map(
                function,
                batched=True,
                batch_size=TOKENIZE_CHUNK,
                num_proc=procs if procs > 1 else None,
                remove_columns=part.column_names,
                features=datasets.Features.from_arrow_schema(TOKENS_SCHEMA),
                cache_file_name=str(self.entry.path / f"tokens-{window}.arrow"),
                new_fingerprint=f"{key[:40]}-{window}",
                load_from_cache_file=False,
                desc="tokenizing",
            )
        if procs > 1:
            outcomes = mapped.data.column("outcome").to_numpy()
            live.kept += int(np.count_nonzero(outcomes <= TRUNCATED))
            live.stopped = live.cap is not None and live.kept >= live.cap
            show(end, live.kept)
        return [Path(f["filename"]).name for f in mapped.cache_files]

    def _walk(
        self, files: list[str], stats: DataStats, table: Any, origin_sources: list[str]
    ) -> tuple[np.ndarray, int]:
        """Replay the sequential loop over the outcomes: where ``max_examples`` stops it, the
        bad rows before that point (raised, or counted with ``skip_bad_rows``), the drops.

        Returns:
            ``(selection, conversations walked)``: the table rows of the kept examples, in
            order, and how many conversations the loop got through.

        Raises:
            BadRowError: the first bad row before the stop, without ``skip_bad_rows``.
        """
        opts = self.options
        store = TokenStore([self.entry.path / f for f in files])
        outcomes = store.outcomes
        kept = outcomes <= TRUNCATED
        end = len(outcomes)
        if opts["max_examples"] is not None:
            reached = np.flatnonzero(np.cumsum(kept) >= opts["max_examples"])
            if reached.size:
                end = int(reached[0]) + 1
        prefix = outcomes[:end]
        bad = np.flatnonzero(prefix == BAD_ROW)
        if bad.size and not opts["skip_bad_rows"]:
            # Only worker processes get here (this process raises at once): their rows align
            # with the conversation table, so tokenize that conversation again to raise its
            # own error, naming its row.
            position = int(bad[0])
            batch = table[position : position + 1]
            (result,) = self.encode.encode_batch(conversations_of(batch, origin_sources))
            if isinstance(result, BadRowError):
                raise result
            raise DataError(  # pragma: no cover - tokenization is deterministic
                f"{result.origin}: tokenizing this conversation failed in a worker process but "
                "not when repeated"
            )
        if bad.size:
            kinds = store.error_kinds()
            for position in bad.tolist():
                stats.count_bad_row(kinds[position])
        for code, reason in enumerate(OUTCOMES):
            if code > TRUNCATED and code != BAD_ROW:
                count = int(np.count_nonzero(prefix == code))
                if count:
                    stats.dropped[reason] = stats.dropped.get(reason, 0) + count
        selection = np.flatnonzero(kept[:end]).astype(np.int64)
        stats.tokenized = end - int(bad.size)
        stats.kept = int(selection.size)
        stats.truncated = int(np.count_nonzero(prefix == TRUNCATED))
        return selection, end


Example = TypeVar("Example")


def split_eval(
    examples: Sequence[Example], eval_fraction: float = 0.05, seed: int = 0
) -> tuple[Sequence[Example], Sequence[Example]]:
    """Carve a held-out evaluation split off the examples, deterministically.

    ``round(eval_fraction * n)`` examples (at least 1 when ``eval_fraction > 0``) are chosen by
    ``random.Random(seed).sample``; both parts keep the input order.

    Args:
        examples: the examples: an :class:`fastmid.data.cache.ExampleTable` (the parts are
            then views of it: no example is copied) or a list (the parts are lists).
        eval_fraction: share held out, in ``[0, 1)``.
        seed: the sampling seed.

    Returns:
        ``(train, held_out)``; the same inputs always give the same split.

    Raises:
        DataError: ``eval_fraction`` outside ``[0, 1)``, or a split that leaves no training
            example.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"--eval-fraction must be in [0, 1), got {eval_fraction!r}")
    total = len(examples)
    count = 0 if eval_fraction == 0 else max(1, round(eval_fraction * total))
    if count >= total and count > 0:
        raise DataError(
            f"--eval-fraction {eval_fraction} holds out {count} of {total} examples and leaves "
            "none to train on; lower it or pass --eval-data"
        )
    held = random.Random(seed).sample(range(total), count)
    if isinstance(examples, ExampleTable):
        mask = np.zeros(total, dtype=bool)
        mask[held] = True
        return examples.select(np.flatnonzero(~mask)), examples.select(np.flatnonzero(mask))
    chosen = set(held)
    train = [ex for i, ex in enumerate(examples) if i not in chosen]
    held_out = [ex for i, ex in enumerate(examples) if i in chosen]
    return train, held_out
