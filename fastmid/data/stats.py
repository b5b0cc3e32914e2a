"""Counts and token statistics of one data build (what ``fastmid data inspect`` prints)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastmid.data.sharegpt import CLEANUP_COUNTERS
from fastmid.data.truncate import DROP_REASONS as TRUNCATION_DROP_REASONS

#: Why an example was dropped: ``empty_answer`` (an assistant message with no text, dropped
#: before tokenization) and the outcomes of :func:`fastmid.data.truncate.truncate_example`.
DROP_REASONS: tuple[str, ...] = ("empty_answer", *TRUNCATION_DROP_REASONS)


def summarize(values: Sequence[int]) -> dict[str, float | int | None]:
    """Mean, median, 95th percentile and maximum of a list of counts.

    Percentiles use linear interpolation between order statistics (numpy's default, "method 7"
    of Hyndman & Fan 1996).

    Args:
        values: e.g. tokens per example.

    Returns:
        ``{"count", "total", "mean", "p50", "p95", "max"}``; the statistics are None when
        ``values`` is empty.
    """
    if len(values) == 0:
        return {"count": 0, "total": 0, "mean": None, "p50": None, "p95": None, "max": None}
    array = np.asarray(values, dtype=np.float64)
    return {
        "count": len(values),
        "total": int(array.sum()),
        "mean": float(array.mean()),
        "p50": float(np.percentile(array, 50)),
        "p95": float(np.percentile(array, 95)),
        "max": int(array.max()),
    }


@dataclass
class DataStats:
    """What happened to the data on its way to examples.

    Attributes:
        sources: the sources read, as named in the data string (with split).
        formats: source -> detected (or forced) format.
        rows_read: rows read from all sources (for a truncated JSON file: complete records).
        bad_rows: bad-row kind -> rows skipped with ``skip_bad_rows`` (see
            :data:`fastmid.data.schema.BAD_ROW_KINDS`).
        sharegpt: ShareGPT cleanup counters (see :mod:`fastmid.data.sharegpt`).
        ignored_fields: field -> rows in which it was present (not null) and ignored because
            the format does not read it (see :func:`fastmid.data.formats.ignored_fields`;
            ``messages[].name`` for a key of the message dicts).
        conversations: valid conversations after format conversion and cleanup.
        tokenized: conversations tokenized (fewer than ``conversations`` when ``max_examples``
            stopped the build early).
        kept: examples returned (including truncated ones).
        truncated: kept examples that were truncated.
        dropped: drop reason -> count (:data:`DROP_REASONS`: ``empty_answer``, ``too_long``,
            ``answer_too_long``, ``no_supervised_tokens``); none of them reaches training.
        tokens: tokens per kept example.
        supervised_tokens: trained tokens (labels != -100) per kept example.
        chat_template: ``"tokenizer"`` or ``"chatml-fallback"``.
        cache: where the tokenized examples live and whether this build reused them (see
            :mod:`fastmid.data.cache`): ``{"status": "cached" | "tokenized", "path": folder,
            "seconds": time to data-ready, "num_proc": tokenizing processes (0 when cached)}``;
            None for stats not made by :func:`fastmid.data.build_sft_examples`.
    """

    sources: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)
    rows_read: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)
    sharegpt: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLEANUP_COUNTERS, 0))
    ignored_fields: dict[str, int] = field(default_factory=dict)
    conversations: int = 0
    tokenized: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    tokens: list[int] = field(default_factory=list)
    supervised_tokens: list[int] = field(default_factory=list)
    chat_template: str = "tokenizer"
    cache: dict[str, Any] | None = None

    @property
    def format(self) -> str:
        """The detected format, or ``"mixed (a, b)"`` when sources differ."""
        kinds = sorted(set(self.formats.values()))
        if not kinds:
            return "unknown"
        return kinds[0] if len(kinds) == 1 else f"mixed ({', '.join(kinds)})"

    @property
    def cache_note(self) -> str | None:
        """One line on the tokenization cache for a data summary, e.g. ``"cached (read in 0.4 s
        from /root/.cache/huggingface/datasets/fastmid-sft/v1/3f2a...)"`` or ``"tokenized in
        41.0 s with 2 processes, cached in ..."``; None without a cache record."""
        if self.cache is None:
            return None
        where, seconds = self.cache["path"], self.cache["seconds"]
        if self.cache["status"] == "cached":
            return f"cached (read in {seconds:.1f} s from {where})"
        procs = self.cache["num_proc"]
        return (
            f"tokenized in {seconds:.1f} s with {procs} process{'es' if procs > 1 else ''}, "
            f"cached in {where}"
        )

    @property
    def bad_rows_skipped(self) -> int:
        """Total rows skipped as malformed."""
        return sum(self.bad_rows.values())

    @property
    def dropped_total(self) -> int:
        """Total examples dropped after tokenization."""
        return sum(self.dropped.values())

    def count_bad_row(self, kind: str) -> None:
        """Count one skipped malformed row of ``kind``."""
        self.bad_rows[kind] = self.bad_rows.get(kind, 0) + 1

    def count_ignored(self, names: Sequence[str]) -> None:
        """Count one row's ignored fields (each name once per row)."""
        for name in names:
            self.ignored_fields[name] = self.ignored_fields.get(name, 0) + 1

    def count_dropped(self, reason: str) -> None:
        """Count one conversation dropped before tokenization (e.g. ``empty_answer``)."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def record(self, outcome: str, example: dict[str, list[int]] | None) -> None:
        """Record the outcome of :func:`fastmid.data.truncate.truncate_example`.

        Args:
            outcome: ``"kept"``, ``"truncated"`` or a drop reason.
            example: the kept example (None when dropped).
        """
        self.tokenized += 1
        if example is None:
            self.dropped[outcome] = self.dropped.get(outcome, 0) + 1
            return
        self.kept += 1
        self.truncated += outcome == "truncated"
        self.tokens.append(len(example["input_ids"]))
        self.supervised_tokens.append(sum(label != -100 for label in example["labels"]))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable summary (no per-example lists)."""
        return {
            "sources": list(self.sources),
            "formats": dict(self.formats),
            "format": self.format,
            "chat_template": self.chat_template,
            "rows_read": self.rows_read,
            "bad_rows_skipped": self.bad_rows_skipped,
            "bad_rows": dict(self.bad_rows),
            "sharegpt_cleanup": dict(self.sharegpt),
            "ignored_fields": dict(self.ignored_fields),
            "conversations": self.conversations,
            "tokenized": self.tokenized,
            "kept": self.kept,
            "truncated": self.truncated,
            "dropped": self.dropped_total,
            "dropped_by_reason": dict(self.dropped),
            "tokens": summarize(self.tokens),
            "supervised_tokens": summarize(self.supervised_tokens),
            "cache": dict(self.cache) if self.cache is not None else None,
        }
