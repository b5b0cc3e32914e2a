"""Local files through datasets (JSON, JSONL, Parquet, CSV, save_to_disk), commas, bad JSON."""

from __future__ import annotations

import json

import datasets
import pytest

from fastmid.data import DataError, load_conversations
from fastmid.data.json_records import read_json_array, read_json_lines
from fastmid.data.sources import load_source, split_data_spec
from fastmid.data.stats import DataStats

ROWS = [{"question": f"q{i}", "answer": f"a{i} #### {i}"} for i in range(5)]


def expected_messages(rows):
    return [
        [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        for r in rows
    ]


@pytest.mark.parametrize("name", ["rows.json", "rows.jsonl"])
def test_json_and_jsonl(write_rows, name):
    path = write_rows(name, ROWS)
    conversations = load_conversations(str(path))
    assert [c.messages for c in conversations] == expected_messages(ROWS)
    assert [c.origin.index for c in conversations] == list(range(5))


def test_parquet_csv_and_save_to_disk(tmp_path):
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.to_parquet(str(tmp_path / "rows.parquet"))
    dataset.to_csv(str(tmp_path / "rows.csv"), index=False)
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0, 1])}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    for source in ("rows.parquet", "rows.csv", "saved"):
        conversations = load_conversations(str(tmp_path / source))
        assert [c.messages for c in conversations] == expected_messages(ROWS), source
    test = load_conversations(str(tmp_path / "saved_dict"), split="test")
    assert [c.messages for c in test] == expected_messages(ROWS[:2])
    with pytest.raises(DataError, match=r"no split 'valid'.*\['test', 'train'\]"):
        load_conversations(str(tmp_path / "saved_dict"), split="valid")


def test_csv_numbers_stay_strings(tmp_path):
    (tmp_path / "n.csv").write_text("prompt,completion\n2+2?,4\n", encoding="utf-8")
    (conversation,) = load_conversations(str(tmp_path / "n.csv"))
    assert conversation.messages[1] == {"role": "assistant", "content": "4"}


def test_several_sources_joined_by_commas(write_rows):
    first = write_rows("a.jsonl", ROWS[:2])
    second = write_rows("b.jsonl", [{"text": "raw"}])
    stats = DataStats()
    conversations = load_conversations(f"{first}, {second},builtin:arith:test", stats=stats)
    assert stats.formats == {
        str(first): "gsm8k",
        str(second): "text",
        "builtin:arith:test": "gsm8k",
    }
    assert stats.format == "mixed (gsm8k, text)"
    assert len(conversations) == 2 + 1 + 500 == stats.rows_read
    assert conversations[2].is_text


def test_data_spec_errors():
    with pytest.raises(DataError, match="--data is empty"):
        split_data_spec(" , ")
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_source("nope.jsonl")
    with pytest.raises(DataError, match="builtin:zzz does not exist"):
        load_source("builtin:zzz")


@pytest.mark.parametrize("flag", ["--eval-data", "--eval-accuracy-data"])
def test_data_errors_name_the_option_that_gave_the_data(tmp_path, flag):
    """The caller says which option the data string came from (``--data`` by default)."""
    (tmp_path / "rows.txt").write_text("x\n")
    (tmp_path / "nothing").mkdir()
    for call in (
        lambda: split_data_spec(" , ", flag),
        lambda: load_source("nope.jsonl", flag=flag),
        lambda: load_source(str(tmp_path / "rows.txt"), flag=flag),
        lambda: load_source(str(tmp_path / "nothing"), flag=flag),
        lambda: load_conversations(f"{tmp_path / 'nope.jsonl'}", flag=flag),
    ):
        with pytest.raises(DataError) as info:
            call()
        assert flag in str(info.value) and "--data" not in str(info.value), str(info.value)
    with pytest.raises(DataError, match="nope.jsonl: no such file or folder; --data takes"):
        load_source("nope.jsonl")


def test_unknown_suffix(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        load_source(str(tmp_path / "x.txt"))


def test_json_array_reader_offsets(tmp_path):
    good = [{"a": "é"}, {"a": 2}]
    text = json.dumps(good)
    path = tmp_path / "a.json"
    path.write_bytes(text.encode())
    assert read_json_array(path).records == good and read_json_array(path).error is None
    cut = text.encode()[:-5]  # cut inside the second record
    path.write_bytes(cut)
    result = read_json_array(path)
    second = text.encode().index(b'{"a": 2}')  # byte offset, with the 2-byte 'é' before it
    assert result.truncated and result.records == good[:1]
    assert f"row 2 starts at byte {second}" in result.error
    assert f"end of the file at byte {len(cut)}" in result.error
    path.write_text('[{"a": 1} {"a": 2}]')
    result = read_json_array(path)
    assert not result.truncated and "expected ',' or ']' after row 1 at byte 10" in result.error


def test_bad_json_lines_error_or_skip(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text(
        json.dumps(ROWS[0]) + "\n{broken\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8"
    )
    result = read_json_lines(path)
    assert [i for i, _ in result.bad_lines] == [1]
    offset = len(json.dumps(ROWS[0])) + 1
    with pytest.raises(DataError, match=rf"line 2 \(byte {offset}\) is not valid JSON"):
        load_conversations(str(path))
    stats = DataStats()
    conversations = load_conversations(str(path), skip_bad_rows=True, stats=stats)
    assert len(conversations) == 2 and stats.bad_rows == {"invalid_json": 1}


def test_split_option_picks_the_builtin_split():
    by_option = load_conversations("builtin:arith", split="test")
    by_name = load_conversations("builtin:arith:test")
    assert [c.messages for c in by_option] == [c.messages for c in by_name]
    assert by_option[0].origin.source == "builtin:arith:test"
