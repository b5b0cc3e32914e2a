"""One builder for every progress bar fastmid shows (training, tokenizing, analysis).

On a console that is not a terminal (stdout or stderr in a file, CI, ``nohup``, a cluster job's
log) rich's live bar writes nothing until it ends; a caller that passes ``plain_every`` then gets
:class:`PlainProgress`, which prints plain lines instead.

Like :mod:`fastmid.errors`, this module imports nothing from fastmid: every layer may use it.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace
from typing import Any

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
    plain_every: int | None = None,
    plain_lines: int | None = None,
) -> Progress | PlainProgress:
    """A rich progress bar: label, bar, ``done/total``, each extra field, elapsed time (and ETA).

    Args:
        console: where to draw; None gives a disabled bar (rich's ``disable=True``) with the same
            interface, so callers never branch on it.
        fields: ``TextColumn`` templates of task fields, e.g. ``"loss {task.fields[loss]}"``.
        label: the first column's template (the task description by default).
        eta: add a time-remaining column.
        transient: remove the bar when it finishes.
        plain_every: on a console that is not a terminal, print a plain line every this many
            completed units (and at least once a minute) instead of the live bar; None keeps the
            rich bar everywhere (unless ``plain_lines`` is given).
        plain_lines: like ``plain_every``, for a total not known in advance: a line each time
            another ``1/plain_lines`` of the task's total (set by ``add_task`` or ``update``) is
            completed, and at least once a minute.

    Returns:
        An unstarted :class:`rich.progress.Progress`, or a :class:`PlainProgress` (use either as a
        context manager).
    """
    plain = plain_every is not None or plain_lines is not None
    if plain and console is not None and not console.is_terminal:
        return PlainProgress(console, label, fields, every=plain_every, lines=plain_lines, eta=eta)
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


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """Progress as plain lines for consoles that are not terminals, with the part of
    :class:`rich.progress.Progress`'s interface fastmid uses (``add_task``, ``update``, ``with``).

    A line (``train 10/90 loss 0.1234 lr 3.00e-04 152 tok/s elapsed 0:01:05 ETA 0:08:40``) is
    printed when the completed count reaches a multiple of ``every`` (or, with ``lines``, of
    ``ceil(total / lines)``: about ``lines`` lines over the task), when ``interval_s`` seconds
    have passed since the last line (checked at each update), and once when the task completes
    (its completed count reaches its total, also a total lowered by :meth:`update`). The ETA
    assumes the remaining units take as long as the ones done in this process.
    """

    def __init__(
        self,
        console: Console,
        label: str,
        fields: tuple[str, ...],
        *,
        every: int | None = None,
        lines: int | None = None,
        eta: bool = False,
        interval_s: float = 60.0,
    ) -> None:
        self.console, self.label, self.fields = console, label, fields
        self.every = None if every is None else max(1, every)
        self.lines, self.eta, self.interval_s = lines, eta, interval_s
        self.tasks: list[dict[str, Any]] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(
        self, description: str, total: float | None = None, completed: float = 0, **fields: Any
    ) -> int:
        """Start a task; returns its id."""
        now = time.monotonic()
        self.tasks.append(
            {
                "description": description,
                "total": total,
                "completed": completed,
                "start": completed,
                "fields": fields,
                "t0": now,
                "last_line": now,
                "ended": False,  # the completion line was printed
            }
        )
        return len(self.tasks) - 1

    def update(
        self,
        task_id: int,
        *,
        total: float | None = None,
        completed: float | None = None,
        advance: float | None = None,
        **fields: Any,
    ) -> None:
        """Record progress; print a line when one is due.

        Args:
            task_id: from :meth:`add_task`.
            total: a new total (as rich's ``update``; None keeps the current one).
            completed: the new completed count.
            advance: add this to the completed count.
            fields: the task's extra fields (shown by the ``fields`` templates).
        """
        task = self.tasks[task_id]
        before = task["completed"]
        if total is not None:
            task["total"] = total
        if completed is not None:
            task["completed"] = completed
        if advance is not None:
            task["completed"] += advance
        task["fields"].update(fields)
        now, done = time.monotonic(), task["completed"]
        every = self._every(task)
        crossed = every is not None and int(done // every) > int(before // every)
        finished = task["total"] is not None and done >= task["total"] and not task["ended"]
        if crossed or finished or now - task["last_line"] >= self.interval_s:
            task["ended"] = task["ended"] or finished
            task["last_line"] = now
            self.console.print(
                self._line(task, now), highlight=False, soft_wrap=True
            )  # one line in a log

    def _every(self, task: dict[str, Any]) -> int | None:
        """Units between two lines; None while ``lines`` waits for the task's total."""
        if self.every is not None:
            return self.every
        if self.lines and task["total"]:
            return max(1, math.ceil(task["total"] / self.lines))
        return None

    def _line(self, task: dict[str, Any], now: float) -> str:
        view = SimpleNamespace(description=task["description"], fields=task["fields"])
        total = task["total"]
        parts = [
            self.label.format(task=view),
            f"{task['completed']:g}/{total:g}" if total else f"{task['completed']:g}",
        ]
        parts += [f.format(task=view) for f in self.fields]
        elapsed = now - task["t0"]
        parts.append(f"elapsed {_clock(elapsed)}")
        done_here = task["completed"] - task["start"]
        if self.eta and total and done_here > 0:
            parts.append(f"ETA {_clock(elapsed / done_here * (total - task['completed']))}")
        return " ".join(parts)
