"""Fixtures for the data tests: SmolLM2's tokenizer (loaded once) and tiny toy tokenizers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TOY_SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
TOY_CORPUS = [
    "hello world how are you doing today",
    "the answer is 42 apples and 7 pears",
    "User: Assistant: system question what is two plus three",
]


@pytest.fixture(scope="session")
def smol_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer (ChatML template with a default system message)."""
    from fastmid.models.loading import ModelSourceError, load_tokenizer

    try:
        return load_tokenizer("default")
    except ModelSourceError as err:  # pragma: no cover - depends on the machine
        pytest.skip(f"SmolLM2 is not installed: {err}")


def make_toy_tokenizer(*, adds_bos: bool = False, chat_template: str | None = None) -> Any:
    """A byte-level BPE tokenizer trained on a few sentences (milliseconds), fast, offline.

    Special tokens: ``<pad>`` 0, ``<s>`` 1 (BOS), ``</s>`` 2 (EOS), ``<|im_start|>`` 3,
    ``<|im_end|>`` 4. With ``adds_bos`` its post-processor prepends ``<s>`` like Llama's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=TOY_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(TOY_CORPUS * 5, trainer)
    if adds_bos:
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture
def toy_tokenizer() -> Callable[..., Any]:
    """Factory: ``toy_tokenizer(adds_bos=False, chat_template=None)``."""
    return make_toy_tokenizer


@pytest.fixture
def write_rows(tmp_path: Path) -> Callable[[str, list[dict[str, Any]]], Path]:
    """Write rows to ``tmp_path/name`` as JSON lines (``.jsonl``) or one JSON array (``.json``)."""

    def write(name: str, rows: list[dict[str, Any]]) -> Path:
        path = tmp_path / name
        if name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        else:
            path.write_text(json.dumps(rows), encoding="utf-8")
        return path

    return write
