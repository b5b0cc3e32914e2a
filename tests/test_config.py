"""Config: defaults < YAML < flags; unknown keys and bad values are named."""

from __future__ import annotations

import dataclasses
import math

import pytest

from fastmid.config import (
    FIELDS,
    GROUPS,
    ConfigError,
    TrainConfig,
    build_config,
    choices,
    config_yaml,
    dump_yaml,
    field_type,
    resolve_auto,
    resume_keys,
    validate,
)


def test_precedence_defaults_yaml_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nmicro-batch: 3\nmax_steps: 7\n")
    cfg = build_config(path, {"max_steps": 9, "lr": None})
    assert cfg.lr == 0.001 and cfg.micro_batch == 3 and cfg.max_steps == 9
    assert cfg.optim == "auto" and cfg.model == "default"
    # auto resolves to bitsandbytes' AdamW8bit outside --precision bf16
    assert resolve_auto(cfg, "cpu").optim == "adamw8bit"
    assert resolve_auto(cfg, "cuda").precision == "bf16-master"


def test_unknown_yaml_key_is_named_with_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'learning_rate'"):
        build_config(path)


def test_unknown_flag_and_bad_values():
    with pytest.raises(ConfigError, match="unknown key 'lrr'.*did you mean 'lr'"):
        build_config(None, {"lrr": 1.0})
    with pytest.raises(ConfigError, match="--optim: 'sgd' is not one of"):
        build_config(None, {"optim": "sgd"})
    with pytest.raises(ConfigError, match="--micro-batch: must be >= 1"):
        build_config(None, {"micro_batch": 0})
    with pytest.raises(ConfigError, match="--max-steps: invalid value"):
        build_config(None, {"max_steps": "many"})
    with pytest.raises(ConfigError, match="either --band or --layers"):
        build_config(None, {"band": "0.2:0.8", "layers": "3-5"})


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        build_config(bad)
    with pytest.raises(ConfigError, match=rf"{tmp_path}: is a folder, not a config file"):
        build_config(tmp_path)


@pytest.mark.parametrize(
    ("content", "offset", "line"),
    [
        ("lr: 0.001\nmodel: café\n".encode("latin-1"), 20, 2),  # é is byte 20, on line 2
        ("lr: 0.001\n".encode("utf-16"), 0, 1),  # the byte-order mark ff fe
    ],
)
def test_yaml_that_is_not_utf8_names_the_file_and_the_byte(tmp_path, content, offset, line):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        build_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not UTF-8 text"), message
    assert f"at offset {offset} (line {line})" in message and "save the file as UTF-8" in message
    assert "\n" not in message


# ---- one declaration: metadata, derived validation, YAML -----------------------------------------

# The settings a resumed run must match, as listed by Trainer.RESUME_KEYS before they moved into
# the field metadata.
OLD_RESUME_KEYS = {
    "model",
    "band",
    "layers",
    "placement",
    "train_embeddings",
    "train_lm_head",
    "train_final_norm",
    "data",
    "eval_data",
    "eval_fraction",
    "format",
    "split",
    "max_examples",
    "shuffle_seed",
    "max_seq_len",
    "truncation",
    "train_on_prompt",
    "last_turn_only",
    "skip_bad_rows",
    "group_by_length",
    "micro_batch",
    "grad_accum",
    "seed",
}
# Added since: the optimizer and schedule settings live in the checkpoint's optimizer and
# scheduler state, which a resume loads (a new --lr on resume was written to config.yaml but
# never used).
OPTIMIZER_RESUME_KEYS = {"lr", "warmup_steps", "schedule", "min_lr_ratio", "weight_decay", "optim", "precision", "optimizer_in_backward", "optimizer_offload"}  # fmt: skip


def test_every_field_has_help_group_and_bounds_metadata():
    for name, f in FIELDS.items():
        meta = f.metadata
        assert meta["help"] and meta["group"] in GROUPS, name
        assert f.default is not dataclasses.MISSING, name
        for key in ("ge", "gt", "le", "lt", "note", "resume_must_match", "yaml_list"):
            assert key in meta, (name, key)
    assert not hasattr(TrainConfig(), "extra")


# --packing changes which examples share a micro-batch, so a resumed run must keep it.
DATA_ORDER_RESUME_KEYS = {"packing"}
# LoRA on the band (--lora-rank): the adapters' shapes, scale and which modules carry them.
LORA_RESUME_KEYS = {"lora_rank", "lora_alpha", "lora_targets", "lora_match_budget"}


def test_resume_keys_come_from_metadata():
    expected = OLD_RESUME_KEYS | OPTIMIZER_RESUME_KEYS | DATA_ORDER_RESUME_KEYS | LORA_RESUME_KEYS
    assert set(resume_keys()) == expected
    assert len(resume_keys()) == len(expected)


def test_literal_choices_and_format_matches_the_data_layer():
    from fastmid.data.formats import FORMATS

    assert choices("optim") == (
        "auto", "adamw8bit", "adamw", "paged_adamw8bit", "ao_adamw8bit", "ao_adamw4bit"
    )  # fmt: skip
    assert choices("precision") == ("auto", "fp32", "bf16-master", "bf16")
    assert choices("format") == FORMATS
    assert choices("placement") == ("first", "last", "middle", "random")
    assert choices("lr") is None
    for name in ("schedule", "truncation", "kernels"):
        assert TrainConfig().__dict__[name] in choices(name)
    with pytest.raises(ConfigError, match="--format: 'csv' is not one of messages"):
        build_config(None, {"format": "csv"})
    with pytest.raises(ConfigError, match="--placement: 'top' is not one of"):
        build_config(None, {"placement": "top"})


def test_bounds_are_derived_from_metadata():
    """A value just past each declared bound is refused with the field's flag."""
    for name, f in FIELDS.items():
        meta = f.metadata
        step = 1 if field_type(name) in (int, int | None) else 1e-6
        outside = []
        if meta["ge"] is not None:
            outside.append(meta["ge"] - step)
        if meta["gt"] is not None:
            outside.append(meta["gt"])
        if meta["le"] is not None:
            outside.append(meta["le"] + step)
        if meta["lt"] is not None:
            outside.append(meta["lt"])
        flag = "--" + name.replace("_", "-")
        for value in outside:
            with pytest.raises(ConfigError, match=f"^{flag}: must be"):
                build_config(None, {name: value})


def test_existing_messages_keep_their_wording():
    cases = {
        "eval_fraction": (1.0, "--eval-fraction: must be in [0, 1)"),
        "min_lr_ratio": (1.5, "--min-lr-ratio: must be in [0, 1]"),
        "grad_clip": (-1.0, "--grad-clip: must be >= 0 (0 disables clipping)"),
        "max_seq_len": (4, "--max-seq-len: must be >= 8 tokens"),
        "lr": (0.0, "--lr: must be > 0"),
        "eval_every": (-1, "--eval-every: must be >= 0 (0 disables)"),
    }
    for name, (value, message) in cases.items():
        with pytest.raises(ConfigError) as info:
            build_config(None, {name: value})
        assert str(info.value) == message


def test_floats_must_be_finite_and_seed_non_negative():
    floats = [n for n in FIELDS if field_type(n) is float]
    assert "lr" in floats and "grad_clip" in floats
    for name in floats:
        for bad in (math.inf, -math.inf, math.nan, "inf"):
            with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')}: must be a finite"):
                build_config(None, {name: bad})
    # Seeds are bounded on both sides: the message names the flag, 0 and the exact maximum.
    for name in ("seed", "shuffle_seed"):
        expected = rf"--{name.replace('_', '-')}: must be in \[0, .*4294967295"
        for bad in (-1, 2**32, 2**70, "1180591620717411303424"):
            with pytest.raises(ConfigError, match=expected):
                build_config(None, {name: bad})
        assert getattr(build_config(None, {name: 2**32 - 1}), name) == 2**32 - 1


def test_seed_bound_keeps_the_data_order_generator_seed_in_range():
    """The recipe seeds ``torch.Generator().manual_seed(seed * 1_000_003 + epoch)``; with the
    largest seed and an epoch below 2**62 (the checkpoint's bound on positions) that fits."""
    import torch

    seed = FIELDS["seed"].metadata["le"]
    torch.Generator().manual_seed(seed * 1_000_003 + 2**62 - 1)


def test_validate_checks_a_config_built_by_hand():
    cfg = TrainConfig(lr=float("inf"))
    with pytest.raises(ConfigError, match="--lr: must be a finite number"):
        validate(cfg)
    with pytest.raises(ConfigError, match="--micro-batch: invalid value"):
        validate(TrainConfig(micro_batch="two"))  # type: ignore[arg-type]
    validate(TrainConfig())


def test_to_dict_is_asdict():
    cfg = TrainConfig(lr=1e-3)
    assert cfg.to_dict() == dataclasses.asdict(cfg)
    assert set(cfg.to_dict()) == set(FIELDS)


def test_yaml_band_list_becomes_start_end(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("band: [0.2, 0.8]\n")
    assert build_config(path).band == "0.2:0.8"
    path.write_text("band: 0:1\n")  # YAML 1.1 would read base-60 1
    assert build_config(path).band == "0:1"
    path.write_text("layers: [3, 5, 7-9]\ndata: [a.jsonl, b.jsonl]\n")
    cfg = build_config(path)
    assert cfg.layers == "3,5,7-9" and cfg.data == "a.jsonl,b.jsonl"
    for bad in ("band: [0.2]\n", "band: [0.2, 0.5, 0.8]\n", "band: [a, b]\n"):
        path.write_text(bad)
        with pytest.raises(
            ConfigError, match=r"c\.yaml: key 'band': invalid value .*\[0\.2, 0\.8\]"
        ):
            build_config(path)
    path.write_text("lr: [1, 2]\n")
    with pytest.raises(ConfigError, match="c.yaml: key 'lr': invalid value"):
        build_config(path)


def test_yaml_numbers_and_booleans(tmp_path):
    """A bad value from the YAML file is named by file and key; the same value as a flag, by the
    flag."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nmax_steps: 10.0\noverwrite: yes\nformat: null\n")
    cfg = build_config(path)
    assert cfg.lr == 1e-4 and cfg.max_steps == 10 and cfg.overwrite is True
    assert cfg.format is None
    for bad, message in (
        ("micro_batch: true\n", "c.yaml: key 'micro_batch': invalid value True"),
        ("overwrite: maybe\n", "c.yaml: key 'overwrite': invalid value 'maybe'"),
        ("lr: null\n", "c.yaml: key 'lr': invalid value None"),
        ("max_steps: 2.5\n", "c.yaml: key 'max_steps': invalid value 2.5"),
    ):
        path.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            build_config(path)
    with pytest.raises(ConfigError, match=r"^--max-steps: invalid value 2\.5"):
        build_config(None, {"max_steps": 2.5})
    path.write_text("lr: .inf\n")
    assert build_config(path, {"lr": 1e-3}).lr == 1e-3  # the flag replaces the file's bad value


def test_duplicate_yaml_keys_are_named_with_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1\nseed: 0\nlr: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'lr' appears twice \(lines 1 and 3\)"):
        build_config(path)
    path.write_text("micro-batch: 2\nmicro_batch: 3\n")  # the same key in both spellings
    with pytest.raises(ConfigError, match="appears twice"):
        build_config(path)


def test_yaml_python_tags_are_refused_in_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError) as info:
        build_config(path)
    message = str(info.value)
    assert "\n" not in message and "invalid YAML (line 1:" in message and "python/object" in message


def test_unknown_keys_suggest_aliases(tmp_path):
    path = tmp_path / "c.yaml"
    for key, known in (
        ("learning_rate", "lr"),
        ("batch_size", "micro_batch"),
        ("gradient_accumulation_steps", "grad_accum"),
        ("num_epochs", "epochs"),
        ("warmup", "warmup_steps"),
        ("max_length", "max_seq_len"),
        ("output_dir", "output"),
        ("model_name_or_path", "model"),
        ("max-seq-length", "max_seq_len"),
    ):
        path.write_text(f"{key}: 1\n")
        with pytest.raises(ConfigError, match=f"unknown key '{key}'; did you mean '{known}'"):
            build_config(path)


def test_dump_yaml_round_trips(tmp_path):
    cfg = build_config(None, {"band": "0:1", "lr": 1e-5, "format": "gsm8k", "resume": "latest"})
    path = tmp_path / "config.yaml"
    dump_yaml(cfg, path)
    assert path.read_text() == config_yaml(cfg)
    again = build_config(path)
    assert again == dataclasses.replace(cfg, resume=None, overwrite=False)
    assert config_yaml(again) == config_yaml(cfg)


def test_auto_precision_follows_the_cpu(monkeypatch):
    import fastmid.config as config

    monkeypatch.delenv("FASTMID_AUTO_CPU_PRECISION", raising=False)
    monkeypatch.setattr(config, "cpu_has_fast_bf16", lambda: True)
    assert config.resolve_precision("auto", "cpu") == "bf16-master"
    monkeypatch.setattr(config, "cpu_has_fast_bf16", lambda: False)
    assert config.resolve_precision("auto", "cpu") == "fp32"
    assert config.resolve_precision("auto", "cuda") == "bf16-master"
    # an explicit value is never changed, and the variable replaces the detection on CPU only
    assert config.resolve_precision("fp32", "cuda") == "fp32"
    monkeypatch.setenv("FASTMID_AUTO_CPU_PRECISION", "bf16-master")
    assert config.resolve_precision("auto", "cpu") == "bf16-master"
    assert config.resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setenv("FASTMID_AUTO_CPU_PRECISION", "bf16")
    with pytest.raises(ConfigError, match=r"\$FASTMID_AUTO_CPU_PRECISION: 'bf16'"):
        config.resolve_precision("auto", "cpu")


def test_cpu_bf16_probe_is_a_bool():
    from fastmid.config import cpu_has_fast_bf16

    assert isinstance(cpu_has_fast_bf16(), bool)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "onednn_bf16", "fast"),
    [
        (True, False, True, True),  # Xeon Sapphire Rapids and later
        (False, True, True, True),  # AMD Zen 4, Xeon Cooper Lake: native bf16 dot products
        (False, False, True, False),  # AVX-512 without BF16: oneDNN emulates bf16, slower
        (True, True, False, False),  # torch built without oneDNN's bf16 kernels
    ],
)
def test_cpu_bf16_probe_counts_amx_and_avx512_bf16(
    monkeypatch, amx, avx512_bf16, onednn_bf16, fast
):
    import torch

    from fastmid.config import cpu_has_fast_bf16

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)
    assert cpu_has_fast_bf16() is fast
