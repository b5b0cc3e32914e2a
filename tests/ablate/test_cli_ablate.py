"""`fastmid ablate`'s options: every train option is there (the shared base), with train's
default unless the ablation sizes it differently; grouped --help without type tags."""

from __future__ import annotations

import re

import typer.main
from typer.testing import CliRunner

from fastmid.ablate.defaults import TRAIN_DEFAULTS
from fastmid.ablate.protocol import build_ablate_config
from fastmid.cli import app
from fastmid.config import FIELDS, flag

ABLATE = typer.main.get_command(app).commands["ablate"]
OWN = {"arms", "lrs", "seeds", "val_n", "lr_extend", "random_arm_seed", "bootstrap", "keep"}


def test_every_train_option_is_a_shared_option_of_ablate():
    params = {p.name: p for p in ABLATE.params}
    assert set(params) == {*FIELDS, *OWN, "config"}
    for name, f in FIELDS.items():
        assert params[name].opts == [flag(name)], name
        assert params[name].default == TRAIN_DEFAULTS.get(name, f.default), name
        assert params[name].rich_help_panel == f.metadata["group"], name
    assert set(TRAIN_DEFAULTS) <= set(FIELDS)


def test_defaults_yaml_flags_precedence(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text("max_steps: 12\nmicro_batch: 4\n")
    cfg, explicit = build_ablate_config(path, {"max_seq_len": 128})
    # YAML over the ablation's default (max_steps), flags over both, the rest the ablation's
    assert (cfg.max_steps, cfg.micro_batch, cfg.max_seq_len) == (12, 4, 128)
    assert (cfg.eval_n, cfg.lora_rank, cfg.eval_accuracy) == (300, 8, False)
    assert explicit == {"max_steps", "micro_batch", "max_seq_len"}


def test_help_has_the_ablation_panel_and_no_type_tags():
    result = CliRunner().invoke(app, ["ablate", "--help"], env={"COLUMNS": "160", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    titles = re.findall(r"╭─ (\w[\w ]*?) ─", result.output)
    assert titles[:3] == ["Arguments", "Options", "ablation"] and "adapter" in titles
    for tag in ("<bool>", "<int>", "INTEGER", "TEXT", "FLOAT"):
        assert tag not in result.output
    assert "(fastmid ablate's default)" in result.output
