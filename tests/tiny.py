"""The one factory of tiny random transformers models for the tests (no download, milliseconds).

Every family starts from the same small shape (:data:`BASE`: hidden 32, intermediate 48, 4 query
heads, 2 key/value heads, 2 layers, vocabulary 64) plus what its config class needs to build at
that size (:data:`CONFIGS`). A test passes only what it changes::

    tiny_config("llama", num_hidden_layers=5)
    tiny_model("gemma2", seed=0, head_dim=16)          # torch.manual_seed(0), then the model
    save_tiny(folder, model, tokenizer)                # an ordinary Hugging Face folder

An override of ``None`` removes the key, so the config class's own default applies. Only the keys
given here or by the caller reach the config: a test that never set ``max_position_embeddings``
still gets transformers' default, so the models are the ones the tests built by hand before.

Tests import this module as ``tiny`` (``pythonpath = ["tests"]`` in pyproject's pytest section);
``tests/conftest.py`` builds the session's ``tiny_llama_dir`` folder with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

BASE: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=64,
)

# model_type -> (config class in transformers, keys on top of BASE; None removes a BASE key).
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "olmo2": ("Olmo2Config", {}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", {"head_dim": 8}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 8}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),  # its default pad id 32000 > the tiny vocab
    "gpt_neox": ("GPTNeoXConfig", {"num_key_value_heads": None}),  # no grouped-query attention
    # GPT-2 names its sizes differently: nothing of BASE applies.
    "gpt2": (
        "GPT2Config",
        {
            **dict.fromkeys(BASE),
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "vocab_size": 64,
            "n_positions": 64,
        },
    ),
}


def config_kwargs(family: str = "llama", **overrides: Any) -> dict[str, Any]:
    """The keyword arguments :func:`tiny_config` passes to the family's config class."""
    if family not in CONFIGS:
        raise KeyError(f"no tiny config for {family!r}; known: {', '.join(sorted(CONFIGS))}")
    kwargs = {**BASE, **CONFIGS[family][1], **overrides}
    return {k: v for k, v in kwargs.items() if v is not None}


def tiny_config(family: str = "llama", **overrides: Any) -> transformers.PretrainedConfig:
    """A tiny config of ``family`` (a ``model_type`` of :data:`CONFIGS`) with ``overrides``."""
    kwargs = config_kwargs(family, **overrides)
    return getattr(transformers, CONFIGS[family][0])(**kwargs)


def tiny_model(
    family: str = "llama",
    seed: int | None = 0,
    config: transformers.PretrainedConfig | None = None,
    **overrides: Any,
) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM: ``torch.manual_seed(seed)`` (unless None), then the model.

    Args:
        family: ``model_type`` of :data:`CONFIGS` (ignored when ``config`` is given).
        seed: seeds torch's global generator just before the weights are drawn.
        config: build from this config instead of :func:`tiny_config` (``overrides`` must be empty).
        overrides: config keys, as for :func:`tiny_config`.

    Returns:
        The model as transformers builds it (training mode); call ``.eval()`` where needed.
    """
    if config is None:
        config = tiny_config(family, **overrides)
    elif overrides:
        raise TypeError("pass either config or config overrides, not both")
    if seed is not None:
        torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def save_tiny(folder: str | Path, model: torch.nn.Module, tokenizer: Any = None) -> Path:
    """Save ``model`` (and ``tokenizer``) as a Hugging Face folder; returns the folder."""
    folder = Path(folder)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
