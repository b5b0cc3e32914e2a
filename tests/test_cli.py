"""The ``fastmid`` command line in-process (typer's CliRunner): the exit codes its docstring
promises (0 success, 1 non-finite loss, 2 known error on one line, 130 interrupted after saving)
and ``--help`` of every command.

``fastmid train`` runs no training here: ``fastmid.train.recipe.run_train``, which the command
imports when it runs, is replaced by a stand-in.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny import tiny_config
from typer.testing import CliRunner

from fastmid.cli import app
from fastmid.train.recipe import NonFiniteLossError, TrainingInterrupted

COMMANDS = [
    [], ["train"], ["plan"], ["eval"], ["generate"], ["analyze"], ["data"], ["data", "inspect"]
]  # fmt: skip


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, exit_code: int = 2) -> str:
    """The CLI's known-error contract: the exit code, one ``error: ...`` line on stderr, nothing
    on stdout, no traceback."""
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, result.stderr
    assert result.stdout.strip() == ""
    return message


@pytest.fixture
def tiny_config_json(tmp_path: Path) -> Path:
    """A bare config.json of a tiny 10-layer Llama (``fastmid plan`` needs no weights)."""
    path = tmp_path / "config.json"
    tiny_config("llama", num_hidden_layers=10).to_json_file(path)
    return path


# ---- --help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "fastmid")
def test_help_of_every_command_exits_0(args: list[str]) -> None:
    result = invoke(*args, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.stdout and "Traceback" not in result.output


def test_top_level_help_lists_every_command() -> None:
    text = invoke("--help").stdout
    for command in ("train", "plan", "eval", "analyze", "data"):
        assert command in text, command


def test_train_help_shows_the_config_flags() -> None:
    text = invoke("train", "--help").stdout
    for flag in ("--max-seq-len", "--lr", "--band", "--model", "--data", "--output"):
        assert flag in text, flag


# ---- exit 0 ------------------------------------------------------------------------------------


def test_plan_of_a_config_json_exits_0(tiny_config_json: Path) -> None:
    result = invoke("plan", "--model", str(tiny_config_json), "--seq-len", "64", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["band"]["indices"] == list(range(2, 8))  # 10 layers, 0.2:0.8 -> [2, 8)
    assert plan["model"]["num_hidden_layers"] == 10

    table = invoke("plan", "--model", str(tiny_config_json), "--seq-len", "64")
    assert table.exit_code == 0, table.output
    assert "2..7" in table.stdout


def test_plan_precision_bf16_is_shown(tiny_config_json: Path) -> None:
    default = json.loads(invoke("plan", "--model", str(tiny_config_json), "--json").stdout)
    # A plan is a GPU estimate: auto means the CUDA default.
    assert (default["setup"]["precision"], default["setup"]["optim"]) == (
        "bf16-master",
        "adamw8bit",
    )

    args = ("plan", "--model", str(tiny_config_json), "--seq-len", "64", "--precision", "bf16")
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert (plan["setup"]["precision"], plan["setup"]["optim"]) == ("bf16", "ao_adamw8bit")
    mid, full = plan["memory"]["mid_block"], plan["memory"]["full"]
    # bf16 weights everywhere: 2 bytes per parameter, Mid-Block and full fine-tuning alike.
    assert mid["bytes"]["weights"] == full["bytes"]["weights"] == 2 * plan["parameters"]["total"]
    assert mid["bytes"]["gradients"] == 2 * plan["parameters"]["trainable"]

    table = invoke(*args)
    assert table.exit_code == 0, table.output
    assert "precision bf16, ao_adamw8bit" in " ".join(table.stdout.split())  # rich may wrap


def test_plan_bf16_with_a_round_to_nearest_optimizer_is_one_line(tiny_config_json: Path) -> None:
    result = invoke(
        "plan", "--model", str(tiny_config_json), "--precision", "bf16", "--optim", "adamw8bit"
    )
    message = assert_one_line_error(result)
    assert "--optim adamw8bit" in message and "--precision bf16" in message


def test_plan_optimizer_options_are_shown(tmp_path: Path) -> None:
    # 10 layers, h=64, 4 heads of 16 (q, o: 64 x 64 = 4096), 2 kv heads (k, v: 64 x 32 = 2048),
    # I=128 (gate, up, down: 64 x 128 = 8192), norms 64; band 2..7 (6 layers).
    path = tmp_path / "config.json"
    tiny_config(
        "llama", num_hidden_layers=10, hidden_size=64, intermediate_size=128, vocab_size=64
    ).to_json_file(path)
    base = ("plan", "--model", str(path), "--seq-len", "64", "--optim", "adamw")

    default = json.loads(invoke(*base, "--json").stdout)
    assert (default["setup"]["optimizer_in_backward"], default["setup"]["optimizer_offload"]) == (
        False,
        False,
    )
    assert default["memory"]["mid_block"]["bytes"]["host_memory"] == 0

    result = invoke(*base, "--optimizer-in-backward", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["setup"]["optimizer_in_backward"] is True
    # bf16-master: fp32 gradients, one gate/up/down gradient at a time.
    assert plan["memory"]["mid_block"]["bytes"]["gradients"] == 8192 * 4
    table = invoke(*base, "--optimizer-in-backward")
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())  # rich may wrap
    assert "optimizer in backward" in text and "host memory" not in text

    result = invoke(*base, "--optimizer-offload", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["setup"]["optimizer_offload"] is True
    mid = plan["memory"]["mid_block"]["bytes"]
    # fp32 AdamW states (8 bytes) of k, v and the norms stay on the GPU; q, o, gate, up, down
    # get a pinned fp32 copy (4), a pinned fp32 gradient buffer (4) and host states (8).
    assert mid["optimizer_states"] == 6 * 8 * (2 * 2048 + 2 * 64) == 202752
    assert mid["host_memory"] == 6 * 16 * (2 * 4096 + 3 * 8192) == 3145728
    gpu_terms = ("weights", "gradients", "optimizer_states", "activations", "logits")
    assert mid["total"] == sum(mid[k] for k in gpu_terms)
    table = invoke(*base, "--optimizer-offload")
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())
    assert "optimizer offload" in text and "host memory (offload)" in text
    assert "host memory" not in " ".join(invoke(*base).stdout.split())


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            ["--optimizer-in-backward", "--optimizer-offload"],
            ["--optimizer-in-backward", "--optimizer-offload"],
        ),
        (
            ["--optimizer-offload", "--optim", "paged_adamw8bit"],
            ["paged_adamw8bit", "--optimizer-offload"],
        ),
    ],
    ids=["both", "offload-paged"],
)
def test_plan_refused_optimizer_options_are_one_line(
    args: list[str], needles: list[str], tiny_config_json: Path
) -> None:
    message = assert_one_line_error(invoke("plan", "--model", str(tiny_config_json), *args))
    for needle in needles:
        assert needle in message, needle


# ---- plan: the recommendation (issue 15) ------------------------------------------------------

# The keys bench/gpu/fit_32b.py and the issue name for `--json`'s "recommended" entry.
RECOMMENDED_KEYS = {
    "flags",
    "total_bytes",
    "headroom_bytes",
    "precision",
    "optim",
    "optimizer_in_backward",
    "optimizer_offload",
}


def _plan_json(*args: str) -> dict:
    result = invoke("plan", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_plan_recommends_a_mode_whose_flags_are_a_valid_train_config(
    tiny_config_json: Path,
) -> None:
    base = ("--model", str(tiny_config_json), "--seq-len", "64", "--band", "0.3:0.7")
    plan = _plan_json(*base, "--gpu-memory", "1", "--min-headroom", "0.5")
    rec = plan["recommended"]
    assert RECOMMENDED_KEYS <= set(rec)
    assert rec["rank"] == 1  # a tiny model fits the first mode
    assert (rec["precision"], rec["optim"]) == ("bf16-master", "adamw8bit")
    assert rec["headroom_bytes"] == 2**30 - rec["total_bytes"] and rec["total_bytes"] > 0
    assert plan["recommendation"]["status"] == "fits"
    # Every mode's flags parse and validate as `fastmid train` flags and select that mode.
    modes = plan["recommendation"]["modes"]
    assert len(modes) == 7 and modes[0]["flags"] == rec["flags"]
    for mode in modes:
        result = invoke("train", *mode["flags"], "--print-config")
        assert result.exit_code == 0, (mode["flags"], result.output)
        cfg = yaml.safe_load(result.stdout)
        assert (cfg["precision"], cfg["optim"]) == (mode["precision"], mode["optim"])
        assert cfg["optimizer_in_backward"] is mode["optimizer_in_backward"]
        assert cfg["optimizer_offload"] is mode["optimizer_offload"]
        assert cfg["grad_checkpointing"] is True
        assert (cfg["max_seq_len"], cfg["micro_batch"], cfg["band"]) == (64, 1, "0.3:0.7")
        if mode["optimizer_in_backward"] or mode["optimizer_offload"]:
            assert cfg["grad_clip"] == 0
        if mode["optimizer_in_backward"]:
            assert cfg["grad_accum"] == 1
    # --layers travels as --layers.
    layers = _plan_json("--model", str(tiny_config_json), "--seq-len", "64", "--layers", "3-5")
    for mode in layers["recommendation"]["modes"]:
        result = invoke("train", *mode["flags"], "--print-config")
        assert result.exit_code == 0, result.output
        assert yaml.safe_load(result.stdout)["layers"] == "3-5"

    text = invoke("plan", *base, "--gpu-memory", "1", "--min-headroom", "0.5")
    assert text.exit_code == 0, text.output
    # The command is one line (soft wrap), the figures in GiB.
    line = next(ln for ln in text.stdout.splitlines() if ln.startswith("fits 1 GiB: "))
    total, headroom = rec["total_bytes"] / 2**30, rec["headroom_bytes"] / 2**30
    assert line == (
        f"fits 1 GiB: fastmid train {' '.join(rec['flags'])} "
        f"({total:.2f} GiB, {headroom:.2f} GiB headroom)"
    )
    joined = " ".join(text.stdout.split())
    assert "recommended: mode 1 of 7 (bf16-master + adamw8bit)" in joined
    assert "CUDA context" in joined and "139-140 GiB" in joined


def test_plan_recommendation_when_no_mode_fits(tiny_config_json: Path) -> None:
    # 1 GiB keeps the default 2 GiB free: nothing fits, whatever the size.
    args = ("--model", str(tiny_config_json), "--seq-len", "64", "--gpu-memory", "1")
    plan = _plan_json(*args)
    assert plan["recommended"] is None
    assert plan["recommendation"]["status"] == "none-fits"
    assert plan["recommendation"]["min_headroom_gib"] == 2.0
    smallest = min(plan["recommendation"]["modes"], key=lambda m: m["total_bytes"])
    text = invoke("plan", *args)
    assert text.exit_code == 0, text.output
    joined = " ".join(text.stdout.split())
    assert (
        f"no mode fits 1 GiB leaving at least 2.00 GiB free: the smallest is mode "
        f"{smallest['rank']} of 7 ({smallest['label']}) at "
        f"{smallest['total_bytes'] / 2**30:.2f} GiB"
    ) in joined
    assert "recommended:" not in joined


@pytest.mark.parametrize(
    "flags",
    [
        ["--precision", "bf16-master"],  # the default mode, but asked for
        ["--optim", "adamw8bit"],
        ["--optimizer-in-backward"],
        ["--optimizer-offload"],
        ["--grad-checkpointing"],
        ["--no-grad-checkpointing"],
        ["--checkpointing"],
        ["--no-checkpointing"],
    ],
    ids=lambda f: " ".join(f),
)
def test_plan_mode_flags_suppress_the_recommendation(
    flags: list[str], tiny_config_json: Path
) -> None:
    args = ("--model", str(tiny_config_json), "--seq-len", "64", *flags)
    plan = _plan_json(*args, "--min-headroom", "0")
    assert plan["recommended"] is None
    assert plan["recommendation"] == {"status": "off"}
    text = " ".join(invoke("plan", *args).stdout.split())
    assert "recommended:" not in text and "no mode fits" not in text and "fits 141" not in text


def test_plan_other_flags_keep_the_recommendation(tiny_config_json: Path) -> None:
    args = ("--model", str(tiny_config_json), "--seq-len", "128", "--micro-batch", "2")
    plan = _plan_json(*args, "--gpu-memory", "80", "--band", "0.3:0.7")
    assert plan["recommendation"]["status"] == "fits"
    assert plan["recommended"]["rank"] == 1
    assert plan["recommendation"]["min_headroom_gib"] == pytest.approx(2.4)  # 3% of 80
    # fastmid train runs on one device: no train command is recommended for a 2-GPU estimate.
    two = _plan_json(*args, "--gpus", "2", "--gpu-memory", "80", "--band", "0.3:0.7")
    assert two["recommendation"]["status"] == "off" and two["recommended"] is None


def test_plan_grad_checkpointing_spellings_and_gpus_reach_the_estimate(
    tiny_config_json: Path,
) -> None:
    base = ("--model", str(tiny_config_json), "--seq-len", "64")
    for on, off in (("--checkpointing", "--no-checkpointing"),):
        assert _plan_json(*base, on) == _plan_json(*base, "--grad-checkpointing")
        assert _plan_json(*base, off) == _plan_json(*base, "--no-grad-checkpointing")
    with_ckpt = _plan_json(*base, "--grad-checkpointing")
    without = _plan_json(*base, "--no-grad-checkpointing")
    assert with_ckpt["setup"]["checkpointing"] is True
    assert without["setup"]["checkpointing"] is False
    mid_on, mid_off = with_ckpt["memory"]["mid_block"], without["memory"]["mid_block"]
    assert mid_on["bytes"]["activations"] < mid_off["bytes"]["activations"]
    two = _plan_json(*base, "--gpus", "2")
    assert two["setup"]["gpus"] == 2
    one = _plan_json(*base)
    assert (
        two["memory"]["mid_block"]["bytes"]["optimizer_states"]
        < one["memory"]["mid_block"]["bytes"]["optimizer_states"]
    )


def test_plan_bad_min_headroom_is_one_line(tiny_config_json: Path) -> None:
    message = assert_one_line_error(
        invoke("plan", "--model", str(tiny_config_json), "--min-headroom", "-1")
    )
    assert "--min-headroom" in message


def test_train_passes_its_flags_to_the_recipe_and_exits_0(monkeypatch, tmp_path: Path) -> None:
    seen = []

    def fake_run_train(cfg, *args, **kwargs):
        seen.append(cfg)
        return {"steps": 0}

    monkeypatch.setattr("fastmid.train.recipe.run_train", fake_run_train)
    out = tmp_path / "run"
    result = invoke("train", "--max-seq-len", "64", "--lr", "0.0003", "--output", str(out))
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert cfg.max_seq_len == 64 and cfg.lr == pytest.approx(3e-4)
    assert Path(cfg.output) == out


def test_eval_of_a_tiny_model_exits_0(tiny_llama_dir: Path) -> None:
    result = invoke(
        "eval", "--model", str(tiny_llama_dir), "--n", "2", "--max-new-tokens", "2", "--json"
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["n"] == 2 and 0 <= doc["correct"] <= 2 and len(doc["ci95"]) == 2


def test_eval_prints_sample_answers_beside_their_references(tiny_llama_dir: Path) -> None:
    from fastmid.data.answers import load_eval_problems

    args = ("eval", "--model", str(tiny_llama_dir), "--n", "2", "--max-new-tokens", "2")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    lines = [x for x in result.stdout.splitlines() if x.strip().startswith("sample ")]
    assert len(lines) == 2  # the run keeps up to 3 samples; 2 problems here
    references = [p.answer for p in load_eval_problems("builtin:arith:test", 2)]
    for line, reference in zip(lines, references, strict=True):
        assert f"reference {reference!r}" in line


def test_data_inspect_exits_0(tiny_llama_dir: Path) -> None:
    result = invoke(
        "data", "inspect", "--data", "builtin:arith", "--model", str(tiny_llama_dir), "--n", "1"
    )
    assert result.exit_code == 0, result.output
    assert "####" in result.stdout


# ---- exit 2: known errors, one line --------------------------------------------------------


def test_bad_train_value_is_one_line(tmp_path: Path) -> None:
    message = assert_one_line_error(
        invoke("train", "--max-seq-len", "0", "--output", str(tmp_path / "run"))
    )
    assert "--max-seq-len" in message


def test_unparsable_flag_value_exits_2_without_traceback() -> None:
    result = invoke("train", "--lr", "abc")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "--lr" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["plan", "--seq-len", "0"], "--seq-len"),
        (["plan", "--band", "0.8:0.2"], "0.8:0.2"),
        (["eval", "--model", "/no/such/model"], "/no/such/model"),
        (["analyze", "--base", "/no/such/model"], "/no/such/model"),
    ],
    ids=["plan-seq-len", "plan-band", "eval-model", "analyze-base"],
)
def test_known_errors_are_one_line(args: list[str], needle: str, tiny_config_json: Path) -> None:
    if args[0] == "plan":
        args = [*args, "--model", str(tiny_config_json)]
    assert needle in assert_one_line_error(invoke(*args))


def test_long_error_stays_on_one_line(tiny_llama_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-data-file.jsonl"
    result = invoke("data", "inspect", "--data", str(missing), "--model", str(tiny_llama_dir))
    assert str(missing) in assert_one_line_error(result)


# ---- exit 1 and 130 from the run ----------------------------------------------------------------


def _train_raising(monkeypatch, tmp_path: Path, exc: BaseException):
    def fake_run_train(cfg, *args, **kwargs):
        raise exc

    monkeypatch.setattr("fastmid.train.recipe.run_train", fake_run_train)
    return invoke("train", "--output", str(tmp_path / "run"))


def test_non_finite_loss_exits_1_on_one_line(monkeypatch, tmp_path: Path) -> None:
    exc = NonFiniteLossError("non-finite loss at step 3, micro-batch 2")
    result = _train_raising(monkeypatch, tmp_path, exc)
    assert "step 3, micro-batch 2" in assert_one_line_error(result, exit_code=1)


def test_interrupt_exits_130_with_the_resume_command(monkeypatch, tmp_path: Path) -> None:
    exc = TrainingInterrupted("interrupted at step 2; saved; resume: fastmid train --resume latest")
    result = _train_raising(monkeypatch, tmp_path, exc)
    assert result.exit_code == 130, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert "--resume latest" in message and "\n" not in message
    assert not message.startswith("error:")  # an interrupt is not an error


def test_unexpected_exception_keeps_its_traceback(monkeypatch, tmp_path: Path) -> None:
    """Only FastmidError becomes one line; anything else is a bug and must stay visible."""
    result = _train_raising(monkeypatch, tmp_path, RuntimeError("a bug"))
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "a bug"


def test_plan_supervised_fraction_and_fused_loss_reach_the_logits_line(
    tiny_config_json: Path,
) -> None:
    """Tiny Llama (vocabulary 64), seq 64 x micro-batch 1: the loss projects lm_head only at the
    supervised rows, 12 bytes x vocabulary each (fp32 log-probabilities and two fp32 gradients;
    tests/models/test_memory_measured.py measures the rule); the fused kernel holds less."""
    base = ("plan", "--model", str(tiny_config_json), "--seq-len", "64", "--json")

    def logits(*extra: str) -> int:
        result = invoke(*base, *extra)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["memory"]["mid_block"]["bytes"]["logits"]

    assert logits("--supervised-fraction", "0.5") == 32 * 12 * 64
    assert logits("--supervised-fraction", "1") == 64 * 12 * 64
    assert logits("--supervised-fraction", "0.5", "--fused-loss") < 32 * 12 * 64
    bad = invoke(*base, "--supervised-fraction", "1.5")
    assert bad.exit_code == 2 and "--supervised-fraction" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_plan_fused_loss_recommendation_selects_the_kernels_and_headroom_is_bounded(
    tiny_config_json: Path,
) -> None:
    args = ("--model", str(tiny_config_json), "--seq-len", "64", "--gpu-memory", "80")
    plan = _plan_json(*args, "--supervised-fraction", "0.5", "--fused-loss")
    assert plan["recommended"]["flags"][-2:] == ["--kernels", "on"]  # the figure needs them
    bad = invoke("plan", *args, "--min-headroom", "80")
    assert bad.exit_code == 2 and "--min-headroom" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
