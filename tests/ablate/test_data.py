"""The carved validation split (disjoint from what is trained on, deterministic), the test-set
check, and the learning-rate rules (grids, extension at an edge, selection with ties)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastmid.ablate.arms import AblateError, Arm
from fastmid.ablate.data import carve_validation, check_test_set, prompt_key, training_prompt_keys
from fastmid.ablate.protocol import (
    AblateSettings,
    Ablation,
    RunResult,
    format_lr,
    next_rate,
    parse_lr_grids,
)
from fastmid.config import build_config


def _keys(path: Path) -> list[str]:
    return [prompt_key(json.loads(line)["messages"]) for line in path.read_text().splitlines()]


def test_validation_is_carved_from_train_and_never_trained_on(tmp_path):
    carved = carve_validation("builtin:arith", tmp_path / "a", val_n=50, seed=7)
    val, train = _keys(carved.validation), _keys(carved.train)
    assert len(val) == 50 and len(train) == 5000 - 50 == carved.train_count
    assert not set(val) & set(train)
    assert set(val) & training_prompt_keys(carved.train) == set()
    # every validation problem is a builtin:arith train problem, none a test problem
    from fastmid.data import load_eval_problems

    train_split = {prompt_key(p.messages) for p in load_eval_problems("builtin:arith:train")}
    test_split = {prompt_key(p.messages) for p in load_eval_problems("builtin:arith:test")}
    assert set(val) <= train_split and not set(val) & test_split
    # deterministic; another seed draws other problems
    again = carve_validation("builtin:arith", tmp_path / "b", val_n=50, seed=7)
    assert again.validation.read_bytes() == carved.validation.read_bytes()
    assert again.train.read_bytes() == carved.train.read_bytes()
    other = carve_validation("builtin:arith", tmp_path / "c", val_n=50, seed=8)
    assert _keys(other.validation) != val


def test_a_duplicate_of_a_validation_prompt_is_dropped_from_train(tmp_path):
    rows = [{"question": "Q1?", "answer": f"so\n#### {k}"} for k in range(3)]
    rows.append({"question": "Q2?", "answer": "#### 9"})
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for seed in range(6):
        carved = carve_validation(str(src), tmp_path / f"o{seed}", val_n=1, seed=seed)
        val, train = set(_keys(carved.validation)), _keys(carved.train)
        assert not val & set(train)
        assert carved.train_count + carved.validation_count + carved.dropped_duplicates == 4
        if "Q1?" in next(iter(val)):
            assert carved.dropped_duplicates == 2 and len(train) == 1


def test_carving_refuses_data_without_marked_answers(tmp_path):
    src = tmp_path / "plain.jsonl"
    src.write_text(json.dumps({"question": "2+2?", "answer": "It is 4."}) + "\n")
    with pytest.raises(AblateError, match=r"^--data .*'#### <number>'"):
        carve_validation(str(src), tmp_path / "o", val_n=1, seed=0)
    with pytest.raises(AblateError, match=r"^--val-n 5000: .* only 5000"):
        carve_validation("builtin:arith", tmp_path / "o", val_n=5000, seed=0)


def test_test_set_without_marked_answers_is_refused_naming_the_file(tmp_path):
    none = tmp_path / "none.jsonl"
    none.write_text(
        "".join(json.dumps({"question": f"q{k}", "answer": f"It is {k}."}) + "\n" for k in range(3))
    )
    with pytest.raises(AblateError, match=rf"^--eval-accuracy-data {none}: none of its answers"):
        check_test_set(str(none), 3)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        json.dumps({"question": "a", "answer": "#### 1"})
        + "\n"
        + json.dumps({"question": "b", "answer": "2"})
        + "\n"
    )
    with pytest.raises(AblateError, match=r"1 of the 2 test answers .* line 2"):
        check_test_set(str(mixed), 2)
    n, keys = check_test_set("builtin:arith:test", 300)
    assert n == 300 and len(keys) == 300


def test_lr_grids():
    grids = parse_lr_grids("full-rank=1e-4,3e-4,1e-3;lora=3e-4,1e-3,3e-3")
    assert grids["mid"] == grids["full"] == [1e-4, 3e-4, 1e-3]
    assert grids["lora-mid"] == [3e-4, 1e-3, 3e-3]
    assert parse_lr_grids("1e-3, 1e-4")["lora"] == [1e-4, 1e-3]
    mixed = parse_lr_grids("lora=1e-3;full=5e-5")
    assert mixed["full"] == [5e-5] and mixed["mid"] == [1e-4, 3e-4, 1e-3]
    for text, needle in (
        ("", "empty grid"),
        ("1e-3,-1e-4", "must be positive"),
        ("0", "must be positive"),
        ("abc", "'abc' is not a number"),
        ("lora=", "lora: empty grid"),
        ("middle=1e-3", "is not KEY=GRID"),
    ):
        with pytest.raises(AblateError, match=rf"^--lrs: .*{needle}"):
            parse_lr_grids(text)
    grid = [1e-4, 3e-4, 1e-3]  # geometric step sqrt(10) = 3.162
    assert next_rate(grid, grid, True, 1) == 3e-3  # 3.16e-3, one significant digit
    assert next_rate(grid, [*grid, 3e-3], True, 2) == 1e-2
    assert next_rate(grid, grid, False, 1) == 3e-5
    assert next_rate(grid, [3e-5, *grid], False, 2) == 1e-5
    assert next_rate([1e-4, 2e-4], [1e-4, 2e-4], True, 1) == 4e-4
    # a fine grid needs a second digit to move past its edge: 1.1e-3 * 1.1 = 1.21e-3
    assert next_rate([1e-3, 1.1e-3], [1e-3, 1.1e-3], True, 1) == 1.2e-3
    assert format_lr(3e-4) == "0.0003" and format_lr(1e-5) == "1e-05"


def _sweep(tmp_path, scores, lr_extend=2, grid="1e-4,3e-4,1e-3"):
    """Run the selection of one arm with fake runs: ``scores(lr) -> (accuracy, loss)`` or None
    (diverged); returns (chosen rate, rates run, note)."""
    cfg = build_config(None, {"output": str(tmp_path / "x"), "eval_accuracy": False})
    ablation = Ablation(cfg, AblateSettings(lrs=grid, lr_extend=lr_extend))
    ablation.grids = parse_lr_grids(grid)
    ran: list[float] = []

    def fake(arm, lr, seed, evals, prune):
        ran.append(lr)
        score = scores(lr)
        if score is None:
            return RunResult(arm.name, lr, seed, tmp_path, "diverged")
        acc, loss = score
        return RunResult(
            arm.name, lr, seed, tmp_path, "finished", {"accuracy": acc, "eval_loss": loss}
        )

    ablation.run_one = fake  # type: ignore[method-assign]
    ablation._prune = lambda folder: None  # type: ignore[method-assign]
    chosen, runs, note = ablation._select_rate(Arm("mid", (1, 2), 4), 0)
    assert [r.lr for r in runs] == sorted(ran)
    return chosen, ran, note


def test_rate_selection_extends_at_an_edge_and_breaks_ties(tmp_path):
    # interior best: no extension
    chosen, ran, note = _sweep(tmp_path, lambda lr: (0.5 if lr == 3e-4 else 0.1, 1.0))
    assert (chosen, ran, note) == (3e-4, [1e-4, 3e-4, 1e-3], None)
    # better and better upwards: two extensions (3e-3, 1e-2), then a note
    chosen, ran, note = _sweep(tmp_path, lambda lr: (lr, 1.0))
    assert ran == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2] and chosen == 1e-2
    assert "highest of the grid after 2 extension(s)" in note
    # best at the bottom, then the added rate is worse: one extension, the old edge stays
    chosen, ran, note = _sweep(tmp_path, lambda lr: (0.9 if lr == 1e-4 else 0.1, 1.0))
    assert ran[-1] == 3e-5 and chosen == 1e-4 and note is None
    # equal accuracy: the lower validation loss wins (then the lower rate)
    chosen, _, _ = _sweep(tmp_path, lambda lr: (0.3, {1e-4: 2.0, 3e-4: 1.0, 1e-3: 1.5}[lr]))
    assert chosen == 3e-4
    # a diverged rate never wins; every rate diverged: no choice
    chosen, _, _ = _sweep(tmp_path, lambda lr: None if lr == 3e-4 else (0.0, 5.0), lr_extend=0)
    assert chosen == 1e-4
    chosen, _, note = _sweep(tmp_path, lambda lr: None)
    assert chosen is None and note == "every rate diverged"
    # one rate: no selection, no extension
    chosen, ran, _ = _sweep(tmp_path, lambda lr: (0.0, 1.0), grid="1e-3")
    assert (chosen, ran) == (1e-3, [1e-3])
