"""LoRA on the band (``--lora-rank``): only adapters train, export merges them into a plain model
under the base names, checkpoints resume exactly, the budget rule, refused combinations."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fastmid.config import ConfigError, build_config
from fastmid.models.lora import LoraError
from fastmid.train import recipe as recipe_module
from fastmid.train.recipe import MidBlockRecipe, TrainingInterrupted

# tiny_llama_dir: 5 layers, hidden 32, 4 query heads of 8, 2 key/value heads, intermediate 64.
HIDDEN, KV, INTER, LAYERS = 32, 16, 64, 5


def _run(cfg) -> MidBlockRecipe:
    trainer = MidBlockRecipe(cfg)
    trainer.setup()
    trainer.train()
    return trainer


def _adapters(trainer: MidBlockRecipe) -> dict[str, torch.Tensor]:
    params = dict(trainer.model.named_parameters())
    return {n: params[n].detach().clone() for n in trainer.trainable_names}


def test_only_adapters_train_and_export_is_a_plain_merged_model(make_config, tiny_llama_dir):
    # band 1..3 of 5 layers, all linears, rank 2
    cfg = make_config("lora", layers="1-3", lora_rank=2, max_steps=3, lr=1e-2)
    trainer = _run(cfg)
    names = trainer.trainable_names
    assert names and all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    # 7 linears per layer, each an A (r x in) and a B (out x r), rank 2 (independent count:
    # q 32->32, k 32->16, v 32->16, o 32->32, gate 32->64, up 32->64, down 64->32)
    per_layer = 2 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + 3 * (32 + 64))
    assert trainer.counts.trainable == 3 * per_layer
    assert sum(p.numel() for p in trainer.trainable) == 3 * per_layer
    assert {int(n.split(".")[2]) for n in names} == {1, 2, 3}
    # after a few steps at a large rate the B matrices have moved off zero
    assert any(float(p.abs().max()) > 0 for n, p in _adapters(trainer).items() if "lora_B" in n)

    final = trainer.export()
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    tuned = load_file(str(final / "model.safetensors"))
    assert set(tuned) == set(base)  # the base names: no base_layer, no lora_ keys
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.split(".")[2] in {"1", "2", "3"} for k in changed)
    assert all(k.endswith("_proj.weight") for k in changed)

    reloaded = AutoModelForCausalLM.from_pretrained(final)
    ids = torch.randint(0, 1000, (2, 9))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits,
            trainer.model(input_ids=ids).logits,
            rtol=1e-5,
            atol=1e-5,
        )
    delta = load_file(str(trainer.out / "band_delta.safetensors"))
    assert set(delta) == set(names)
    plan = json.loads((trainer.out / "plan.json").read_text())
    assert plan["lora"]["rank"] == 2 and plan["lora"]["modules_adapted"] == 21


def test_qkvo_budget_matches_uniform_lora_over_every_layer(make_config):
    # uniform q/k/v/o rank 3 over 5 layers: total rank 3 * 4 * 5 = 60, spread over the 12
    # modules of layers 1..3: 5 each
    cfg = make_config(
        "budget", layers="1-3", lora_rank=3, lora_targets="qkvo", lora_match_budget=True,
        max_steps=1,
    )  # fmt: skip
    trainer = MidBlockRecipe(cfg)
    trainer.setup()
    assert trainer.lora is not None
    ranks = [m[3] for m in trainer.lora.modules]
    assert ranks == [5] * 12 and trainer.lora.total_rank == 60
    # q 32->32, k 32->16, v 32->16, o 32->32 at rank 5, three layers
    assert trainer.counts.trainable == 3 * 5 * (64 + 48 + 48 + 64)
    shapes = {
        n: tuple(p.shape)
        for n, p in trainer.model.named_parameters()
        if n in trainer.trainable_names
    }
    assert shapes["model.layers.2.self_attn.k_proj.lora_B.default.weight"] == (16, 5)
    assert not any("mlp" in n for n in shapes)


def test_train_embeddings_stays_trainable_beside_the_adapters(make_config):
    trainer = MidBlockRecipe(
        make_config("emb", layers="2", lora_rank=1, train_embeddings=True, max_steps=1)
    )
    trainer.setup()
    assert "model.embed_tokens.weight" in trainer.trainable_names
    assert not any(".base_layer." in n for n in trainer.trainable_names)


def test_resume_with_lora_is_exact(make_config, monkeypatch):
    opts = dict(layers="1-3", lora_rank=2, lora_targets="qkvo", lr=1e-2, max_steps=4, save_every=0)
    straight = _run(make_config("straight", **opts))

    first = MidBlockRecipe(make_config("split", **opts))
    first.setup()
    real = recipe_module.train_step

    def step_then_interrupt(*args, **kwargs):
        record = real(*args, **kwargs)
        if first.state.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(recipe_module, "train_step", step_then_interrupt)
    with pytest.raises(TrainingInterrupted):
        first.train()
    monkeypatch.setattr(recipe_module, "train_step", real)
    resumed = _run(make_config("split", resume="latest", **opts))
    a, b = _adapters(straight), _adapters(resumed)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_refused_combinations_name_the_flag():
    for values, needle in (
        (dict(lora_rank=4, nproc=2), "--nproc"),
        (dict(lora_rank=4, fuse_frozen=True), "--fuse-frozen"),
        (dict(lora_match_budget=True), "--lora-match-budget"),
        (dict(lora_alpha=8.0), "--lora-alpha"),
        (dict(lora_rank=-1), "--lora-rank"),
        (dict(lora_rank=2, lora_targets="mlp"), "--lora-targets"),
    ):
        with pytest.raises(ConfigError) as info:
            build_config(None, values)
        assert str(info.value).startswith(needle), (values, str(info.value))


def test_missing_peft_is_one_line_naming_the_extra(make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(LoraError, match=r"pip install 'fastmid\[ablate\]'"):
        MidBlockRecipe(make_config("nopeft", lora_rank=2, max_steps=1)).setup()
