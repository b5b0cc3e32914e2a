"""CLI options come from TrainConfig: one flag per field, one default per shared option, grouped
--help without type tags, flags over YAML, --print-config, --version, unknown-flag hints.

Everything runs in-process (typer's CliRunner) and loads no model.
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version

import pytest
import typer.main
from typer.testing import CliRunner

from fastmid.analysis.analyze import load_examples, run_analysis
from fastmid.cli import app
from fastmid.config import FIELDS, GROUPS, TrainConfig, build_config, choices, config_yaml, flag
from fastmid.data.inspect import inspect_data
from fastmid.eval.exact_match import evaluate_accuracy, run_eval

runner = CliRunner()
ROOT = typer.main.get_command(app)
COMMANDS = {
    "train": ROOT.commands["train"],
    "plan": ROOT.commands["plan"],
    "eval": ROOT.commands["eval"],
    "analyze": ROOT.commands["analyze"],
    "data inspect": ROOT.commands["data"].commands["inspect"],
}

# The options other commands share with `train`: command -> {parameter: TrainConfig field}.
SHARED = {
    "data inspect": {
        name: name
        for name in (
            "model", "data", "format", "split", "max_examples", "max_seq_len", "truncation",
            "train_on_prompt", "last_turn_only", "skip_bad_rows",
        )
    },
    "eval": {
        "model": "model",
        "data": "eval_accuracy_data",
        "n": "eval_n",
        "max_new_tokens": "eval_max_new_tokens",
        "batch_size": "eval_batch_size",
        "skip_bad_rows": "skip_bad_rows",
    },
    "analyze": {
        name: name
        for name in (
            "data", "format", "split", "max_seq_len", "truncation", "train_on_prompt",
            "last_turn_only", "skip_bad_rows",
        )
    },
    "plan": {"model": "model", "band": "band", "layers": "layers", "optim": "optim"},
}  # fmt: skip

# Parameters named like a field that are deliberately their own option.
OWN = {
    ("analyze", "output"): "the report's folder, not a run folder",
    ("plan", "micro_batch"): "plan sizes a long-sequence GPU run (--seq-len 4096, micro-batch 1)",
}

# The library functions behind the commands: their defaults must be the same ones.
EVAL_LIBRARY = {k: v for k, v in SHARED["eval"].items() if k != "model"}
DATA_LIBRARY = {k: v for k, v in SHARED["analyze"].items() if k != "data"}
LIBRARY = {
    "inspect_data": (inspect_data, {**DATA_LIBRARY, "max_examples": "max_examples"}),
    "run_eval": (run_eval, EVAL_LIBRARY),
    "evaluate_accuracy": (evaluate_accuracy, EVAL_LIBRARY),
    "run_analysis": (run_analysis, DATA_LIBRARY),
    "load_examples": (load_examples, DATA_LIBRARY),
}


def _params(command_name: str) -> dict[str, object]:
    return {p.name: p for p in COMMANDS[command_name].params}


def _invoke(*args: str) -> object:
    return runner.invoke(app, list(args), env={"COLUMNS": "160", "NO_COLOR": "1"})


def test_every_field_has_a_flag_a_yaml_key_help_and_group():
    params = _params("train")
    for name, f in FIELDS.items():
        param = params[name]
        assert param.opts == [flag(name)], name
        if isinstance(f.default, bool):
            assert param.secondary_opts == ["--no-" + flag(name)[2:]], name
        assert param.default == f.default, name
        assert param.help.startswith(f.metadata["help"]), name
        assert param.rich_help_panel == f.metadata["group"], name
        allowed = choices(name)
        if allowed is not None:
            assert " | ".join(allowed) in param.help, name
    assert set(params) == {*FIELDS, "config", "print_config"}
    # every field is a YAML key: the written-out config holds each one and reads back
    assert set(re.findall(r"^(\w+):", config_yaml(TrainConfig()), re.M)) == set(FIELDS)


def test_literal_choices_are_enforced_by_the_flags():
    for name in [n for n in FIELDS if choices(n) is not None]:
        result = _invoke("train", flag(name), "not-a-choice", "--print-config")
        assert result.exit_code == 2, name
        assert "not-a-choice" in result.output


def test_shared_options_have_one_default():
    for command, mapping in SHARED.items():
        params = _params(command)
        for param_name, field_name in mapping.items():
            param = params[param_name]
            assert param.default == FIELDS[field_name].default, (command, param_name)
            if param_name == field_name:  # the same option: the same spelling
                assert param.opts == [flag(field_name)], (command, param_name)
        # Any other parameter named like a field is that field, with its default.
        for param_name, param in params.items():
            same_field = mapping.get(param_name, param_name) == param_name
            if param_name in FIELDS and same_field and (command, param_name) not in OWN:
                assert param.default == FIELDS[param_name].default, (command, param_name)
    for label, (fn, mapping) in LIBRARY.items():
        signature = inspect.signature(fn).parameters
        for param_name, field_name in mapping.items():
            default = signature[param_name].default
            if default is not inspect.Parameter.empty:  # a required argument has no default
                assert default == FIELDS[field_name].default, (label, param_name)


def test_max_seq_len_and_eval_defaults_agree():
    defaults = {c: _params(c)["max_seq_len"].default for c in ("data inspect", "analyze")}
    assert defaults == {"data inspect": 512, "analyze": 512} and TrainConfig().max_seq_len == 512
    eval_params = _params("eval")
    assert (eval_params["n"].default, eval_params["max_new_tokens"].default) == (100, 96)
    assert eval_params["batch_size"].default == 50
    assert eval_params["n"].opts == ["--n"] and eval_params["batch_size"].opts == ["--batch-size"]


@pytest.mark.parametrize(
    ("command", "groups"),
    [
        ("train", GROUPS),
        ("plan", ("model", "band", "optimization", "output")),
        ("eval", ("model", "evaluation", "output")),
        ("analyze", ("model", "data", "analysis", "output")),
        ("data inspect", ("model", "data", "output")),
    ],
)
def test_help_is_grouped_with_defaults_and_no_type_tags(command, groups):
    result = _invoke(*command.split(), "--help")
    assert result.exit_code == 0, result.output
    out = result.output
    titles = re.findall(r"╭─ (\w[\w ]*?) ─", out)
    assert [t for t in titles if t in groups] == list(groups), titles
    assert "[default:" in out
    for tag in ("<bool>", "<int>", "<str>", "<float>", "<path>", "INTEGER", "TEXT", "FLOAT"):
        assert tag not in out, (command, tag)


@pytest.mark.parametrize("args", [["--help"], ["data", "--help"]])
def test_group_help_has_no_type_tags_and_unbroken_command_help(args):
    result = _invoke(*args)
    assert result.exit_code == 0
    assert "<bool>" not in result.output
    if args == ["--help"]:
        assert "Train the band of a model on SFT data." in result.output
        assert "--version" in result.output


def test_version():
    result = _invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"fastmid {version('fastmid')}"


def test_print_config_is_the_resolved_yaml_and_reproduces_the_run(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nmax_steps: 7\nband: [0.1, 0.9]\n")
    result = _invoke("train", str(path), "--max-steps", "9", "--no-eval-accuracy", "--print-config")
    assert result.exit_code == 0, result.output
    printed = result.output
    expected = build_config(path, {"max_steps": 9, "eval_accuracy": False})
    assert printed == config_yaml(expected)
    # flags left out keep the YAML's values; flags given win
    assert "lr: 0.001\n" in printed and "max_steps: 9\n" in printed
    assert "band: 0.1:0.9\n" in printed and "eval_accuracy: false\n" in printed
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    again = _invoke("train", str(saved), "--print-config")
    assert again.exit_code == 0 and again.output == printed
    assert build_config(saved) == expected
    assert _invoke("train", "--print-config").output == config_yaml(TrainConfig())


def test_bad_values_are_one_line_naming_the_flag():
    for args, needle in (
        (["--lr", "inf"], "--lr: must be a finite number"),
        (["--seed", "-1"], "--seed: must be in [0, "),
        (["--seed", "4294967296"], "--seed: must be in [0, "),
        (["--shuffle-seed", "1180591620717411303424"], "--shuffle-seed: must be in [0, "),
        (["--micro-batch", "0"], "--micro-batch: must be >= 1"),
    ):
        result = _invoke("train", *args, "--print-config")
        assert result.exit_code == 2, args
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], result.output


def test_unknown_flags_suggest_the_closest_one():
    for typed, known in (
        ("--learning-rate", "--lr"),
        ("--lrr", "--lr"),
        ("--batch-size", "--micro-batch"),
        ("--max-length", "--max-seq-len"),
    ):
        result = _invoke("train", typed, "1")
        assert result.exit_code == 2
        assert f"No such option: {typed}" in result.output and known in result.output, typed
