"""The arms: their layers, the paper's five-segment rule, the lora-mid rank budget, and the
trainable parameters of every arm on SmolLM2-135M's real shapes (meta device, no weights)."""

from __future__ import annotations

import random

import pytest
from transformers import LlamaConfig

from fastmid.ablate.arms import (
    ARMS,
    AblateError,
    format_layers,
    parse_arms,
    plan_arms,
    trainable_parameters,
)
from fastmid.config import LoraTargets
from fastmid.models.band import BandError, BandPlan
from fastmid.models.lora import LORA_TARGETS, distribute_ranks, paper_mid_layers, plan_lora
from fastmid.models.memory import build_meta_model

# SmolLM2-135M-Instruct's config.json (the shapes that matter): Llama, 30 layers, hidden 576,
# 9 query heads and 3 key/value heads of 64, MLP 1536, vocabulary 49152, tied embeddings.
SMOL = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    tie_word_embeddings=True,
)
# Hand counts of one decoder layer: q 576x576, k 576x192, v 576x192, o 576x576, gate/up/down
# 576x1536 each, two RMSNorm weights of 576.
Q_PROJ = O_PROJ = 576 * 576
K_PROJ = V_PROJ = 576 * 192
MLP = 3 * 576 * 1536
LAYER = Q_PROJ + K_PROJ + V_PROJ + O_PROJ + MLP + 2 * 576
# LoRA parameters per unit of rank, r x (in + out): q 1152, k 768, v 768, o 1152, gate/up/down
# 2112 each.
QKVO_PER_RANK = 1152 + 768 + 768 + 1152
ALL_PER_RANK = QKVO_PER_RANK + 3 * 2112


@pytest.fixture(scope="module")
def smol_meta():
    return build_meta_model(LlamaConfig(**SMOL))


def test_the_targets_literal_matches_the_models_layer():
    from typing import get_args

    assert get_args(LoraTargets) == LORA_TARGETS


@pytest.mark.parametrize(
    ("layers", "middle"), [(30, range(6, 24)), (18, range(4, 14)), (16, range(3, 13))]
)
def test_paper_mid_layers_by_hand(layers, middle):
    # five segments of 30 layers: 0-5, 6-11, 12-17, 18-23, 24-29 -> the middle three 6..23;
    # of 18: bounds round_half_up(3.6 k) = 0, 4, 7, 11, 14, 18 -> 4..13
    assert paper_mid_layers(layers) == tuple(middle)


def test_paper_mid_layers_equal_the_default_band_at_every_depth():
    for depth in range(1, 257):
        try:
            band = BandPlan.from_fractions(depth, 0.2, 0.8).indices
        except BandError:
            band = ()
        assert paper_mid_layers(depth) == band, depth


def test_distribute_ranks_differ_by_at_most_one():
    assert distribute_ranks(10, 3) == [4, 3, 3]
    ranks = distribute_ranks(960, 72)
    assert ranks == [14] * 24 + [13] * 48 and sum(ranks) == 960
    for total, count in ((7, 7), (100, 7), (61, 12)):
        ranks = distribute_ranks(total, count)
        assert sum(ranks) == total and max(ranks) - min(ranks) <= 1


def test_arms_on_30_layers():
    mid = BandPlan.parse(30)
    arms = {a.name: a for a in plan_arms(list(ARMS), mid, lora_rank=8, random_seed=5)}
    assert arms["mid"].layers == tuple(range(6, 24))
    assert arms["early"].layers == tuple(range(18))
    assert arms["late"].layers == tuple(range(12, 30))
    assert arms["random"].layers == tuple(sorted(random.Random(5).sample(range(30), 18)))
    assert arms["random"].seed == 5
    assert arms["full"].layers == arms["lora"].layers == tuple(range(30))
    assert arms["lora-mid"].layers == tuple(range(6, 24))
    assert (arms["lora"].lora_targets, arms["lora"].lora_match_budget) == ("all-linear", False)
    assert (arms["lora-mid"].lora_targets, arms["lora-mid"].lora_match_budget) == ("qkvo", True)
    assert arms["mid"].lora_rank == 0 and arms["lora-mid"].lora_rank == 8
    assert arms["mid"].overrides()["layers"] == "6-23"


def test_trainable_parameters_of_every_arm_on_smollm2_shapes(smol_meta):
    mid = BandPlan.parse(30)
    arms = plan_arms(list(ARMS), mid, lora_rank=8)
    counts = {a.name: trainable_parameters(smol_meta, a) for a in arms}
    assert LAYER == 3_540_096
    assert counts == {
        "mid": 18 * LAYER,  # 63,721,728: fastmid train's header for the default band
        "early": 18 * LAYER,
        "late": 18 * LAYER,
        "random": 18 * LAYER,
        "full": 30 * LAYER,
        "lora": 30 * 8 * ALL_PER_RANK,  # 2,442,240
        # total rank 8 x 4 x 30 = 960 over 72 modules: layers 6..11 rank 14, 12..23 rank 13
        "lora-mid": 6 * 14 * QKVO_PER_RANK + 12 * 13 * QKVO_PER_RANK,
    }
    assert counts["mid"] == 63_721_728
    # the budget's ranks happen to be whole layers here: the same parameters as uniform r = 8
    assert counts["lora-mid"] == 30 * 8 * QKVO_PER_RANK == 921_600
    # --train-embeddings adds the (tied) table once, to every arm alike
    emb = trainable_parameters(smol_meta, arms[0], train_embeddings=True)
    assert emb == 18 * LAYER + 49152 * 576


def test_lora_mid_budget_equals_uniform_qkvo_lora(smol_meta):
    band = BandPlan.from_indices(30, paper_mid_layers(30))
    budget = plan_lora(smol_meta, band, 8, "qkvo", match_budget=True)
    uniform = plan_lora(smol_meta, BandPlan.parse(30, band="0:1"), 8, "qkvo")
    assert budget.total_rank == uniform.total_rank == 8 * 4 * 30
    assert len(budget.modules) == 72 and len(uniform.modules) == 120
    assert {m[3] for m in budget.modules} == {13, 14}
    # five segments of 18 layers (Gemma-3-270M's depth): 10 middle layers, 40 modules,
    # total 8 x 4 x 18 = 576 -> ranks 15 (16 modules) and 14 (24 modules)
    assert distribute_ranks(8 * 4 * 18, 4 * len(paper_mid_layers(18))) == [15] * 16 + [14] * 24


def test_parse_arms_and_layers_text():
    assert parse_arms("lora-mid, mid") == ["mid", "lora-mid"]
    with pytest.raises(AblateError, match=r"^--arms: unknown arm 'middle'"):
        parse_arms("mid,middle")
    with pytest.raises(AblateError, match=r"^--arms: empty"):
        parse_arms(" , ")
    assert format_layers([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert BandPlan.parse(30, layers=format_layers([3, 9, 10, 11])).indices == (3, 9, 10, 11)


def test_lora_arms_need_a_rank():
    with pytest.raises(AblateError, match="^--lora-rank"):
        plan_arms(["mid", "lora"], BandPlan.parse(30), lora_rank=0)
    assert plan_arms(["mid"], BandPlan.parse(30), lora_rank=0)[0].name == "mid"
