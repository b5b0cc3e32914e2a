"""The data of an ablation: a validation split carved out of the training data, and the test set.

Validation (for choosing each arm's learning rate) comes from the training data, never from the
test set. :func:`carve_validation` reads every training conversation once, draws ``--val-n``
problems among those whose answer ends in a ``#### <number>`` line (``random.Random(
--shuffle-seed)``), and writes two files in the messages format::

    <output>/data/validation.jsonl   the drawn problems
    <output>/data/train.jsonl        every other conversation, minus any whose prompt (the
                                     messages before the last answer) equals a validation
                                     problem's prompt

Every arm trains on ``train.jsonl`` (``--max-examples``/``--shuffle-seed`` then apply to it as in
``fastmid train``), so no validation prompt is ever trained on: the two files are disjoint by
prompt, which a test checks.

The test set (``--eval-accuracy-data``, default ``builtin:arith:test``) is scored by the number
after ``####`` (GSM8K convention): :func:`check_test_set` refuses a test set whose first
``--eval-n`` answers lack that line, naming the file.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastmid.ablate.arms import AblateError
from fastmid.data import Conversation, extract_final_answer, load_conversations, load_eval_problems

FINAL_MARK = "####"


def _answer_of(conversation: Conversation) -> str | None:
    """The last assistant message's text, or None (a text-format row has none)."""
    if conversation.is_text:
        return None
    answers = [m["content"] for m in conversation.messages if m["role"] == "assistant"]
    return answers[-1] if answers else None


def _has_marked_answer(text: str | None) -> bool:
    """True when ``text`` has a ``####`` followed by a number (GSM8K's final-answer line)."""
    if text is None or FINAL_MARK not in text:
        return False
    return extract_final_answer(text.rsplit(FINAL_MARK, 1)[1]) is not None


def prompt_key(messages: list[dict[str, str]]) -> str:
    """A conversation's prompt (the messages before its last assistant message) as a string key:
    two problems with the same key are the same question."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    prompt = messages if last is None else messages[:last]
    return json.dumps([[m["role"], m["content"]] for m in prompt], ensure_ascii=False)


@dataclass(frozen=True)
class CarvedData:
    """What :func:`carve_validation` wrote.

    Attributes:
        train, validation: the two JSONL files (messages format).
        train_count, validation_count: conversations in each.
        dropped_duplicates: training conversations left out because their prompt equals a
            validation problem's.
        source: the training data string it came from.
    """

    train: Path
    validation: Path
    train_count: int
    validation_count: int
    dropped_duplicates: int
    source: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {
            "source": self.source,
            "train": str(self.train),
            "validation": str(self.validation),
            "train_conversations": self.train_count,
            "validation_problems": self.validation_count,
            "dropped_duplicates_of_validation": self.dropped_duplicates,
        }


def _write_jsonl(path: Path, conversations: list[Conversation]) -> None:
    """Write ``{"messages": [...]}`` lines atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for c in conversations:
            messages = [{"role": m["role"], "content": m["content"]} for m in c.messages]
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def carve_validation(
    data: str,
    folder: Path,
    val_n: int,
    seed: int,
    *,
    split: str = "train",
    format: str | None = None,
    skip_bad_rows: bool = False,
) -> CarvedData:
    """Split the training data into ``train.jsonl`` and ``validation.jsonl`` under ``folder``.

    Deterministic: the same data, ``val_n`` and ``seed`` give the same files (an existing pair
    is rewritten identically).

    Args:
        data: ``--data`` (any source ``fastmid train`` reads).
        folder: where the two files go (``<output>/data``).
        val_n: validation problems to draw (>= 1).
        seed: seed of the draw (``--shuffle-seed``).
        split, format, skip_bad_rows: as for ``fastmid train``.

    Raises:
        AblateError: text-format data; fewer than ``val_n + 1`` conversations with a
            ``#### <number>`` answer (naming ``--data`` or ``--val-n``).
        fastmid.data.DataError: unreadable data (names the file and row).
    """
    conversations = load_conversations(
        data, split=split, format=format, skip_bad_rows=skip_bad_rows, flag="--data"
    )
    if any(c.is_text for c in conversations):
        raise AblateError(
            f"--data {data}: text-format data has no answers to score; fastmid ablate needs "
            "question/answer or chat data with '#### <number>' answers"
        )
    candidates = [i for i, c in enumerate(conversations) if _has_marked_answer(_answer_of(c))]
    if not candidates:
        raise AblateError(
            f"--data {data}: no training example ends in a '#### <number>' answer line, so no "
            "validation problem can be carved from it (GSM8K format)"
        )
    if len(candidates) <= val_n:
        raise AblateError(
            f"--val-n {val_n}: the training data has only {len(candidates)} problems with a "
            "'#### <number>' answer and must keep some to train on; lower --val-n"
        )
    chosen = sorted(random.Random(seed).sample(candidates, val_n))
    validation = [conversations[i] for i in chosen]
    held = {prompt_key(c.messages) for c in validation}
    taken = set(chosen)
    train = [
        c
        for i, c in enumerate(conversations)
        if i not in taken and prompt_key(c.messages) not in held
    ]
    dropped = len(conversations) - len(taken) - len(train)
    folder = Path(folder)
    _write_jsonl(folder / "validation.jsonl", validation)
    _write_jsonl(folder / "train.jsonl", train)
    return CarvedData(
        folder / "train.jsonl", folder / "validation.jsonl", len(train), len(validation), dropped,
        data,
    )  # fmt: skip


def check_test_set(data: str, n: int, *, skip_bad_rows: bool = False) -> tuple[int, set[str]]:
    """Check the test set: its first ``n`` problems exist and each answer has a ``####`` line.

    Args:
        data: ``--eval-accuracy-data`` (``builtin:arith:test`` or a GSM8K-format JSONL).
        n: ``--eval-n``.
        skip_bad_rows: as ``--skip-bad-rows``.

    Returns:
        ``(problems scored, their prompt keys)`` (:func:`prompt_key`, to find test problems that
        also occur in the training data).

    Raises:
        AblateError: no problem, or an answer without ``#### <number>`` (naming the flag, the
            file and the first such row).
        fastmid.data.DataError: unreadable data.
    """
    flag = "--eval-accuracy-data"
    problems = load_eval_problems(data, n, skip_bad_rows=skip_bad_rows, flag=flag)
    if not problems:
        raise AblateError(f"{flag} {data}: no test problem found")
    conversations = load_conversations(data, split="test", skip_bad_rows=skip_bad_rows, flag=flag)
    used = [c for c in conversations if not c.is_text][: len(problems)]
    unmarked = [c for c in used if not _has_marked_answer(_answer_of(c))]
    if len(unmarked) == len(used):
        raise AblateError(
            f"{flag} {data}: none of its answers has a '#### <number>' final-answer line "
            "(GSM8K format); fastmid ablate scores the number after '####'"
        )
    if unmarked:
        raise AblateError(
            f"{flag} {data}: {len(unmarked)} of the {len(used)} test answers have no "
            f"'#### <number>' line, the first at {unmarked[0].origin}; fix them or lower --eval-n"
        )
    return len(problems), {prompt_key(p.messages) for p in problems}


def training_prompt_keys(path: Path) -> set[str]:
    """Prompt keys of every conversation in a ``train.jsonl`` written by :func:`carve_validation`."""
    keys = set()
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                keys.add(prompt_key(json.loads(line)["messages"]))
    return keys
