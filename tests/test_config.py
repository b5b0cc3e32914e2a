"""Config: defaults < YAML < flags; unknown keys and bad values are named."""

from __future__ import annotations

import pytest

from fastmid.config import ConfigError, build_config


def test_precedence_defaults_yaml_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nmicro-batch: 3\nmax_steps: 7\n")
    cfg = build_config(path, {"max_steps": 9, "lr": None})
    assert cfg.lr == 0.001 and cfg.micro_batch == 3 and cfg.max_steps == 9
    assert cfg.optim == "adamw8bit" and cfg.model == "default"


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
