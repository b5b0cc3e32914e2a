"""`fastmid data inspect` marks trained spans in text where colour cannot show them."""

from __future__ import annotations

import io

from rich.console import Console

from fastmid.data import inspect_data
from fastmid.data.inspect import needs_text_marks, render_example

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _inspect(console: Console, toy_tokenizer, write_rows) -> None:
    path = write_rows("q.jsonl", [{"question": "what is 2", "answer": "the answer is 42"}])
    inspect_data(str(path), toy_tokenizer(chat_template=CHATML), n=1, console=console)


def test_no_colour_console_marks_trained_text_and_says_so(toy_tokenizer, write_rows):
    for kwargs in ({"no_color": True}, {"color_system": None}):
        buffer = io.StringIO()
        _inspect(Console(file=buffer, width=100, **kwargs), toy_tokenizer, write_rows)
        out = buffer.getvalue()
        assert "[[the answer is 42<|im_end|>" in out
        assert "]]" in out and "what is 2" in out and "[[what is 2" not in out
        assert "legend: [[trained tokens]]" in out and "marked [[...]]" in out


def test_colour_terminal_keeps_plain_text():
    colour = Console(file=io.StringIO(), force_terminal=True, color_system="truecolor")
    assert not needs_text_marks(colour)
    assert needs_text_marks(Console(file=io.StringIO(), force_terminal=True, no_color=True))
    assert needs_text_marks(Console(file=io.StringIO(), force_terminal=True, color_system=None))
    assert needs_text_marks(Console(file=io.StringIO(), color_system="truecolor"))  # piped


def test_render_example_marks_only_when_asked(toy_tokenizer):
    tokenizer = toy_tokenizer()
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    example = {"input_ids": ids, "labels": [-100] * (len(ids) - 1) + [ids[-1]]}
    assert "[[" not in render_example(example, tokenizer).plain
    marked = render_example(example, tokenizer, marks=True).plain
    assert (
        marked.endswith("]]")
        and "[[" in marked
        and marked.replace("[[", "").replace("]]", "") == "hello world"
    )
