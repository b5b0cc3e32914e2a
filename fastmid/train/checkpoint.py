"""Atomic checkpoints and exact resume.

A checkpoint ``<output>/checkpoints/step-<N>/`` holds:

* ``band.safetensors``: the trainable tensors only (the band; frozen weights come from the base
  model, which is why a checkpoint of a 32B model with an 18-layer band is a fraction of its size);
* ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()`` (8-bit states included);
* ``trainer_state.json``: step, data position, tokens seen, RNG states (python, torch CPU, CUDA),
  the band plan and the resolved config.

It is written to ``step-<N>.tmp-*`` and renamed when complete, so a crash mid-write never leaves a
folder that looks valid; only the last ``keep_last`` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastmid.errors import FastmidError
from fastmid.train.export import make_readable

_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(FastmidError, ValueError):
    """A checkpoint that cannot be found or does not match the run (path and reason named)."""


@dataclass
class TrainerState:
    """Loop position and bookkeeping saved with each checkpoint.

    Attributes:
        step: optimizer steps completed.
        micro_batches: micro-batches consumed since the start (data position).
        tokens: non-padding tokens seen; supervised_tokens: tokens with a label.
        elapsed_s: training wall time so far, in seconds.
    """

    step: int
    micro_batches: int
    tokens: int
    supervised_tokens: int
    elapsed_s: float
    rng: dict[str, Any]
    plan: dict[str, Any]
    config: dict[str, Any]


def capture_rng() -> dict[str, Any]:
    """RNG states (python, torch CPU, CUDA when present) as JSON-ready lists."""
    state: dict[str, Any] = {
        "python": _jsonable(random.getstate()),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_jsonable(o) for o in obj]
    return obj


def save_checkpoint(
    checkpoints_dir: Path,
    model: torch.nn.Module,
    trainable_names: list[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    keep_last: int,
) -> Path:
    """Write ``step-<N>`` atomically and prune older checkpoints beyond ``keep_last``.

    Args:
        checkpoints_dir: ``<output>/checkpoints``.
        model: the model; only ``trainable_names`` tensors are written.
        trainable_names: state-dict names of the trainable tensors.

    Returns:
        The checkpoint folder.
    """
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{state.step}"
    tmp = Path(tempfile.mkdtemp(prefix=f"step-{state.step}.tmp-", dir=checkpoints_dir))
    try:
        params = dict(model.named_parameters())
        tensors = {n: params[n].detach().contiguous().cpu() for n in trainable_names}
        save_file(tensors, str(tmp / "band.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state.__dict__, indent=1) + "\n")
        make_readable(tmp)
        if final.exists():  # a re-save of the same step (e.g. SIGINT right after a save)
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints in ``checkpoints_dir``, oldest first (temporary folders ignored)."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for child in checkpoints_dir.iterdir():
        match = _STEP_RE.match(child.name)
        if match and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: Path) -> Path:
    """Turn ``--resume`` (a checkpoint folder, or ``latest``) into a checkpoint folder.

    Raises:
        CheckpointError: no checkpoint under ``<output>/checkpoints`` for ``latest``; a path that is
            not a complete checkpoint.
    """
    if resume == "latest":
        found = list_checkpoints(output_dir / "checkpoints")
        if not found:
            raise CheckpointError(
                f"--resume latest: no checkpoint in {output_dir / 'checkpoints'}; "
                "start without --resume"
            )
        return found[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(
            f"--resume {path}: not a fastmid checkpoint (no trainer_state.json); pass a "
            "checkpoints/step-<N> folder or 'latest'"
        )
    return path


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    trainable_names: list[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> TrainerState:
    """Load band weights, optimizer and scheduler state into the live objects; return the state.

    Raises:
        CheckpointError: the checkpoint's tensors do not match the run's trainable parameters
            (a different band or model).
    """
    tensors = load_file(str(path / "band.safetensors"))
    if sorted(tensors) != sorted(trainable_names):
        missing = sorted(set(trainable_names) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(trainable_names))[:3]
        raise CheckpointError(
            f"{path}: its trained tensors do not match this run's band (missing {missing}, "
            f"unexpected {extra}); resume with the same --model and --band/--layers"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise CheckpointError(
                    f"{path}: tensor {name} has shape {tuple(value.shape)}, "
                    f"the model's is {tuple(params[name].shape)}"
                )
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    data = json.loads((path / "trainer_state.json").read_text())
    return TrainerState(**data)
