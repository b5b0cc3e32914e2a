"""``fastmid train`` end to end: setup, accuracy before, train, export, accuracy after, summary.

Writes the run folder of design section 7: ``config.yaml``, ``plan.json``, ``metrics.jsonl``,
``checkpoints/step-<N>/``, ``final/``, ``band_delta.safetensors``, ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fastmid.config import TrainConfig
from fastmid.train.logging import peak_memory_bytes
from fastmid.train.loop import (  # noqa: F401 (errors re-exported until the recipe owns them)
    NonFiniteLossError,
    RunFolderError,
    Trainer,
    TrainingInterrupted,
    attention_implementation,
)


def _accuracy(trainer: Trainer, label: str) -> dict[str, Any] | None:
    cfg = trainer.cfg
    if not cfg.eval_accuracy:
        return None
    from fastmid.eval.exact_match import evaluate_accuracy

    trainer.console.print(
        f"[bold]eval[/] {label}: exact match on {cfg.eval_n} problems of {cfg.eval_accuracy_data}"
    )
    result = evaluate_accuracy(
        trainer.model,
        trainer.tokenizer,
        cfg.eval_accuracy_data,
        n=cfg.eval_n,
        max_new_tokens=cfg.eval_max_new_tokens,
        batch_size=cfg.eval_batch_size,
    )
    lo, hi = result.ci95
    trainer.console.print(
        f"  {label}: accuracy {result.accuracy:.1%} ({result.correct}/{result.n}), "
        f"95% CI [{lo:.1%}, {hi:.1%}], answer loss {result.eval_loss:.4f}"
        if result.eval_loss is not None
        else f"  {label}: accuracy {result.accuracy:.1%} ({result.correct}/{result.n})"
    )
    return result.to_dict()


def run_train(cfg: TrainConfig, console: Console | None = None) -> dict[str, Any]:
    """Run one training job and return ``summary.json``'s content.

    Raises:
        RunFolderError, ConfigError, ModelSourceError, DataError, NonFiniteLossError,
        TrainingInterrupted, CheckpointError: see their modules; each message says what to do.
    """
    console = console or Console(stderr=True)
    trainer = Trainer(cfg, console)
    trainer.setup()
    out = trainer.out
    counts = trainer.counts
    console.print(
        f"[bold]fastmid train[/] {cfg.model} ({trainer.model.config.model_type}): band "
        f"{trainer.plan.describe()}, trainable {counts.trainable:,} of {counts.total:,} "
        f"({counts.trainable_share:.1f}%), {len(trainer.train_examples)} train / "
        f"{len(trainer.eval_examples)} eval examples, {trainer.total_steps} steps"
    )
    # The base model's accuracy is computed once per run (a resumed run reuses it) unless the
    # evaluation settings changed.
    before_path = out / "eval_before.json"
    key = {
        "data": cfg.eval_accuracy_data,
        "n": cfg.eval_n,
        "max_new_tokens": cfg.eval_max_new_tokens,
    }
    saved = json.loads(before_path.read_text()) if before_path.is_file() else None
    if saved and saved.get("settings") == key:
        before = saved["result"]
    else:
        before = _accuracy(trainer, "before")
        if before is not None:
            before_path.write_text(json.dumps({"settings": key, "result": before}, indent=1) + "\n")
    last = trainer.train()
    final = trainer.export()
    after = _accuracy(trainer, "after")
    state = trainer.state
    summary = {
        "output": str(out),
        "final_model": str(final),
        "model": cfg.model,
        "model_type": trainer.model.config.model_type,
        "band": trainer.plan.to_dict(),
        "parameters": counts.to_dict(),
        "steps": state.step,
        "tokens": state.tokens,
        "supervised_tokens": state.supervised_tokens,
        "train_time_s": state.elapsed_s,
        "tokens_per_s": state.tokens / state.elapsed_s if state.elapsed_s else None,
        "peak_memory_bytes": peak_memory_bytes(trainer.device),
        "device": str(trainer.device),
        "optimizer": cfg.optim,
        "kernels": trainer.kernel_report.to_dict(),
        "attention": attention_implementation(trainer.model),
        "final_loss": last.get("loss"),
        "final_eval_loss": trainer.eval_loss(),
        "accuracy_before": before,
        "accuracy_after": after,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_summary(summary, console)
    return summary


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """A short table of what the run did."""
    table = Table(title="fastmid train: summary", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("band", f"layers {summary['band']['first']}..{summary['band']['last']}")
    p = summary["parameters"]
    table.add_row("trainable", f"{p['trainable']:,} ({p['trainable_share_percent']:.1f}%)")
    table.add_row("steps / tokens", f"{summary['steps']} / {summary['tokens']:,}")
    if summary["tokens_per_s"]:
        table.add_row("tokens/s", f"{summary['tokens_per_s']:.0f}")
    table.add_row("peak memory", f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB")
    if summary["final_loss"] is not None:
        table.add_row("final train loss", f"{summary['final_loss']:.4f}")
    if summary["final_eval_loss"] is not None:
        table.add_row("eval loss", f"{summary['final_eval_loss']:.4f}")
    for key in ("accuracy_before", "accuracy_after"):
        acc = summary.get(key)
        if acc:
            lo, hi = acc["ci95"]
            table.add_row(
                key.replace("_", " "),
                f"{acc['accuracy']:.1%} ({acc['correct']}/{acc['n']}), 95% CI [{lo:.1%}, {hi:.1%}]",
            )
    table.add_row("model folder", summary["final_model"])
    console.print(table)


def load_summary(run_dir: Path) -> dict[str, Any]:
    """Read ``summary.json`` of a finished run."""
    return json.loads((Path(run_dir) / "summary.json").read_text())
