"""`fastmid eval` shows its progress: plain `eval n/total` lines on a console that is not a
terminal (a log file, CI)."""

from __future__ import annotations

import io
import json

from rich.console import Console

from fastmid.eval import exact_match
from fastmid.eval.exact_match import evaluate_accuracy, run_eval


def _problems(tmp_path, n: int) -> str:
    path = tmp_path / "gsm8k.jsonl"
    rows = [
        {"question": f"What is {i} + 1?", "answer": f"{i} + 1.\n#### {i + 1}"} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _canned(calls: list[int]):
    def generate(model, tokenizer, prompts, max_new_tokens=256, batch_size=16):
        calls.append(len(prompts))
        return [f"#### {p[-1]['content'].split()[2]}" for p in prompts]  # "i": wrong by one

    return generate


def test_plain_progress_lines_on_a_non_terminal_console(tmp_path, monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(exact_match, "generate_answers", _canned(calls))
    buffer = io.StringIO()
    console = Console(file=buffer, width=120)
    assert not console.is_terminal
    result = evaluate_accuracy(
        None, None, _problems(tmp_path, 5), n=5, batch_size=2, with_loss=False, console=console
    )
    assert (result.n, result.correct) == (5, 0) and calls == [2, 2, 1]
    lines = [line for line in buffer.getvalue().splitlines() if line.strip()]
    assert [line.split()[:2] for line in lines] == [
        ["eval", "2/5"],
        ["eval", "4/5"],
        ["eval", "5/5"],
    ]


def test_run_eval_passes_the_console_on(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(exact_match, "generate_answers", _canned([]))
    monkeypatch.setattr(exact_match, "load_model_and_tokenizer", lambda source: (None, None))
    monkeypatch.setattr(exact_match, "answer_loss", lambda *a, **k: None)
    buffer = io.StringIO()
    result = run_eval(
        "tiny", _problems(tmp_path, 3), n=3, batch_size=50, console=Console(file=buffer)
    )
    assert result.n == 3 and "eval 3/3" in buffer.getvalue()


def test_default_console_is_stderr(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(exact_match, "generate_answers", _canned([]))
    evaluate_accuracy(None, None, _problems(tmp_path, 2), n=2, batch_size=1, with_loss=False)
    captured = capsys.readouterr()
    assert captured.out == "" and "eval 2/2" in captured.err
