"""Bad data files and rows (issue 12): one line naming the file, the 1-based line or row and what
to do; --skip-bad-rows skips and counts; empty answers dropped; ignored fields reported."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import re
from pathlib import Path

import datasets
import pytest
from rich.console import Console
from typer.testing import CliRunner

from fastmid.data import (
    BadRowError,
    DataError,
    DataStats,
    RowOrigin,
    build_sft_examples,
    inspect_data,
    load_conversations,
    load_eval_problems,
)
from fastmid.data.csv_records import read_csv_records
from fastmid.data.json_records import read_json_array
from fastmid.data.schema import BAD_ROW_KINDS
from fastmid.data.sources import load_source

GOOD = {"question": "What is 2+2?", "answer": "4"}
GOOD_LINE = json.dumps(GOOD).encode() + b"\n"
LATIN1_LINE = b'{"question": "caf\xe9?", "answer": "5"}\n'


def one_line(err: pytest.ExceptionInfo[DataError]) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def at(path: Path) -> str:
    """A regex matching the file name as messages write it."""
    return re.escape(str(path))


# --- 1. files that are not UTF-8 ------------------------------------------------------------


def test_latin1_jsonl_names_file_line_and_byte_and_says_to_reencode(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD_LINE + LATIN1_LINE + GOOD_LINE)
    byte = len(GOOD_LINE) + LATIN1_LINE.index(b"\xe9")
    with pytest.raises(
        DataError, match=rf"{at(path)}: line 2 \(byte {byte}\) is not valid UTF-8"
    ) as err:
        load_conversations(str(path))
    message = one_line(err)
    assert "0xe9" in message and "re-encode the file as UTF-8" in message
    assert "iconv -f latin1 -t utf-8" in message and "--skip-bad-rows" in message


def test_latin1_jsonl_line_is_skipped_and_counted(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD_LINE + LATIN1_LINE + GOOD_LINE)
    stats = DataStats()
    conversations = load_conversations(str(path), skip_bad_rows=True, stats=stats)
    assert [c.origin.line for c in conversations] == [1, 3]
    assert stats.bad_rows == {"invalid_utf8": 1} and stats.rows_read == 2
    assert "invalid_utf8" in BAD_ROW_KINDS


def test_latin1_everywhere_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "all_latin1.jsonl"
    path.write_bytes(LATIN1_LINE * 2)
    with pytest.raises(DataError, match=rf"{at(path)}: line 1 \(byte \d+\) is not valid UTF-8"):
        load_conversations(str(path), skip_bad_rows=True)


def test_latin1_csv_names_line_and_byte_and_skips(tmp_path):
    path = tmp_path / "latin1.csv"
    header, good, bad = b"question,answer\n", b"q1,1\n", b"caf\xe9,2\n"
    path.write_bytes(header + good + bad + good)
    byte = len(header + good) + bad.index(b"\xe9")
    with pytest.raises(
        DataError, match=rf"{at(path)}: line 3 \(byte {byte}\) is not valid UTF-8"
    ) as err:
        load_conversations(str(path))
    assert "iconv" in one_line(err)
    stats = DataStats()
    conversations = load_conversations(str(path), skip_bad_rows=True, stats=stats)
    assert [c.origin.line for c in conversations] == [2, 4]
    assert stats.bad_rows == {"invalid_utf8": 1}


def test_latin1_csv_header_cannot_be_skipped(tmp_path):
    path = tmp_path / "header.csv"
    path.write_bytes(b"qu\xe9stion,answer\nq,1\n")
    with pytest.raises(DataError, match=rf"{at(path)}: line 1 \(byte 2\) is not valid UTF-8"):
        load_conversations(str(path), skip_bad_rows=True)


def test_latin1_json_array_names_row_line_and_byte(tmp_path):
    path = tmp_path / "latin1.json"
    text = b'[{"question": "q", "answer": "1"},\n {"question": "caf\xe9", "answer": "2"}]'
    path.write_bytes(text)
    byte = text.index(b"\xe9")
    with pytest.raises(
        DataError, match=rf"{at(path)}: row 2 \(line 2, byte {byte}\) is not valid UTF-8"
    ):
        load_conversations(str(path))
    stats = DataStats()
    (conversation,) = load_conversations(str(path), skip_bad_rows=True, stats=stats)
    assert stats.bad_rows == {"invalid_utf8": 1} and str(conversation.origin).endswith("row 1")


def test_compressed_latin1_jsonl_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl.gz"
    path.write_bytes(gzip.compress(GOOD_LINE + LATIN1_LINE))
    with pytest.raises(DataError, match=rf"{at(path)}: line 2 \(byte \d+\) is not valid UTF-8"):
        load_conversations(str(path))
    bz = tmp_path / "rows.jsonl.bz2"
    bz.write_bytes(bz2.compress(GOOD_LINE))
    assert len(load_conversations(str(bz))) == 1
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=rf"{at(broken)}: cannot read the .gz data"):
        load_conversations(str(broken))


def test_a_character_cut_by_the_end_of_a_json_array_is_a_truncation(tmp_path):
    path = tmp_path / "cut.json"
    text = json.dumps([GOOD, {"question": "é" * 3, "answer": "x"}], ensure_ascii=False).encode()
    path.write_bytes(text[: text.index("é".encode()) + 1])  # half of a 2-byte character
    result = read_json_array(path)
    assert result.truncated and result.records == [GOOD] and "not valid UTF-8" not in result.error


def test_utf8_bom_is_accepted(tmp_path):
    jsonl, csv_file = tmp_path / "bom.jsonl", tmp_path / "bom.csv"
    jsonl.write_bytes(b"\xef\xbb\xbf" + GOOD_LINE)
    csv_file.write_bytes(b"\xef\xbb\xbfquestion,answer\nq,1\n")
    assert len(load_conversations(str(jsonl))) == 1
    assert len(load_conversations(str(csv_file))) == 1


def test_lone_surrogate_escape_is_a_bad_row_not_a_tokenizer_crash(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    path.write_bytes(GOOD_LINE + b'{"question": "a \\ud800 b", "answer": "1"}\n')
    with pytest.raises(BadRowError, match=rf"{at(path)}, line 2: 'question' holds the lone") as err:
        load_conversations(str(path))
    assert err.value.kind == "invalid_utf8"
    stats = DataStats()
    assert len(load_conversations(str(path), skip_bad_rows=True, stats=stats)) == 1
    assert stats.bad_rows == {"invalid_utf8": 1}


# --- 2. empty answers and ignored fields ----------------------------------------------------


def test_empty_answers_are_dropped_and_counted_never_trained(write_rows, smol_tokenizer):
    rows = [
        {"question": "Q1", "answer": "1"},
        {"question": "Q2", "answer": ""},
        {"question": "Q3", "answer": "  \n\t "},
        {"question": "Q4", "answer": "4"},
    ]
    path = write_rows("empty_answers.jsonl", rows)
    examples, stats = build_sft_examples(str(path), smol_tokenizer, max_seq_len=256)
    assert len(examples) == stats.kept == 2
    assert stats.dropped["empty_answer"] == 2 and stats.conversations == 4
    summary = stats.to_dict()
    assert summary["dropped_by_reason"]["empty_answer"] == 2 and summary["dropped"] == 2
    prompts = [smol_tokenizer.decode(e["input_ids"]) for e in examples]
    assert any("Q1" in p for p in prompts) and not any("Q2" in p or "Q3" in p for p in prompts)
    only_empty = write_rows("only_empty.jsonl", rows[1:3])
    with pytest.raises(DataError, match=r"no training example left.*'empty_answer': 2"):
        build_sft_examples(str(only_empty), smol_tokenizer)


def test_an_empty_assistant_turn_in_a_conversation_drops_it(write_rows, smol_tokenizer):
    empty_turn = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": " "},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    path = write_rows("turns.jsonl", [{"messages": empty_turn}, {"messages": good}])
    examples, stats = build_sft_examples(str(path), smol_tokenizer)
    assert len(examples) == 1 and stats.dropped["empty_answer"] == 1


def test_empty_reference_answer_still_fails_evaluation(write_rows):
    path = write_rows("eval.jsonl", [{"question": "Q", "answer": ""}])
    with pytest.raises(BadRowError, match=r"eval.jsonl, line 1: .*no_reference_answer"):
        load_eval_problems(str(path))


def test_ignored_fields_are_counted_and_reported(write_rows, smol_tokenizer):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "hi", "name": "bob"},
                {"role": "assistant", "content": "hello", "weight": 0},
            ],
            "id": 1,
            "meta": {"source": "x"},
        },
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "id": 2,
            "note": None,  # null carries nothing: not counted
        },
    ]
    path = write_rows("extra.jsonl", rows)
    buffer = io.StringIO()
    stats = inspect_data(
        str(path), smol_tokenizer, n=0, console=Console(file=buffer, width=120, color_system=None)
    )
    expected = {"id": 2, "meta": 1, "messages[].name": 1, "messages[].weight": 1}
    assert stats.ignored_fields == expected
    assert stats.to_dict()["ignored_fields"] == expected
    out = buffer.getvalue()
    assert "Fields ignored" in out
    for name in expected:
        assert name in out
    assert "empty_answer" in out  # every drop reason has its row in the counts table


def test_format_columns_are_not_ignored_fields(write_rows):
    path = write_rows(
        "alpaca.jsonl", [{"instruction": "i", "input": "x", "output": "o", "system": "s"}]
    )
    stats = DataStats()
    load_conversations(str(path), stats=stats)
    assert stats.ignored_fields == {}
    text = write_rows("text.jsonl", [{"text": "t", "system": "s"}])
    stats = DataStats()
    load_conversations(str(text), stats=stats)
    assert stats.ignored_fields == {"system": 1}  # the text format has no system message


# --- 3. one numbering: 1-based, "line" in JSONL/CSV files, "row" elsewhere ------------------


def test_parse_and_schema_errors_count_the_same_lines(tmp_path):
    parse, schema = tmp_path / "parse.jsonl", tmp_path / "schema.jsonl"
    parse.write_bytes(GOOD_LINE + b"\n" + b"{broken\n")
    schema.write_bytes(GOOD_LINE + b"\n" + b'{"question": "q"}\n')
    with pytest.raises(DataError, match=rf"{at(parse)}: line 3 \(byte \d+\) is not valid JSON"):
        load_conversations(str(parse))
    with pytest.raises(BadRowError, match=rf"{at(schema)}, line 3: the column 'answer'"):
        load_conversations(str(schema))


def test_csv_rows_are_named_by_the_line_they_start_on(tmp_path):
    path = tmp_path / "multiline.csv"
    path.write_text('question,answer\n"two\nlines",1\nq\n', encoding="utf-8")
    with pytest.raises(BadRowError, match=rf"{at(path)}, line 4: the column 'answer'"):
        load_conversations(str(path), format="gsm8k")


def test_json_array_and_parquet_rows_are_named_from_1(tmp_path, write_rows):
    array = write_rows("rows.json", [GOOD, {"question": "q"}])
    with pytest.raises(BadRowError, match=rf"{at(array)}, row 2: the column 'answer'"):
        load_conversations(str(array))
    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([GOOD, {"question": "q", "answer": None}]).to_parquet(str(parquet))
    with pytest.raises(BadRowError, match=rf"{at(parquet)}, row 2: the column 'answer'"):
        load_conversations(str(parquet))


def test_folder_rows_are_named_by_file_and_line(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(GOOD_LINE + b'{"question": "q"}\n')
    with pytest.raises(BadRowError, match=r"folder[/\\]train\.jsonl, line 2: the column 'answer'"):
        load_conversations(str(folder))
    with pytest.raises(DataError, match=r"no data file of split 'test'.*\['train'\].*--split"):
        load_conversations(str(folder), split="test")


def test_row_origin_is_one_based():
    assert str(RowOrigin("data.json", 0)) == "data.json, row 1"
    assert str(RowOrigin("data.jsonl", 0, line=7)) == "data.jsonl, line 7"


def test_records_that_are_not_objects_name_their_line(tmp_path):
    path = tmp_path / "scalars.jsonl"
    path.write_bytes(GOOD_LINE + b"[1, 2]\n")
    with pytest.raises(BadRowError, match=rf"{at(path)}, line 2: expected a JSON object"):
        load_conversations(str(path))
    stats = DataStats()
    assert len(load_conversations(str(path), skip_bad_rows=True, stats=stats)) == 1
    assert stats.bad_rows == {"wrong_type": 1}


# --- 4. one message, not datasets' and ours -------------------------------------------------


@pytest.mark.parametrize("skip", [False, True])
def test_malformed_jsonl_prints_nothing_else(tmp_path, capfd, skip):
    path = tmp_path / "malformed.jsonl"
    path.write_bytes(GOOD_LINE + b'{"question": "q", "answer": \n' + GOOD_LINE)
    capfd.readouterr()
    if skip:
        rows = load_source(str(path), skip_bad_rows=True)
        assert len(rows.rows) == 2 and rows.bad_rows == {"invalid_json": 1}
    else:
        with pytest.raises(DataError, match=rf"{at(path)}: line 2 \(byte \d+\) is not valid JSON"):
            load_source(str(path))
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_a_folder_read_by_datasets_prints_nothing_and_restores_logging(tmp_path, capfd):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "train.txt").write_text("one line\n", encoding="utf-8")
    verbosity = datasets.utils.logging.get_verbosity()
    capfd.readouterr()
    rows = load_source(str(folder))
    assert rows.columns == ["text"] and len(rows.rows) == 1
    assert capfd.readouterr().err == ""
    assert datasets.utils.logging.get_verbosity() == verbosity


# --- 6. other bad inputs: one line naming the file or flag ----------------------------------


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.jsonl", b"", "the file is empty: no rows to read"),
        ("empty.csv", b"", "the file is empty: no rows to read"),
        ("empty.json", b"", "the file is empty: no rows to read"),
        ("blank.jsonl", b"\n  \n\n", "the file holds only blank lines: no rows to read"),
        ("blank.json", b"\n\n", "the file holds only blank lines: no rows to read"),
        ("array.json", b" [ ] ", r"the JSON array is empty \(\[\]\): no rows to read"),
        ("header.csv", b"question,answer\n", "the CSV has a header line but no rows"),
        (
            "columns.csv",
            b"a,b\n1,2\n",
            r"cannot tell the data format from the columns \['a', 'b'\]",
        ),
        ("dup.csv", b"q,q\n1,2\n", "line 1: the header names the column 'q' twice"),
        ("object.json", b'{\n "data": [1]\n}\n', "the file holds one JSON object"),
        ("notes.txt", b"hi", r"unknown file type '\.txt'"),
    ],
)
def test_bad_files_are_one_line_naming_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    for skip in (False, True):
        with pytest.raises(DataError, match=rf"{at(path)}: {expected}") as err:
            load_conversations(str(path), skip_bad_rows=skip)
        one_line(err)


def test_csv_line_with_more_cells_than_the_header(tmp_path):
    path = tmp_path / "cells.csv"
    path.write_text("question,answer\nq,1\nq, with comma,2\nr,3,\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{at(path)}: line 3 has 3 cells but the header names 2"):
        load_conversations(str(path))
    stats = DataStats()
    conversations = load_conversations(str(path), skip_bad_rows=True, stats=stats)
    assert [c.origin.line for c in conversations] == [2, 4]  # a trailing empty cell is fine
    assert stats.bad_rows == {"invalid_csv": 1}


def test_csv_cells_stay_text(tmp_path):
    path = tmp_path / "cells.csv"
    long = "x" * 200_000  # above csv's default cap of 131,072 characters per cell
    path.write_text(f"question,answer\nNA,None\n{long},007\n", encoding="utf-8")
    records = read_csv_records(path).records
    assert records == [{"question": "NA", "answer": "None"}, {"question": long, "answer": "007"}]


def test_missing_paths_folders_and_builtins(tmp_path):
    with pytest.raises(DataError, match=rf"{at(tmp_path / 'nope.jsonl')}: no such file or folder"):
        load_conversations(str(tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(DataError, match=rf"{at(empty)}: a folder with no data files"):
        load_conversations(str(empty))
    named = tmp_path / "rows.jsonl"
    named.mkdir()  # a folder where a file was meant
    with pytest.raises(DataError, match=rf"{at(named)}: a folder \(named like a \.jsonl file\)"):
        load_conversations(str(named))
    with pytest.raises(DataError, match=r"builtin:unknown does not exist; .*builtin:arith"):
        load_conversations("builtin:unknown")


def test_forced_format_that_does_not_match_the_columns(write_rows):
    path = write_rows("gsm8k.jsonl", [GOOD])
    with pytest.raises(
        DataError,
        match=rf"{at(path)}: --format alpaca reads the columns instruction\+output, but this "
        r"source has \['answer', 'question'\] \(the columns look like --format gsm8k\)",
    ) as err:
        load_conversations(str(path), format="alpaca", skip_bad_rows=True)
    one_line(err)


def test_data_errors_are_one_line():
    assert str(DataError("first\nsecond\r\nthird")) == "first second  third"


# --- through the CLI: exit 2, one line, no traceback ----------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("latin1.jsonl", GOOD_LINE + LATIN1_LINE, "line 2 (byte"),
        ("latin1.csv", b"question,answer\ncaf\xe9,1\n", "line 2 (byte"),
        ("blank.jsonl", b"\n\n", "only blank lines"),
    ],
)
def test_cli_data_inspect_reports_one_line(
    tmp_path, monkeypatch, smol_tokenizer, name, content, expected
):
    from fastmid import cli
    from fastmid.models import loading

    monkeypatch.setattr(loading, "load_tokenizer", lambda *args, **kwargs: smol_tokenizer)
    # rich wraps at 80 columns when stderr is not a terminal; the message itself is one line
    monkeypatch.setenv("COLUMNS", "1000")
    path = tmp_path / name
    path.write_bytes(content)
    result = CliRunner().invoke(cli.app, ["data", "inspect", "--data", str(path)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:") and str(path) in lines[0] and expected in lines[0]
