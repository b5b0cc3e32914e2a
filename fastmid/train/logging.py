"""Run telemetry: ``metrics.jsonl``, peak memory, throughput and the rich progress bar."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory in bytes: the CUDA caching allocator's peak on CUDA, else the process's peak
    resident set size (``getrusage`` ``ru_maxrss``; kilobytes on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` and flushes each line, so a crash
    loses at most the step in flight."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Write one record (values must be JSON-serializable)."""
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        """Close the file."""
        self._fh.close()


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop records of steps after ``after_step`` (used on resume, so steps are not repeated)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("step", 0) <= after_step:
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


def make_progress(console: Console) -> Progress:
    """Progress bar: step/total, loss, lr, tokens/s, elapsed, ETA."""
    return Progress(
        TextColumn("[bold]train[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
