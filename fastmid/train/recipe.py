"""``fastmid train``: the whole Mid-Block SFT run as one class, read top to bottom.

The shape is torchtune's single-device recipe (``recipes/full_finetune_single_device.py``):
:meth:`MidBlockRecipe.setup` builds everything, :meth:`~MidBlockRecipe.train` runs the steps,
:meth:`~MidBlockRecipe.save_checkpoint` and :meth:`~MidBlockRecipe.export` write, and
:meth:`~MidBlockRecipe.summary` reports. One optimizer step is :func:`train_step`, a function of
plain inputs (model, micro-batches, optimizer, scheduler, clip) that returns its record; the
recipe knows no model family and the band knows no data (design section 2).

The loss of a step is ``sum of token losses over the window / supervised tokens in the window``
(design section 4), so a micro-batch of 2 equals 2 accumulated micro-batches of 1 exactly.
Gradients are clipped by global L2 norm over the band, then the optimizer and the schedule step.

Nothing is lost: checkpoints are atomic; SIGINT finishes the step in flight, saves and prints the
resume command; a NaN/inf loss or gradient norm stops the run before the optimizer step, and
non-finite band weights after a step stop it before anything is saved or exported; the last good
checkpoint stays and the message says how to resume.

Run folder (design section 7): ``config.yaml``, ``plan.json``, ``metrics.jsonl``,
``checkpoints/step-<N>/``, ``final/``, ``band_delta.safetensors``, ``eval_before.json``,
``summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import resource
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fastmid.config import (
    PATH_FIELDS,
    ConfigError,
    TrainConfig,
    dump_yaml,
    resolve_auto,
    resolve_path_value,
    resolve_paths,
    resume_keys,
)
from fastmid.data import (
    DataError,
    LengthGroupedSampler,
    build_sft_examples,
    collate_batch,
    collate_packed,
    load_eval_problems,
    pack_rows,
    packing_stats,
    pad_token_id,
    split_eval,
)
from fastmid.errors import FastmidError, first_line
from fastmid.eval.base_cache import base_eval_key, load_base_eval, save_base_eval
from fastmid.eval.exact_match import evaluate_accuracy, token_mean_loss
from fastmid.models.band import (
    BandPlan,
    ExecutionPolicy,
    ParameterCounts,
    apply_band,
    count_parameters,
    install_execution_policy,
)
from fastmid.models.families import decoder_layers
from fastmid.models.fused_frozen import fuse_frozen_layers, unfuse_frozen_layers
from fastmid.models.loading import (
    default_device,
    load_model_and_tokenizer,
    replay_library_notices,
    weights_folder,
)
from fastmid.models.lora import LoraPlan, inject_lora, lora_counts, merged_state_dict, plan_lora
from fastmid.models.loss import batch_loss_sum, count_supervised, packed_attention_path
from fastmid.models.patching import PatchReport, patch_model, resolve_kernels_flag
from fastmid.models.precision import PrecisionPolicy, restore_stored_values
from fastmid.progress import make_progress
from fastmid.train.checkpoint import (
    CheckpointError,
    TrainerState,
    capture_rng,
    clean_partial_checkpoints,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from fastmid.train.distributed import (
    DistContext,
    check_settings,
    fp32_state_parameters,
    full_state_dict,
    full_tensor,
    init_from_env,
    local_tensor,
    set_gradient_sync,
    shard_model,
    sharding_changed_state,
    shutdown,
)
from fastmid.train.export import clean_partial_exports, export_hf_folder, save_band_delta
from fastmid.train.lossplot import write_loss_plot
from fastmid.train.optim import (
    OptimizerError,
    OptimizerInBackward,
    build_optimizer,
    build_scheduler,
    check_offload_device,
    is_compiled_optimizer,
    lr_factor,
)
from fastmid.train.runfolder import LOCK_NAME, acquire_run_lock, clear_run_folder
from fastmid.train.sharded_checkpoint import is_sharded, load_sharded, save_sharded
from fastmid.train.trackers import Trackers

# What a run writes before its first checkpoint (``.lock`` aside).
_UNSAVED_RUN_FILES = {
    "config.yaml",
    "plan.json",
    "metrics.jsonl",
    "eval_before.json",
    "checkpoints",
    "train.log",
    "loss.png",
    "tensorboard",
}


# train.log: fastmid's own lines (the header, a line every --log-every steps, evaluations, the
# outcome) and the warnings of the libraries a run drives, which stay off the console.
_RUN_LOG = logging.getLogger("fastmid.run")
# Where train.log is not open (ranks > 0 of several processes), the run's lines go nowhere rather
# than to Python's last-resort stderr handler.
_RUN_LOG.addHandler(logging.NullHandler())
_LIBRARY_LOGGERS = ("transformers", "datasets", "bitsandbytes", "torchao", "torch", "py.warnings")


@contextlib.contextmanager
def train_log(path: Path) -> Any:
    """Append ``path`` (``train.log``) with fastmid's run lines (INFO) and the WARNING records of
    transformers, datasets, bitsandbytes, torchao, torch and Python ``warnings`` (which, while the
    run lasts, go to the file instead of the console), the libraries' import notices held since
    start-up included. Handlers are removed on exit.
    """
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [_RUN_LOG, *(logging.getLogger(n) for n in _LIBRARY_LOGGERS)]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    _RUN_LOG.setLevel(logging.INFO)
    handler.setLevel(logging.INFO)  # the libraries' own levels (WARNING by default) still apply
    logging.getLogger("py.warnings").propagate = False
    for lg in loggers:
        lg.addHandler(handler)
    replay_library_notices(handler)  # import notices logged before the file opened
    logging.captureWarnings(True)
    try:
        yield _RUN_LOG
    finally:
        logging.captureWarnings(False)
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
        handler.close()


class RunFolderError(FastmidError, RuntimeError):
    """The output folder already holds a run (and neither --overwrite nor --resume was given)."""


class NonFiniteLossError(FastmidError, RuntimeError):
    """A NaN/inf loss, gradient norm or band weight; nothing of that step was saved (exit 1)."""

    exit_code = 1


class RankZeroError(FastmidError, RuntimeError):
    """Raised on the other ranks when rank 0 stopped on an error of its own (the run folder's
    checks): the same text and exit status; rank 0 alone prints it (``repeated``)."""

    repeated = True

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrainingInterrupted(FastmidError, RuntimeError):
    """SIGINT: a checkpoint was saved; the message holds the resume command (exit 130)."""

    exit_code = 130


# ---- telemetry ---------------------------------------------------------------------------------


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


# ---- one optimizer step -------------------------------------------------------------------------


@dataclass
class StepResult:
    """What one :func:`train_step` did.

    Attributes:
        loss: token-mean loss of the window (nats per supervised token; 0 when none).
        grad_norm: global L2 norm of the band's gradients before clipping.
        lr: the learning rate the step used.
        tokens: non-padding tokens in the window; supervised_tokens: tokens with a label.
        padded_tokens: tokens the step computed on, padding included (``B x T`` summed over the
            window's micro-batches).
        grad_bytes: the most bytes of band gradients alive at once during the step (storage
            sizes of ``.grad``): the whole band's after backward for an ordinary step, the
            largest sampled in the hooks for :class:`~fastmid.train.optim.OptimizerInBackward`.
    """

    loss: float
    grad_norm: float
    lr: float
    tokens: int
    supervised_tokens: int
    grad_bytes: int = 0
    padded_tokens: int = 0


class NonFiniteStep(NonFiniteLossError):
    """Raised by :func:`train_step`: a non-finite loss or gradient norm (before the optimizer
    step) or band weights (after it); the recipe re-raises it with the run's context.

    Attributes:
        what: what was not finite; value: its value; micro_batch: index in the window, or None.
    """

    def __init__(
        self, what: str, value: float, micro_batch: int | None = None, stepped: bool = False
    ) -> None:
        super().__init__(f"non-finite {what} ({value})")
        self.what, self.value, self.micro_batch = what, value, micro_batch
        self.stepped = stepped


def train_step(
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    clip_params: list[torch.nn.Parameter],
    grad_clip: float,
    fused: bool = False,
    precision: PrecisionPolicy | None = None,
    dist: DistContext | None = None,
) -> StepResult:
    """One optimizer step over a window of micro-batches (gradient accumulation).

    Each micro-batch's token-loss sum is divided by the supervised tokens of the *whole window*
    before backward, so the accumulated gradient is that of the window's token-mean loss. A
    window without supervised tokens steps the schedule but not the optimizer.

    Args:
        model: the model, in train mode, with the band's execution policy installed.
        micro_batches: collated batches on the model's device (``input_ids``, ``attention_mask``,
            ``labels``: (B, T) int64).
        optimizer, scheduler: stepped once each.
        clip_params: the parameters whose gradients are clipped and checked (the band).
        grad_clip: global L2 clip; 0 disables clipping (the norm is still measured).
        fused: run the loss through the fused linear cross-entropy kernel.
        precision: the forward passes run under its autocast (``bf16-master``); backward runs
            outside it, as ``torch.autocast`` requires. None: no autocast.
        dist: this rank's context when several processes train (FSDP2-sharded ``model``):
            ``micro_batches`` are this rank's share of the global window, the loss is divided by
            the global supervised-token count, gradients are reduce-scattered once (after the
            last micro-batch), the norm is the global one and the record's loss and token counts
            are global. None: one process.

    Returns:
        The step's :class:`StepResult`.

    Raises:
        NonFiniteStep: a NaN/inf loss (naming the micro-batch), gradient norm, or band weight
            after the update. For the first two the optimizer did not step.
    """
    supervised = sum(count_supervised(b["labels"]) for b in micro_batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
    padded = sum(b["input_ids"].numel() for b in micro_batches)
    if dist is not None:
        supervised, tokens, padded = (int(v) for v in dist.sum([supervised, tokens, padded]))
    if isinstance(optimizer, OptimizerInBackward):
        result = _train_step_in_backward(
            model, micro_batches, optimizer, scheduler, clip_params, fused, precision, tokens,
            supervised,
        )  # fmt: skip
        result.padded_tokens = padded
        return result
    optimizer.zero_grad(set_to_none=True)
    loss_total = 0.0
    bad: tuple[int, float] | None = None  # (micro-batch, loss) of the first non-finite loss
    for k, batch in enumerate(micro_batches):
        if dist is not None:
            set_gradient_sync(model, k == len(micro_batches) - 1)
        with precision.autocast(batch["input_ids"].device) if precision else nullcontext():
            loss_sum, _n = micro_batch_loss(model, batch, fused)
        if not torch.isfinite(loss_sum):
            if dist is None:
                raise NonFiniteStep("loss", float(loss_sum.detach()), k)
            # Every rank must reach the same collectives: go on, stop all ranks below.
            bad = bad or (k, float(loss_sum.detach()))
        if supervised > 0:
            (loss_sum / supervised).backward()
        loss_total += float(loss_sum.detach())
    if dist is not None:
        loss_total, any_bad = dist.sum([loss_total, bad is not None])
        if any_bad:
            k, value = bad if bad is not None else (None, float("nan"))
            raise NonFiniteStep("loss" if bad else "loss on another rank", value, k)
    params = [p for p in clip_params if p.grad is not None]
    grad_bytes = sum(local_tensor(p.grad).untyped_storage().nbytes() for p in params)
    grad_norm = 0.0
    if params:
        grad_norm = _clip_global_norm(params, grad_clip)
    if not math.isfinite(grad_norm):
        raise NonFiniteStep("gradient norm", grad_norm)
    lr = float(optimizer.param_groups[0]["lr"])  # torchao keeps it as a 0-d tensor
    if supervised > 0:
        optimizer.step()
        _check_weights(params, dist)
    scheduler.step()
    return StepResult(
        loss=loss_total / supervised if supervised else 0.0,
        grad_norm=grad_norm,
        lr=lr,
        tokens=tokens,
        supervised_tokens=supervised,
        grad_bytes=grad_bytes,
        padded_tokens=padded,
    )


def _clip_global_norm(params: list[torch.nn.Parameter], grad_clip: float) -> float:
    """Clip the gradients of ``params`` by their global L2 norm (``grad_clip``; 0: measure only)
    and return the norm before clipping. Sharded (DTensor) gradients give a partial norm per
    rank: it is made whole (a collective) before the clip, so every rank clips by the norm over
    all shards (as ``torch.nn.utils.clip_grad_norm_`` does for one process)."""
    grads = [p.grad for p in params]
    total = full_tensor(torch.nn.utils.get_total_norm(grads, 2.0))
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def _check_weights(params: list[torch.nn.Parameter], dist: DistContext | None = None) -> None:
    """An infinite learning rate or an overflowing update leaves finite gradients but NaN
    weights; catching it here keeps them out of every checkpoint and export. With several
    processes the squared norms of the local shards are summed over the ranks, so all stop."""
    if not params:
        return
    with torch.no_grad():
        squares = sum(float(local_tensor(p).norm()) ** 2 for p in params)  # float64: no overflow
    if dist is not None:
        (squares,) = dist.sum([squares])
    weight_norm = math.sqrt(squares) if math.isfinite(squares) else squares
    if not math.isfinite(weight_norm):
        raise NonFiniteStep("band weights after the update", weight_norm, stepped=True)


def _train_step_in_backward(
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    optimizer: OptimizerInBackward,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    clip_params: list[torch.nn.Parameter],
    fused: bool,
    precision: PrecisionPolicy | None,
    tokens: int,
    supervised: int,
) -> StepResult:
    """:func:`train_step` when each parameter steps inside backward: one micro-batch, no
    clipping (:func:`fastmid.config.validate` refuses the rest). The hooks gather the squared
    norms and a non-finite flag on the device; both are read once, after backward. A non-finite
    gradient means some parameters already stepped on it: the step is reported as such and
    nothing of it may be saved."""
    if len(micro_batches) != 1:
        raise ValueError(
            f"--optimizer-in-backward steps once per backward: got {len(micro_batches)} "
            "micro-batches for one step (--grad-accum must be 1)"
        )
    batch = micro_batches[0]
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.begin_step()
    try:
        with precision.autocast(batch["input_ids"].device) if precision else nullcontext():
            loss_sum, _n = micro_batch_loss(model, batch, fused)
        if not torch.isfinite(loss_sum):
            raise NonFiniteStep("loss", float(loss_sum.detach()), 0)
        if supervised > 0:
            (loss_sum / supervised).backward()  # every band parameter steps in here
    finally:
        grad_norm, finite = optimizer.end_step()
    if not finite or not math.isfinite(grad_norm):
        raise NonFiniteStep("gradient", grad_norm, 0, stepped=True)
    if supervised > 0:
        optimizer.step()  # nothing to do; keeps the schedule's step bookkeeping in order
        _check_weights(clip_params)
    scheduler.step()
    return StepResult(
        loss=float(loss_sum.detach()) / supervised if supervised else 0.0,
        grad_norm=grad_norm,
        lr=lr,
        tokens=tokens,
        supervised_tokens=supervised,
        grad_bytes=optimizer.grad_bytes_peak,
    )


def micro_batch_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], fused: bool
) -> tuple[torch.Tensor, int]:
    """Token-sum loss and supervised count of one micro-batch (:func:`batch_loss_sum`)."""
    return batch_loss_sum(model, batch, fused)


# ---- the run ------------------------------------------------------------------------------------


@dataclass
class MicroBatchRef:
    """Where a micro-batch comes from: position in the run, epoch, example indices (with
    ``--packing``: the rows, each a list of example indices)."""

    position: int
    epoch: int
    indices: list[Any]


class MidBlockRecipe:
    """One Mid-Block SFT run: ``setup()``, then ``train()``, ``export()``, ``summary()``.

    Build order in :meth:`setup`: output folder check -> model and tokenizer -> band plan ->
    ``apply_band`` -> execution policy (prefix ``no_grad``, checkpointing) -> kernels -> data ->
    optimizer and schedule -> run folder -> resume.
    """

    def __init__(
        self, cfg: TrainConfig, console: Console | None = None, dist: DistContext | None = None
    ) -> None:
        # Absolute paths, so config.yaml and the checkpoints work from any directory; precision
        # and optimizer resolved for this machine, so config.yaml records what ran.
        self.cfg = resolve_auto(resolve_paths(cfg), default_device().type, distributed=bool(dist))
        self.precision = PrecisionPolicy.from_name(self.cfg.precision)
        self.dist = dist  # None: one process; else this rank of an FSDP2 run
        check_settings(self.cfg, dist.world_size if dist else 1)
        if self.cfg.optimizer_offload:  # refused before anything loads where there is no GPU
            check_offload_device(default_device().type == "cuda")
        # Rank 0 alone prints, shows progress and writes the run folder.
        self.is_main = dist is None or dist.is_main
        self.console = (console or Console(stderr=True)) if self.is_main else Console(quiet=True)
        self.out = Path(self.cfg.output)
        self._replace_folder = False  # --overwrite, or the files of a run that saved nothing
        self.device = torch.device("cpu")
        self.model: Any = None  # a transformers *ForCausalLM once setup() ran
        self.tokenizer: Any = None
        self.plan: BandPlan | None = None
        self.counts: ParameterCounts | None = None
        self.lora: LoraPlan | None = None  # --lora-rank: the adapters on the band's layers
        self.trainable: list[torch.nn.Parameter] = []
        self.trainable_names: list[str] = []
        self.policy: ExecutionPolicy | None = None
        self.kernel_report: PatchReport | None = None
        self.fused_loss = False
        self.data_stats: Any = None
        self.train_examples: list[dict[str, Any]] = []
        self.eval_examples: list[dict[str, Any]] = []
        self.pad_id = 0
        self.total_steps = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.state = TrainerState(
            step=0,
            micro_batches=0,
            tokens=0,
            supervised_tokens=0,
            elapsed_s=0.0,
            rng={},
            plan={},
            config=asdict(self.cfg),
        )
        self._epoch_order: tuple[int, list[list[int]]] | None = None
        self.trackers: Trackers | None = None
        self._interrupted = False
        self.units: list[str] = []  # FSDP2 units (several processes)
        self.optimizer_restarted = False  # resumed across world sizes without optimizer state
        self.padded_tokens = 0  # tokens computed on (padding included) in this process's steps
        self._train_s = 0.0  # seconds of this process's steps
        self.fuse_report: Any = None  # fastmid.models.fused_frozen.FuseReport after setup()
        self.packing_attention: str | None = None  # how packed rows attend (--packing)
        self.fp32_state: list[str] = []  # torchao parameters whose state stays fp32 on this rank

    def _on_main(self, fn: Any) -> Any:
        """Run ``fn`` on rank 0 only and return its result there; a fastmid error it raises is
        raised on every rank (rank 0 sends its text), so all ranks stop together."""
        if self.dist is None:
            return fn()
        error, result = None, None
        if self.dist.is_main:
            try:
                result = fn()
            except FastmidError as exc:
                error = exc
        sent = self.dist.broadcast(None if error is None else (str(error), error.exit_code))
        if error is not None:
            raise error
        if sent is not None:
            raise RankZeroError(*sent)
        return result

    # ---- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Load and build everything; after it, :meth:`train` can run.

        Raises:
            RunFolderError, CheckpointError, ModelSourceError, BandError, DataError,
            ConfigError: each names the flag, file or row and what to do. Nothing in an existing
            run folder is deleted before model and data have loaded.
        """
        cfg = self.cfg
        self._on_main(self._clean_partial_saves)
        self._on_main(self._check_output)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        self.model, self.tokenizer = load_model_and_tokenizer(
            cfg.model,
            dtype=self.precision.weight_dtype,
            # Several processes: each loads on the CPU and FSDP2 moves only its shards to its GPU.
            device="cpu" if self.dist else None,
            trust_remote_code=cfg.trust_remote_code,
        )
        self.device = self.dist.device if self.dist else next(self.model.parameters()).device
        self.plan = BandPlan.parse(
            len(decoder_layers(self.model)), cfg.band, cfg.layers, cfg.placement, cfg.seed
        )
        extras = dict(
            train_embeddings=cfg.train_embeddings,
            train_lm_head=cfg.train_lm_head,
            train_final_norm=cfg.train_final_norm,
        )
        self.trainable = apply_band(self.model, self.plan, **extras)
        self.counts = count_parameters(self.model, self.plan, **extras)
        if cfg.lora_rank:
            if self.dist is not None:  # torchrun without --nproc; --nproc > 1 is refused earlier
                raise ConfigError(
                    "--lora-rank: LoRA adapters run on one process; start the run without "
                    "torchrun, or drop --lora-rank for the full-rank band"
                )
            self.lora = plan_lora(
                self.model,
                self.plan,
                cfg.lora_rank,
                cfg.lora_targets,
                cfg.lora_alpha,
                cfg.lora_match_budget,
            )
            # The band's own weights freeze; its adapters (drawn from the seeded generator) train.
            self.trainable = inject_lora(self.model, self.lora)
            self.counts = lora_counts(self.counts, self.plan, self.lora)
        # bf16-master: fp32 master weights for what trains, bf16 for the frozen rest.
        self.precision.cast_trainable(self.trainable)
        ids = {id(p) for p in self.trainable}
        named = dict(self.model.named_parameters())
        self.trainable_names = [n for n, p in named.items() if id(p) in ids]
        if self.precision.trained_dtype != self.precision.weight_dtype:
            # The masters start at the files' values, not the bf16-rounded load (see
            # fastmid.models.precision: on the bf16 grid small updates stay invisible).
            restore_stored_values(
                {n: named[n] for n in self.trainable_names}, weights_folder(cfg.model)
            )
        self.policy = install_execution_policy(
            self.model, self.plan, grad_checkpointing=cfg.grad_checkpointing
        )
        kernels_on = resolve_kernels_flag(cfg.kernels, self.device)  # type: ignore[arg-type]
        self.kernel_report = patch_model(self.model, kernels_on)
        self.fused_loss = self.kernel_report.loss == "fused_linear_cross_entropy"
        self.fuse_report = fuse_frozen_layers(
            self.model,
            self.plan,
            enabled=cfg.fuse_frozen and self.dist is None,
            off_reason=(
                "several processes (FSDP2): packed views do not survive fully_shard; frozen "
                "layers run unfused"
                if self.dist is not None
                else "--no-fuse-frozen"
            ),
            backend="auto" if kernels_on else "torch",
        )
        if cfg.fuse_frozen:
            self.console.print(self.fuse_report.describe(), highlight=False)
        if self.dist is not None:
            self.units = shard_model(self.model, self.dist, cfg.precision)
            # FSDP2 replaced every parameter by its sharded DTensor: take the band's new ones.
            named_params = dict(self.model.named_parameters())
            self.trainable = [named_params[n] for n in self.trainable_names]

        if cfg.packing:
            try:
                self.packing_attention = packed_attention_path(self.model)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        self._load_data()
        steps_per_epoch = math.ceil(len(self._epoch_batches(0)) / self._window_micro_batches)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        if cfg.warmup_steps >= self.total_steps:
            # The schedule reaches --lr at step index warmup_steps (fastmid.train.optim.lr_factor).
            self.console.print(
                f"[yellow]warning:[/] --warmup-steps {cfg.warmup_steps} is not below the run's "
                f"{self.total_steps} steps: the peak learning rate --lr is never reached",
                highlight=False,
            )
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if cfg.optimizer_in_backward:
            self.optimizer = OptimizerInBackward(
                named, lambda one: build_optimizer(one, cfg.optim, cfg.lr, cfg.weight_decay)
            )
        else:
            self.optimizer = build_optimizer(
                named, cfg.optim, cfg.lr, cfg.weight_decay, offload=cfg.optimizer_offload
            )
        self.scheduler = build_scheduler(
            self.optimizer, self.total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio
        )
        if self.dist is not None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            self.fp32_state = fp32_state_parameters(named, cfg.optim)
            changed = sharding_changed_state(named, cfg.optim)
            if changed:  # torchao issue #4912: never a silent change of state precision
                self.console.print(
                    f"[yellow]note:[/] {cfg.optim} keeps fp32 state for {len(changed)} tensor(s) "
                    f"whose {self.dist.world_size}-way shards are under "
                    "4096 elements or not whole blocks (one process would quantize them): "
                    f"{', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} (plan.json)",
                    highlight=False,
                )
        self.state.plan = self.plan.to_dict()
        self._on_main(self._prepare_run_folder)
        if self.dist is not None:
            self.dist.check_shared_folder(self.out)
        if cfg.resume is not None:
            self._resume()  # on every rank: a sharded checkpoint loads collectively
        self._on_main(self._write_run_folder)

    def _prepare_run_folder(self) -> None:
        """Rank 0: replace an old run (--overwrite) and create the folder."""
        # Only now, with model and data loaded, may --overwrite replace an old run (keeping the
        # run lock, so no second run can take the folder meanwhile).
        if self.cfg.resume is None and self._replace_folder and self.out.exists():
            clear_run_folder(self.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def _write_run_folder(self) -> None:
        """Rank 0: write ``config.yaml``, ``plan.json`` and open the trackers."""
        cfg = self.cfg
        dump_yaml(cfg, self.out / "config.yaml")
        (self.out / "plan.json").write_text(json.dumps(self.plan_record(), indent=1) + "\n")
        # Last: a tracker's package that is missing stops the run before any step.
        self.trackers = Trackers(
            [t.strip() for t in cfg.report_to.split(",") if t.strip()], self.out, asdict(cfg)
        )

    @property
    def _window_micro_batches(self) -> int:
        """Micro-batches of one optimizer step over all ranks (``grad_accum x world_size``)."""
        return self.cfg.grad_accum * (self.dist.world_size if self.dist else 1)

    def _check_output(self) -> None:
        """Refuse to start where a run would be lost; nothing is deleted here."""
        cfg, out = self.cfg, self.out
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"--output {out} is a file, not a folder; choose a folder")
        if cfg.resume is not None:
            self._check_resume_matches()
            return
        holds_run = bool(list_checkpoints(out / "checkpoints")) or (out / "final").is_dir()
        if holds_run and not cfg.overwrite:
            raise RunFolderError(
                f"{out} already holds a run; continue it with "
                f"`fastmid train {out / 'config.yaml'} --resume latest`, "
                f"replace it with --overwrite, or choose another --output"
            )
        names = {p.name for p in out.iterdir()} - {LOCK_NAME} if out.is_dir() else set()
        if names and not holds_run and not cfg.overwrite:
            if not names <= _UNSAVED_RUN_FILES:
                raise RunFolderError(
                    f"{out} exists and is not empty (and is not a fastmid run); choose another "
                    "--output or pass --overwrite"
                )
            # A run that stopped before its first checkpoint left only these: nothing to resume
            # and nothing to lose, so a new start replaces them.
            self.console.print(
                f"{out} holds a run that saved no checkpoint; starting it again", highlight=False
            )
        self._replace_folder = cfg.overwrite or bool(names)

    def _clean_partial_saves(self) -> None:
        """Remove the temporary folders a killed save left behind (their complete versions,
        if any, are untouched) and say so."""
        removed = clean_partial_checkpoints(self.out / "checkpoints")
        removed += clean_partial_exports(self.out)
        if removed:
            names = ", ".join(p.name for p in removed)
            self.console.print(
                f"removed {len(removed)} partial folder(s) left by an interrupted save: {names}",
                highlight=False,
            )

    def _check_resume_matches(self) -> None:
        path = resolve_resume(self.cfg.resume, self.out)  # type: ignore[arg-type]
        saved = json.loads((path / "trainer_state.json").read_text())["config"]
        # Checkpoints of older versions stored paths as typed: compare them resolved.
        saved = {
            k: resolve_path_value(k, v) if k in PATH_FIELDS and isinstance(v, str) else v
            for k, v in saved.items()
        }
        current = asdict(self.cfg)
        # Another number of processes may resume with another --grad-accum, as long as the
        # global batch (micro-batch x grad-accum x processes) stays the same.
        saved_world = (
            json.loads((path / "sharded.json").read_text())["world_size"]
            if (is_sharded(path))
            else 1
        )
        world = self.dist.world_size if self.dist else 1
        if "grad_accum" in saved:
            saved["grad_accum"] = saved["grad_accum"] * saved_world
            current["grad_accum"] = current["grad_accum"] * world
        diff = [k for k in resume_keys() if k in saved and saved[k] != current.get(k)]
        if diff:
            shown = ", ".join(
                f"{k} x processes: {saved[k]!r} -> {current.get(k)!r}"
                if k == "grad_accum"
                else f"{k}: {saved[k]!r} -> {current.get(k)!r}"
                for k in diff
            )
            raise CheckpointError(
                f"--resume {path}: this run's settings differ from the checkpoint's ({shown}); "
                f"resume with the run's own config: `fastmid train "
                f"{path.parent.parent / 'config.yaml'} --resume {self.cfg.resume}`"
            )

    def _load_data(self) -> None:
        cfg = self.cfg
        opts = dict(
            max_seq_len=cfg.max_seq_len,
            format=cfg.format,
            truncation=cfg.truncation,
            train_on_prompt=cfg.train_on_prompt,
            last_turn_only=cfg.last_turn_only,
            skip_bad_rows=cfg.skip_bad_rows,
            console=self.console,  # progress for large data (rank 0's console alone shows it)
        )
        examples, self.data_stats = build_sft_examples(
            cfg.data,
            self.tokenizer,
            split=cfg.split,
            max_examples=cfg.max_examples,
            shuffle_seed=cfg.shuffle_seed,
            **opts,
        )
        if cfg.eval_data:
            self.train_examples = examples
            self.eval_examples, _ = build_sft_examples(
                cfg.eval_data, self.tokenizer, flag="--eval-data", **opts
            )
        elif cfg.eval_fraction > 0:
            self.train_examples, self.eval_examples = split_eval(
                examples, cfg.eval_fraction, cfg.seed
            )
        else:
            self.train_examples, self.eval_examples = examples, []
        if not self.train_examples:
            raise DataError(
                f"--data {cfg.data}: no training example left after tokenization and truncation "
                "(see `fastmid data inspect`)"
            )
        self.pad_id = pad_token_id(self.tokenizer)
        if cfg.eval_accuracy:
            # Read the accuracy problems now: a bad file must stop the run before training, not
            # after it (a resumed run reuses the cached "before" result).
            load_eval_problems(
                cfg.eval_accuracy_data,
                cfg.eval_n,
                skip_bad_rows=cfg.skip_bad_rows,
                flag="--eval-accuracy-data",
            )

    def _resume(self) -> None:
        assert self.optimizer is not None and self.scheduler is not None
        cfg = self.cfg
        # Rank 0 finds and checks the checkpoint; every rank then reads it (a shared folder).
        found = self._on_main(lambda: str(resolve_resume(cfg.resume, self.out)))  # type: ignore[arg-type]
        path = Path(self.dist.broadcast(found) if self.dist else found)
        if self.dist is not None or is_sharded(path):
            resumed = load_sharded(
                path,
                self.model,
                self.trainable_names,
                self.optimizer,
                self.scheduler,
                self.dist,
                cfg.optim,
            )
            self.state = resumed.state
            world = self.dist.world_size if self.dist else 1
            if not resumed.optimizer_restored:
                self.optimizer_restarted = True
                self.console.print(
                    f"[yellow]warning:[/] {path} was written by {resumed.saved_world_size} "
                    f"process(es) with {cfg.optim}, whose state cannot be resharded to {world}: "
                    "the band weights, schedule and data position resume, the optimizer state "
                    "starts fresh (summary.json: optimizer_state_restarted)",
                    highlight=False,
                )
        else:
            self.state = load_checkpoint(
                path, self.model, self.trainable_names, self.optimizer, self.scheduler
            )
        if self.state.step >= self.total_steps:
            raise RunFolderError(
                f"{path}: the run already finished its {self.total_steps} steps; pass a "
                "larger --max-steps to train on, or use its final/ model"
            )
        restore_rng(self.state.rng)
        if self.is_main:
            truncate_metrics(self.out / "metrics.jsonl", self.state.step)
        self.console.print(f"resumed from {path} at step {self.state.step}")
        self._follow_schedule()

    def _follow_schedule(self) -> None:
        """Put the learning rate of the resumed step on this run's schedule.

        The checkpoint holds the learning rate its own schedule set for the next step. With the
        same ``--max-steps`` that is this schedule's value and nothing changes (resume stays
        exact); a run extended with a larger ``--max-steps`` switches to the longer schedule here,
        at the resumed step, instead of taking one step at the old schedule's value.
        """
        assert self.optimizer is not None and self.scheduler is not None
        cfg = self.cfg
        factor = lr_factor(
            self.scheduler.last_epoch,
            self.total_steps,
            cfg.warmup_steps,
            cfg.schedule,
            cfg.min_lr_ratio,
        )
        groups, bases = self.optimizer.param_groups, self.scheduler.base_lrs
        old = float(groups[0]["lr"])
        for group, base in zip(groups, bases, strict=True):
            new = base * factor
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(new)
            else:
                group["lr"] = new
        self.scheduler._last_lr = [float(g["lr"]) for g in groups]  # what get_last_lr() reports
        if float(groups[0]["lr"]) != old:
            self.console.print(
                f"the schedule now spans {self.total_steps} steps: step {self.state.step + 1} "
                f"uses lr {float(groups[0]['lr']):.3g} (the checkpoint's schedule had {old:.3g})",
                highlight=False,
            )

    # ---- data order ---------------------------------------------------------------------------

    def _epoch_batches(self, epoch: int) -> list[list[Any]]:
        """Example indices of each micro-batch in ``epoch``: a seeded permutation (or seeded
        length-grouped order) cut into ``micro_batch``-sized pieces; the last may be smaller.
        With ``--packing``: this epoch's packed rows (:func:`fastmid.data.pack_rows`, seeded per
        epoch) cut into micro-batches of ``micro_batch`` rows."""
        if self._epoch_order is not None and self._epoch_order[0] == epoch:
            return self._epoch_order[1]
        n, mb, seed = len(self.train_examples), self.cfg.micro_batch, self.cfg.seed
        if self.cfg.packing:
            rows = pack_rows(self._lengths(), self.cfg.max_seq_len, seed * 1_000_003 + epoch)
            packed = [rows[i : i + mb] for i in range(0, len(rows), mb)]
            self._epoch_order = (epoch, packed)
            return packed
        if self.cfg.group_by_length:
            order = list(LengthGroupedSampler(self._lengths(), mb, seed + epoch))
        else:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=gen).tolist()
        batches = [order[i : i + mb] for i in range(0, n, mb)]
        self._epoch_order = (epoch, batches)
        return batches

    def micro_batch_at(self, position: int) -> MicroBatchRef:
        """The micro-batch at global ``position`` (epochs follow one another), so the data
        position of a resumed run is one integer."""
        epoch, k = divmod(position, len(self._epoch_batches(0)))
        return MicroBatchRef(position, epoch, self._epoch_batches(epoch)[k])

    def _lengths(self) -> list[int]:
        """Tokens per training example."""
        lengths = getattr(self.train_examples, "lengths", None)
        if callable(lengths):
            return [int(n) for n in lengths()]
        return [len(e["input_ids"]) for e in self.train_examples]

    def collate(self, indices: list[Any]) -> dict[str, torch.Tensor]:
        """Right-padded training batch of ``indices`` on the model's device (with ``--packing``,
        ``indices`` are rows of example indices: :func:`fastmid.data.collate_packed`)."""
        examples = self.train_examples
        if self.cfg.packing:
            batch = collate_packed([[examples[i] for i in row] for row in indices], self.pad_id)
        else:
            batch = collate_batch([examples[i] for i in indices], self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    # ---- evaluate -----------------------------------------------------------------------------

    def eval_loss(self) -> float | None:
        """Token-mean loss over up to ``eval_batches`` micro-batches of the held-out split."""
        if not self.eval_examples:
            return None
        with self.precision.autocast(self.device):
            return token_mean_loss(
                self.model,
                self.eval_examples,
                self.cfg.micro_batch,
                self.pad_id,
                max_batches=self.cfg.eval_batches,
                fused=self.fused_loss,
            )

    def evaluate(self, label: str) -> dict[str, Any] | None:
        """Exact-match accuracy (with answer loss) on ``eval_accuracy_data``, or None when
        ``--no-eval-accuracy``. ``label`` is ``before`` or ``after``; the base model's result is
        cached in ``eval_before.json`` with its settings, so a resumed run does not redo it."""
        cfg = self.cfg
        if not cfg.eval_accuracy:
            return None
        settings = {
            "data": cfg.eval_accuracy_data,
            "n": cfg.eval_n,
            "max_new_tokens": cfg.eval_max_new_tokens,
            "precision": cfg.precision,
        }
        cache = self.out / "eval_before.json"

        def cached() -> dict[str, Any] | None:
            if label == "before" and cache.is_file():
                saved = json.loads(cache.read_text())
                if saved.get("settings") == settings:
                    return saved["result"]
            return None

        # Rank 0 reads the run folder; every rank must agree on whether to generate.
        hit = self.dist.broadcast(self._on_main(cached)) if self.dist else cached()
        if hit is not None:
            return hit
        shared_key = None
        if label == "before":
            # The machine-wide cache (fastmid.eval.base_cache): a second run on the same base
            # model, problems and generation settings skips the generation, and says so.
            shared_key = base_eval_key(
                cfg.model,
                cfg.eval_accuracy_data,
                {
                    **settings,
                    "batch_size": cfg.eval_batch_size,
                    "kernels": cfg.kernels,
                    "fuse_frozen": cfg.fuse_frozen,
                    "trust_remote_code": cfg.trust_remote_code,
                    "world_size": self.dist.world_size if self.dist else 1,
                    "device": self.device.type,
                },
            )
            shared = load_base_eval(shared_key)
            if shared is not None:
                record, where = shared
                line = (
                    f"  before: accuracy {record['accuracy']:.1%} "
                    f"({record['correct']}/{record['n']}), reused from {where} (same base model, "
                    "problems and generation settings; delete that file to recompute)"
                )
                self.console.print(line)
                _RUN_LOG.info(line.strip())
                if self.is_main:
                    cache.write_text(
                        json.dumps({"settings": settings, "result": record}, indent=1) + "\n"
                    )
                return record
        self.console.print(
            f"[bold]eval[/] {label}: exact match on {cfg.eval_n} problems of "
            f"{cfg.eval_accuracy_data}"
        )
        with self.precision.autocast(self.device):
            result = evaluate_accuracy(
                self.model,
                self.tokenizer,
                cfg.eval_accuracy_data,
                n=cfg.eval_n,
                max_new_tokens=cfg.eval_max_new_tokens,
                batch_size=cfg.eval_batch_size,
                skip_bad_rows=cfg.skip_bad_rows,
                flag="--eval-accuracy-data",
                console=self.console,
                rank=self.dist.rank if self.dist else 0,
                world_size=self.dist.world_size if self.dist else 1,
            )
        lo, hi = result.ci95
        line = f"  {label}: accuracy {result.accuracy:.1%} ({result.correct}/{result.n})"
        if result.eval_loss is not None:
            line += f", 95% CI [{lo:.1%}, {hi:.1%}], answer loss {result.eval_loss:.4f}"
        self.console.print(line)
        _RUN_LOG.info(line.strip())
        record = result.to_dict()
        if label == "before" and self.is_main:
            cache.write_text(json.dumps({"settings": settings, "result": record}, indent=1) + "\n")
            save_base_eval(
                shared_key, record, {"model": cfg.model, "data": cfg.eval_accuracy_data, **settings}
            )
        return record

    # ---- train --------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Run the remaining steps and save the last; returns the last step's record ({} if none).

        Raises:
            NonFiniteLossError: a NaN/inf loss, gradient norm or band weight (nothing of that
                step is saved; the last good checkpoint stays).
            TrainingInterrupted: SIGINT; a checkpoint of the last finished step was saved.
        """
        assert self.optimizer is not None and self.scheduler is not None
        cfg, state = self.cfg, self.state
        metrics = MetricsWriter(self.out / "metrics.jsonl") if self.is_main else None
        previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        self.model.train()
        last: dict[str, Any] = {}
        base_elapsed, t_start = state.elapsed_s, time.perf_counter()
        progress = make_progress(
            self.console,
            "loss {task.fields[loss]}",
            "lr {task.fields[lr]}",
            "grad_norm {task.fields[gnorm]}",
            "{task.fields[tps]} tok/s",
            label="[bold]train[/]",
            eta=True,
            plain_every=cfg.log_every,  # a log file gets a line every --log-every steps
        )
        if is_compiled_optimizer(self.optimizer) and state.step < self.total_steps:
            self.console.print(
                f"compiling the optimizer step ({cfg.optim}: torch.compile, once per parameter "
                "shape; about 40 s on 2 CPU cores, seconds once cached)",
                highlight=False,
            )
        try:
            with progress:
                task = progress.add_task(
                    "train",
                    total=self.total_steps,
                    completed=state.step,
                    loss="-",
                    lr="-",
                    gnorm="-",
                    tps="-",
                )
                while state.step < self.total_steps:
                    positions = (
                        self.dist.window(state.micro_batches, cfg.grad_accum)
                        if self.dist
                        else range(state.micro_batches, state.micro_batches + cfg.grad_accum)
                    )
                    refs = [self.micro_batch_at(p) for p in positions]
                    t0 = time.perf_counter()
                    try:
                        result = train_step(
                            self.model,
                            [self.collate(r.indices) for r in refs],
                            self.optimizer,
                            self.scheduler,
                            self.trainable,
                            cfg.grad_clip,
                            self.fused_loss,
                            self.precision,
                            self.dist,
                        )
                    except NonFiniteStep as exc:
                        raise self._non_finite(exc, refs) from None
                    except Exception as exc:
                        if not type(exc).__module__.startswith(
                            ("torch._inductor", "torch._dynamo")
                        ):
                            raise
                        # torch.compile of torchao's step: its own report runs to hundreds of
                        # lines; the first says what failed.
                        saved = list_checkpoints(self.out / "checkpoints")
                        kept = (
                            f"the last checkpoint {saved[-1]} is kept; resume with: "
                            f"{self.resume_command()}"
                            if saved
                            else "no checkpoint was saved yet"
                        )
                        raise OptimizerError(
                            f"torch.compile failed to build the optimizer step of --optim "
                            f"{cfg.optim} at step {state.step + 1} ({first_line(exc, 300)}); {kept}; "
                            "or train with --optim adamw8bit (--precision fp32 or bf16-master)"
                        ) from None
                    dt = time.perf_counter() - t0
                    state.step += 1
                    state.micro_batches += self._window_micro_batches
                    state.tokens += result.tokens
                    self.padded_tokens += result.padded_tokens
                    self._train_s = time.perf_counter() - t_start
                    state.supervised_tokens += result.supervised_tokens
                    state.elapsed_s = base_elapsed + time.perf_counter() - t_start
                    record: dict[str, Any] = {"step": state.step, **asdict(result)}
                    record["tokens_per_s"] = result.tokens / dt if dt > 0 else 0.0
                    record["padded_tokens_per_s"] = result.padded_tokens / dt if dt > 0 else 0.0
                    record["step_time_s"] = dt
                    record["peak_memory_bytes"] = peak_memory_bytes(self.device)
                    record["elapsed_s"] = state.elapsed_s
                    at_end = state.step == self.total_steps
                    if cfg.eval_every and (state.step % cfg.eval_every == 0 or at_end):
                        record["eval_loss"] = self._checked_eval_loss()
                    if metrics is not None:
                        metrics.write(record)
                    if self.trackers is not None:
                        self.trackers.log(record)
                    progress.update(
                        task,
                        completed=state.step,
                        loss=f"{result.loss:.4f}",
                        lr=f"{result.lr:.2e}",
                        gnorm=f"{result.grad_norm:.3g}",
                        tps=f"{record['tokens_per_s']:.0f}",
                    )
                    if state.step % cfg.log_every == 0 or at_end or "eval_loss" in record:
                        _RUN_LOG.info(
                            "step %d/%d loss %.4f lr %.3e grad_norm %.4g tokens/s %.0f%s",
                            state.step,
                            self.total_steps,
                            result.loss,
                            result.lr,
                            result.grad_norm,
                            record["tokens_per_s"],
                            f" eval_loss {record['eval_loss']:.4f}"
                            if record.get("eval_loss") is not None
                            else "",
                        )
                    last = record
                    if cfg.save_every and state.step % cfg.save_every == 0 and not at_end:
                        self.save_checkpoint()
                    if self.dist is not None and self.dist.max([self._interrupted])[0]:
                        # A signal may reach one rank only: all stop after the same step.
                        path = self.save_checkpoint()
                        stop = TrainingInterrupted(
                            f"interrupted at step {state.step}; checkpoint saved to {path}. "
                            f"Resume with: {self.resume_command()}"
                        )
                        stop.repeated = not self.is_main  # rank 0 alone says it
                        raise stop
                    # Several processes: only the collective check above may stop, else a
                    # signal landing after it sends each rank down this path on its own.
                    if self.dist is None and self._interrupted:
                        path = self.save_checkpoint()
                        raise TrainingInterrupted(
                            f"interrupted at step {state.step}; checkpoint saved to {path}. "
                            f"Resume with: {self.resume_command()}"
                        )
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            if metrics is not None:
                metrics.close()
            if self.trackers is not None:
                self.trackers.close()
        self.save_checkpoint()
        return last

    def _checked_eval_loss(self) -> float | None:
        """The held-out loss; a non-finite one stops the run like a non-finite training loss."""
        loss = self.eval_loss()
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite held-out loss ({loss}) after step {self.state.step}; this step "
                f"was not saved; {self._keep_and_resume()}"
            )
        return loss

    def _non_finite(self, exc: NonFiniteStep, refs: list[MicroBatchRef]) -> NonFiniteLossError:
        step = self.state.step + 1
        if exc.micro_batch is not None:
            ref = refs[exc.micro_batch]
            where = f"micro-batch {ref.position} (epoch {ref.epoch}, examples {ref.indices})"
        else:
            where = f"micro-batches {refs[0].position}..{refs[-1].position}"
        stepped = "the optimizer stepped" if exc.stepped else "the optimizer did not step"
        return NonFiniteLossError(
            f"{exc} at step {step}, {where}; {stepped} and nothing of it was saved; "
            f"{self._keep_and_resume()}"
        )

    def _keep_and_resume(self) -> str:
        saved = list_checkpoints(self.out / "checkpoints")
        if not saved:
            return (
                "no checkpoint was saved yet; lower --lr or fix the data, then start again: "
                f"fastmid train {self.out / 'config.yaml'} --lr <lower>"
            )
        return (
            f"the last good checkpoint {saved[-1]} is kept; lower --lr or fix the data, then "
            f"resume with: {self.resume_command()}"
        )

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._interrupted:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._interrupted = True
        self.console.print("[yellow]interrupt: finishing this step, then saving a checkpoint[/]")

    def resume_command(self) -> str:
        """The command that continues this run (for a run started by torchrun itself, the same
        torchrun options are needed: the run's config.yaml does not know them)."""
        args = f"train {self.out / 'config.yaml'} --resume latest"
        if self.dist is not None and self.cfg.nproc == 1:  # started by torchrun, not --nproc
            return f"torchrun <this run's torchrun options> -m fastmid {args}"
        return f"fastmid {args}"

    def interruption(self) -> TrainingInterrupted:
        """The error for a Ctrl-C outside the training loop, saying what there is to continue."""
        saved = list_checkpoints(self.out / "checkpoints")
        if saved:
            return TrainingInterrupted(
                f"interrupted; the last checkpoint is {saved[-1]}. Resume with: "
                f"{self.resume_command()}"
            )
        return TrainingInterrupted(
            "interrupted before the first checkpoint; nothing to resume. Start again with the "
            "same command"
        )

    # ---- save, export -------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-<N>/`` of the current step atomically; returns the folder."""
        assert self.optimizer is not None and self.scheduler is not None
        self.state.rng = capture_rng()
        if self.dist is not None:
            path = save_sharded(
                self.out / "checkpoints",
                self.model,
                self.optimizer,
                self.scheduler,
                self.state,
                self.cfg.keep_last,
                self.dist,
                self.cfg.optim,
            )
            if self.is_main:
                self.plot_loss()
            return path
        path = save_checkpoint(
            self.out / "checkpoints",
            self.model,
            self.trainable_names,
            self.optimizer,
            self.scheduler,
            self.state,
            self.cfg.keep_last,
        )
        self.plot_loss()
        return path

    def plot_loss(self) -> Path | None:
        """Redraw ``loss.png`` from ``metrics.jsonl`` (:mod:`fastmid.train.lossplot`); a drawing
        that fails is a warning, never the end of a run."""
        try:
            return write_loss_plot(
                self.out / "metrics.jsonl",
                self.out / "loss.png",
                title=f"{self.cfg.model}: band {self.plan.describe() if self.plan else ''}",
            )
        except Exception as exc:  # matplotlib's errors share no base class; a plot is optional
            _RUN_LOG.warning("loss.png not drawn: %s", exc)
            return None

    def export(self) -> Path:
        """Write ``final/`` (an HF folder ``from_pretrained`` loads, in the run's model dtype:
        fp32 under ``--precision fp32``, else bf16; with ``--lora-rank`` the adapters merged into
        the base weights) and ``band_delta.safetensors`` (the band, or the LoRA adapters, in its
        training dtype); returns ``final/``."""
        assert self.plan is not None
        plan = self.plan.to_dict()
        if self.lora is not None:
            plan["lora"] = self.lora.to_dict(per_module=False)
        if self.dist is None:
            unfuse_frozen_layers(self.model)  # save_pretrained would copy the packed views
        # Several processes: every rank takes part in gathering the full weights to rank 0.
        state = full_state_dict(self.model, self.dist) if self.dist else None
        # LoRA: final/ is a plain model under the base names, the adapters merged into the
        # weights; band_delta.safetensors keeps the adapters themselves (one process only).
        merged = merged_state_dict(self.model) if self.lora is not None else state

        def write() -> Path:
            final = export_hf_folder(
                self.model,
                self.tokenizer,
                self.out / "final",
                dtype=self.precision.export_dtype,
                state_dict=merged,
            )
            delta = self.out / "band_delta.safetensors"
            save_band_delta(self.model, self.trainable_names, delta, plan, state_dict=state)
            return final

        self._on_main(write)
        return self.out / "final"

    # ---- records ------------------------------------------------------------------------------

    def plan_record(self) -> dict[str, Any]:
        """``plan.json``: the band, parameter counts, execution roles, data statistics."""
        assert self.plan is not None and self.counts is not None and self.policy is not None
        stats = self.data_stats
        return {
            "band": self.plan.to_dict(),
            "lora": self.lora.to_dict() if self.lora is not None else None,
            "parameters": self.counts.to_dict(),
            "model": self.cfg.model,
            "model_type": self.model.config.model_type,
            "execution": {
                "no_grad_prefix": self.policy.no_grad_prefix,
                "grad_checkpointing": self.policy.grad_checkpointing,
                "roles": self.policy.roles,
            },
            "data": stats.to_dict() if hasattr(stats, "to_dict") else None,
            "train_examples": len(self.train_examples),
            "eval_examples": len(self.eval_examples),
            "total_steps": self.total_steps,
            "distributed": None
            if self.dist is None
            else {
                "world_size": self.dist.world_size,
                "backend": self.dist.backend,
                "fsdp_units": self.units,
                "global_batch_micro_batches": self._window_micro_batches,
                "fp32_optimizer_state_on_rank0": self.fp32_state,
            },
        }

    def final_eval_loss(self, last: dict[str, Any]) -> float | None:
        """The held-out loss of the trained model (the last step's, when it measured one).

        Raises:
            NonFiniteLossError: the loss is NaN/inf: nothing must be exported.
        """
        return last["eval_loss"] if "eval_loss" in last else self._checked_eval_loss()

    def summary(
        self,
        final: Path,
        last: dict[str, Any],
        eval_loss: float | None,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Write ``summary.json`` (what the run did, with figures) and return it."""
        assert self.plan is not None and self.counts is not None
        assert self.kernel_report is not None
        state = self.state
        summary = {
            "output": str(self.out),
            "final_model": str(final),
            "model": self.cfg.model,
            "model_type": self.model.config.model_type,
            "band": self.plan.to_dict(),
            "lora": self.lora.to_dict(per_module=False) if self.lora is not None else None,
            "parameters": self.counts.to_dict(),
            "steps": state.step,
            "tokens": state.tokens,
            "supervised_tokens": state.supervised_tokens,
            "train_time_s": state.elapsed_s,
            "tokens_per_s": state.tokens / state.elapsed_s if state.elapsed_s else None,
            "padded_tokens_per_s": (self.padded_tokens / self._train_s if self._train_s else None),
            "packing": None
            if not self.cfg.packing
            else {
                "attention": self.packing_attention,
                **packing_stats(
                    self._lengths(), self.cfg.max_seq_len, self.cfg.micro_batch, self.cfg.seed
                ).to_dict(),
            },
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "device": str(self.device),
            "optimizer": self.cfg.optim,
            "precision": self.cfg.precision,
            "kernels": self.kernel_report.to_dict(),
            "attention": str(getattr(self.model.config, "_attn_implementation", "unknown")),
            "loss_plot": str(plot) if self.is_main and (plot := self.plot_loss()) else None,
            "final_loss": last.get("loss"),
            "final_eval_loss": eval_loss,
            "optimizer_state_restarted": self.optimizer_restarted,
            "fuse_frozen": self.fuse_report.to_dict() if self.fuse_report else None,
            "accuracy_before": before,
            "accuracy_after": after,
        }
        if self.dist is not None:
            summary["world_size"] = self.dist.world_size
            summary["backend"] = self.dist.backend
            summary["fsdp_units"] = len(self.units)
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary


def run_train(cfg: TrainConfig, console: Console | None = None) -> dict[str, Any]:
    """Run one ``fastmid train`` job under the run folder's lock; return ``summary.json``'s
    content.

    Raises:
        RunFolderError, RunLockedError, ConfigError, ModelSourceError, DataError,
        NonFiniteLossError, TrainingInterrupted, CheckpointError, ExportError: see their modules;
        each message says what to do.
    """
    console = console or Console(stderr=True)
    dist = init_from_env()  # None unless torchrun started several processes
    try:
        return _run_locked(MidBlockRecipe(cfg, console, dist))
    finally:
        shutdown()


def _run_locked(recipe: MidBlockRecipe) -> dict[str, Any]:
    out, console = recipe.out, recipe.console  # rank > 0: a quiet console

    def lock(stack: contextlib.ExitStack) -> bool:
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"--output {out} is a file, not a folder; choose a folder")
        created = not out.exists()
        # One live run per folder: the OS drops the lock when the process ends, however it ends.
        stack.enter_context(acquire_run_lock(out))
        return created

    with contextlib.ExitStack() as stack:
        created = recipe._on_main(lambda: lock(stack))  # rank 0 holds the lock of the run
        try:
            return _run_steps(recipe, console)
        except KeyboardInterrupt:
            # Ctrl-C outside the training loop (loading, evaluation, export).
            raise recipe.interruption() from None
        finally:
            if created and [p.name for p in out.iterdir()] == [LOCK_NAME]:
                shutil.rmtree(out, ignore_errors=True)  # a run that never started leaves nothing


def _run_steps(recipe: MidBlockRecipe, console: Console) -> dict[str, Any]:
    recipe.setup()  # creates (or, with --overwrite, clears) the run folder
    with train_log(recipe.out / "train.log") if recipe.is_main else nullcontext():
        try:
            return _logged_run(recipe, console)
        except FastmidError as exc:
            _RUN_LOG.error("%s", exc)
            raise


def _logged_run(recipe: MidBlockRecipe, console: Console) -> dict[str, Any]:
    cfg = recipe.cfg
    assert recipe.plan is not None and recipe.counts is not None
    counts = recipe.counts
    header = (
        f"fastmid train {cfg.model} ({recipe.model.config.model_type}): band "
        f"{recipe.plan.describe()}, trainable {counts.trainable:,} of {counts.total:,} "
        f"({counts.trainable_share:.1f}%), {len(recipe.train_examples)} train / "
        f"{len(recipe.eval_examples)} eval examples, {recipe.total_steps} steps, precision "
        f"{cfg.precision}, optimizer {cfg.optim}"
    )
    if recipe.lora is not None:
        header += f", {recipe.lora.describe()}"
    if recipe.dist is not None:
        header += f", {recipe.dist.world_size} processes (FSDP2, {recipe.dist.backend})"
    console.print(f"[bold]fastmid train[/]{header[len('fastmid train') :]}", highlight=False)
    _RUN_LOG.info("%s", header)
    before = recipe.evaluate("before")
    last = recipe.train()
    eval_loss = recipe.final_eval_loss(last)  # checked finite before anything is exported
    final = recipe.export()
    after = recipe.evaluate("after")
    summary = recipe.summary(final, last, eval_loss, before, after)
    print_summary(summary, console)
    _RUN_LOG.info(
        "done: %d steps, final loss %s, eval loss %s; model %s; summary %s",
        summary["steps"],
        summary["final_loss"],
        summary["final_eval_loss"],
        summary["final_model"],
        recipe.out / "summary.json",
    )
    return summary


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """A short table of what the run did."""
    table = Table(title="fastmid train: summary", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("band", f"layers {summary['band']['first']}..{summary['band']['last']}")
    if summary.get("lora"):
        lora = summary["lora"]
        ranks = (
            f"r={lora['rank_min']}"
            if lora["rank_min"] == lora["rank_max"]
            else f"ranks {lora['rank_min']}-{lora['rank_max']}"
        )
        table.add_row(
            "adapters", f"LoRA {lora['targets']} {ranks}, {lora['modules_adapted']} modules"
        )
    p = summary["parameters"]
    table.add_row("trainable", f"{p['trainable']:,} ({p['trainable_share_percent']:.1f}%)")
    table.add_row("precision / optimizer", f"{summary['precision']} / {summary['optimizer']}")
    if summary.get("world_size"):
        table.add_row("processes", f"{summary['world_size']} (FSDP2, {summary['backend']})")
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
    if summary.get("loss_plot"):
        table.add_row("loss plot", summary["loss_plot"])
    console.print(table)
