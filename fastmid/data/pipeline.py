"""The SFT data pipeline: sources -> conversations -> tokenized, truncated examples.

``build_sft_examples`` is what ``fastmid train`` calls; ``load_conversations`` is the first half
(no tokenizer), shared with evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastmid.data.formats import (
    FORMATS,
    check_format_columns,
    detect_format,
    has_empty_answer,
    ignored_fields,
    row_to_conversation,
)
from fastmid.data.schema import BadRowError, Conversation, DataError
from fastmid.data.sources import load_source, split_data_spec
from fastmid.data.stats import DataStats
from fastmid.data.tokenize import ExampleTokenizer
from fastmid.data.truncate import TRUNCATION_MODES, truncate_example
from fastmid.progress import make_progress

if TYPE_CHECKING:
    from rich.console import Console

TOKENIZE_CHUNK = 64  # conversations per batched tokenizer call
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
) -> tuple[list[dict[str, list[int]]], DataStats]:
    """Build tokenized SFT examples with labels.

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
        progress: called as ``progress(conversations_done, conversations_total)`` after each
            chunk of 64 conversations is tokenized (for a progress bar).
        flag: the option that gave ``data``, named in its errors: ``--data`` (training data),
            ``--eval-data`` (the held-out loss data) or ``--eval-accuracy-data``.
        console: where to show tokenization progress (:func:`fastmid.progress.make_progress`:
            a transient rich bar on a terminal, else a plain line per tenth of the work and at
            least one a minute, e.g. ``tokenizing --data 2048/20000 elapsed 0:00:02 ETA
            0:00:17``), only when at least :data:`PROGRESS_MIN_CONVERSATIONS` (10,000)
            conversations are to be tokenized (``max_examples`` when smaller: then the count is
            of examples kept); None (the default) shows nothing.

    Returns:
        ``(examples, stats)``: each example is ``{"input_ids": list[int], "labels": list[int]}``
        of equal length <= ``max_seq_len``, labels -100 where not trained and at position 0,
        with at least one trained token; ``stats`` is the :class:`DataStats`. A conversation
        with an empty (or whitespace-only) assistant message is never an example: it is
        counted in ``stats.dropped["empty_answer"]``.

    Raises:
        DataError: bad options (naming the flag), unreadable data, a malformed row (without
            ``skip_bad_rows``), a chat template that breaks the prompt-prefix property, or no
            example left (with ``require_examples``).
    """
    if truncation not in TRUNCATION_MODES:
        raise DataError(f"--truncation {truncation!r}: choose one of {', '.join(TRUNCATION_MODES)}")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise DataError(f"--max-seq-len must be an integer >= 2, got {max_seq_len!r}")
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    ):
        raise DataError(f"--max-examples must be a positive integer, got {max_examples!r}")
    stats = DataStats()
    encode = ExampleTokenizer(
        tokenizer, train_on_prompt=train_on_prompt, last_turn_only=last_turn_only
    )
    stats.chat_template = "chatml-fallback" if encode.renderer.uses_fallback else "tokenizer"
    conversations = load_conversations(
        data,
        split=split,
        format=format,
        skip_bad_rows=skip_bad_rows,
        shuffle_seed=shuffle_seed,
        stats=stats,
        flag=flag,
    )
    # dropped here, not in load_conversations: evaluation reads the same rows and must report
    # an empty reference answer (no_reference_answer) rather than lose the problem silently
    answered = [c for c in conversations if not has_empty_answer(c)]
    for _ in range(len(conversations) - len(answered)):
        stats.count_dropped("empty_answer")
    conversations = answered
    examples: list[dict[str, list[int]]] = []
    # With a binding max_examples the work ends when that many examples are kept, so that count
    # is the progress (an ETA over every conversation of a large source would be wrong).
    capped = max_examples is not None and max_examples < len(conversations)
    work = max_examples if capped else len(conversations)
    shown = console if work >= PROGRESS_MIN_CONVERSATIONS else None
    bar = make_progress(
        shown,
        label="tokenizing {task.description}",
        eta=True,
        transient=True,
        plain_lines=PROGRESS_PLAIN_LINES,
    )
    done = 0
    with bar:
        task = bar.add_task(flag, total=work)
        for begin in range(0, len(conversations), TOKENIZE_CHUNK):
            if max_examples is not None and len(examples) >= max_examples:
                break
            chunk = conversations[begin : begin + TOKENIZE_CHUNK]
            for tokenized in encode.encode_batch(chunk):
                if max_examples is not None and len(examples) >= max_examples:
                    break
                if isinstance(tokenized, BadRowError):
                    if not skip_bad_rows:
                        raise tokenized
                    stats.count_bad_row(tokenized.kind)
                    continue
                example, outcome = truncate_example(tokenized, max_seq_len, truncation)
                stats.record(outcome, example)
                if example is not None:
                    examples.append(example)
            converted = min(begin + TOKENIZE_CHUNK, len(conversations))
            if progress is not None:
                progress(converted, len(conversations))
            done = len(examples) if capped else converted
            bar.update(task, completed=done)
        if done < work:  # a capped source ran dry (dropped examples): end the bar where it is
            bar.update(task, total=done, completed=done)
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


def split_eval(
    examples: list[dict[str, list[int]]], eval_fraction: float = 0.05, seed: int = 0
) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]]]:
    """Carve a held-out evaluation split off a list of examples, deterministically.

    ``round(eval_fraction * n)`` examples (at least 1 when ``eval_fraction > 0``) are chosen by
    ``random.Random(seed).sample``; both parts keep the input order.

    Args:
        examples: the examples.
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
    held = set(random.Random(seed).sample(range(total), count))
    train = [ex for i, ex in enumerate(examples) if i not in held]
    held_out = [ex for i, ex in enumerate(examples) if i in held]
    return train, held_out
