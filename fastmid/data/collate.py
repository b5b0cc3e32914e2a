"""Batches: right padding, attention mask, and length-grouped sampling.

Padding is always on the right, whatever ``tokenizer.padding_side`` says: training needs no
left padding (nothing is generated after the batch), and right padding keeps every sequence's
positions 0..T-1 without ``position_ids`` arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from fastmid.data.schema import DataError
from fastmid.labels import IGNORE_INDEX


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token.

    Padding is told apart by ``attention_mask`` and ``labels``, never by id, so reusing EOS is
    safe (the usual choice for Llama-style tokenizers that ship no pad token).

    Raises:
        DataError: the tokenizer has neither a pad nor an EOS token.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token; "
            "set tokenizer.pad_token in the model folder"
        )
    return int(pad)


def collate_batch(
    examples: Sequence[dict[str, Sequence[int]]],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad examples on the right into one batch.

    Args:
        examples: ``{"input_ids": [...], "labels": [...]}`` dicts (other keys are ignored).
        pad_token_id: the id written into padding positions (often equal to EOS; padding is
            told apart by ``attention_mask``, never by id).
        pad_to_multiple_of: round the padded length T up to a multiple of this (e.g. 8 for
            tensor cores); None pads to the longest example.

    Returns:
        ``input_ids`` (B, T) int64, ``attention_mask`` (B, T) int64 (1 = real token, 0 = padding),
        ``labels`` (B, T) int64 (-100 on padding).

    Raises:
        DataError: no examples, an example whose ``input_ids`` and ``labels`` differ in length
            or are empty, or a ``pad_token_id`` that is not an integer.
    """
    if not examples:
        raise DataError("collate_batch got no examples")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise DataError(
            f"pad_token_id must be an int, got {pad_token_id!r}; a tokenizer without a pad "
            "token can pad with its eos_token_id (labels and attention_mask mark the padding)"
        )
    lengths = []
    for index, example in enumerate(examples):
        n_ids, n_labels = len(example["input_ids"]), len(example["labels"])
        if n_ids != n_labels or n_ids == 0:
            raise DataError(
                f"example {index} of the batch has {n_ids} input_ids and {n_labels} labels; "
                "both must be equal and non-zero"
            )
        lengths.append(n_ids)
    width = max(lengths)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, (example, length) in enumerate(zip(examples, lengths, strict=True)):
        input_ids[row, :length] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        labels[row, :length] = torch.as_tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class LengthGroupedSampler(Sampler[int]):
    """Yields example indices so that consecutive groups of ``batch_size`` have similar lengths.

    The scheme of Hugging Face's ``LengthGroupedSampler``: shuffle all indices, cut them into
    mega-batches of ``batch_size * mega_batch_mult``, sort each mega-batch by length (longest
    first), cut it into batches, and shuffle the order of the batches. The full batch holding
    the longest example goes first, so an out-of-memory error shows at step 1, and the one short
    batch (when ``len(lengths)`` is not a multiple of ``batch_size``) goes last, so that a
    ``DataLoader(batch_size=batch_size, sampler=...)`` cuts batches exactly where this sampler
    does. Every index appears exactly once per epoch.

    Args:
        lengths: tokens per example.
        batch_size: examples per batch (>= 1).
        seed: base seed; epoch ``e`` uses ``torch.Generator().manual_seed(seed + e)``.
        mega_batch_mult: mega-batch size in batches (50, Hugging Face's default); larger groups
            pad less but mix less.

    Raises:
        DataError: empty ``lengths`` or ``batch_size``/``mega_batch_mult`` < 1.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batch_mult: int = 50
    ) -> None:
        if len(lengths) == 0:
            raise DataError("LengthGroupedSampler got no lengths (no examples)")
        if batch_size < 1 or mega_batch_mult < 1:
            raise DataError(
                f"batch_size and mega_batch_mult must be >= 1, got {batch_size}, {mega_batch_mult}"
            )
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (its order is seeded with ``seed + epoch``)."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This epoch's batches of indices (the last may be short)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        mega = self.batch_size * self.mega_batch_mult
        batches: list[list[int]] = []
        for begin in range(0, len(order), mega):
            group = sorted(order[begin : begin + mega], key=lambda i: -self.lengths[i])
            batches.extend(
                group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)
            )
        short = [b for b in batches if len(b) < self.batch_size]
        full = [b for b in batches if len(b) == self.batch_size]
        permutation = torch.randperm(len(full), generator=generator).tolist()
        full = [full[i] for i in permutation]
        if full:
            longest = max(range(len(full)), key=lambda i: max(self.lengths[j] for j in full[i]))
            full[0], full[longest] = full[longest], full[0]
        return full + short

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch

    def __len__(self) -> int:
        return len(self.lengths)
