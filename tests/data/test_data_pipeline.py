"""build_sft_examples options, malformed rows end to end, truncation, split_eval."""

from __future__ import annotations

import pytest

from fastmid.data import BadRowError, DataError, build_sft_examples, split_eval
from fastmid.data.tokenize import TokenizedExample
from fastmid.data.truncate import truncate_example

BAD_ROWS = [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, None),
    ({"other": "x"}, "missing_column"),
    ({"messages": [{"role": "user", "content": ["not", "text"]}]}, "wrong_type"),
    ({"messages": []}, "empty_conversation"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown_role"),
    (
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "assistant", "content": "b"},
            ]
        },
        "consecutive_assistant",
    ),
]


@pytest.mark.parametrize("index", range(1, len(BAD_ROWS)))
def test_each_malformed_row_kind_names_file_and_row(index, write_rows, toy_tokenizer):
    rows = [BAD_ROWS[0][0], BAD_ROWS[index][0]]
    path = write_rows("bad.json", rows)
    with pytest.raises(BadRowError) as info:
        build_sft_examples(str(path), toy_tokenizer(), format="messages")
    assert info.value.kind == BAD_ROWS[index][1]
    assert f"{path}, row 2" in str(info.value)


def test_skip_bad_rows_counts_each_kind(write_rows, toy_tokenizer):
    # JSON lines: rows of different shapes must not be unified into one Arrow schema
    path = write_rows("bad.jsonl", [row for row, _ in BAD_ROWS])
    with pytest.warns(UserWarning, match="ChatML"):
        examples, stats = build_sft_examples(
            str(path), toy_tokenizer(), format="messages", skip_bad_rows=True
        )
    assert len(examples) == 1 and stats.kept == 1
    assert stats.bad_rows == {kind: 1 for _, kind in BAD_ROWS[1:]}
    assert stats.rows_read == len(BAD_ROWS)


@pytest.fixture(scope="module")
def arith_examples(smol_tokenizer):
    return build_sft_examples("builtin:arith", smol_tokenizer, max_seq_len=512, max_examples=40)


@pytest.mark.realmodel
def test_max_examples_and_shuffle_seed(smol_tokenizer, arith_examples):
    examples, stats = arith_examples
    assert len(examples) == stats.kept == 40 and stats.rows_read == 5000
    first, _ = build_sft_examples("builtin:arith", smol_tokenizer, max_examples=5, shuffle_seed=3)
    again, _ = build_sft_examples("builtin:arith", smol_tokenizer, max_examples=5, shuffle_seed=3)
    other, _ = build_sft_examples("builtin:arith", smol_tokenizer, max_examples=5, shuffle_seed=4)
    assert first == again and first != other and first != examples[:5]


@pytest.mark.realmodel
def test_every_example_is_well_formed(arith_examples, smol_tokenizer):
    examples, stats = arith_examples
    im_end = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for example in examples:
        assert len(example["input_ids"]) == len(example["labels"]) <= 512
        assert example["labels"][0] == -100
        assert example["input_ids"][-1] == example["labels"][-1] == im_end
        trained = [
            t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab != -100
        ]
        assert "####" in smol_tokenizer.decode(trained)
    assert stats.tokens == [len(e["input_ids"]) for e in examples]


@pytest.mark.realmodel
def test_prompt_longer_than_max_seq_len(write_rows, smol_tokenizer):
    long_prompt = "Please read this. " * 200  # ~800 tokens
    path = write_rows("long.jsonl", [{"prompt": long_prompt, "completion": "The answer is 7."}])
    examples, stats = build_sft_examples(str(path), smol_tokenizer, max_seq_len=64)
    (example,) = examples
    assert len(example["input_ids"]) == 64 and stats.truncated == 1 and stats.kept == 1
    trained = [
        t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab != -100
    ]
    assert smol_tokenizer.decode(trained) == "The answer is 7.<|im_end|>"
    assert smol_tokenizer.decode(example["input_ids"]).endswith(
        "read this.<|im_end|>\n<|im_start|>assistant\nThe answer is 7.<|im_end|>"
    )
    dropped, stats = build_sft_examples(
        str(path), smol_tokenizer, max_seq_len=64, truncation="drop", require_examples=False
    )
    assert dropped == [] and stats.dropped["too_long"] == 1 and stats.kept == 0
    with pytest.raises(DataError, match="no training example left"):
        build_sft_examples(str(path), smol_tokenizer, max_seq_len=64, truncation="drop")


def make(ids, labels, turns, bos=0, is_text=False):
    return TokenizedExample(list(ids), list(labels), turns, bos, is_text=is_text)


def test_prompt_left_keeps_bos_and_last_fitting_turn():
    # 0=BOS, prompt 10..13, turn A 20..21 (+closing 99), prompt 30..31, turn B 40..44 + 99
    ids = [0, 10, 11, 12, 13, 20, 21, 99, 30, 31, 40, 41, 42, 43, 44, 99]
    labels = [-100] * 5 + [20, 21, 99] + [-100] * 2 + [40, 41, 42, 43, 44, 99]
    example = make(ids, labels, [(5, 8), (10, 16)], bos=1)
    out, outcome = truncate_example(example, 9, "prompt-left")
    assert outcome == "truncated"
    assert out["input_ids"] == [0, 30, 31, 40, 41, 42, 43, 44, 99]
    assert out["labels"] == [-100, -100, -100, 40, 41, 42, 43, 44, 99]
    # turn B alone (6 + BOS) does not fit in 6: fall back to turn A, drop turn B
    out, outcome = truncate_example(example, 6, "prompt-left")
    assert out["input_ids"] == [0, 12, 13, 20, 21, 99] and outcome == "truncated"
    out, outcome = truncate_example(example, 3, "prompt-left")
    assert out is None and outcome == "answer_too_long"
    assert truncate_example(example, 9, "drop") == (None, "too_long")
    assert truncate_example(example, 16, "drop")[1] == "kept"


def test_text_truncation_keeps_the_head_and_no_label_example_is_dropped():
    text = make(range(10), [-100, *range(1, 10)], [], is_text=True)
    out, outcome = truncate_example(text, 4, "prompt-left")
    assert out == {"input_ids": [0, 1, 2, 3], "labels": [-100, 1, 2, 3]}
    assert outcome == "truncated"
    silent = make([5, 6], [-100, -100], [(1, 2)])
    assert truncate_example(silent, 8) == (None, "no_supervised_tokens")


def test_option_errors_name_the_flag(toy_tokenizer):
    tokenizer = toy_tokenizer()
    with pytest.raises(DataError, match="--truncation 'right'"):
        build_sft_examples("builtin:arith", tokenizer, truncation="right")
    with pytest.raises(DataError, match="--max-seq-len"):
        build_sft_examples("builtin:arith", tokenizer, max_seq_len=1)
    with pytest.raises(DataError, match="--max-examples"):
        build_sft_examples("builtin:arith", tokenizer, max_examples=0)
    with pytest.raises(DataError, match="--format 'xml'"):
        build_sft_examples("builtin:arith", tokenizer, format="xml")


def test_split_eval_is_deterministic_and_disjoint():
    examples = [{"input_ids": [i], "labels": [i]} for i in range(100)]
    train, held = split_eval(examples, eval_fraction=0.05, seed=0)
    assert len(held) == 5 and len(train) == 95
    assert split_eval(examples, 0.05, 0) == (train, held)
    assert split_eval(examples, 0.05, 1)[1] != held
    ids = sorted(e["input_ids"][0] for e in train + held)
    assert ids == list(range(100))
    assert split_eval(examples[:3], 0.01, 0)[1] != []  # at least one held out
    assert split_eval(examples, 0.0, 0) == (examples, [])
    with pytest.raises(DataError, match="--eval-fraction"):
        split_eval(examples, 1.0)
    with pytest.raises(DataError, match="leaves none to train"):
        split_eval(examples[:1], 0.5)
