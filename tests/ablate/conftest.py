"""Fixtures of the ablation tests: the tiny Llama of tests/conftest.py (5 layers, SmolLM2's
tokenizer) and a fast base config (two steps, a handful of short evaluations)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# Two optimizer steps, tiny evaluations: one arm-run takes seconds on 2 cores.
FAST = {
    "max_steps": 2,
    "warmup_steps": 0,
    "micro_batch": 2,
    "max_examples": 16,
    "max_seq_len": 160,
    "eval_n": 4,
    "eval_max_new_tokens": 4,
    "eval_batch_size": 4,
    "save_every": 1,
}


@pytest.fixture
def fast_args(tiny_llama_dir: Path, tmp_path: Path):
    """CLI arguments of a fast ablation on the tiny model into ``tmp_path/abl`` (extra arguments
    appended by the test)."""

    def make(*extra: str, output: str = "abl") -> list[str]:
        args = ["ablate", "--model", str(tiny_llama_dir), "--output", str(tmp_path / output)]
        for key, value in FAST.items():
            args += ["--" + key.replace("_", "-"), str(value)]
        return [*args, "--val-n", "4", "--bootstrap", "200", *extra]

    return make


@pytest.fixture
def fast_config(tiny_llama_dir: Path, tmp_path: Path):
    """``(base config, settings)`` of a fast ablation, built as the CLI builds them."""
    from fastmid.ablate.protocol import AblateSettings, build_ablate_config

    def make(output: str = "abl", settings: dict[str, Any] | None = None, **overrides: Any):
        values = {"model": str(tiny_llama_dir), "output": str(tmp_path / output), **FAST}
        values.update(overrides)
        cfg, explicit = build_ablate_config(None, values)
        opts = {"val_n": 4, "bootstrap": 200, **(settings or {})}
        return cfg, AblateSettings(**opts), explicit

    return make
