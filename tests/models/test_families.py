"""The family table against transformers' real module trees (tiny random configs)."""

from __future__ import annotations

import pytest
import torch
from tiny import BASE, CONFIGS, tiny_model

from fastmid.models.families import (
    FAMILIES,
    UnsupportedModelError,
    decoder_layers,
    embeddings_tied,
    family_for_model_type,
    family_of,
    final_norm,
    input_embeddings,
    layer_index_of,
    module_kind,
    output_head,
    supported_model_types,
)

# The tiny factory's shape (tests/tiny.py): hidden 32, vocabulary 64, 2 layers.
HIDDEN, VOCAB, LAYERS = BASE["hidden_size"], BASE["vocab_size"], BASE["num_hidden_layers"]


def build(model_type: str, tied: bool | None = None) -> torch.nn.Module:
    if tied is None:
        return tiny_model(model_type, seed=0)
    return tiny_model(model_type, seed=0, tie_word_embeddings=tied)


def test_table_covers_the_tested_families() -> None:
    assert sorted(CONFIGS) == supported_model_types()


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_paths_match_module_tree(model_type: str) -> None:
    model = build(model_type)
    spec = family_of(model)
    assert spec is FAMILIES[model_type]
    layers = decoder_layers(model)
    assert isinstance(layers, torch.nn.ModuleList)
    assert len(layers) == model.config.num_hidden_layers == LAYERS
    for layer in layers:
        assert isinstance(getattr(layer, spec.attention), torch.nn.Module)
        assert isinstance(getattr(layer, spec.mlp), torch.nn.Module)
        if spec.gated_mlp:
            mlp = getattr(layer, spec.mlp)
            assert all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))

    emb = input_embeddings(model)
    assert isinstance(emb, torch.nn.Embedding)
    assert tuple(emb.weight.shape) == (VOCAB, HIDDEN)
    for path in spec.extra_embeddings:
        assert isinstance(model.get_submodule(path), torch.nn.Embedding)
    head = output_head(model)
    assert tuple(head.weight.shape) == (VOCAB, HIDDEN)
    if spec.final_logit_softcapping_attr:
        assert hasattr(model.config, spec.final_logit_softcapping_attr)

    # Every decoder-layer parameter is attention, mlp or norm; never "other".
    for name, _ in model.named_parameters():
        idx = layer_index_of(name, spec)
        if idx is not None:
            assert 0 <= idx < LAYERS
            assert module_kind(name, spec) != "other", name


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_final_norm_kind_by_behaviour(model_type: str) -> None:
    """rms: ``x * rstd * w``; rms_gemma: ``x * rstd * (1 + w)``; layernorm: ``nn.LayerNorm``.

    With the weight set to zero, an RMS norm outputs 0 and a Gemma norm outputs ``x * rstd``.
    """
    model = build(model_type)
    spec = family_of(model)
    norm = final_norm(model)
    if spec.norm_kind == "layernorm":
        assert isinstance(norm, torch.nn.LayerNorm)
        return
    x = torch.randn(3, HIDDEN, dtype=torch.float64)
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6))
    normalized = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    with torch.no_grad():
        norm.weight.zero_()
        out = norm.double()(x)
    expected = normalized if spec.norm_kind == "rms_gemma" else torch.zeros_like(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("tied", [True, False])
def test_tie_detection(model_type: str, tied: bool) -> None:
    model = build(model_type, tied=tied)
    shared = output_head(model).weight.data_ptr() == input_embeddings(model).weight.data_ptr()
    assert embeddings_tied(model) is shared is tied


def test_unsupported_model_type_lists_supported() -> None:
    with pytest.raises(UnsupportedModelError) as err:
        family_for_model_type("bert")
    message = str(err.value)
    assert "'bert' is not supported" in message
    for model_type in supported_model_types():
        assert model_type in message
