"""The internal message schema every input format becomes, and the data errors.

A :class:`Conversation` is a list of messages ``{"role": ..., "content": ...}`` with roles
``system`` (only first), ``user`` and ``assistant`` (OpenAI / Hugging Face chat-template style), or,
for the ``text`` format, one raw string in which every token is trained. Each conversation carries a
:class:`RowOrigin` (source and row index) so that every later error can name the row it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fastmid.errors import FastmidError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")

#: Kinds of malformed rows. Each is an error by default and a counted skip with ``skip_bad_rows``.
BAD_ROW_KINDS: tuple[str, ...] = (
    "missing_column",  # a required column is absent or null
    "wrong_type",  # a column or message field has the wrong Python type
    "empty_conversation",  # no messages at all, or empty text
    "unknown_role",  # a role / speaker name outside the accepted spellings
    "misplaced_system",  # a system message that is not the first message
    "consecutive_assistant",  # two assistant turns in a row (messages-style formats)
    "no_assistant_turn",  # nothing to train on: the conversation has no assistant message
    "leading_assistant",  # the conversation opens with the assistant (nothing to answer)
    "invalid_json",  # a JSONL line or JSON record that does not parse
    "invalid_utf8",  # a line or record whose bytes are not UTF-8, or text with a lone surrogate
    "invalid_csv",  # a CSV line with more fields than the header names
    "truncated_file",  # a JSON array cut off in the middle of a record
    "template_rejected",  # the chat template raised on this conversation
    "no_reference_answer",  # an evaluation reference without a final number
)


class DataError(FastmidError, ValueError):
    """Bad data or a bad data option; the message names the source/row/flag and what to do.

    The CLI prints the message as one line, so line breaks in it (from a library's exception
    text or a template error quoted in it) are joined with spaces.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(" ".join(str(message).split("\n")).replace("\r", " "))


@dataclass(frozen=True)
class RowOrigin:
    """Where a row came from, written 1-based in every message.

    A row of a line-oriented file (JSON lines, CSV) is named by the physical line it starts on
    (``"data.jsonl, line 7"``: what an editor or ``sed -n 7p`` shows); a record of a JSON array,
    a Parquet file, a dataset folder or a built-in set by its 1-based position
    (``"data.json, row 3"``).

    Attributes:
        source: the file, folder or builtin name as the user wrote it (plus ``[split]`` for
            folders holding several splits).
        index: 0-based position of the row among the source's rows (for code; messages add 1).
        line: 1-based line of the file on which the row starts, or None when the source has no
            lines to point at.
    """

    source: str
    index: int
    line: int | None = None

    @property
    def where(self) -> str:
        """``"line N"`` or ``"row N"``, 1-based (see the class docstring)."""
        return f"line {self.line}" if self.line is not None else f"row {self.index + 1}"

    def __str__(self) -> str:
        return f"{self.source}, {self.where}"


class TemplatePrefixError(DataError):
    """The chat template renders a conversation's prefix differently from the full conversation.

    Labels are built from the rendered prompt prefix of each assistant turn; a template that
    rewrites earlier turns (e.g. a thinking model dropping ``<think>`` blocks from history) breaks
    that for every multi-turn example, so this is always an error, never a skipped row.
    """


class BadRowError(DataError):
    """A malformed row.

    Attributes:
        kind: one of :data:`BAD_ROW_KINDS`; ``skip_bad_rows`` counts skipped rows per kind.
        origin: the offending row (None when the problem is not tied to one row).
    """

    def __init__(self, kind: str, origin: RowOrigin | None, detail: str) -> None:
        if kind not in BAD_ROW_KINDS:
            raise ValueError(f"unknown bad-row kind {kind!r}")
        self.kind = kind
        self.origin = origin
        where = f"{origin}: " if origin is not None else ""
        super().__init__(
            f"{where}{detail} [{kind}]; fix the row or pass --skip-bad-rows to skip and count it"
        )


@dataclass
class Conversation:
    """One training example in the internal schema.

    Attributes:
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``; empty for the
            ``text`` format. After :func:`fastmid.data.formats.validate_messages` an optional
            system message comes first, the first non-system message is a user message, no two
            assistant messages are adjacent, and at least one assistant message exists.
        origin: where the row came from.
        text: the raw string of a ``text``-format row (every token trained); None otherwise.
    """

    messages: list[dict[str, str]] = field(default_factory=list)
    origin: RowOrigin = field(default_factory=lambda: RowOrigin("<memory>", 0))
    text: str | None = None

    @property
    def is_text(self) -> bool:
        """True for a ``text``-format example (no chat template, every token trained)."""
        return self.text is not None
