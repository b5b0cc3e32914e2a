"""Several processes: the process group, FSDP2 sharding, each rank's share of the data, reductions.

``fastmid train`` runs as one process, or as ``N`` processes started by ``torchrun`` (``torchrun
--nproc-per-node N -m fastmid train ...`` or ``fastmid train --nproc N``), one per GPU, on one node
or several. This module is everything the recipe needs to know about the second case; the recipe
calls it and stays one readable file.

Layout (torchtitan's ``torchtitan/distributed/``, adapted to a loss that runs the decoder and
``lm_head`` apart; :func:`shard_model`):

- every decoder layer is one FSDP2 unit (``fully_shard``): its weights are all-gathered just
  before its forward (the next layer's gather overlaps the current layer's compute, FSDP2's
  implicit prefetch) and resharded after it;
- the input embeddings are one unit, unless they are tied to ``lm_head``;
- the root unit holds what is left: the final norm and ``lm_head`` (and tied embeddings). The
  loss computes ``lm_head`` on the supervised positions only, so it runs inside the root's
  forward (:func:`fastmid.models.loss.route_loss_through_forward`), where the root's weights are
  gathered. The root is not resharded after forward (FSDP2's default for a root): ``lm_head`` is
  needed again at the start of backward.

Exactness (the README's "Several GPUs"): each rank takes ``grad_accum`` consecutive micro-batches
of every global window of ``grad_accum x world_size`` micro-batches, in the order of one process;
the loss is the sum of token losses over the global window divided by the global number of
supervised tokens (an all-reduce of the count), and FSDP2's reduce-scatter *sums* the gradients
(divide factor 1, sum reduction: PyTorch issue #162338, gloo sums where NCCL averages, so the
factor is set by hand). N processes then compute the gradient of one process with that window.

Optimizers under FSDP2: torch ``adamw`` and torchao's ``ao_adamw8bit``/``ao_adamw4bit`` (DTensor
aware). bitsandbytes' 8-bit optimizers fail on DTensor parameters (bitsandbytes issues #89 and
#1633), so they are refused with one line.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fastmid.errors import FastmidError

# The --optim values that run on DTensor parameters.
FSDP_OPTIMIZERS: tuple[str, ...] = ("adamw", "ao_adamw8bit", "ao_adamw4bit")

# torchao's low-bit AdamW keeps an 8-bit (4-bit) state only for a tensor whose *local* shard has
# at least 4096 elements and a multiple of the block size; every other tensor keeps fp32 state
# (torchao/optim/adam.py, ``_new_buffer``; torchao issue #4912 for what that means under FSDP2).
TORCHAO_MIN_QUANT_NUMEL = 4096
TORCHAO_BLOCK_SIZE = {"ao_adamw8bit": 256, "ao_adamw4bit": 128}


class DistributedError(FastmidError, RuntimeError):
    """A setting or a state that several processes cannot run with (one line, exit 2)."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in a multi-process run.

    Attributes:
        rank: global rank, 0..world_size-1; local_rank: rank on this node (its GPU index).
        world_size: processes in the run (``torchrun``'s ``WORLD_SIZE``), at least 2.
        backend: ``nccl`` on CUDA, ``gloo`` on CPU.
        device: this rank's device (``cuda:<local_rank>`` or ``cpu``).
    """

    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes the run folder, prints and shows progress."""
        return self.rank == 0

    def sum(self, values: Iterable[float]) -> list[float]:
        """The sums over all ranks of ``values`` (one all-reduce, float64)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def max(self, values: Iterable[float]) -> list[float]:
        """The maxima over all ranks of ``values`` (one all-reduce, float64)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def barrier(self) -> None:
        """Wait until every rank is here."""
        dist.barrier(device_ids=[self.local_rank] if self.backend == "nccl" else None)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled: only for fastmid's own small values)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def window(self, start: int, grad_accum: int) -> list[int]:
        """This rank's micro-batch positions in the global window that begins at ``start``: the
        ``grad_accum`` consecutive positions ``start + rank * grad_accum ...``."""
        first = start + self.rank * grad_accum
        return list(range(first, first + grad_accum))

    def check_shared_folder(self, folder: Any) -> None:
        """Check that every rank sees ``folder`` (the run folder) as the same folder: rank 0
        writes a marker file, every rank reads it back. Checkpoints are written by every rank
        into one folder, so on several nodes it must be on a shared filesystem.

        Raises:
            DistributedError: on every rank, naming the ranks that do not see the marker.
        """
        import uuid
        from pathlib import Path

        marker = Path(folder) / ".fastmid-shared-check"
        token = self.broadcast(uuid.uuid4().hex if self.is_main else None)
        if self.is_main:
            marker.write_text(token)
        self.barrier()
        try:
            seen = marker.read_text() == token
        except OSError:
            seen = False
        missing = [r for r, ok in enumerate(self.gather_flags(seen)) if not ok]
        self.barrier()
        if self.is_main:
            marker.unlink(missing_ok=True)
        if missing:
            raise DistributedError(
                f"--output {folder}: rank(s) {missing} do not see the run folder rank 0 wrote; "
                "on several nodes put --output on a filesystem every node mounts at the same path"
            )

    def gather_flags(self, flag: bool) -> list[bool]:
        """Every rank's ``flag``, in rank order (one all-gather)."""
        t = torch.zeros(self.world_size, dtype=torch.float64, device=self._comm_device)
        t[self.rank] = float(flag)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [bool(v) for v in t.tolist()]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` (or another launcher setting ``WORLD_SIZE``/``RANK``) started us."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def world_size_from_env() -> int:
    """``WORLD_SIZE`` of the launcher, 1 when not launched by one."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def init_from_env(timeout_s: float = 600.0) -> DistContext | None:
    """Join the process group of a ``torchrun`` launch; None for a one-process run.

    A launch of one process (``--nproc-per-node 1``) is a one-process run: no group, no sharding.
    The backend is NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``), else gloo.

    Args:
        timeout_s: how long a collective waits for the other ranks before it fails (seconds);
            a rank that died therefore stops the others within this bound even when the launcher
            does not.

    Raises:
        DistributedError: more processes on a node than GPUs.
    """
    world = world_size_from_env()
    if world < 2:
        return None
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"--nproc: local rank {local_rank} has no GPU ({torch.cuda.device_count()} "
                "visible); start at most one process per GPU"
            )
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", torch.device("cuda", local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=None
        )
    return DistContext(rank, local_rank, world, backend, device)


def shutdown() -> None:
    """Leave the process group (when one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_settings(cfg: Any, world_size: int) -> None:
    """Refuse, in one line each, what several processes cannot run (before anything loads).

    Args:
        cfg: the resolved :class:`fastmid.config.TrainConfig`.
        world_size: processes in the run.

    Raises:
        DistributedError: an ``--optim`` that fails on DTensor parameters, the step in backward,
            optimizer offload.
    """
    if world_size < 2:
        return
    if cfg.optim not in (*FSDP_OPTIMIZERS, "auto"):  # auto resolves to ao_adamw8bit here
        raise DistributedError(
            f"--optim: {cfg.optim} cannot step FSDP2's sharded (DTensor) parameters "
            f"(bitsandbytes issues #89, #1633); with several processes use "
            f"{', '.join(FSDP_OPTIMIZERS)}"
        )
    if cfg.optimizer_in_backward:
        raise DistributedError(
            "--optimizer-in-backward: FSDP2 reduce-scatters a gradient after its accumulate hook "
            "has fired, so the step cannot run inside backward with several processes; drop "
            "--optimizer-in-backward (FSDP2 already keeps 1/N of the gradients per rank)"
        )
    if cfg.precision == "bf16":
        raise DistributedError(
            "--precision bf16: torchao's low-bit AdamW fails on bf16 DTensor shards (torchao "
            "0.18: a dtype error in its step; pytorch/ao#3314); with several processes use "
            "--precision bf16-master (bf16 compute, fp32 band masters)"
        )
    if cfg.optimizer_offload:
        raise DistributedError(
            "--optimizer-offload: not available with several processes; drop it (FSDP2 already "
            "keeps 1/N of the optimizer states per rank)"
        )


def shard_model(model: torch.nn.Module, ctx: DistContext, precision: str) -> list[str]:
    """Apply FSDP2 to ``model`` in fastmid's layout (module docstring); returns the units' names.

    Call after the band, the execution policy and the kernels are installed, before the
    optimizer is built (it must see the sharded parameters).

    Args:
        model: a ``*ForCausalLM`` of a supported family on the CPU or on ``ctx.device``.
        ctx: this rank's context.
        precision: the resolved ``--precision``. On CUDA, ``bf16-master`` gathers the fp32 band
            weights in bf16 and reduces gradients in fp32 (``MixedPrecisionPolicy(param_dtype=
            bf16, reduce_dtype=fp32)``); ``bf16`` reduces in fp32. On CPU nothing is cast.

    Returns:
        The units, in order: ``model.layers.0`` ... , the embeddings when separate, ``<root>``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from fastmid.models.families import decoder_layers, input_embeddings, output_head
    from fastmid.models.loss import route_loss_through_forward

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    mp = MixedPrecisionPolicy()
    if ctx.device.type == "cuda" and precision == "bf16-master":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif ctx.device.type == "cuda" and precision == "bf16":
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    names = {id(m): n for n, m in model.named_modules()}
    units: list[str] = []
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
        units.append(names[id(layer)])
    embed, head = input_embeddings(model), output_head(model)
    if embed.weight is not getattr(head, "weight", None):
        fully_shard(embed, mesh=mesh, mp_policy=mp)
        units.append(names[id(embed)])
    fully_shard(model, mesh=mesh, mp_policy=mp)
    units.append("<root>")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum, never average: the loss is already divided by the global token count.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    route_loss_through_forward(model)
    return units


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients in the coming backward (``sync``) or accumulate them unsharded
    (the micro-batches before the last of a step), so a step costs one reduction."""
    set_sync = getattr(model, "set_requires_gradient_sync", None)
    if set_sync is not None:
        set_sync(sync)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective: every rank must call it); any other tensor as
    it is."""
    gather = getattr(t, "full_tensor", None)
    return gather() if gather is not None else t


def full_state_dict(model: torch.nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0 (CPU tensors); ``{}`` on the other ranks.

    A collective: every rank must call it. Tied weights appear under each of their names.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return state if ctx.is_main else {}


def fp32_state_parameters(named: Iterable[tuple[str, torch.nn.Parameter]], optim: str) -> list[str]:
    """The parameters whose torchao low-bit state stays fp32 on this rank (its local shard is
    under 4096 elements or not a multiple of the block size), by name; ``[]`` for other
    optimizers. The same parameter can keep 8-bit state in one world size and fp32 in another
    (torchao issue #4912): the recipe logs this list."""
    if optim not in TORCHAO_BLOCK_SIZE:
        return []
    return [
        name for name, p in named if not _low_bit_state(local_tensor(p.detach()).numel(), optim)
    ]


def sharding_changed_state(
    named: Iterable[tuple[str, torch.nn.Parameter]], optim: str
) -> list[str]:
    """The parameters that keep fp32 torchao state on this rank only because they are sharded:
    one process would give them low-bit state (their whole numel qualifies, their local shard
    does not). The recipe says so in one line: the run's state precision differs from a
    one-process run's for these."""
    return [
        name
        for name, p in named
        if _low_bit_state(p.numel(), optim)
        and not _low_bit_state(local_tensor(p.detach()).numel(), optim)
    ]


def _low_bit_state(numel: int, optim: str) -> bool:
    block = TORCHAO_BLOCK_SIZE.get(optim)
    return block is not None and numel >= TORCHAO_MIN_QUANT_NUMEL and numel % block == 0


def check_launch(nproc: int) -> None:
    """Under ``torchrun``, ``--nproc`` (when given) must be the launcher's processes per node.

    Raises:
        DistributedError: they differ.
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if launched_by_torchrun() and nproc > 1 and nproc != local:
        raise DistributedError(
            f"--nproc {nproc}: torchrun started {local} process(es) on this node; drop --nproc "
            "when you launch with torchrun (its --nproc-per-node decides)"
        )


def launch(cfg: Any) -> int:
    """Start ``cfg.nproc`` processes of ``fastmid train`` on this node, as ``torchrun
    --standalone --nproc-per-node N -m fastmid train CONFIG`` would, and wait for them.

    The processes read ``cfg`` from a temporary YAML file (so they train exactly ``cfg``,
    whatever the command line looked like). Each prints its own errors; when one fails the
    others are stopped, and the launcher's own report (a traceback of the launcher) is left out.

    Args:
        cfg: the :class:`fastmid.config.TrainConfig` of the run (``nproc > 1``).

    Returns:
        The exit status for the command: 0, the first failed process's status, or 130 when a
        signal (Ctrl-C) stopped the launcher and with it the processes.
    """
    import logging
    import sys
    import tempfile
    import uuid
    from pathlib import Path

    import yaml
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent logs each failure with a traceback of its own; the ranks have said what failed.
    # Its modules' loggers carry levels of their own, so each is set.
    for name in [*logging.Logger.manager.loggerDict, "torch.distributed.elastic"]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="fastmid-launch-") as tmp:
        config = Path(tmp) / "config.yaml"
        # Every field, --overwrite and --resume included (config.yaml of a run leaves them out).
        config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        launch_config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=cfg.nproc,
            run_id=str(uuid.uuid4()),
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
            max_restarts=0,
            start_method="spawn",
        )
        try:
            elastic_launch(launch_config, entrypoint=sys.executable)(
                "-m", "fastmid", "train", str(config)
            )
        except ChildFailedError as exc:
            _rank, failure = exc.get_first_failure()
            return failure.exitcode if failure.exitcode > 0 else 1
        except SignalException as exc:
            # Ctrl-C (or SIGTERM) reached the launcher, which stopped the processes.
            print(
                f"interrupted ({exc.sigval.name}): stopped the {cfg.nproc} processes",
                file=sys.stderr,
            )
            return 130
    return 0
