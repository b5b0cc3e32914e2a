"""Training configuration: one dataclass, YAML files, ``--flag`` overrides, validation.

Precedence: dataclass defaults < YAML file < command-line flags. YAML keys use the flag names with
``_`` or ``-`` (``micro_batch`` or ``micro-batch``). An unknown key is an error that names the key
and the file; a bad value is an error that names the flag.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastmid.errors import FastmidError


class ConfigError(FastmidError, ValueError):
    """Invalid configuration; the message names the key or flag and what to do."""


OPTIMIZERS = ("adamw8bit", "adamw", "paged_adamw8bit")
SCHEDULES = ("cosine", "constant")
TRUNCATIONS = ("prompt-left", "drop")
KERNEL_MODES = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Everything one ``fastmid train`` run needs; written out resolved as ``config.yaml``.

    Units: ``lr`` per optimizer step; ``max_seq_len`` in tokens; ``micro_batch`` in sequences;
    steps count optimizer steps (one step = ``grad_accum`` micro-batches).
    """

    # model and band
    model: str = "default"
    band: str | None = None  # "0.2:0.8" when neither band nor layers is given
    layers: str | None = None
    placement: str | None = None  # first | last | middle | random (ablations)
    train_embeddings: bool = False
    train_lm_head: bool = False
    train_final_norm: bool = False
    # data
    data: str = "builtin:arith"
    eval_data: str | None = None
    eval_fraction: float = 0.05
    format: str | None = None
    split: str = "train"
    max_examples: int | None = 2000
    shuffle_seed: int = 0
    max_seq_len: int = 512
    truncation: str = "prompt-left"
    train_on_prompt: bool = False
    last_turn_only: bool = False
    skip_bad_rows: bool = False
    group_by_length: bool = False
    # schedule
    max_steps: int | None = 90
    epochs: float = 1.0
    micro_batch: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_steps: int = 5
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    optim: str = "adamw8bit"
    grad_checkpointing: bool = False
    kernels: str = "auto"
    # evaluation, saving
    eval_every: int = 30
    eval_batches: int = 8
    save_every: int = 30
    keep_last: int = 2
    eval_accuracy: bool = True
    eval_n: int = 100
    eval_max_new_tokens: int = 128
    eval_batch_size: int = 50
    eval_accuracy_data: str = "builtin:arith:test"
    output: str = "runs/default"
    overwrite: bool = False
    resume: str | None = None
    seed: int = 0
    log_every: int = 1
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults written out (``extra`` omitted)."""
        out = dataclasses.asdict(self)
        out.pop("extra", None)
        return out


_FIELDS = {f.name for f in dataclasses.fields(TrainConfig) if f.name != "extra"}


def _normalize_key(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, sorted(_FIELDS), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config into a dict with normalized keys.

    Raises:
        ConfigError: missing file, invalid YAML, not a mapping, or an unknown key (named).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the config must be a mapping of key: value")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        norm = _normalize_key(str(key))
        if norm not in _FIELDS:
            raise _unknown(str(key), str(p))
        out[norm] = value
    return out


def build_config(
    yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then the YAML file, then ``overrides`` (flags given on the command line).

    Args:
        yaml_path: optional YAML file.
        overrides: flag values; ``None`` values mean "not given" and are skipped.

    Raises:
        ConfigError: unknown key, wrong type, or a value that fails :func:`validate`.
    """
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values.update(load_yaml(yaml_path))
    for key, value in (overrides or {}).items():
        norm = _normalize_key(key)
        if norm not in _FIELDS:
            raise _unknown(key, "command line")
        if value is not None:
            values[norm] = value
    cfg = TrainConfig()
    for key, value in values.items():
        setattr(cfg, key, _coerce(key, value, getattr(cfg, key)))
    validate(cfg)
    return cfg


def _coerce(key: str, value: Any, default: Any) -> Any:
    hints = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    hint = str(hints[key])
    if value is None:
        return None
    try:
        if "bool" in hint:
            if isinstance(value, str):
                low = value.lower()
                if low in ("true", "yes", "1", "on"):
                    return True
                if low in ("false", "no", "0", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint.startswith("float"):
            return float(value)
        if hint.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{key.replace('_', '-')}: invalid value {value!r} ({hint})") from None
    return value


def validate(cfg: TrainConfig) -> None:
    """Check ranges and choices.

    Raises:
        ConfigError: naming the flag and the accepted values.
    """

    def need(cond: bool, flag: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"--{flag}: {msg}")

    need(cfg.optim in OPTIMIZERS, "optim", f"'{cfg.optim}' is not one of {', '.join(OPTIMIZERS)}")
    need(cfg.schedule in SCHEDULES, "schedule", f"'{cfg.schedule}' is not one of {SCHEDULES}")
    need(cfg.truncation in TRUNCATIONS, "truncation", f"'{cfg.truncation}' not in {TRUNCATIONS}")
    need(cfg.kernels in KERNEL_MODES, "kernels", f"'{cfg.kernels}' not in {KERNEL_MODES}")
    need(cfg.micro_batch >= 1, "micro-batch", "must be >= 1")
    need(cfg.grad_accum >= 1, "grad-accum", "must be >= 1")
    need(cfg.max_steps is None or cfg.max_steps >= 1, "max-steps", "must be >= 1")
    need(cfg.epochs > 0, "epochs", "must be > 0")
    need(cfg.lr > 0, "lr", "must be > 0")
    need(cfg.warmup_steps >= 0, "warmup-steps", "must be >= 0")
    need(0.0 <= cfg.min_lr_ratio <= 1.0, "min-lr-ratio", "must be in [0, 1]")
    need(cfg.weight_decay >= 0, "weight-decay", "must be >= 0")
    need(cfg.grad_clip >= 0, "grad-clip", "must be >= 0 (0 disables clipping)")
    need(cfg.max_seq_len >= 8, "max-seq-len", "must be >= 8 tokens")
    need(0.0 <= cfg.eval_fraction < 1.0, "eval-fraction", "must be in [0, 1)")
    need(cfg.eval_every >= 0, "eval-every", "must be >= 0 (0 disables)")
    need(cfg.save_every >= 0, "save-every", "must be >= 0 (0 saves only at the end)")
    need(cfg.keep_last >= 1, "keep-last", "must be >= 1")
    need(cfg.log_every >= 1, "log-every", "must be >= 1")
    need(cfg.eval_n >= 1, "eval-n", "must be >= 1")
    need(cfg.eval_batch_size >= 1, "eval-batch-size", "must be >= 1")
    need(cfg.eval_max_new_tokens >= 1, "eval-max-new-tokens", "must be >= 1")
    need(cfg.max_examples is None or cfg.max_examples >= 1, "max-examples", "must be >= 1")
    need(
        not (cfg.band is not None and cfg.layers is not None),
        "band",
        "give either --band or --layers, not both",
    )


def dump_yaml(cfg: TrainConfig, path: Path) -> None:
    """Write the resolved config (every default written out) to ``path``.

    ``overwrite`` and ``resume`` describe one invocation, not the run: they are written as
    ``false``/``null`` so that re-running a saved config never wipes or silently resumes a run.
    """
    values = cfg.to_dict()
    values["overwrite"] = False
    values["resume"] = None
    path.write_text(yaml.safe_dump(values, sort_keys=False))
