"""``bench/ablate_results.py`` (issue 23): the committed markdown shows what ``ablate.json``
says, row by row, and refuses a folder without one."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from bench_scripts import load_bench_script

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "ablate_results.py"


def load_script() -> ModuleType:
    return load_bench_script("ablate_results.py", "ablate_results")


def _doc(tmp_path: Path) -> dict:
    run = tmp_path / "arms" / "mid" / "lr-0.0001" / "seed-0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"precision": "bf16-master"}))
    sweep = [
        {"lr": 3e-4, "status": "finished", "validation_accuracy": 0.08, "folder": "x"},
        {"lr": 1e-4, "status": "finished", "validation_accuracy": 0.11, "folder": str(run)},
    ]
    return {
        "model": "/m/SmolLM2",
        "model_type": "llama",
        "num_hidden_layers": 30,
        "protocol": {
            "seeds": [0, 1],
            "max_steps": 30,
            "micro_batch": 8,
            "grad_accum": 1,
            "max_seq_len": 256,
            "eval_max_new_tokens": 96,
            "validation": {"validation_problems": 100},
            "test": {
                "data": "builtin:arith:test",
                "problems": 300,
                "prompts_also_in_training_data": 0,
            },
        },
        "statistics": {"bootstrap_resamples": 10000},
        "rows": [
            {
                "arm": "base",
                "layers_text": "-",
                "how": "no training",
                "trainable_parameters": 0,
                "training_tokens": 0,
                "lr": None,
                "accuracy_per_seed": [0.02],
                "accuracy_mean": 0.02,
                "ci95": [0.01, 0.04],
                "vs_mid": {
                    "difference": 0.105,
                    "ci95": [0.07, 0.14],
                    "p": 0.0001,
                    "p_holm": 0.0002,
                },
            },
            {
                "arm": "mid",
                "layers_text": "6-23",
                "how": "full rank",
                "trainable_parameters": 63_721_728,
                "training_tokens": 31631.0,
                "lr": 1e-4,
                "lr_sweep": sweep,
                "lr_note": None,
                "accuracy_per_seed": [0.12, 0.13],
                "accuracy_mean": 0.125,
                "ci95": [0.1, 0.15],
                "vs_mid": None,
            },
        ],
        "comparisons": [{"sentence": "mid - base: +10.5 points (...)."}],
        "runs": [{"folder": str(run), "train_time_s": 75.0}],
    }


def test_markdown_shows_the_json_rows(tmp_path):
    mod = load_script()
    text = mod.render(_doc(tmp_path), "fastmid ablate --output X", 3725.0, "1 of 2 seeds")
    lines = text.splitlines()
    assert "**Partial:** 1 of 2 seeds" in lines
    assert not any(line.startswith("**Note:**") for line in lines)
    (tmp_path / "again").mkdir()
    noted = mod.render(_doc(tmp_path / "again"), "c", 1.0, None, "rates from run A").splitlines()
    assert "**Note:** rates from run A" in noted
    assert not any(line.startswith("**Partial:**") for line in noted)
    assert "Wall time 1:02:05 for 1 training runs (training alone 0:01:15" in text
    assert "precision `bf16-master`" in text
    # the sweep sorted by rate, the chosen rate beside it
    assert "| mid | 0.0001: 11.0, 0.0003: 8.0 | 0.0001 |" in lines
    assert (
        "| mid | 6-23 | full rank | 63.72M | 31,631 | 0.0001 | 12.0 13.0 | 12.5 [10.0, 15.0] | - | - |"
        in lines
    )
    assert (
        "| base | - | no training | 0 | - | - | 2.0 | 2.0 [1.0, 4.0] | +10.5 [+7.0, +14.0] "
        "| 0.0002 |" in lines
    )
    assert "- mid - base: +10.5 points (...)." in lines


def test_fixed_rates_and_the_answer_loss_column(tmp_path):
    """One rate per arm is said to be no selection; the answer loss is the row's mean with three
    decimals, '-' where a row has none."""
    mod = load_script()
    doc = _doc(tmp_path)
    doc["protocol"]["lr_grids"] = {"mid": [1e-4]}
    doc["rows"][0]["answer_loss_mean"] = 1.62425
    doc["rows"][1]["answer_loss_mean"] = None
    lines = mod.render(doc, "c", 60.0, None).splitlines()
    assert any(
        line.startswith("## Learning rates: one fixed rate per arm, no selection") for line in lines
    )
    header = next(x for x in lines if x.startswith("| arm | layers"))
    assert header.endswith("| p (Holm) | answer loss |")
    assert any(
        line.startswith("| base |") and line.endswith("| 0.0002 | 1.624 |") for line in lines
    )
    assert any(
        line.startswith("| mid | 6-23 |") and line.endswith("| - | - | - |") for line in lines
    )
    doc["protocol"]["lr_grids"] = {"mid": [1e-4, 3e-4]}
    text = mod.render(doc, "c", 60.0, None)
    assert "## Learning-rate selection" in text and "no selection" not in text


def test_a_folder_without_ablate_json_is_refused(tmp_path, capsys):
    mod = load_script()
    assert mod.main([str(tmp_path), "x", "--command", "c"]) == 2
    assert "ablate.json: not found" in capsys.readouterr().err
