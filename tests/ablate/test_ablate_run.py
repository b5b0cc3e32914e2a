"""``fastmid ablate`` end to end on the tiny model: two arms (mid, lora-mid), one rate, one seed,
two steps: the folder layout, the JSON/CSV schema, a re-run that skips finished runs, an
interrupted run that resumes, a changed setting refused, bad input as one line each."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fastmid.ablate import protocol
from fastmid.ablate.report import CSV_COLUMNS
from fastmid.cli import app
from fastmid.train import recipe as recipe_module

runner = CliRunner()
TWO_ARMS = ("--arms", "mid,lora-mid", "--lrs", "1e-3", "--seeds", "1")


def _invoke(args: list[str]):
    return runner.invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert needle in lines[0], lines[0]


def test_two_arms_layout_schema_resume_and_a_refused_change(fast_args, tmp_path, monkeypatch):
    out = tmp_path / "abl"
    result = _invoke(fast_args(*TWO_ARMS))
    assert result.exit_code == 0, result.output
    assert "ablate 1/2 mid lr 0.001 seed 0" in result.output
    assert "ablate 2/2 lora-mid lr 0.001 seed 0" in result.output

    # layout
    for name in ("ablate_settings.json", "ablate.json", "ablate.csv", "ablate.png"):
        assert (out / name).is_file(), name
    assert (out / "data" / "train.jsonl").is_file() and (
        out / "data" / "validation.jsonl"
    ).is_file()
    base = json.loads((out / "base" / "eval_test.json").read_text())
    runs = {arm: out / "arms" / arm / "lr-0.001" / "seed-0" for arm in ("mid", "lora-mid")}
    for folder in runs.values():
        for name in ("config.yaml", "plan.json", "metrics.jsonl", "summary.json", "train.log"):
            assert (folder / name).is_file(), (folder, name)
        # --keep results: the selection run was scored on both sets, then its model removed
        for which in ("validation", "test"):
            saved = json.loads((folder / f"eval_{which}.json").read_text())
            assert saved["set"] == which and len(saved["result"]["per_problem"]) == saved["n"]
        assert not (folder / "final").exists() and not (folder / "checkpoints").exists()
        test = json.loads((folder / "eval_test.json").read_text())["result"]["per_problem"]
        assert [p["reference"] for p in test] == [
            p["reference"] for p in base["result"]["per_problem"]
        ]

    # each arm is a normal run of its own config: the arm's layers and adapters
    mid_cfg = yaml.safe_load((runs["mid"] / "config.yaml").read_text())
    lora_cfg = yaml.safe_load((runs["lora-mid"] / "config.yaml").read_text())
    assert (mid_cfg["layers"], mid_cfg["lora_rank"]) == ("1-3", 0)
    assert (lora_cfg["layers"], lora_cfg["lora_rank"], lora_cfg["lora_targets"]) == (
        "1-3",
        8,
        "qkvo",
    )
    assert lora_cfg["lora_match_budget"] is True and lora_cfg["lr"] == mid_cfg["lr"] == 1e-3
    assert mid_cfg["data"] == lora_cfg["data"] == str(out / "data" / "train.jsonl")
    # the same examples in the same order: the same tokens at every step
    steps = {
        arm: [json.loads(x)["tokens"] for x in (f / "metrics.jsonl").read_text().splitlines()]
        for arm, f in runs.items()
    }
    assert steps["mid"] == steps["lora-mid"] and len(steps["mid"]) == 2

    # ablate.json
    doc = json.loads((out / "ablate.json").read_text())
    for key in ("fastmid_ablate", "model", "num_hidden_layers", "settings", "protocol",
                "statistics", "rows", "comparisons", "runs"):  # fmt: skip
        assert key in doc, key
    assert doc["num_hidden_layers"] == 5
    assert [r["arm"] for r in doc["rows"]] == ["base", "mid", "lora-mid"]
    mid, lora = doc["rows"][1], doc["rows"][2]
    # trainable: mid 3 layers of the tiny Llama (q 32x32, k/v 32x16, o 32x32, 3 MLP 32x64,
    # 2 norms 32) = 3 x 9,280; lora-mid: total rank 8 x 4 x 5 = 160 over 12 q/k/v/o modules
    # (ranks 14 x 4, 13 x 8), r x (in + out): q/o 64, k/v 48
    assert mid["trainable_parameters"] == 3 * 9280 == mid["trainable_parameters_reported"][0]
    assert lora["trainable_parameters"] == 14 * (64 + 48 + 48 + 64) + 2 * 13 * (64 + 48 + 48 + 64)
    assert lora["trainable_parameters_reported"] == [lora["trainable_parameters"]]
    for row in (mid, lora):
        assert row["lr"] == 1e-3 and row["seeds"] == [0] and len(row["accuracy_per_seed"]) == 1
        assert row["training_tokens"] == sum(steps["mid"])
        assert 0 <= row["ci95"][0] <= row["accuracy_mean"] <= row["ci95"][1] <= 1
        assert row["lr_sweep"][0]["validation_accuracy"] is not None
    assert [c["other"] for c in doc["comparisons"]] == ["base", "lora-mid"]
    for comp in doc["comparisons"]:
        assert set(comp) >= {"difference", "ci95", "p", "p_holm", "distinguishable", "sentence"}
    assert lora["vs_mid"]["p_holm"] == doc["comparisons"][1]["p_holm"]
    # the test answer loss beside exact match: each seed's eval_test.json, read back here
    for row in doc["rows"]:
        records = [
            json.loads((Path(folder) / "eval_test.json").read_text())
            if row["arm"] != "base"
            else json.loads(Path(folder).read_text())
            for folder in row["runs"]
        ]
        expected = [rec["result"]["eval_loss"] for rec in records]
        assert row["answer_loss_per_seed"] == pytest.approx(expected, rel=1e-12)
        assert row["answer_loss_mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-12)
        assert all(0 < x < 20 for x in expected)
    assert doc["protocol"]["validation"]["validation_problems"] == 4
    assert doc["protocol"]["test"]["problems"] == 4

    # ablate.csv
    with (out / "ablate.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert tuple(table[0]) == CSV_COLUMNS
    assert [r["arm"] for r in table] == ["base", "mid", "lora-mid"]
    assert table[2]["p_holm_vs_mid"] != "" and table[1]["p_holm_vs_mid"] == ""
    for rec, row in zip(table, doc["rows"], strict=True):
        assert float(rec["answer_loss_mean"]) == pytest.approx(row["answer_loss_mean"], rel=1e-6)

    # a re-run trains and evaluates nothing: every run is finished
    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run was trained or evaluated again")

    monkeypatch.setattr(protocol, "run_train", forbidden)
    monkeypatch.setattr(protocol, "evaluate_accuracy", forbidden)
    again = _invoke(fast_args(*TWO_ARMS))
    assert again.exit_code == 0, again.output
    assert "finished earlier" in again.output
    assert json.loads((out / "ablate.json").read_text())["rows"] == doc["rows"]

    # a setting that defines the arms, changed: refused, naming the flag
    _one_line_error(_invoke(fast_args(*TWO_ARMS, "--max-steps", "3")), "--max-steps was 2, now 3")
    _one_line_error(
        _invoke(fast_args("--arms", "mid", "--lrs", "3e-3", "--seeds", "1")), "--lrs was"
    )


def test_an_interrupted_run_resumes_from_its_checkpoint(fast_config, monkeypatch, capsys):
    cfg, settings, explicit = fast_config(settings={"arms": "mid", "lrs": "1e-3", "seeds": 1})
    real = recipe_module.train_step
    calls = {"n": 0}

    def interrupt_after_first(*args, **kwargs):
        record = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the recipe saves step 1, then stops
        return record

    monkeypatch.setattr(recipe_module, "train_step", interrupt_after_first)
    with pytest.raises(protocol.AblateInterrupted, match="run the same fastmid ablate command"):
        protocol.run_ablation(cfg, settings, None, explicit)
    folder = Path(cfg.output) / "arms" / "mid" / "lr-0.001" / "seed-0"
    assert (folder / "checkpoints" / "step-1").is_dir() and not (folder / "summary.json").exists()

    monkeypatch.setattr(recipe_module, "train_step", real)
    # Between the rate selection and the test set the chosen run keeps its model, not its
    # checkpoints (a finished run resumes nothing; they would fill the disk over 35 runs).
    seen: list[tuple[bool, bool]] = []
    real_evaluate = protocol.Ablation._evaluate_run

    def evaluate(self, arm, lr, seed, which):
        if "test" in which:
            seen.append(((folder / "final").is_dir(), (folder / "checkpoints").exists()))
        return real_evaluate(self, arm, lr, seed, which)

    monkeypatch.setattr(protocol.Ablation, "_evaluate_run", evaluate)
    capsys.readouterr()
    doc = protocol.run_ablation(cfg, settings, None, explicit)
    assert seen == [(True, False)]
    err = "".join(capsys.readouterr().err.split())  # the console wraps long lines at 80
    assert f"resumedfrom{folder / 'checkpoints' / 'step-1'}atstep1" in err
    steps = [json.loads(x)["step"] for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert [r["arm"] for r in doc["rows"]] == ["base", "mid"]


def test_bad_input_is_one_line_naming_the_flag_or_file(fast_args, tmp_path):
    no_marks = tmp_path / "test.jsonl"
    no_marks.write_text(
        "".join(
            json.dumps({"question": f"q{k}?", "answer": f"It is {k}."}) + "\n" for k in range(5)
        )
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not an ablation")
    cases = [
        (["--arms", "mid,middle"], "--arms: unknown arm 'middle'"),
        (["--lrs", ","], "--lrs: empty grid"),
        (["--lrs", "1e-3,-1e-4"], "--lrs: learning rates must be positive"),
        (["--lrs", "mid=0"], "--lrs: mid: learning rates must be positive"),
        (["--seeds", "0"], "--seeds: must be >= 1"),
        (["--eval-accuracy-data", str(no_marks)], f"--eval-accuracy-data {no_marks}: none"),
        (["--band", "0.1:0.15"], "--band 0.1:0.15"),  # no layer of 5: an arm with zero layers
        (["--lr", "1e-3"], "--lr: not an option of fastmid ablate"),
        (["--resume", "latest"], "--resume: not an option of fastmid ablate"),
        (["--keep", "some"], "--keep: 'some' is not one of results, final, all"),
    ]
    for extra, needle in cases:
        _one_line_error(_invoke(fast_args(*TWO_ARMS, *extra)), needle)
    result = _invoke(fast_args(*TWO_ARMS, output="other"))
    _one_line_error(result, f"--output {other} is not empty and holds no fastmid ablation")
    # nothing was created or trained by any of them
    assert not (tmp_path / "abl").exists()
