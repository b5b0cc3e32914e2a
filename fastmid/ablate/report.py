"""The ablation's numbers and outputs: per-arm intervals, paired comparisons with ``mid``,
``ablate.json``, ``ablate.csv``, ``ablate.png`` and the console table.

Each row (an arm, or ``base``, the untrained model) carries its per-problem correctness on the
test set for each seed (``correct``: seeds x problems, 0/1) and each seed's test answer loss
(``answer_loss_per_seed``: mean cross-entropy in nats per reference-answer token, teacher-forced,
:func:`fastmid.eval.exact_match.answer_loss`). The answer loss is reported beside exact match, not
tested: it still separates arms when exact match sits near 0% (a small base model on arithmetic).
The statistics (:mod:`fastmid.ablate.stats`):

* accuracy: the mean over seeds of the per-seed accuracies, with a 95% percentile bootstrap
  interval over problems of the seed-averaged correctness;
* ``mid`` against every other row: the mean paired difference of seed-averaged correctness
  (``mid`` minus the other), its paired bootstrap interval and two-sided p-value, and Holm's
  adjustment over all comparisons against ``mid``; a comparison is "distinguishable from zero"
  when its adjusted p is below 0.05.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from fastmid.ablate.stats import DEFAULT_CONFIDENCE, bootstrap_ci, holm, paired_bootstrap

ALPHA = 0.05  # family-wise level of the comparisons against mid
REFERENCE = "mid"
CSV_COLUMNS: tuple[str, ...] = (
    "arm",
    "layers",
    "how",
    "trainable_parameters",
    "training_tokens",
    "lr",
    "seeds",
    "accuracy_per_seed",
    "accuracy_mean",
    "ci95_low",
    "ci95_high",
    "diff_vs_mid",
    "diff_ci95_low",
    "diff_ci95_high",
    "p_vs_mid",
    "p_holm_vs_mid",
    "answer_loss_per_seed",
    "answer_loss_mean",
)


def seed_averaged(correct: list[list[bool]] | np.ndarray) -> np.ndarray:
    """Per-problem correctness averaged over seeds.

    Args:
        correct: seeds x problems, 0/1 (bool or int).

    Returns:
        float64 array of shape ``(problems,)``, values in [0, 1].
    """
    arr = np.asarray(correct, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"correctness must be seeds x problems, got shape {arr.shape}")
    return arr.mean(axis=0)


def _points(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def comparison_sentence(other: str, comp: dict[str, Any], n: int, seeds: str) -> str:
    """One sentence: the difference ``mid - other`` in accuracy points, its interval, the
    Holm-adjusted p, and whether it is distinguishable from zero at this size."""
    d, lo, hi, p = comp["difference"], comp["ci95"][0], comp["ci95"][1], comp["p_holm"]
    head = (
        f"mid - {other}: {100 * d:+.1f} points (95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}]), "
        f"Holm-adjusted p = {p:.3g}: "
    )
    if p < ALPHA:
        better, worse = (REFERENCE, other) if d > 0 else (other, REFERENCE)
        verdict = f"{better} is better than {worse}, distinguishable from zero"
    else:
        verdict = "not distinguishable from zero"
    return f"{head}{verdict} at this size ({n} test problems, {seeds})."


def compute_statistics(
    rows: list[dict[str, Any]],
    resamples: int,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> list[dict[str, Any]]:
    """Fill each row's ``accuracy_mean``, ``ci95`` and ``vs_mid``; return the comparisons.

    Args:
        rows: dicts with ``arm`` and ``correct`` (seeds x problems, 0/1; empty: no result, e.g.
            every seed diverged); all rows score the same problems in the same order.
        resamples: bootstrap resamples.
        seed: resampling seed (each row and comparison resamples with the same seed).
        confidence: interval coverage.

    Returns:
        One dict per comparison of ``mid`` with another row that has results: ``other``,
        ``difference``, ``ci95``, ``p``, ``p_holm``, ``distinguishable``, ``sentence``.
    """
    for row in rows:
        row["accuracy_mean"], row["ci95"], row["vs_mid"] = None, None, None
        losses = [x for x in row.get("answer_loss_per_seed", []) if x is not None]
        row["answer_loss_mean"] = float(np.mean(losses)) if losses else None
        if row.get("correct"):
            c = seed_averaged(row["correct"])
            mean, lo, hi = bootstrap_ci(c, resamples, seed, confidence)
            row["accuracy_mean"], row["ci95"] = mean, [lo, hi]
    ref = next((r for r in rows if r["arm"] == REFERENCE and r.get("correct")), None)
    if ref is None:
        return []
    c_ref = seed_averaged(ref["correct"])
    comparisons: list[dict[str, Any]] = []
    for row in rows:
        if row is ref or not row.get("correct"):
            continue
        result = paired_bootstrap(c_ref, seed_averaged(row["correct"]), resamples, seed, confidence)
        comparisons.append(
            {
                "other": row["arm"],
                "difference": result.difference,
                "ci95": [result.low, result.high],
                "p": result.p,
                "n": result.n,
                "_row": row,
            }
        )
    for comp, adjusted in zip(comparisons, holm([c["p"] for c in comparisons]), strict=True):
        comp["p_holm"] = adjusted
        comp["distinguishable"] = adjusted < ALPHA
        row = comp.pop("_row")
        seeds = f"{len(ref['correct'])} vs {len(row['correct'])} seed(s)"
        comp["sentence"] = comparison_sentence(comp["other"], comp, comp["n"], seeds)
        row["vs_mid"] = {k: comp[k] for k in ("difference", "ci95", "p", "p_holm")}
    return comparisons


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def public_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows without their per-problem matrices (kept in each run's ``eval_test.json``)."""
    return [{k: v for k, v in row.items() if k != "correct"} for row in rows]


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``ablate.json`` (atomically)."""
    _atomic_write(path, json.dumps(document, indent=1) + "\n")


def _number(x: float) -> float | int:
    """``x`` as an int when it is integral (a token count), else as it is."""
    return int(x) if float(x).is_integer() else x


def csv_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One CSV record per row, columns :data:`CSV_COLUMNS` (accuracies as fractions; per-seed
    accuracies joined by ``;``)."""
    out = []
    for row in rows:
        vs = row.get("vs_mid") or {}
        ci = row.get("ci95") or [None, None]
        diff_ci = vs.get("ci95") or [None, None]
        out.append(
            {
                "arm": row["arm"],
                "layers": row.get("layers_text", ""),
                "how": row.get("how", ""),
                "trainable_parameters": row.get("trainable_parameters", 0),
                "training_tokens": _number(row.get("training_tokens") or 0),
                "lr": "" if row.get("lr") is None else f"{row['lr']:g}",
                "seeds": ";".join(str(s) for s in row.get("seeds", [])),
                "accuracy_per_seed": ";".join(
                    f"{a:.6f}" for a in row.get("accuracy_per_seed", []) if a is not None
                ),
                "accuracy_mean": "" if row.get("accuracy_mean") is None else row["accuracy_mean"],
                "ci95_low": "" if ci[0] is None else ci[0],
                "ci95_high": "" if ci[1] is None else ci[1],
                "diff_vs_mid": vs.get("difference", ""),
                "diff_ci95_low": "" if diff_ci[0] is None else diff_ci[0],
                "diff_ci95_high": "" if diff_ci[1] is None else diff_ci[1],
                "p_vs_mid": vs.get("p", ""),
                "p_holm_vs_mid": vs.get("p_holm", ""),
                "answer_loss_per_seed": ";".join(
                    f"{x:.6f}" for x in row.get("answer_loss_per_seed", []) if x is not None
                ),
                "answer_loss_mean": (
                    "" if row.get("answer_loss_mean") is None else row["answer_loss_mean"]
                ),
            }
        )
    return out


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``ablate.csv``: one line per row (``base`` first), columns :data:`CSV_COLUMNS`."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(rows))
    _atomic_write(path, buffer.getvalue())


def write_plot(path: Path, rows: list[dict[str, Any]], title: str) -> Path:
    """``ablate.png``: each row's mean accuracy with its 95% interval and per-seed points (left
    axis, percent), trainable parameters as bars on a log-scaled second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["arm"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5))
    try:
        ax2 = ax.twinx()
        params = [max(int(r.get("trainable_parameters") or 0), 0) for r in rows]
        ax2.bar(x, [p if p > 0 else np.nan for p in params], width=0.6, color="0.85", zorder=0)
        ax2.set_yscale("log")
        positive = [p for p in params if p > 0]
        if positive:  # bars start a decade below the smallest, so every one shows
            ax2.set_ylim(min(positive) / 10, max(positive) * 3)
        ax2.set_ylabel("trainable parameters (grey bars, log scale)")
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
        for i, row in enumerate(rows):
            seeds = [a for a in row.get("accuracy_per_seed", []) if a is not None]
            ax.scatter(
                [i] * len(seeds), [100 * a for a in seeds], s=12, color="tab:gray", clip_on=False
            )
            if row.get("accuracy_mean") is None:
                continue
            mean, (lo, hi) = row["accuracy_mean"], row["ci95"]
            ax.errorbar(
                [i],
                [100 * mean],
                yerr=[[100 * (mean - lo)], [100 * (hi - mean)]],
                fmt="o",
                color="tab:blue" if row["arm"] != "base" else "black",
                capsize=4,
                clip_on=False,  # a 0% mean sits on the axis and stays whole
            )
        tops = [100 * r["ci95"][1] for r in rows if r.get("ci95")]
        tops += [100 * a for r in rows for a in r.get("accuracy_per_seed", []) if a is not None]
        ax.set_ylim(0, min(100.0, max([5.0, *tops]) * 1.15))
        ax.set_xticks(x, names)
        ax.set_ylabel("test exact match, % (mean, 95% CI; dots: seeds)")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        tmp = path.with_name(path.stem + ".tmp.png")
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path


def _millions(n: int | None) -> str:
    if not n:
        return "0"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def print_table(console: Console, rows: list[dict[str, Any]], comparisons: list[dict]) -> None:
    """The console table (one line per row) and one sentence per comparison."""
    table = Table(title="fastmid ablate: test exact match (%)", show_lines=False)
    for column in (
        "arm", "layers", "how", "trainable", "tokens", "lr", "seeds", "mean [95% CI]",
        "mid - arm [95% CI]", "p Holm", "answer loss",
    ):  # fmt: skip
        table.add_column(column, no_wrap=column != "layers")
    for row in rows:
        ci = row.get("ci95")
        vs = row.get("vs_mid")
        seeds = " ".join(_points(a) for a in row.get("accuracy_per_seed", []))
        mean = (
            f"{_points(row['accuracy_mean'])} [{_points(ci[0])}, {_points(ci[1])}]"
            if row.get("accuracy_mean") is not None
            else "-"
        )
        diff = (
            f"{100 * vs['difference']:+.1f} [{100 * vs['ci95'][0]:+.1f}, "
            f"{100 * vs['ci95'][1]:+.1f}]"
            if vs
            else "-"
        )
        table.add_row(
            row["arm"],
            row.get("layers_text", ""),
            row.get("how", ""),
            _millions(row.get("trainable_parameters")),
            f"{row['training_tokens']:,.0f}" if row.get("training_tokens") else "-",
            f"{row['lr']:g}" if row.get("lr") is not None else "-",
            seeds or "-",
            mean,
            diff,
            f"{vs['p_holm']:.3g}" if vs else "-",
            "-" if row.get("answer_loss_mean") is None else f"{row['answer_loss_mean']:.3f}",
        )
    if console.is_terminal:
        console.print(table)
    else:
        # A log file gets the whole table rather than columns cut to 80 characters (rich caps a
        # print's width at its console's).
        wide = Console(file=console.file, width=max(console.width, 170), no_color=True)
        wide.print(table)
    for comp in comparisons:
        console.print(comp["sentence"], highlight=False, soft_wrap=True)
    if not comparisons and not any(r["arm"] == REFERENCE and r.get("correct") for r in rows):
        console.print("no mid result: nothing to compare against mid", highlight=False)


def finite_or_none(x: float | None) -> float | None:
    """``x`` when it is a finite number, else None (JSON has no NaN)."""
    return x if x is not None and math.isfinite(x) else None
