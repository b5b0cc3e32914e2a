"""ShareGPT conversations (``conversations: [{"from", "value"}, ...]``) and their cleanup rules.

Real ShareGPT exports are messy. The rules, applied in this order and counted in
:class:`fastmid.data.stats.DataStats` (``sharegpt`` counters):

1. **Map speakers** (``speakers_renamed`` counts turns whose name is not ``human``/``gpt``/
   ``system``): ``human`` and ``user`` -> ``user``; ``gpt``, ``assistant``, ``chatgpt``,
   ``bing``, ``bard``, ``model`` -> ``assistant``; ``system`` -> ``system``. Names are matched
   case-insensitively after stripping. Any other name is an ``unknown_role`` bad row.
2. **Drop empty turns** (``empty_turns_dropped``): a turn whose value is empty or whitespace says
   nothing; it is removed (before merging, so its neighbours may merge).
3. **Merge repeated speakers** (``turns_merged``, one per merge): consecutive turns of the same
   role are joined with a blank line (``"\\n\\n"``) into one turn: the same person continuing.
4. **Drop leading assistant turns** (``leading_assistant_turns_dropped``): an assistant turn
   before the first user turn answers nothing visible (the user's message was lost in export).
5. **Drop trailing user turns** (``trailing_user_turns_dropped``): a user turn after the last
   assistant turn has no answer to train on.
6. **Skip empty conversations** (``empty_conversations_skipped``): no turns at all, or no
   assistant turn left after rules 1-5; these are counted, not errors.

A ``system`` turn anywhere but first is a ``misplaced_system`` bad row. Message contents are
stripped of leading and trailing whitespace, like every other format (see
:mod:`fastmid.data.formats`).
"""

from __future__ import annotations

from typing import Any

from fastmid.data.schema import BadRowError, RowOrigin

SPEAKER_ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}
CANONICAL_SPEAKERS: frozenset[str] = frozenset({"human", "gpt", "system"})
CLEANUP_COUNTERS: tuple[str, ...] = (
    "speakers_renamed",
    "empty_turns_dropped",
    "turns_merged",
    "leading_assistant_turns_dropped",
    "trailing_user_turns_dropped",
    "empty_conversations_skipped",
)


def sharegpt_to_messages(
    turns: Any, origin: RowOrigin, counts: dict[str, int]
) -> list[dict[str, str]] | None:
    """Apply the cleanup rules to one ShareGPT conversation.

    Args:
        turns: the row's ``conversations`` value: a list of ``{"from": str, "value": str}``.
        origin: the row, for errors.
        counts: cleanup counters (keys of :data:`CLEANUP_COUNTERS`), incremented in place.

    Returns:
        Messages ``[{"role", "content"}, ...]`` (optional system first, then user/assistant
        alternating, ending with assistant), or None when rule 6 skips the conversation.

    Raises:
        BadRowError: ``missing_column`` (no ``conversations``), ``wrong_type`` (not a list of
            dicts with string ``from``/``value``), ``unknown_role``, ``misplaced_system``.
    """
    if turns is None:
        raise BadRowError("missing_column", origin, "the column 'conversations' is missing or null")
    if not isinstance(turns, list):
        raise BadRowError(
            "wrong_type", origin, f"'conversations' must be a list, got {type(turns).__name__}"
        )
    messages: list[dict[str, str]] = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRowError(
                "wrong_type", origin, f"turn {position} is {type(turn).__name__}, expected a dict"
            )
        speaker, value = turn.get("from"), turn.get("value")
        if not isinstance(speaker, str) or not isinstance(value, str):
            raise BadRowError(
                "wrong_type",
                origin,
                f"turn {position} needs string 'from' and 'value', got "
                f"{type(speaker).__name__} and {type(value).__name__}",
            )
        name = speaker.strip().lower()
        role = SPEAKER_ROLES.get(name)
        if role is None:
            raise BadRowError(
                "unknown_role",
                origin,
                f"turn {position} has speaker {speaker!r}; known speakers: "
                + ", ".join(sorted(SPEAKER_ROLES)),
            )
        if name not in CANONICAL_SPEAKERS:
            counts["speakers_renamed"] += 1
        if role == "system" and position != 0:
            raise BadRowError(
                "misplaced_system", origin, f"turn {position} is a system turn; only turn 0 may be"
            )
        try:
            value.encode("utf-8")  # tokenizers cannot read lone surrogates
        except UnicodeEncodeError as err:
            raise BadRowError(
                "invalid_utf8",
                origin,
                f"turn {position} holds the lone surrogate {value[err.start]!r} at character "
                f"{err.start} (a \\uD800-\\uDFFF escape without its pair), which is not text a "
                "tokenizer can read",
            ) from None
        content = value.strip()
        if not content:
            counts["empty_turns_dropped"] += 1
            continue
        if messages and messages[-1]["role"] == role:
            counts["turns_merged"] += 1
            messages[-1]["content"] += "\n\n" + content
            continue
        messages.append({"role": role, "content": content})

    start = 1 if messages and messages[0]["role"] == "system" else 0
    while len(messages) > start and messages[start]["role"] == "assistant":
        del messages[start]
        counts["leading_assistant_turns_dropped"] += 1
    while messages and messages[-1]["role"] == "user":
        messages.pop()
        counts["trailing_user_turns_dropped"] += 1
    if not any(m["role"] == "assistant" for m in messages):
        counts["empty_conversations_skipped"] += 1
        return None
    return messages
