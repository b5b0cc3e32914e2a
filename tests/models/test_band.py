"""BandPlan: layer selection, parsing, errors, parameter accounting and apply_band."""

from __future__ import annotations

import pytest
from tiny import tiny_model
from transformers import LlamaForCausalLM

from fastmid.models.band import (
    BandError,
    BandPlan,
    apply_band,
    count_parameters,
    parse_layer_list,
    round_half_up,
)


def tiny_llama(tied: bool, layers: int = 10) -> LlamaForCausalLM:
    return tiny_model(
        "llama", seed=0, num_hidden_layers=layers, vocab_size=101, tie_word_embeddings=tied
    )


@pytest.mark.parametrize(
    ("layers", "first", "last"), [(30, 6, 23), (16, 3, 12), (64, 13, 50), (32, 6, 25)]
)
def test_from_fractions_examples(layers: int, first: int, last: int) -> None:
    plan = BandPlan.from_fractions(layers, 0.2, 0.8)
    assert plan.indices == tuple(range(first, last + 1))
    assert plan.contiguous and plan.placement == "fractions"


def test_round_half_up_is_decimal() -> None:
    # Binary floats would give 7.499999... or round-half-even; the rule is half up in decimal.
    assert round_half_up(0.25 * 30) == 8
    assert round_half_up(0.5) == 1 and round_half_up(2.5) == 3
    assert BandPlan.from_fractions(5, 0.1, 0.5).indices == (1, 2)  # 0.1*5 = 0.5 -> 1


def test_default_smollm2_band() -> None:
    # SmolLM2-135M has 30 layers (fastmid.models.loading: default source).
    assert BandPlan.parse(30).describe() == "layers 6..23 (18 of 30)"


@pytest.mark.parametrize(
    ("placement", "expected"),
    [("first", range(0, 18)), ("last", range(12, 30)), ("middle", range(6, 24))],
)
def test_placements_same_size(placement: str, expected: range) -> None:
    plan = BandPlan.parse(30, band="0.2:0.8", placement=placement)
    assert plan.indices == tuple(expected) and plan.size == 18


def test_random_placement_is_seeded_and_distinct() -> None:
    a = BandPlan.from_placement(30, "random", 18, seed=3)
    b = BandPlan.from_placement(30, "random", 18, seed=3)
    c = BandPlan.from_placement(30, "random", 18, seed=4)
    assert a.indices == b.indices and a.indices != c.indices
    assert len(set(a.indices)) == 18 and all(0 <= i < 30 for i in a.indices)
    assert a.seed == 3


def test_parse_layers_and_roles() -> None:
    assert parse_layer_list("0-2,7") == [0, 1, 2, 7]
    plan = BandPlan.parse(10, layers="2-3,6")
    assert plan.indices == (2, 3, 6) and not plan.contiguous
    roles = [plan.role(i) for i in range(10)]
    expected = ["frozen-prefix"] * 2 + ["band"] * 2 + ["frozen-gap"] * 2 + ["band"]
    assert roles == expected + ["frozen-suffix"] * 3
    assert plan.describe() == "layers 2,3,6 (3 of 10)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(band="0.5:0.5"), "reversed or empty"),
        (dict(band="0.8:0.2"), "reversed or empty"),
        (dict(band="-0.1:0.5"), "outside \\[0, 1\\]"),
        (dict(band="0.2:1.5"), "outside \\[0, 1\\]"),
        (dict(band="0.41:0.44"), "is empty"),
        (dict(band="0.2"), "START:END"),
        (dict(band="a:b"), "two numbers"),
        (dict(layers="8-12"), "out of range"),
        (dict(layers="3,3"), "duplicate"),
        (dict(layers="5-2"), "reversed"),
        (dict(layers=" , "), "empty"),
        (dict(layers="x"), "not an integer"),
        (dict(band="0.2:0.8", layers="1-2"), "not both"),
        (dict(band="0.2:0.8", placement="sideways"), "unknown band placement"),
    ],
)
def test_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(BandError, match=message):
        BandPlan.parse(10, **kwargs)


def test_empty_and_bad_constructor_inputs() -> None:
    with pytest.raises(BandError, match="empty"):
        BandPlan.from_indices(10, [])
    with pytest.raises(BandError, match="positive integer"):
        BandPlan(0, (0,))
    with pytest.raises(BandError, match="between 1 and 10"):
        BandPlan.from_placement(10, "first", 11)


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_accounting_adds_up(tied: bool) -> None:
    model = tiny_llama(tied)
    plan = BandPlan.from_fractions(10, 0.2, 0.8)
    counts = count_parameters(model, plan)
    # Independent total: distinct storages, so a tied tensor counts once.
    distinct = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert counts.total == sum(distinct.values())
    parts = sum(counts.per_layer.values()) + counts.embeddings + counts.final_norm
    assert counts.total == parts + counts.lm_head + counts.other
    assert counts.other == 0
    assert counts.lm_head == (0 if tied else 101 * 32)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert counts.trainable == 6 * layer
    assert counts.frozen == counts.total - 6 * layer
    assert counts.to_dict()["trainable_share_percent"] == pytest.approx(
        100 * 6 * layer / counts.total, abs=1e-4
    )


def test_apply_band_freezes_outside() -> None:
    model = tiny_llama(tied=False)
    plan = BandPlan.from_fractions(10, 0.2, 0.8)
    trainable = apply_band(model, plan)
    band_ids = {id(p) for i in plan.indices for p in model.model.layers[i].parameters()}
    assert {id(p) for p in trainable} == band_ids
    for name, p in model.named_parameters():
        in_band = any(name.startswith(f"model.layers.{i}.") for i in plan.indices)
        assert p.requires_grad == in_band, name
    assert not model.model.embed_tokens.weight.requires_grad
    assert not model.model.norm.weight.requires_grad
    assert not model.lm_head.weight.requires_grad


def test_tied_weights_train_together() -> None:
    model = tiny_llama(tied=True)
    plan = BandPlan.from_fractions(10, 0.2, 0.8)
    trainable = apply_band(model, plan, train_lm_head=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.requires_grad
    assert sum(p is model.lm_head.weight for p in trainable) == 1
    counts = count_parameters(model, plan, train_lm_head=True)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert counts.trainable == 6 * layer + 101 * 32  # the shared table counted once


def test_plan_layer_count_mismatch() -> None:
    model = tiny_llama(tied=False)
    with pytest.raises(BandError, match="the plan is for 30 layers but the model has 10"):
        apply_band(model, BandPlan.from_fractions(30, 0.2, 0.8))
    with pytest.raises(BandError, match="the plan is for 30 layers"):
        count_parameters(model, BandPlan.from_fractions(30, 0.2, 0.8))


def test_to_dict_round_trip_fields() -> None:
    d = BandPlan.from_fractions(30, 0.2, 0.8).to_dict()
    assert d["first"] == 6 and d["last"] == 23 and d["size"] == 18
    assert d["indices"] == list(range(6, 24)) and d["fractions"] == [0.2, 0.8]
