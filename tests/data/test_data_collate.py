"""Right padding, attention mask, labels on padding; the length-grouped sampler."""

from __future__ import annotations

import random

import pytest
import torch

from fastmid.data import DataError, LengthGroupedSampler, collate_batch


def test_collate_pads_right_with_mask_and_ignored_labels():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [-100]},
    ]
    batch = collate_batch(examples, pad_token_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    padded = collate_batch(examples, pad_token_id=2, pad_to_multiple_of=8)
    assert padded["input_ids"].shape == (2, 8) and padded["attention_mask"].sum() == 4


def test_collate_rejects_bad_input():
    with pytest.raises(DataError, match="no examples"):
        collate_batch([], 0)
    with pytest.raises(DataError, match="2 input_ids and 1 labels"):
        collate_batch([{"input_ids": [1, 2], "labels": [1]}], 0)
    with pytest.raises(DataError, match="pad_token_id must be an int"):
        collate_batch([{"input_ids": [1], "labels": [1]}], None)


def padding(lengths, batches):
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouped_sampler_is_a_seeded_permutation_that_pads_less():
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(1003)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1, mega_batch_mult=16)
    order = list(sampler)
    assert sorted(order) == list(range(1003)) and len(sampler) == 1003
    assert order == list(LengthGroupedSampler(lengths, 8, seed=1, mega_batch_mult=16))
    assert order != list(LengthGroupedSampler(lengths, 8, seed=2, mega_batch_mult=16))
    sampler.set_epoch(1)
    assert list(sampler) != order
    batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert batches == LengthGroupedSampler(lengths, 8, seed=1, mega_batch_mult=16).batches()
    assert len(batches[-1]) == 1003 % 8  # the short batch is last
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch is first
    shuffled = list(range(1003))
    random.Random(5).shuffle(shuffled)
    random_batches = [shuffled[i : i + 8] for i in range(0, 1003, 8)]
    assert padding(lengths, batches) < 0.25 * padding(lengths, random_batches)


def test_sampler_rejects_empty_input():
    with pytest.raises(DataError, match="no lengths"):
        LengthGroupedSampler([], 4)
