"""The one progress builder: rich's live bar on a terminal, plain lines in a log when asked."""

from __future__ import annotations

from io import StringIO

from rich.console import Console
from rich.progress import Progress

from fastmid.progress import PlainProgress, make_progress


def test_a_terminal_or_no_plain_every_keeps_the_rich_bar():
    assert isinstance(
        make_progress(Console(file=StringIO(), force_terminal=True), plain_every=1), Progress
    )
    assert isinstance(make_progress(Console(file=StringIO()), plain_every=None), Progress)
    assert isinstance(make_progress(None, plain_every=1), Progress)  # disabled rich bar
    assert isinstance(make_progress(Console(file=StringIO()), plain_every=1), PlainProgress)


def test_plain_lines_every_n_units_at_the_end_and_after_the_interval():
    out = StringIO()
    bar = PlainProgress(Console(file=out), "tok", ("x {task.fields[x]}",), every=3, interval_s=3600)
    with bar:
        task = bar.add_task("tok", total=7, x="-")
        for i in range(1, 8):
            bar.update(task, completed=i, x=i)
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["3/7", "6/7", "7/7"]
    assert out.getvalue().splitlines()[0].startswith("tok 3/7 x 3 elapsed 0:00:0")

    out = StringIO()
    bar = PlainProgress(Console(file=out), "tok", (), every=100, interval_s=0.0)
    task = bar.add_task("tok", total=None)
    bar.update(task, advance=1)
    bar.update(task, advance=1)
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["1", "2"]
