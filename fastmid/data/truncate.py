"""Fit a tokenized example into ``max_seq_len`` tokens.

``prompt-left`` (default) keeps the answer and cuts the prompt from the left:

* Chat: the sequence must end with a trained assistant turn's closing token. Starting from the
  last trained turn and moving to earlier ones, the first turn whose own tokens (plus the BOS, if
  any) fit is kept whole, later turns are cut off, and the tokens before it are cut from the left
  (after the BOS, which stays at position 0) until the sequence fits. Tokens of an earlier turn
  that survive the cut keep their labels. If no trained turn fits on its own, the example is
  dropped (``answer_too_long``): a cut answer without its closing token would teach the model not
  to stop.
* Text: the head ``max_seq_len`` tokens are kept (there is no prompt to cut).

``drop`` drops every example longer than ``max_seq_len`` (``too_long``).

An example that ends up with no trained token is dropped (``no_supervised_tokens``); it never
reaches the loss. ``labels[0]`` is reset to -100 after a cut (position 0 is never predicted).
"""

from __future__ import annotations

from fastmid.data.schema import DataError
from fastmid.data.tokenize import TokenizedExample
from fastmid.labels import IGNORE_INDEX

TRUNCATION_MODES: tuple[str, ...] = ("prompt-left", "drop")
DROP_REASONS: tuple[str, ...] = ("too_long", "answer_too_long", "no_supervised_tokens")


def truncate_example(
    example: TokenizedExample, max_seq_len: int, mode: str = "prompt-left"
) -> tuple[dict[str, list[int]] | None, str]:
    """Truncate (or drop) one example.

    Args:
        example: the tokenized example.
        max_seq_len: the most tokens a sequence may have (>= 2).
        mode: ``"prompt-left"`` or ``"drop"``.

    Returns:
        ``(example dict with "input_ids" and "labels" (lists of int, same length <=
        max_seq_len), outcome)`` where outcome is ``"kept"`` or ``"truncated"``; or
        ``(None, reason)`` with reason in :data:`DROP_REASONS`.

    Raises:
        DataError: unknown mode or ``max_seq_len`` < 2.
    """
    if mode not in TRUNCATION_MODES:
        raise DataError(f"--truncation {mode!r}: choose one of {', '.join(TRUNCATION_MODES)}")
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise DataError(f"--max-seq-len must be an integer >= 2, got {max_seq_len!r}")
    ids, labels = example.input_ids, example.labels
    outcome = "kept"
    if len(ids) > max_seq_len:
        if mode == "drop":
            return None, "too_long"
        outcome = "truncated"
        if example.is_text:
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        else:
            bos = example.bos
            for start, end in reversed(example.turns):
                if end - start + bos <= max_seq_len:
                    cut = max(bos, end - (max_seq_len - bos))
                    ids = ids[:bos] + ids[cut:end]
                    labels = labels[:bos] + labels[cut:end]
                    break
            else:
                return None, "answer_too_long"
        labels = [IGNORE_INDEX, *labels[1:]]
    if all(label == IGNORE_INDEX for label in labels):
        return None, "no_supervised_tokens"
    return {"input_ids": list(ids), "labels": list(labels)}, outcome
