"""Training with --packing: exact resume, the summary's packing record, and data inspect."""

from __future__ import annotations

import json

import pytest
import torch
from test_recipe import _band_state, _interrupt_after, _run

from fastmid.train.recipe import MidBlockRecipe, TrainingInterrupted


def test_resume_with_packing_is_exact(make_config, monkeypatch):
    """4 packed steps in one go == 2 steps, interrupt, resume, 2 steps: same losses, weights."""
    opts = dict(max_steps=4, save_every=0, packing=True, micro_batch=2, optim="adamw")
    full, rec_full = _run(make_config("full", **opts))
    first = MidBlockRecipe(make_config("split", **opts))
    first.setup()
    _interrupt_after(first, 2, monkeypatch)
    with pytest.raises(TrainingInterrupted):
        first.train()
    resumed, rec_split = _run(make_config("split", resume="latest", **opts))
    assert [r["loss"] for r in rec_full] == [r["loss"] for r in rec_split]
    wf, wr = _band_state(full), _band_state(resumed)
    assert all(torch.equal(wf[n], wr[n]) for n in wf)
    # Every row holds whole examples: real tokens over padded tokens is the packing's fill.
    assert all(r["padded_tokens"] >= r["tokens"] for r in rec_full)


def test_summary_reports_packing(make_config, smol_tokenizer):
    from pathlib import Path

    from rich.console import Console

    from fastmid.data import build_sft_examples, split_eval
    from fastmid.train.recipe import run_train

    cfg = make_config("sum", max_steps=2, save_every=0, packing=True, micro_batch=2)
    summary = run_train(cfg, Console(quiet=True))
    packing = summary["packing"]
    assert packing["attention"] == "sdpa, block-diagonal boolean mask"
    assert 0 < packing["fill_ratio"] <= 1
    # the same training examples, tokenized here without the recipe
    examples, _ = build_sft_examples(
        cfg.data,
        smol_tokenizer,
        split=cfg.split,
        max_examples=cfg.max_examples,
        shuffle_seed=cfg.shuffle_seed,
        max_seq_len=cfg.max_seq_len,
    )
    train, _ = split_eval(examples, cfg.eval_fraction, cfg.seed)
    assert packing["examples"] == len(train)
    assert packing["tokens"] == sum(len(e["input_ids"]) for e in train)
    assert summary["padded_tokens_per_s"] >= summary["tokens_per_s"] > 0
    saved = json.loads((Path(cfg.output) / "summary.json").read_text())
    assert saved["packing"] == packing


def test_packing_and_group_by_length_refused(make_config):
    from fastmid.config import ConfigError

    with pytest.raises(ConfigError, match="--packing: packed rows are already filled"):
        make_config("x", packing=True, group_by_length=True)
