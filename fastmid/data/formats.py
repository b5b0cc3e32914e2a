"""Input formats -> the internal message schema (:class:`fastmid.data.schema.Conversation`).

Formats, detected from the columns (first rule that matches) unless ``--format`` names one:

=====================  ==========================================  ==============================
format                 columns                                     becomes
=====================  ==========================================  ==============================
``messages``           ``messages`` (or ``conversations`` whose    the messages as given
                       items have ``role``/``content``)
``sharegpt``           ``conversations`` with ``from``/``value``   cleaned up, see
                                                                   :mod:`fastmid.data.sharegpt`
``alpaca``             ``instruction``, ``output``, optional       user: instruction + blank line
                       ``input``                                   + input; assistant: output
``prompt-completion``  ``prompt``, ``completion`` (strings or      user: prompt (or the prompt
                       message lists)                              messages); assistant:
                                                                   completion
``gsm8k``              ``question``, ``answer``                    user: question; assistant:
                                                                   answer (with ``#### n``)
``text``               ``text``                                    raw text, every token trained
=====================  ==========================================  ==============================

Every chat format also takes an optional ``system`` column (a string), used as the system message
when the conversation has none. Message contents are stripped of leading and trailing whitespace
(as Llama 3's template does): the answer then starts right after the template's assistant header,
which keeps the prompt/answer boundary on a token boundary for byte-level BPE tokenizers.

A valid chat conversation has: an optional system message first and nowhere else, a user message
before the first assistant message, no two assistant messages in a row, and at least one assistant
message. Anything else is a :class:`fastmid.data.schema.BadRowError` naming the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastmid.data.schema import ROLES, BadRowError, Conversation, DataError, RowOrigin
from fastmid.data.sharegpt import sharegpt_to_messages

FORMATS: tuple[str, ...] = ("messages", "sharegpt", "alpaca", "prompt-completion", "gsm8k", "text")

#: The columns each format reads; ``messages`` reads ``messages``, or ``conversations`` when a
#: row has no ``messages``. Every other column of a row is ignored (and counted, see
#: :func:`ignored_fields`).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages", "conversations", "system"),
    "sharegpt": ("conversations", "system"),
    "alpaca": ("instruction", "input", "output", "system"),
    "prompt-completion": ("prompt", "completion", "system"),
    "gsm8k": ("question", "answer", "system"),
    "text": ("text",),
}
# the columns a source must have for a forced --format to read any row: all of one group
_REQUIRED_COLUMNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "messages": (("messages",), ("conversations",)),
    "sharegpt": (("conversations",),),
    "alpaca": (("instruction", "output"),),
    "prompt-completion": (("prompt", "completion"),),
    "gsm8k": (("question", "answer"),),
    "text": (("text",),),
}
# keys of the message dicts inside list columns; other keys are ignored (and counted)
_MESSAGE_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "messages": {"messages": ("role", "content"), "conversations": ("role", "content")},
    "sharegpt": {"conversations": ("from", "value")},
    "prompt-completion": {"prompt": ("role", "content"), "completion": ("role", "content")},
}


def _first_turn(rows: Sequence[dict[str, Any]], column: str) -> dict[str, Any] | None:
    for row in rows[:1000]:
        value = row.get(column)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return value[0]
    return None


def detect_format(columns: Sequence[str], rows: Sequence[dict[str, Any]], source: str) -> str:
    """Detect a source's format from its columns.

    Args:
        columns: the column names.
        rows: the rows (the first 1000 are looked at to tell role/content message lists from
            from/value ones in a ``conversations`` column).
        source: the source name, for the error.

    Returns:
        One of :data:`FORMATS`.

    Raises:
        DataError: no rule matches; the message lists the columns and the formats.
    """
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        turn = _first_turn(rows, "conversations")
        if turn is not None and "role" in turn and "from" not in turn:
            return "messages"
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt-completion"
    if {"question", "answer"} <= cols:
        return "gsm8k"
    if "text" in cols:
        return "text"
    raise DataError(
        f"{source}: cannot tell the data format from the columns {sorted(cols)}; expected "
        "messages | conversations | instruction+output | prompt+completion | question+answer | "
        f"text, or pass --format with one of {', '.join(FORMATS)}"
    )


def check_format_columns(fmt: str, columns: Sequence[str], source: str) -> None:
    """Check that a source has the columns a forced ``--format`` reads.

    Args:
        fmt: one of :data:`FORMATS`.
        columns: the source's column names.
        source: the source name, for the error.

    Raises:
        DataError: none of the format's column sets is present (every row would be a
            ``missing_column`` bad row); the message names the source, its columns and the
            format detected from them.
    """
    cols = set(columns)
    groups = _REQUIRED_COLUMNS.get(fmt, ())
    if not groups or any(set(group) <= cols for group in groups):
        return
    need = " or ".join("+".join(group) for group in groups)
    try:
        detected = f"the columns look like --format {detect_format(columns, [], source)}"
    except DataError:
        detected = "no format matches them"
    raise DataError(
        f"{source}: --format {fmt} reads the columns {need}, but this source has "
        f"{sorted(map(str, cols))} ({detected}); drop --format to detect the format, or pass "
        "the one that matches"
    )


def ignored_fields(row: dict[str, Any], fmt: str) -> list[str]:
    """The fields of a row that ``fmt`` does not read (they are ignored, not trained on).

    Args:
        row: column name -> value.
        fmt: one of :data:`FORMATS`.

    Returns:
        The names of the row's non-null columns outside :data:`FORMAT_COLUMNS` (for
        ``messages``: ``conversations`` when ``messages`` is read), then ``column[].key`` for
        each extra key of the message dicts in a list column (``messages[].tool_calls``,
        ``conversations[].weight``), each once.
    """
    used = set(FORMAT_COLUMNS.get(fmt, ()))
    nested = dict(_MESSAGE_KEYS.get(fmt, {}))
    if fmt == "messages":
        read = "messages" if "messages" in row else "conversations"
        used.discard("conversations" if read == "messages" else "messages")
        nested = {read: nested[read]}
    names = [str(key) for key, value in row.items() if key not in used and value is not None]
    for column, keys in nested.items():
        items = row.get(column)
        if not isinstance(items, list):
            continue
        extra = {
            str(key)
            for item in items
            if isinstance(item, dict)
            for key, value in item.items()
            if key not in keys and value is not None
        }
        names.extend(f"{column}[].{key}" for key in sorted(extra))
    return names


def has_empty_answer(conversation: Conversation) -> bool:
    """True when a chat conversation has an assistant message with no text.

    Contents are stripped when rows are converted, so whitespace-only answers count. Such a
    conversation is dropped (``empty_answer``) before tokenization: its only trained tokens
    would be the turn's closing token, teaching the model to answer nothing.
    """
    return not conversation.is_text and any(
        m["role"] == "assistant" and not m["content"] for m in conversation.messages
    )


def _valid_text(value: str, what: str, origin: RowOrigin) -> str:
    """``value`` when it can be encoded as UTF-8 (tokenizers need that)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRowError(
            "invalid_utf8",
            origin,
            f"{what} holds the lone surrogate {value[err.start]!r} at character {err.start} (a "
            "\\uD800-\\uDFFF escape without its pair), which is not text a tokenizer can read",
        ) from None
    return value


def _required(row: dict[str, Any], column: str, origin: RowOrigin) -> Any:
    value = row.get(column)
    if value is None:
        raise BadRowError("missing_column", origin, f"the column {column!r} is missing or null")
    return value


def _string(value: Any, what: str, origin: RowOrigin) -> str:
    if not isinstance(value, str):
        raise BadRowError(
            "wrong_type", origin, f"{what} must be a string, got {type(value).__name__}"
        )
    return _valid_text(value, what, origin).strip()


def _message_list(value: Any, column: str, origin: RowOrigin) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise BadRowError(
            "wrong_type",
            origin,
            f"{column!r} must be a list of {{role, content}} messages, got {type(value).__name__}",
        )
    messages = []
    for position, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRowError(
                "wrong_type",
                origin,
                f"{column}[{position}] is {type(message).__name__}, expected a dict",
            )
        role = message.get("role")
        if not isinstance(role, str):
            raise BadRowError(
                "wrong_type" if role is not None else "missing_column",
                origin,
                f"{column}[{position}] needs a string 'role', got {type(role).__name__}",
            )
        if role not in ROLES:
            raise BadRowError(
                "unknown_role",
                origin,
                f"{column}[{position}] has role {role!r}; roles are {', '.join(ROLES)}",
            )
        content = _string(message.get("content"), f"{column}[{position}]['content']", origin)
        messages.append({"role": role, "content": content})
    return messages


def validate_messages(messages: list[dict[str, str]], origin: RowOrigin) -> list[dict[str, str]]:
    """Check the structure of a chat conversation (see the module docstring).

    Args:
        messages: ``[{"role", "content"}, ...]`` with roles already checked.
        origin: the row, for errors.

    Returns:
        ``messages`` unchanged.

    Raises:
        BadRowError: ``empty_conversation``, ``misplaced_system``, ``leading_assistant``,
            ``consecutive_assistant`` or ``no_assistant_turn``.
    """
    if not messages:
        raise BadRowError("empty_conversation", origin, "the conversation has no messages")
    for position, message in enumerate(messages):
        if message["role"] == "system" and position != 0:
            raise BadRowError(
                "misplaced_system",
                origin,
                f"message {position} is a system message; only the first message may be",
            )
    first = 1 if messages[0]["role"] == "system" else 0
    if len(messages) > first and messages[first]["role"] == "assistant":
        raise BadRowError(
            "leading_assistant",
            origin,
            f"message {first} is an assistant message with no user message before it",
        )
    for position in range(1, len(messages)):
        if messages[position]["role"] == messages[position - 1]["role"] == "assistant":
            raise BadRowError(
                "consecutive_assistant",
                origin,
                f"messages {position - 1} and {position} are both assistant turns; merge them or "
                "put the user turn between them",
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRowError(
            "no_assistant_turn", origin, "the conversation has no assistant message to train on"
        )
    return messages


def _with_system(
    row: dict[str, Any], messages: list[dict[str, str]], origin: RowOrigin
) -> list[dict[str, str]]:
    system = row.get("system")
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    text = _string(system, "'system'", origin)
    return [{"role": "system", "content": text}, *messages] if text else messages


def row_to_conversation(
    row: dict[str, Any], fmt: str, origin: RowOrigin, sharegpt_counts: dict[str, int]
) -> Conversation | None:
    """Convert one row to the internal schema.

    Args:
        row: column name -> value.
        fmt: one of :data:`FORMATS`.
        origin: the row, for errors.
        sharegpt_counts: ShareGPT cleanup counters, updated in place (``sharegpt`` only).

    Returns:
        The :class:`Conversation`, or None for a ShareGPT conversation the cleanup rules skip.

    Raises:
        BadRowError: the row is malformed (kind and row named in the message).
        DataError: ``fmt`` is not a known format.
    """
    if fmt == "text":
        text = _required(row, "text", origin)
        if not isinstance(text, str):
            raise BadRowError(
                "wrong_type", origin, f"'text' must be a string, got {type(text).__name__}"
            )
        if not text.strip():
            raise BadRowError("empty_conversation", origin, "the 'text' column is empty")
        return Conversation(origin=origin, text=_valid_text(text, "'text'", origin))
    if fmt == "messages":
        column = "messages" if "messages" in row else "conversations"
        messages = _message_list(_required(row, column, origin), column, origin)
    elif fmt == "sharegpt":
        cleaned = sharegpt_to_messages(row.get("conversations"), origin, sharegpt_counts)
        if cleaned is None:
            return None
        messages = cleaned
    elif fmt == "alpaca":
        instruction = _string(_required(row, "instruction", origin), "'instruction'", origin)
        extra = row.get("input")
        extra_text = _string(extra, "'input'", origin) if extra is not None else ""
        output = _string(_required(row, "output", origin), "'output'", origin)
        user = f"{instruction}\n\n{extra_text}" if extra_text else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif fmt == "prompt-completion":
        prompt = _required(row, "prompt", origin)
        completion = _required(row, "completion", origin)
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": _string(prompt, "'prompt'", origin)}]
        else:
            messages = _message_list(prompt, "prompt", origin)
        if isinstance(completion, str):
            content = _string(completion, "'completion'", origin)
            messages.append({"role": "assistant", "content": content})
        else:
            answer = _message_list(completion, "completion", origin)
            if any(m["role"] != "assistant" for m in answer):
                raise BadRowError(
                    "wrong_type", origin, "'completion' messages must all be assistant messages"
                )
            messages.extend(answer)
    elif fmt == "gsm8k":
        question = _string(_required(row, "question", origin), "'question'", origin)
        answer = _string(_required(row, "answer", origin), "'answer'", origin)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    else:
        raise DataError(f"--format {fmt!r} is not a format; choose one of {', '.join(FORMATS)}")
    messages = _with_system(row, messages, origin)
    return Conversation(messages=validate_messages(messages, origin), origin=origin)
