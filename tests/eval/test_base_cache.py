"""The machine-wide cache of the base model's evaluation, and the answer-line stopping rule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastmid.config import build_config
from fastmid.eval.base_cache import base_eval_key, cache_dir, load_base_eval, save_base_eval
from fastmid.eval.exact_match import AnswerLineStop
from fastmid.train.recipe import run_train

SETTINGS = {"n": 4, "max_new_tokens": 8, "batch_size": 2, "precision": "fp32"}


def _problems(path: Path, answer: int) -> Path:
    path.write_text(json.dumps({"question": "What is 2 + 3?", "answer": f"#### {answer}"}) + "\n")
    return path


def test_key_changes_with_every_input(tiny_llama_dir, tmp_path):
    data = _problems(tmp_path / "p.jsonl", 5)
    key = base_eval_key(str(tiny_llama_dir), str(data), SETTINGS)
    assert key is not None and len(key) == 64
    assert base_eval_key(str(tiny_llama_dir), str(data), dict(SETTINGS)) == key
    assert base_eval_key(str(tiny_llama_dir), str(data), {**SETTINGS, "n": 5}) != key
    assert base_eval_key(str(tiny_llama_dir), str(data), {**SETTINGS, "batch_size": 4}) != key
    assert base_eval_key(str(tiny_llama_dir), "builtin:arith:test", SETTINGS) != key
    _problems(data, 6)  # same size, new contents
    assert base_eval_key(str(tiny_llama_dir), str(data), SETTINGS) != key


def test_key_follows_the_model_files(tiny_llama_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    key = base_eval_key(str(model), "builtin:arith:test", SETTINGS)
    weights = next(model.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert base_eval_key(str(model), "builtin:arith:test", SETTINGS) != key


def test_random_weights_and_missing_sources_are_not_cached(tmp_path, tiny_llama_dir):
    assert (
        base_eval_key(str(tiny_llama_dir / "config.json"), "builtin:arith:test", SETTINGS) is None
    )
    assert base_eval_key(str(tmp_path / "nowhere"), "builtin:arith:test", SETTINGS) is None
    save_base_eval(None, {"accuracy": 1.0}, {})
    assert not list(cache_dir().glob("*.json"))
    assert load_base_eval(None) is None


def test_round_trip_and_corrupt_entries(tmp_path):
    key = "a" * 64
    assert load_base_eval(key) is None
    save_base_eval(key, {"accuracy": 0.25, "n": 4}, {"model": "m"})
    result, path = load_base_eval(key)
    assert result == {"accuracy": 0.25, "n": 4} and path == cache_dir() / f"{key}.json"
    path.write_text("{not json")
    assert load_base_eval(key) is None
    path.write_text(json.dumps({"key": "b" * 64, "result": {}}))  # an entry under the wrong name
    assert load_base_eval(key) is None


def test_second_run_reuses_the_base_evaluation(tiny_llama_dir, tmp_path):
    def run(name: str) -> dict:
        cfg = build_config(
            None,
            dict(
                model=str(tiny_llama_dir),
                max_steps=1,
                max_examples=16,
                micro_batch=4,
                eval_n=3,
                eval_batch_size=3,
                eval_max_new_tokens=4,
                eval_every=0,
                save_every=0,
                output=str(tmp_path / name),
            ),
        )
        return run_train(cfg)

    first = run("one")
    assert "reused from" not in (tmp_path / "one" / "train.log").read_text()
    assert len(list(cache_dir().glob("*.json"))) == 1
    second = run("two")
    log = (tmp_path / "two" / "train.log").read_text()
    assert "reused from" in log and str(cache_dir()) in log
    assert second["accuracy_before"] == first["accuracy_before"]
    # the run folder keeps its own copy, for a resume
    saved = json.loads((tmp_path / "two" / "eval_before.json").read_text())
    assert saved["result"] == first["accuracy_before"]


def _stop(tokenizer, completions: list[str], prompt: str = "Q: 1 + 1?") -> list[bool]:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    rows = [prompt_ids + tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    # right-pad the generated part: the criterion decodes with special tokens removed
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    return AnswerLineStop(tokenizer, len(prompt_ids))(ids, torch.zeros(len(rows), 1)).tolist()


def test_answer_line_stop(smol_tokenizer):
    flags = _stop(
        smol_tokenizer,
        [
            "So 12 + 5 = 17.\n#### 17\n",  # the answer line has ended: stop
            "So 12 + 5 = 17.\n#### 17",  # the line may go on (17.5, 170): keep going
            "####\nThe answer",  # no number on the answer line yet
            "12 + 5 = 17\nso 17 apples\n",  # no answer line at all
            "#### $1,234.50 in total\nThen",  # a number with text after it, line ended
        ],
    )
    assert flags == [True, False, False, False, True]
