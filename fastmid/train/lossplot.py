"""``loss.png``: the training loss (raw and smoothed) and the held-out loss against the step, with
the learning rate on a second axis, drawn from ``metrics.jsonl``.

Written at every checkpoint and at the end of a run (``summary.json`` names it); matplotlib's
non-interactive Agg backend, so it works without a display.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing; Adam's bias
    correction, Kingma & Ba 2015, eq. 2-4): ``m_t = w m_{t-1} + (1 - w) x_t``, reported as
    ``m_t / (1 - w^t)`` so the first values are not pulled toward 0.

    Args:
        values: the raw series (e.g. the loss per step).
        weight: ``w`` in [0, 1); 0 returns the series unchanged.
    """
    out, m = [], 0.0
    for t, x in enumerate(values, start=1):
        m = weight * m + (1.0 - weight) * x
        out.append(m / (1.0 - weight**t))
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (blank or unreadable lines skipped: a run killed in the
    middle of a write leaves a partial last line)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_loss_plot(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Draw ``out_png`` from ``metrics_path``; return it, or None when there is no step yet.

    The left axis holds the training loss per step (thin), its smoothed curve
    (:func:`smoothed`) and the held-out loss where it was measured (markers); the right axis
    the learning rate. Loss in nats per supervised token.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if "step" in r and "loss" in r]
    if not records:
        return None
    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        ax.plot(steps, smoothed(loss), color="tab:blue", linewidth=2, label="train (smoothed)")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", color="tab:orange", label="held-out loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats per supervised token)")
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [r.get("lr", 0.0) for r in records], color="tab:gray", linestyle="--")
        lr_ax.set_ylabel("learning rate", color="tab:gray")
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles, labels, loc="upper right")
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        out_png = Path(out_png)
        tmp = out_png.with_name(out_png.name + ".tmp.png")
        fig.savefig(tmp)
        tmp.replace(out_png)  # a reader never sees half a picture
    finally:
        plt.close(fig)
    return out_png
