"""``fastmid generate`` and :mod:`fastmid.eval.generate` on the session's tiny random Llama.

Greedy decoding is deterministic, so the expected completion is computed here independently:
the prompt rendered by the tokenizer's own ``apply_chat_template``, tokenized without added
special tokens, and ``model.generate(..., do_sample=False)`` stopping at SmolLM2's end-of-turn
tokens (``<|im_end|>``, ``<|endoftext|>``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fastmid.cli import app
from fastmid.errors import FastmidError
from fastmid.eval.generate import (
    GenerateError,
    check_generate_settings,
    generate_completion,
    read_prompts,
    run_generate,
)
from fastmid.models.loading import load_model_and_tokenizer

PROMPT = "What is 12 times 7?"


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(app, ["generate", *args], input=input)


def assert_one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, result.stderr
    assert result.stdout.strip() == ""
    return message


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path):
    return load_model_and_tokenizer(tiny_llama_dir)


def reference(tiny, prompt: str, max_new_tokens: int, system: str | None = None) -> list[int]:
    """The greedy continuation's token ids, computed without fastmid's generation code."""
    model, tokenizer = tiny
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]),
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


def test_cli_greedy_completion_equals_model_generate(tiny, tiny_llama_dir: Path) -> None:
    new = reference(tiny, PROMPT, 8)
    expected = tiny[1].decode(new, skip_special_tokens=True)
    assert new and expected, "the tiny model should say something for the test to mean anything"
    result = invoke("--model", str(tiny_llama_dir), "--prompt", PROMPT, "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    args = ("--model", str(tiny_llama_dir), "--prompt", PROMPT, "--max-new-tokens", "8", "--json")
    row = json.loads(invoke(*args).stdout)
    assert (row["completion"], row["tokens"]) == (expected, len(new))


def test_system_message_reaches_the_template(tiny) -> None:
    model, tokenizer = tiny
    got = generate_completion(model, tokenizer, PROMPT, system="Be brief.", max_new_tokens=6)
    new = reference(tiny, PROMPT, 6, system="Be brief.")
    assert got.completion == tokenizer.decode(new, skip_special_tokens=True)
    assert got.tokens == len(new)


def test_json_keys_and_token_bound(tiny_llama_dir: Path) -> None:
    result = invoke(
        "--model", str(tiny_llama_dir), "--prompt", PROMPT, "--max-new-tokens", "3", "--json"
    )
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert set(row) == {"prompt", "completion", "tokens", "seconds"}
    assert row["prompt"] == PROMPT
    assert 1 <= row["tokens"] <= 3
    assert row["seconds"] >= 0


def test_stdin_prompt_and_several_prompts_in_turn(tiny, tiny_llama_dir: Path) -> None:
    result = invoke(
        "--model",
        str(tiny_llama_dir),
        "--prompt",
        "-",
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "4",
        "--json",
        input=PROMPT + "\n",
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == [PROMPT, "Hello"]
    tokenizer = tiny[1]
    for row in rows:
        new = reference(tiny, row["prompt"], 4)
        assert row["completion"] == tokenizer.decode(new, skip_special_tokens=True)
        assert row["tokens"] == len(new)


def test_seeded_sampling_repeats(tiny) -> None:
    model, tokenizer = tiny
    kwargs = {"max_new_tokens": 5, "temperature": 1.5, "top_p": 0.9, "seed": 7}
    first = generate_completion(model, tokenizer, PROMPT, **kwargs)
    assert generate_completion(model, tokenizer, PROMPT, **kwargs).completion == first.completion


@pytest.mark.parametrize(
    ("args", "input", "needle"),
    [
        (["--model", "/nonexistent/model", "--prompt", "hi"], None, "/nonexistent/model"),
        (["--prompt", ""], None, "--prompt"),
        (["--prompt", "   "], None, "--prompt"),
        (["--prompt", "-"], "\n", "standard input"),
        (["--prompt", "-", "--prompt", "-"], "hi", "only once"),
        (["--prompt", "hi", "--max-new-tokens", "0"], None, "--max-new-tokens"),
        (["--prompt", "hi", "--temperature", "-1"], None, "--temperature"),
        (["--prompt", "hi", "--temperature", "1", "--top-p", "0"], None, "--top-p"),
        (["--model", "x"], None, "--prompt"),
    ],
    ids=[
        "missing-model",
        "empty",
        "blank",
        "empty-stdin",
        "stdin-twice",
        "max-new-tokens",
        "temperature",
        "top-p",
        "no-prompt",
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], input: str | None, needle: str) -> None:
    # No case loads a model: the prompt and settings are checked first (the default model need
    # not be installed).
    assert needle in assert_one_line_error(invoke(*args, input=input))


def test_library_errors_are_fastmid_errors() -> None:
    assert issubclass(GenerateError, FastmidError)
    with pytest.raises(GenerateError, match="--max-new-tokens"):
        check_generate_settings(0, 0.0, 1.0)
    with pytest.raises(GenerateError, match="#2"):
        read_prompts(["ok", ""])
    assert read_prompts(["-", "b"], io.StringIO("a\n")) == ["a", "b"]
    with pytest.raises(GenerateError, match="empty"):
        next(run_generate("default", [" "]))
