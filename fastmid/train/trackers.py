"""``--report-to``: the step records of ``metrics.jsonl`` sent to experiment trackers.

Metric names follow HF Trainer's where one exists (``train/loss``, ``train/learning_rate``,
``train/grad_norm``, ``eval/loss``), plus fastmid's own (``train/tokens_per_s``: real, non-padding
tokens per second of the step; ``train/peak_memory_bytes``; ``train/grad_bytes``: band gradient
bytes alive at once). The step axis is the optimizer step.

* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` into ``<run>/tensorboard/`` (needs
  the ``tensorboard`` package: ``pip install 'fastmid[tensorboard]'``).
* ``wandb``: ``wandb.init(project="fastmid", dir=<run>, config=...)``
  (``pip install 'fastmid[wandb]'``). ``WANDB_MODE`` is wandb's to read (``offline`` for no
  network); when it is unset and no API key is found (``WANDB_API_KEY``, or the netrc entry that
  ``wandb login`` writes for ``WANDB_BASE_URL``'s host), the run logs offline into
  ``<run>/wandb`` (``wandb sync`` uploads it later) rather than stop at wandb's login prompt,
  which nobody answers in a run left alone (:func:`wandb_mode`).
* ``trackio``: ``trackio.init(project="fastmid", config=...)`` (``pip install 'fastmid[trackio]'``).

A tracker that is asked for and not installed is a one-line :class:`TrackerError` before training
starts.
"""

from __future__ import annotations

import importlib
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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


def _netrc_has_key(host: str, environ: Mapping[str, str]) -> bool:
    """Whether the netrc file wandb reads (``$NETRC``, else ``~/.netrc``) has a password for
    ``host``; an unreadable or malformed file counts as none."""
    path = environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_mode(environ: Mapping[str, str] | None = None) -> str | None:
    """The ``mode`` fastmid passes to ``wandb.init``.

    Args:
        environ: the environment (``os.environ`` when None).

    Returns:
        ``"offline"`` when ``WANDB_MODE`` is unset (or empty) and no W&B credential is found:
        no ``WANDB_API_KEY``, no ``WANDB_IDENTITY_TOKEN_FILE``, and no netrc password for the
        host of ``WANDB_BASE_URL`` (default ``https://api.wandb.ai``). Else None: wandb decides
        (``WANDB_MODE``, or online with the key).
    """
    env = os.environ if environ is None else environ
    if env.get("WANDB_MODE") or env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or ""
    return None if _netrc_has_key(host, env) else "offline"


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

                options: dict[str, Any] = {"project": "fastmid", "dir": str(run_dir)}
                mode = wandb_mode()
                if mode is not None:  # else WANDB_MODE or the key decides, as wandb documents
                    options["mode"] = mode
                self._writers.append((name, wandb.init(**options, config=config)))
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
