"""builtin:arith: sizes, determinism, disjoint splits, answers that add up."""

from __future__ import annotations

import re

import pytest

from fastmid.data import DataError, arith_problems
from fastmid.data.builtin import SPLIT_SIZES, TEMPLATES, problem_split


def test_sizes_and_determinism():
    train, test = arith_problems("train"), arith_problems("test")
    assert len(train) == SPLIT_SIZES["train"] == 5000 and len(test) == SPLIT_SIZES["test"] == 500
    assert arith_problems("test") == test
    assert {index for index, _, _ in train} == set(range(len(TEMPLATES)))


def test_splits_are_disjoint():
    train, test = arith_problems("train"), arith_problems("test")
    assert not {q for _, q, _ in train} & {q for _, q, _ in test}
    assert problem_split(0, (1, 2, 3)) in ("train", "test")


def test_every_step_is_correct_arithmetic_and_ends_with_the_final_answer():
    step = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
    for _, _, answer in arith_problems("test") + arith_problems("train")[:500]:
        lines = answer.split("\n")
        assert 2 <= len(lines) - 1 <= 4, answer  # 2 to 4 steps, then '#### n'
        computed = []
        for line in lines[:-1]:
            a, op, b, result = step.search(line).groups()
            a, b, result = int(a), int(b), int(result)
            expected = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
            assert expected == result and 0 < result < 1000, line
            computed.append(result)
        assert lines[-1] == f"#### {computed[-1]}"


def test_unknown_split():
    with pytest.raises(DataError, match="builtin:arith has splits"):
        arith_problems("validation")
