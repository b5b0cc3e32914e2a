"""Write an :class:`~fastmid.analysis.results.AnalysisResult`: JSON, CSV, PNG and a console table.

Files (in the output folder):

* ``analysis.json``: every layer's metrics, the current and recommended bands with the rule and
  its threshold, the depth pattern, the inputs and timings. NaN is written as ``null``.
* ``analysis.csv``: one row per layer, columns of :meth:`LayerMetrics.columns` (empty = not
  computed).
* ``analysis.png``: metrics against depth with the current band shaded and the recommended band
  outlined.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastmid.analysis.results import AnalysisResult, LayerMetrics
from fastmid.errors import FastmidError

# The files of one analysis in its output folder, by kind.
REPORT_FILES = {"json": "analysis.json", "csv": "analysis.csv", "png": "analysis.png"}


class ReportWriteError(FastmidError):
    """The report cannot be written where ``--output`` points (a file in the way, no
    permission, a full disk); the message names the path."""


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf: strict parsers reject them, so they become null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(result: AnalysisResult, path: str | Path) -> Path:
    """Write ``result`` as indented JSON (NaN/inf -> null); returns the path."""
    path = Path(path)
    path.write_text(json.dumps(_clean(result.to_dict()), indent=2) + "\n")
    return path


def write_csv(rows: list[LayerMetrics], path: str | Path) -> Path:
    """Write one CSV row per layer (NaN -> empty cell, floats to 10 significant digits)."""
    path = Path(path)
    cols = LayerMetrics.columns()
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(cols)
        for row in rows:
            cells = []
            for c in cols:
                v = getattr(row, c)
                if isinstance(v, float):
                    cells.append("" if not math.isfinite(v) else f"{v:.10g}")
                else:
                    cells.append(str(v))
            writer.writerow(cells)
    return path


def _finite(values: list[float]) -> bool:
    return any(math.isfinite(v) for v in values)


def plot_analysis(result: AnalysisResult, path: str | Path, title: str | None = None) -> Path:
    """Six panels of metrics against layer index, current band shaded, recommended band outlined.

    Panels: CKA (debiased, biased) and pooled cosine; relative weight change per module kind;
    normalized matrix entropy; effective rank; gradient norm; the normalized change used by the
    band rule with its threshold. Panels without data say so.

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.layers
    x = [r.index for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharex=True)
    band = result.current_band
    adv = result.advice

    def series(ax: Any, items: list[tuple[str, list[float], str]], ylabel: str) -> None:
        drawn = False
        for label, values, style in items:
            if _finite(values):
                ax.plot(x, values, style, label=label, markersize=3)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
        elif len(items) > 1:
            ax.legend(fontsize=8)
        ax.set_ylabel(ylabel)
        ax.axvspan(band[0] - 0.5, band[-1] + 0.5, color="tab:gray", alpha=0.15, lw=0)
        ax.axvspan(adv.start - 0.5, adv.end - 0.5, fill=False, ec="tab:green", ls="--", lw=1.2)
        ax.grid(alpha=0.3)

    def col(name: str) -> list[float]:
        return [getattr(r, name) for r in rows]

    series(
        axes[0, 0],
        [
            ("CKA debiased", col("cka_debiased"), "o-"),
            ("CKA biased", col("cka_biased"), "s--"),
            ("cosine (pooled)", col("cosine"), "^:"),
        ],
        "similarity base vs tuned",
    )
    series(
        axes[0, 1],
        [
            ("all", col("weight_change"), "o-"),
            ("attention", col("weight_change_attention"), "s--"),
            ("mlp", col("weight_change_mlp"), "^--"),
            ("norm", col("weight_change_norm"), "v:"),
        ],
        "relative weight change",
    )
    series(
        axes[0, 2],
        [("base", col("entropy_base"), "o-"), ("tuned", col("entropy_tuned"), "s--")],
        "prompt matrix entropy (normalized)",
    )
    series(
        axes[1, 0],
        [("base", col("erank_base"), "o-"), ("tuned", col("erank_tuned"), "s--")],
        "effective rank",
    )
    series(axes[1, 1], [("grad norm", col("grad_norm"), "o-")], "grad norm of SFT loss (base)")
    series(
        axes[1, 2],
        [(f"normalized {adv.metric}", adv.normalized_change or [math.nan] * len(x), "o-")],
        "normalized change (band rule)",
    )
    if adv.normalized_change:
        axes[1, 2].axhline(adv.threshold, color="tab:red", ls=":", lw=1, label="threshold")
        axes[1, 2].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("decoder layer")
    L = result.num_hidden_layers
    fig.suptitle(
        (title + "\n" if title else "")
        + f"{L} layers, {result.n_tokens} tokens; shaded: current band {band[0]}..{band[-1]}; "
        f"dashed: recommended {adv.start}..{adv.end - 1}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# The main table: what decides the band, readable at 80 columns (also piped). The other metrics
# go to a second table; every metric at full precision is in analysis.csv / analysis.json.
MAIN_COLUMNS = [
    ("layer", "index"),
    ("CKA deb", "cka_debiased"),
    ("dW rel", "weight_change"),
    ("cos", "cosine"),
    ("grad", "grad_norm"),
]
MORE_COLUMNS = [
    ("layer", "index"),
    ("CKA bias", "cka_biased"),
    ("H base", "entropy_base"),
    ("H tuned", "entropy_tuned"),
    ("erank b", "erank_base"),
    ("erank t", "erank_tuned"),
]
# CKA and cosine sit near 1 for small changes: fixed decimals keep the digits that differ.
_FIXED = {"cka_debiased", "cka_biased", "cosine"}


def _cell(column: str, value: Any, band: set[int]) -> str:
    if column == "index":
        return f"{value}{'*' if value in band else ' '}"
    if isinstance(value, float):
        return (
            "-" if not math.isfinite(value) else format(value, ".4f" if column in _FIXED else ".3g")
        )
    return str(value)


def layer_table(result: AnalysisResult, columns: list[tuple[str, str]], title: str) -> Any:
    """A rich table of ``columns`` (``(header, LayerMetrics field)``) per layer, or None when no
    column but the layer has a value; ``*`` marks the current band."""
    from rich import box
    from rich.table import Table

    present = [
        (h, c)
        for h, c in columns
        if c == "index" or _finite([getattr(r, c) for r in result.layers])
    ]
    if len(present) < 2:
        return None
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for header, _ in present:
        # fold, never "…": a cut number reads as a different number
        table.add_column(
            header, justify="right", no_wrap=True, overflow="fold", min_width=len(header)
        )
    band = set(result.current_band)
    for r in result.layers:
        table.add_row(*(_cell(c, getattr(r, c), band) for _, c in present))
    return table


def print_table(result: AnalysisResult, console: Any = None) -> None:
    """Print the per-layer tables and the band advice with rich (``*`` marks the current band).

    The main table (layer, debiased CKA, relative weight change, pooled cosine, grad norm) and a
    second one with the other metrics each fit 80 columns; ``analysis.csv`` has every metric at
    full precision.

    Args:
        result: the analysis.
        console: a ``rich.console.Console``; a new one when None.
    """
    from rich.console import Console

    console = console or Console()
    for columns, title in (
        (MAIN_COLUMNS, "fastmid analyze: per-layer metrics"),
        (MORE_COLUMNS, "more per-layer metrics"),
    ):
        table = layer_table(result, columns, title)
        if table is not None:
            console.print(table)
    adv = result.advice
    console.print(
        f"current band (*): layers {result.current_band[0]}..{result.current_band[-1]}; "
        f"recommended band: layers {adv.start}..{adv.end - 1} "
        f"(--layers {adv.start}-{adv.end - 1}){' [fallback]' if adv.fallback else ''}"
    )
    console.print(f"rule: {adv.reason}")


def write_report(result: AnalysisResult, output_dir: str | Path, title: str | None = None) -> dict:
    """Write ``analysis.json``, ``analysis.csv`` and ``analysis.png`` into ``output_dir``.

    Creates the folder. Returns ``{"json": path, "csv": path, "png": path}`` (strings) and records
    it in ``result.files`` before the JSON is written. Replaces the files of an earlier analysis
    there (the caller decides whether that is allowed: ``run_analysis``'s ``overwrite``).

    Raises:
        ReportWriteError: the folder or a file cannot be written (a file where the folder should
            be, no permission, a full disk), naming the path.
    """
    out = Path(output_dir)
    files = {kind: str(out / name) for kind, name in REPORT_FILES.items()}
    with _naming_the_path(out):
        out.mkdir(parents=True, exist_ok=True)
    result.files = files
    with _naming_the_path(Path(files["csv"])):
        write_csv(result.layers, files["csv"])
    with _naming_the_path(Path(files["png"])):
        plot_analysis(result, files["png"], title)
    with _naming_the_path(Path(files["json"])):
        write_json(result, files["json"])
    return files


@contextmanager
def _naming_the_path(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` of writing ``path`` (``FileExistsError``, ``NotADirectoryError``,
    ``IsADirectoryError``, ``PermissionError``, a full disk...) into a one-line
    :class:`ReportWriteError` naming ``--output`` and the path, instead of a traceback."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ReportWriteError(
            f"--output: cannot write {path} ({reason}); choose another --output"
        ) from None
