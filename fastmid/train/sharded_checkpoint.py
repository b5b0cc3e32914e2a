"""Checkpoints of runs of several processes: ``torch.distributed.checkpoint`` (DCP) for the sharded
band and optimizer states, fastmid's JSON for the rest, and resume in any number of processes.

A sharded checkpoint ``<output>/checkpoints/step-<N>/`` holds:

* ``dcp/``: DCP's files (``__<rank>_0.distcp`` per rank and ``.metadata``) of one state dict,
  ``{"band": ..., "optimizer": ...}``: the band's weights by state-dict name and the optimizer's
  state keyed by parameter name (``torch.distributed.checkpoint.state_dict.get_state_dict`` with
  ``ignore_frozen_params``: frozen weights come from the base model). Each rank writes its shards.
* ``scheduler.json`` (and ``scheduler.safetensors`` if its state holds tensors) as in the
  one-process format (:mod:`fastmid.train.checkpoint`).
* ``sharded.json``: the world size, the optimizer, and the RNG states of every rank.
* ``trainer_state.json`` last, as in the one-process format (it marks a complete checkpoint).

Atomicity: rank 0 creates ``step-<N>.tmp-*`` (:func:`fastmid.train.runfolder.atomic_folder`), every
rank writes its DCP files into it, and after a barrier rank 0 writes the JSON files, fsyncs every
file and folder, renames the folder to ``step-<N>`` and fsyncs ``checkpoints/``. A kill during a
save leaves only a ``.tmp-*`` folder, which the next start removes; ``--resume latest`` finds the
previous complete checkpoint.

Resume (:func:`load_sharded`):

* the same number of processes: everything as saved, RNG states per rank (exact);
* another number (2 -> 1, 1 -> 2 ...): DCP reshards the band weights and torch AdamW's states
  (plain tensors of the parameter's shape). torchao's low-bit states are not resharded: a state's
  8-bit blocks and scales belong to the shard that wrote them, and torchao gives a tensor 8-bit or
  fp32 state by its local shard's size (torchao issue #4912), so the weights resume and the
  optimizer starts fresh, said in one warning line and in ``summary.json``;
* a one-process checkpoint (:mod:`fastmid.train.checkpoint`'s format) in several processes: the
  band from ``band.safetensors``; torch AdamW's state from ``optimizer.safetensors`` (parameter
  index ``i`` is the ``i``-th trainable name); other optimizers start fresh, as above.

Security: every file fastmid writes is safetensors or JSON; DCP's ``.metadata`` file is a pickle,
which PyTorch unpickles on load: resume only from checkpoints you trust (README, security note).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from fastmid.train.checkpoint import (
    CheckpointError,
    TrainerState,
    capture_rng,
    list_checkpoints,
    load_checkpoint_parts,
    save_state_json,
)
from fastmid.train.distributed import DistContext
from fastmid.train.runfolder import atomic_folder, remove_folder

SHARDED_FILE = "sharded.json"
SHARDED_FORMAT = 1
# Optimizers whose every state tensor has its parameter's shape (or is a scalar): DCP reshards them.
RESHARDABLE = ("adamw",)


def is_sharded(path: Path) -> bool:
    """Whether the checkpoint folder ``path`` was written by several processes."""
    return (Path(path) / SHARDED_FILE).is_file()


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)


def save_sharded(
    checkpoints_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    keep_last: int,
    ctx: DistContext,
    optim: str,
) -> Path:
    """Write ``step-<N>`` of a run of several processes (a collective: every rank calls it).

    Args:
        checkpoints_dir: ``<output>/checkpoints``.
        model: the FSDP2-sharded model; its trainable parameters are saved.
        optimizer, scheduler: the run's.
        state: the loop position (``state.rng`` is replaced by rank 0's RNG state).
        keep_last: complete checkpoints to keep (>= 1).
        ctx: this rank's context.
        optim: the ``--optim`` name, recorded for resume.

    Returns:
        The checkpoint folder.

    Raises:
        CheckpointError: the disk filled up (rank 0's message; the previous checkpoints are
            intact).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / f"step-{state.step}"
    band, optim_state = get_state_dict(model, optimizer, options=_options())
    rngs = _gather(ctx, capture_rng())
    state = dataclasses.replace(state, rng=rngs[0])
    if not ctx.is_main:
        tmp = Path(ctx.broadcast(None))
        dcp.save({"band": band, "optimizer": optim_state}, checkpoint_id=tmp / "dcp")
        ctx.barrier()  # rank 0 writes the JSON files and renames
        ctx.barrier()
        return final
    previous = [p for p in list_checkpoints(checkpoints_dir) if p != final]
    kept = f"; {previous[-1].name} is intact" if previous else ""
    with atomic_folder(final, what="checkpoint", error=CheckpointError, keep_note=kept) as tmp:
        ctx.broadcast(str(tmp))
        dcp.save({"band": band, "optimizer": optim_state}, checkpoint_id=tmp / "dcp")
        ctx.barrier()  # every rank's files are written
        save_state_json(scheduler, tmp, "scheduler")
        info = {
            "format": SHARDED_FORMAT,
            "world_size": ctx.world_size,
            "optim": optim,
            "rng_per_rank": rngs,
        }
        (tmp / SHARDED_FILE).write_text(json.dumps(info) + "\n")
        (tmp / "trainer_state.json").write_text(
            json.dumps(dataclasses.asdict(state), indent=1) + "\n"
        )  # last: it marks a complete checkpoint
    ctx.barrier()
    others = [p for p in list_checkpoints(checkpoints_dir) if p != final]
    for old in others[: max(0, len(others) - (keep_last - 1))]:
        remove_folder(old)
    return final


def _gather(ctx: DistContext, obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


@dataclasses.dataclass
class ShardedResume:
    """What :func:`load_sharded` restored.

    Attributes:
        state: the saved :class:`TrainerState` (``rng``: this rank's RNG state to restore).
        saved_world_size: processes of the run that wrote the checkpoint (1: one-process format).
        optimizer_restored: False when the optimizer starts fresh (another world size with
            torchao's low-bit states, or a one-process checkpoint of an optimizer other than
            torch AdamW).
    """

    state: TrainerState
    saved_world_size: int
    optimizer_restored: bool


def load_sharded(
    path: Path,
    model: torch.nn.Module,
    trainable_names: list[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ctx: DistContext | None,
    optim: str,
) -> ShardedResume:
    """Resume from ``path`` in this run's processes (a collective when ``ctx`` is given).

    ``path`` is a sharded checkpoint (any world size, ``ctx`` None for one process), or a
    one-process checkpoint when ``ctx`` is given. Everything is checked and read before the live
    model, optimizer and scheduler change.

    Raises:
        CheckpointError: a damaged or mismatching checkpoint (the file and what to do named).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    world = ctx.world_size if ctx else 1
    rank = ctx.rank if ctx else 0
    if not is_sharded(path):
        return _load_one_process(path, model, trainable_names, optimizer, scheduler, optim)
    try:
        info = json.loads((path / SHARDED_FILE).read_text())
        saved_world = int(info["world_size"])
        rngs = info["rng_per_rank"]
        state = TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: its {SHARDED_FILE} or trainer_state.json is damaged ({exc}); resume from "
            "an older checkpoint with --resume <output>/checkpoints/step-<M>"
        ) from None
    restore_optimizer = saved_world == world or optim in RESHARDABLE
    band, optim_state = get_state_dict(model, optimizer, options=_options())
    target: dict[str, Any] = {"band": band}
    if restore_optimizer:
        target["optimizer"] = optim_state
    try:
        dcp.load(target, checkpoint_id=path / "dcp", no_dist=ctx is None)
    except Exception as exc:  # DCP's errors share no base class; the first line says what
        raise CheckpointError(
            f"{path / 'dcp'}: the sharded checkpoint does not load ({str(exc).strip()[:300]}); "
            "resume with the run's own --model, band and --optim, or from an older checkpoint"
        ) from None
    set_state_dict(
        model,
        optimizer,
        model_state_dict=target["band"],
        optim_state_dict=target.get("optimizer", {}),
        options=dataclasses.replace(_options(), strict=False),
    ) if restore_optimizer else _set_band(model, target["band"])
    _load_scheduler(path, scheduler)
    state.rng = rngs[rank] if rank < len(rngs) and saved_world == world else rngs[0]
    return ShardedResume(state, saved_world, restore_optimizer)


def _set_band(model: torch.nn.Module, band: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(
        model, band, options=StateDictOptions(ignore_frozen_params=True, strict=False)
    )


def _load_scheduler(path: Path, scheduler: Any) -> None:
    from fastmid.train.checkpoint import load_state_json

    try:
        scheduler.load_state_dict(load_state_json(path, "scheduler", scheduler))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{path / 'scheduler.json'}: the scheduler state does not fit ({exc})"
        ) from None


def _load_one_process(
    path: Path,
    model: torch.nn.Module,
    trainable_names: list[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    optim: str,
) -> ShardedResume:
    """A one-process checkpoint into a sharded run: full tensors, distributed by DCP's
    ``set_state_dict(full_state_dict=True)`` (every rank reads the files)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state, band, opt_state = load_checkpoint_parts(path, trainable_names, optimizer)
    full = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False)
    restore_optimizer = optim in RESHARDABLE and opt_state is not None
    optim_sd: dict[str, Any] = {}
    if restore_optimizer:
        # torch numbers a state's parameters in the order of the optimizer's groups (decayed
        # weights, then norms and biases); this run's optimizer has the same groups, so index i
        # is the i-th parameter of its groups, whose name the model gives.
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        groups = [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [order[i] for i in g["params"]],
            }
            for g in opt_state["param_groups"]
        ]
        optim_sd = {
            "state": {order[int(i)]: s for i, s in opt_state["state"].items()},
            "param_groups": groups,
        }
    if restore_optimizer:
        set_state_dict(
            model, optimizer, model_state_dict=band, optim_state_dict=optim_sd, options=full
        )
    else:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, band, options=full)
    _load_scheduler(path, scheduler)
    return ShardedResume(state, 1, restore_optimizer)
