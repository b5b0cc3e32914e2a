"""The defaults of ``fastmid ablate``, importable without torch (the CLI reads them for --help).

Sized so that one SmolLM2-135M run (train, then validation or test exact match) takes a few
minutes on 2 CPU cores: short runs, no periodic held-out loss (the carved validation split is the
held-out set), a checkpoint every 10 steps (runs resume), one checkpoint kept.
"""

from __future__ import annotations

from typing import Any

ARMS: tuple[str, ...] = ("mid", "early", "late", "random", "full", "lora", "lora-mid")
FULL_RANK_ARMS: tuple[str, ...] = ("mid", "early", "late", "random", "full")
LORA_ARMS: tuple[str, ...] = ("lora", "lora-mid")
# The train options whose default differs under `fastmid ablate` (YAML and flags still win).
TRAIN_DEFAULTS: dict[str, Any] = {
    "max_steps": 30,
    "max_seq_len": 256,
    "eval_fraction": 0.0,  # the carved validation split is the held-out set
    "eval_every": 0,
    "save_every": 10,
    "keep_last": 1,
    "eval_n": 300,
    "eval_accuracy": False,  # the ablation scores each run itself (validation, test)
    "lora_rank": 8,
    "output": "runs/ablate",
}
# The learning-rate grids, fixed in advance: three rates a factor of 3 apart per family.
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "full-rank": (1e-4, 3e-4, 1e-3),
    "lora": (3e-4, 1e-3, 3e-3),
}
DEFAULT_LRS = "full-rank=1e-4,3e-4,1e-3;lora=3e-4,1e-3,3e-3"
KEEP_CHOICES: tuple[str, ...] = ("results", "final", "all")
DEFAULT_SEEDS = 3
DEFAULT_VAL_N = 100
DEFAULT_LR_EXTEND = 2
DEFAULT_BOOTSTRAP = 10_000
