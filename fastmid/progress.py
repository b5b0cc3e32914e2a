"""One builder for every progress bar fastmid shows (training, tokenizing, analysis).

Like :mod:`fastmid.errors`, this module imports nothing from fastmid: every layer may use it.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def make_progress(
    console: Console | None,
    *fields: str,
    label: str = "{task.description}",
    eta: bool = False,
    transient: bool = False,
) -> Progress:
    """A rich progress bar: label, bar, ``done/total``, each extra field, elapsed time (and ETA).

    Args:
        console: where to draw; None gives a disabled bar (rich's ``disable=True``) with the same
            interface, so callers never branch on it.
        fields: ``TextColumn`` templates of task fields, e.g. ``"loss {task.fields[loss]}"``.
        label: the first column's template (the task description by default).
        eta: add a time-remaining column.
        transient: remove the bar when it finishes.

    Returns:
        An unstarted :class:`rich.progress.Progress` (use it as a context manager).
    """
    columns: list[str | ProgressColumn] = [
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f) for f in fields),
        TimeElapsedColumn(),
    ]
    if eta:
        columns += [TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*columns, console=console, transient=transient, disable=console is None)
