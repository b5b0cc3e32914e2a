"""Exact-match evaluation (GSM8K convention), its Wilson 95% interval, and the answer loss.

Expected values come from outside the code under test: the published Wilson intervals of Newcombe
(1998, "Two-sided confidence intervals for the single proportion", Stat. Med. 17:857, table I,
method 3), scipy's ``binomtest(...).proportion_ci(method="wilson")``, the closed forms at 0 and n
successes, and transformers' own per-example loss.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy.stats import binomtest, norm

from fastmid.errors import FastmidError
from fastmid.eval import exact_match
from fastmid.eval.exact_match import (
    AccuracyResult,
    answer_loss,
    evaluate_accuracy,
    generate_answers,
    run_eval,
    wilson_interval,
)

Z95 = norm.ppf(0.975)


# ---- Wilson score interval --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("correct", "n", "low", "high"),
    [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_newcombe_table(correct: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(correct, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


@pytest.mark.parametrize(
    ("correct", "n"), [(0, 1), (1, 1), (0, 4), (3, 4), (3, 10), (50, 200), (117, 200), (200, 200)]
)
def test_wilson_matches_scipy(correct: int, n: int) -> None:
    ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(correct, n)
    assert lo == pytest.approx(ci.low, rel=1e-12, abs=1e-12)
    assert hi == pytest.approx(ci.high, rel=1e-12, abs=1e-12)


def test_wilson_closed_forms_at_the_ends() -> None:
    # p = 0: [0, z²/(n + z²)]; p = 1: [n/(n + z²), 1]. By hand for n = 10, z = 1.96: 0.2775.
    n, z2 = 10, Z95**2
    lo, hi = wilson_interval(0, n)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(z2 / (n + z2), rel=1e-12)
    assert hi == pytest.approx(0.2775, abs=5e-5)
    lo, hi = wilson_interval(n, n)
    assert lo == pytest.approx(n / (n + z2), rel=1e-12) and hi == pytest.approx(1.0, abs=1e-12)
    # 3 of 10 by hand: centre (0.3 + z²/20) / (1 + z²/10), half-width z sqrt(0.021 + z²/400) / (...)
    centre = (0.3 + z2 / 20) / (1 + z2 / 10)
    half = math.sqrt(z2) * math.sqrt(0.3 * 0.7 / 10 + z2 / 400) / (1 + z2 / 10)
    assert wilson_interval(3, 10) == pytest.approx((centre - half, centre + half), rel=1e-12)
    assert wilson_interval(3, 10) == pytest.approx((0.1078, 0.6032), abs=5e-5)


@pytest.mark.parametrize(("correct", "n"), [(0, 0), (-1, 5), (6, 5)])
def test_wilson_rejects_impossible_counts(correct: int, n: int) -> None:
    with pytest.raises(ValueError):
        wilson_interval(correct, n)


# ---- scoring: the GSM8K convention ----------------------------------------------------------


def _gsm8k_file(tmp_path, answers: list[str]):
    path = tmp_path / "gsm8k.jsonl"
    rows = [
        {"question": f"Question {i}?", "answer": f"Work for {i}.\n#### {a}"}
        for i, a in enumerate(answers)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_last_number_of_the_completion_is_scored(tmp_path, monkeypatch) -> None:
    """GSM8K (Cobbe et al. 2021): the reference follows ``####``; the completion's last number,
    commas removed, must equal it as a number."""
    data = _gsm8k_file(tmp_path, ["7", "1,234", "15", "-3.5", "12", "4"])
    completions = [
        "3 + 4 = 7",  # right
        "The total is 1,234 apples.",  # right: commas dropped on both sides
        "I think 12, or maybe 15",  # right: the last number counts
        "It drops to 3.5 degrees",  # wrong sign
        "I think 12, or maybe 15",  # wrong: the last number counts
        "no digits here",  # nothing to score
    ]
    seen = {}

    def canned(model, tokenizer, prompts, max_new_tokens=256, batch_size=16):
        seen["prompts"] = prompts
        return completions[: len(prompts)]

    monkeypatch.setattr(exact_match, "generate_answers", canned)
    result = evaluate_accuracy(None, None, data, n=6, with_loss=False, keep_samples=2)
    assert seen["prompts"][0] == [{"role": "user", "content": "Question 0?"}]
    assert (result.n, result.correct) == (6, 3)
    assert result.accuracy == pytest.approx(0.5)
    assert result.ci95 == pytest.approx(wilson_interval(3, 6), rel=1e-12)
    assert result.eval_loss is None
    assert [s["correct"] for s in result.samples] == [True, True]
    assert result.samples[1]["predicted"] == result.samples[1]["reference"] == "1234"

    first_four = evaluate_accuracy(None, None, data, n=4, with_loss=False)
    assert (first_four.n, first_four.correct) == (4, 3)


def test_unreadable_problem_file_is_a_fastmid_error(tmp_path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(FastmidError, match="empty.jsonl"):  # the CLI's one-line error
        evaluate_accuracy(None, None, str(empty), n=3)


def test_problem_file_errors_name_the_option_and_bad_rows_can_be_skipped(
    tmp_path, monkeypatch
) -> None:
    """``fastmid train`` names its --eval-accuracy-data; ``--skip-bad-rows`` (``fastmid eval``)
    scores the problems it can read instead of stopping at a non-UTF-8 line."""
    with pytest.raises(FastmidError) as info:
        evaluate_accuracy(None, None, str(tmp_path / "nope.jsonl"), flag="--eval-accuracy-data")
    assert "--eval-accuracy-data takes" in str(info.value) and "--data" not in str(info.value)
    data = tmp_path / "latin1.csv"
    data.write_bytes("question,answer\ncafé?,#### 1\nWhat is 2 + 2?,#### 4\n".encode("latin-1"))
    with pytest.raises(FastmidError, match=r"latin1\.csv: line 2 .*--skip-bad-rows"):
        evaluate_accuracy(None, None, str(data), n=5, with_loss=False)

    def canned(model, tokenizer, prompts, max_new_tokens=256, batch_size=16):
        return ["#### 4"] * len(prompts)

    monkeypatch.setattr(exact_match, "generate_answers", canned)
    result = evaluate_accuracy(None, None, str(data), n=5, with_loss=False, skip_bad_rows=True)
    assert (result.n, result.correct) == (1, 1)


def test_result_dict_is_json_ready() -> None:
    result = AccuracyResult(4, 3, 0.75, wilson_interval(3, 4), 1.25, 0.5, [{"correct": True}])
    d = json.loads(json.dumps(result.to_dict()))
    assert d["n"] == 4 and d["correct"] == 3 and d["accuracy"] == 0.75
    assert d["ci95"] == list(wilson_interval(3, 4)) and d["eval_loss"] == 1.25


# ---- on a tiny model: generation, accuracy, answer loss --------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    """The session's tiny random Llama with SmolLM2's tokenizer (its own copy per module)."""
    from fastmid.models.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(tiny_llama_dir, device="cpu")


def test_generation_restores_mode_and_padding_side(tiny_lm) -> None:
    model, tok = tiny_lm
    model.train()
    prompts = [[{"role": "user", "content": q}] for q in ("What is 2 + 2?", "Name a colour.", "Hi")]
    try:
        out = generate_answers(model, tok, prompts, max_new_tokens=3, batch_size=2)
        assert len(out) == 3 and all(isinstance(o, str) for o in out)
        assert model.training and tok.padding_side == "right"
    finally:
        model.eval()


def test_a_tokenizer_without_chat_template_is_prompted_in_chatml(tiny_lm, monkeypatch) -> None:
    """A base model (no chat template, e.g. Gemma-3-270M base) is evaluated in the ChatML
    fallback it was trained in; apply_chat_template would raise. The expected prompt is the
    ChatML text written out by hand."""
    import copy

    from fastmid.data.chat_template import ChatTemplateFallbackWarning

    model, tok = tiny_lm
    tok = copy.deepcopy(tok)
    tok.chat_template = None
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    seen: list[str] = []
    generate = model.generate

    def spy(**kwargs):
        seen.extend(tok.batch_decode(kwargs["input_ids"]))
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    with pytest.warns(ChatTemplateFallbackWarning):
        out = generate_answers(
            model, tok, [[{"role": "user", "content": "What is 2 + 2?"}]], max_new_tokens=2
        )
    assert len(out) == 1
    assert seen == ["<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"]


def test_accuracy_on_a_tiny_model(tiny_lm) -> None:
    model, tok = tiny_lm
    result = evaluate_accuracy(
        model, tok, "builtin:arith:test", n=3, max_new_tokens=4, batch_size=2
    )
    assert result.n == 3 and 0 <= result.correct <= 3 and len(result.samples) == 3
    assert result.ci95 == pytest.approx(wilson_interval(result.correct, 3), rel=1e-12, abs=1e-12)
    # A random model's next-token distribution is near uniform: loss ~ ln(vocabulary size).
    assert result.eval_loss == pytest.approx(math.log(len(tok)), abs=0.1)
    assert not model.training


def test_answer_loss_is_the_token_mean_of_transformers_losses(tiny_lm) -> None:
    """Sum over examples of (HF mean loss x supervised tokens) / all supervised tokens, whatever
    the batch size (padding and batching change nothing)."""
    from fastmid.data import build_sft_examples

    model, tok = tiny_lm
    examples, _ = build_sft_examples("builtin:arith:test", tok, split="test", max_examples=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
            k = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * k
            count += k
    expected = total / count
    for batch_size in (1, 2, 3):
        got = answer_loss(model, tok, "builtin:arith:test", 3, batch_size)
        assert got == pytest.approx(expected, rel=1e-5), batch_size


def test_run_eval_loads_a_folder(tiny_llama_dir) -> None:
    result = run_eval(
        str(tiny_llama_dir), "builtin:arith:test", n=2, max_new_tokens=2, batch_size=2
    )
    assert result.n == 2 and math.isfinite(result.eval_loss)
