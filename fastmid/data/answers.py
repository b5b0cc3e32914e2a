"""Exact-match evaluation data: prompts with reference final answers, GSM8K conventions.

GSM8K (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems") ends each reference
solution with ``#### <number>``; the usual scoring takes that number from the reference and the
last number of a generated answer, with thousands separators (commas) removed, and compares
strings. :func:`extract_final_answer` does both: the number after the last ``####`` when there is
one, else the last number in the text; it also writes ``72.0`` / ``72.`` as ``72`` so that a
model's ``$72.00`` matches a reference ``72``.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import NamedTuple

from fastmid.data.pipeline import load_conversations
from fastmid.data.schema import BadRowError, DataError
from fastmid.data.stats import DataStats

# a thousands-grouped number (1,234,567.5) or a plain one (1234.5, .5 is not matched)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_FINAL_MARK = "####"


class EvalProblem(NamedTuple):
    """One exact-match problem (unpacks as ``messages, answer``).

    Attributes:
        messages: the conversation up to, not including, the reference assistant message.
        answer: the reference final answer, normalized by :func:`normalize_number`.
    """

    messages: list[dict[str, str]]
    answer: str


def normalize_number(token: str) -> str:
    """Canonical string of a number: commas removed, integral values without a decimal part.

    Args:
        token: e.g. ``"1,234"``, ``"-3.50"``, ``"72.0"``.

    Returns:
        e.g. ``"1234"``, ``"-3.5"``, ``"72"``; the input without commas if it does not parse.
    """
    plain = token.replace(",", "").rstrip(".")
    try:
        value = Decimal(plain)
    except InvalidOperation:
        return plain
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_final_answer(text: str) -> str | None:
    """The final numeric answer of a solution text.

    Args:
        text: a GSM8K reference (``... #### 72``) or a generated answer.

    Returns:
        The first number after the last ``####`` if the text has one, else the last number in
        the text, normalized (:func:`normalize_number`); None when there is no number.
    """
    if _FINAL_MARK in text:
        tail = text.rsplit(_FINAL_MARK, 1)[1]
        match = _NUMBER.search(tail)
        if match:
            return normalize_number(match.group(0))
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def load_eval_problems(
    data: str,
    n: int | None = None,
    *,
    split: str = "test",
    format: str | None = None,
    skip_bad_rows: bool = False,
    flag: str = "--data",
) -> list[EvalProblem]:
    """Prompts and reference answers for exact-match evaluation.

    Works on any chat data whose last assistant message holds a number (``builtin:arith:test``,
    GSM8K JSONL with ``question``/``answer``, or messages); the prompt is every message before
    the last assistant message.

    Args:
        data: a data string (see :func:`fastmid.data.load_conversations`), e.g. ``builtin:arith``.
        n: the first ``n`` problems (source order); None for all.
        split: split of built-in sets and dataset folders (default ``"test"``).
        format: force a format; None detects it.
        skip_bad_rows: skip malformed rows and references without a number.
        flag: the option that gave ``data`` (``--data`` of ``fastmid eval``,
            ``--eval-accuracy-data`` of ``fastmid train``), named by errors about it.

    Returns:
        The :class:`EvalProblem` list.

    Raises:
        DataError: unreadable data, ``text``-format data (no reference answer), ``n`` < 1; a
            malformed row or a reference without a number (kind ``no_reference_answer``) unless
            ``skip_bad_rows``.
    """
    if n is not None and n < 1:
        raise DataError(f"--n must be a positive integer, got {n}")
    stats = DataStats()
    conversations = load_conversations(
        data, split=split, format=format, skip_bad_rows=skip_bad_rows, stats=stats, flag=flag
    )
    problems: list[EvalProblem] = []
    for conversation in conversations:
        if n is not None and len(problems) >= n:
            break
        if conversation.is_text:
            raise DataError(
                f"{conversation.origin.source}: text-format data has no reference answers; "
                "exact-match evaluation needs question/answer or chat data"
            )
        messages = conversation.messages
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        answer = extract_final_answer(messages[last]["content"])
        if answer is None:
            error = BadRowError(
                "no_reference_answer",
                conversation.origin,
                "the reference answer contains no number (GSM8K style '#### <number>')",
            )
            if not skip_bad_rows:
                raise error
            continue
        problems.append(EvalProblem([dict(m) for m in messages[:last]], answer))
    return problems
