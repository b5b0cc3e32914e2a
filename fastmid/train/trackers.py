"""``--report-to``: the step records of ``metrics.jsonl`` sent to experiment trackers.

Metric names follow HF Trainer's where one exists (``train/loss``, ``train/learning_rate``,
``train/grad_norm``, ``eval/loss``), plus fastmid's own (``train/tokens_per_s``: real, non-padding
tokens per second of the step; ``train/peak_memory_bytes``; ``train/grad_bytes``: band gradient
bytes alive at once). The step axis is the optimizer step.

* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` into ``<run>/tensorboard/`` (needs
  the ``tensorboard`` package: ``pip install 'fastmid[tensorboard]'``).
* ``wandb``: ``wandb.init(project="fastmid", dir=<run>, config=...)``; ``WANDB_MODE=offline``
  works with no network (``pip install 'fastmid[wandb]'``).
* ``trackio``: ``trackio.init(project="fastmid", config=...)`` (``pip install 'fastmid[trackio]'``).

A tracker that is asked for and not installed is a one-line :class:`TrackerError` before training
starts.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from fastmid.errors import FastmidError

# fastmid's record key -> the tracker's metric name.
METRIC_NAMES: dict[str, str] = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "eval_loss": "eval/loss",
    "tokens_per_s": "train/tokens_per_s",
    "peak_memory_bytes": "train/peak_memory_bytes",
    "grad_bytes": "train/grad_bytes",
}
_EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


class TrackerError(FastmidError, RuntimeError):
    """A tracker that cannot start (missing package; the extra to install named)."""


def _require(name: str) -> Any:
    try:
        return importlib.import_module(_EXTRAS[name])
    except ImportError:
        raise TrackerError(
            f"--report-to {name}: the {name} package is not installed; pip install "
            f"'fastmid[{name}]', or drop {name} from --report-to"
        ) from None


class Trackers:
    """The trackers of one run; :meth:`log` sends a step record to each, :meth:`close` ends them.

    Args:
        names: from ``--report-to`` (``none`` gives no tracker).
        run_dir: the run folder (TensorBoard writes ``tensorboard/`` there).
        config: the resolved config, recorded by the trackers that keep one.

    Raises:
        TrackerError: a requested tracker's package is missing.
    """

    def __init__(self, names: list[str], run_dir: Path, config: dict[str, Any]) -> None:
        self._writers: list[tuple[str, Any]] = []
        for name in names:
            if name == "none":
                continue
            _require(name)
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
                writer.add_text("config", "\n".join(f"{k}: {v}" for k, v in config.items()))
                self._writers.append((name, writer))
            elif name == "wandb":
                import wandb

                self._writers.append(
                    (name, wandb.init(project="fastmid", dir=str(run_dir), config=config))
                )
            elif name == "trackio":
                import trackio

                self._writers.append((name, trackio.init(project="fastmid", config=config)))

    def log(self, record: dict[str, Any]) -> None:
        """Send one ``metrics.jsonl`` record (its ``step`` is the x axis)."""
        if not self._writers:
            return
        step = int(record["step"])
        values = {
            METRIC_NAMES[k]: float(v)
            for k, v in record.items()
            if k in METRIC_NAMES and isinstance(v, int | float)
        }
        for name, writer in self._writers:
            if name == "tensorboard":
                for tag, value in values.items():
                    writer.add_scalar(tag, value, step)
            else:
                writer.log(values, step=step)

    def close(self) -> None:
        """Flush and close every tracker."""
        for name, writer in self._writers:
            if name == "tensorboard":
                writer.close()
            else:
                writer.finish()
        self._writers = []
