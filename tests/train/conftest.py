"""Fixtures for the training tests: fast TrainConfigs on ``tiny_llama_dir`` (tests/conftest.py),
a tiny random Llama saved once per session with SmolLM2's real tokenizer, so every training test
exercises the real loading, tokenization, band and export code in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def make_config(tiny_llama_dir: Path, tmp_path: Path):
    """Factory of fast TrainConfigs on the tiny model and builtin:arith (no accuracy eval)."""
    return lambda output="run", **overrides: _tiny_config(
        tiny_llama_dir, tmp_path / output, **overrides
    )


def _tiny_config(model_dir: Path, output: Path, **overrides):
    from fastmid.config import build_config

    values = dict(
        model=str(model_dir),
        data="builtin:arith",
        max_examples=64,
        max_seq_len=256,
        micro_batch=4,
        grad_accum=1,
        max_steps=4,
        warmup_steps=1,
        lr=1e-3,
        eval_every=2,
        eval_batches=2,
        save_every=2,
        eval_accuracy=False,
        output=str(output),
        seed=0,
    )
    values.update(overrides)
    return build_config(None, values)


@pytest.fixture(scope="session")
def dist_model_dir(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer: Any) -> Path:
    """A tiny Llama (hidden 128, 5 layers, tied embeddings) whose band tensors are big enough for
    torchao's 8-bit state on each of 2 ranks (local shards of 64 x 128 elements)."""
    from tiny import save_tiny, tiny_model

    tok = smol_tokenizer
    model = tiny_model(
        "llama",
        seed=1234,
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return save_tiny(tmp_path_factory.mktemp("tiny-dist"), model, tok)
