"""Fixtures for the training tests: a tiny random Llama with SmolLM2's real tokenizer.

The tiny model (5 layers, hidden 32, SmolLM2's 49,152-token vocabulary, tied embeddings) is saved
as an ordinary Hugging Face folder once per session, so every training test exercises the real
loading, tokenization, band and export code in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def smol_tokenizer():
    from fastmid.models.loading import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=smol_tokenizer.bos_token_id,
        eos_token_id=smol_tokenizer.eos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


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
