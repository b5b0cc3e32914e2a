"""Packing: several examples share one row of ``--max-seq-len`` tokens, without attending to each
other (``--packing``).

Rows are filled by best-fit decreasing (Johnson 1973; the bin-packing heuristic that places the
longest item first, each into the fullest row where it still fits): it wastes at most about 22% of
the optimum's rows in the worst case and typically leaves a few percent of padding. An example
longer than a row never reaches this module (the tokenizer's truncation rules cut or drop it
first), and no example is split across rows.

In a packed row (:func:`collate_packed`):

* ``position_ids`` restart at 0 for every example, so each example sees the positions (RoPE
  angles) it would see alone;
* the first label of every example is ``-100``: nothing learns to predict the next example's first
  token from the previous example's last one;
* ``attention_mask`` stays the usual (B, T) 0/1 padding mask (what the token counts read); the
  attention itself is block-diagonal, built from ``position_ids`` by
  :func:`fastmid.models.loss.packed_attention_mask` (no query attends across examples);
* the loss stays ``sum of token losses / supervised tokens``, so a packed row gives the same
  per-example token losses and gradients as its examples unpacked.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastmid.data.schema import DataError
from fastmid.labels import IGNORE_INDEX


def pack_rows(lengths: Sequence[int], max_len: int, seed: int = 0) -> list[list[int]]:
    """Group example indices into rows of at most ``max_len`` tokens (best-fit decreasing).

    Examples are placed longest first (ties in a seeded random order), each into the row with the
    least room left that still fits it, else into a new row. The rows come back in a seeded random
    order, each listing its examples in placement order.

    Args:
        lengths: tokens per example (each >= 1).
        max_len: tokens per row (``--max-seq-len``).
        seed: seeds the order of ties and of the rows (an epoch passes ``seed + epoch``).

    Returns:
        Rows of example indices: every index exactly once.

    Raises:
        DataError: an example longer than ``max_len`` or shorter than 1 token, or ``max_len`` < 1.
    """
    if max_len < 1:
        raise DataError(f"--max-seq-len must be >= 1 to pack rows, got {max_len}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= max_len:
            raise DataError(
                f"example {i} has {n} tokens; packing needs 1..{max_len} (--max-seq-len): "
                "truncation should have cut it first"
            )
    gen = torch.Generator().manual_seed(seed)
    ties = torch.randperm(len(lengths), generator=gen).tolist()
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], ties[i]))
    rows: list[list[int]] = []
    # (room left, row index), kept sorted: the best fit is the first entry with room >= length.
    rooms: list[tuple[int, int]] = []
    for i in order:
        n = int(lengths[i])
        at = bisect.bisect_left(rooms, (n, -1))
        if at < len(rooms):
            room, row = rooms.pop(at)
            rows[row].append(i)
            bisect.insort(rooms, (room - n, row))
        else:
            rows.append([i])
            bisect.insort(rooms, (max_len - n, len(rows) - 1))
    shuffle = torch.randperm(len(rows), generator=gen).tolist()
    return [rows[k] for k in shuffle]


def collate_packed(
    rows: Sequence[Sequence[dict[str, Sequence[int]]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """One batch of packed rows, right-padded to the longest row.

    Args:
        rows: each row a list of examples (``{"input_ids", "labels"}``), concatenated in order.
        pad_token_id: the padding id (told apart by ``attention_mask``, never by id).

    Returns:
        ``input_ids``, ``labels`` (the first label of every example -100, padding -100),
        ``attention_mask`` (1 = a real token), ``position_ids`` (0.. per example, 0 on padding):
        all (B, T) int64.

    Raises:
        DataError: an empty row or an example whose ``input_ids`` and ``labels`` differ in length.
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise DataError("collate_packed got an empty batch or an empty row")
    widths = []
    for row in rows:
        width = 0
        for example in row:
            n = len(example["input_ids"])
            if n != len(example["labels"]) or n == 0:
                raise DataError(
                    f"a packed example has {n} input_ids and {len(example['labels'])} labels; "
                    "both must be equal and non-zero"
                )
            width += n
        widths.append(width)
    shape = (len(rows), max(widths))
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for example in row:
            n = len(example["input_ids"])
            input_ids[b, start : start + n] = torch.as_tensor(example["input_ids"])
            labels[b, start : start + n] = torch.as_tensor(example["labels"])
            labels[b, start] = IGNORE_INDEX  # never predicted from the previous example
            position_ids[b, start : start + n] = torch.arange(n)
            start += n
        attention_mask[b, :start] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
    }


@dataclass(frozen=True)
class PackingStats:
    """What packing does to one epoch.

    Attributes:
        examples: examples packed; rows: rows they fill; max_len: tokens per row.
        tokens: real tokens; fill_ratio: ``tokens / (rows x max_len)``.
        padded_tokens_unpacked: tokens (real + padding) of the same examples in micro-batches of
            ``micro_batch`` padded to their longest example, in a seeded random order (what
            training without ``--packing`` computes on).
        padded_tokens_packed: tokens of the packed rows in micro-batches of ``micro_batch`` rows,
            each padded to its longest row.
    """

    examples: int
    rows: int
    max_len: int
    tokens: int
    fill_ratio: float
    padded_tokens_unpacked: int
    padded_tokens_packed: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return dict(self.__dict__)


def packing_stats(
    lengths: Sequence[int], max_len: int, micro_batch: int, seed: int = 0
) -> PackingStats:
    """:class:`PackingStats` of packing ``lengths`` into rows of ``max_len`` (``seed`` as in
    :func:`pack_rows`, and for the unpacked order)."""
    lengths = [int(n) for n in lengths]  # plain ints: the stats go to JSON
    rows = pack_rows(lengths, max_len, seed)
    row_lengths = [sum(lengths[i] for i in row) for row in rows]
    tokens = int(sum(lengths))
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()

    def padded(sizes: list[int]) -> int:
        return sum(
            max(sizes[k : k + micro_batch]) * len(sizes[k : k + micro_batch])
            for k in range(0, len(sizes), micro_batch)
        )

    return PackingStats(
        examples=len(lengths),
        rows=len(rows),
        max_len=max_len,
        tokens=tokens,
        fill_ratio=tokens / (len(rows) * max_len) if rows else 0.0,
        padded_tokens_unpacked=padded([int(lengths[i]) for i in order]),
        padded_tokens_packed=padded(row_lengths),
    )
