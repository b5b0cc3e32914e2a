"""GSM8K-style final answers and evaluation problems."""

from __future__ import annotations

import pytest

from fastmid.data import DataError, extract_final_answer, load_eval_problems, normalize_number
from fastmid.data.builtin import arith_problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,234", "1234"),  # GSM8K style
        ("I think it is 12, or maybe 15.", "15"),
        ("The total is $1,000.00.", "1000"),
        ("It drops to -3.50 degrees", "-3.5"),
        ("#### 42 (but 7 later)", "42"),
        ("no digits here", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_normalize_number():
    assert normalize_number("72.0") == "72"
    assert normalize_number("0.250") == "0.25"


def test_builtin_eval_problems():
    problems = load_eval_problems("builtin:arith", n=20)
    reference = arith_problems("test")[:20]
    assert len(problems) == 20
    for (messages, answer), (_, question, solution) in zip(problems, reference, strict=True):
        assert messages == [{"role": "user", "content": question}]
        assert answer == solution.rsplit("#### ", 1)[1]


def test_gsm8k_jsonl_eval_problems(write_rows):
    path = write_rows(
        "gsm8k.jsonl",
        [
            {"question": "Q1", "answer": "2 * 3 = <<2*3=6>>6\n#### 6"},
            {"question": "Q2", "answer": "no number"},
        ],
    )
    with pytest.raises(DataError, match=r"gsm8k.jsonl, line 2: .*no_reference_answer"):
        load_eval_problems(str(path))
    problems = load_eval_problems(str(path), skip_bad_rows=True)
    assert problems == [([{"role": "user", "content": "Q1"}], "6")]
