"""The lean Mid-Block training loop (design section 2; torchtune's single-device recipe and
nanoGPT's ``train.py`` are the models: one readable class, builders instead of inheritance).

One optimizer step consumes ``grad_accum`` micro-batches. The loss of a step is
``sum of token losses over the window / supervised tokens in the window`` (design section 4), so a
micro-batch of 2 equals 2 accumulation steps of 1 exactly. Gradients are clipped by global L2 norm
over the band's parameters, then the optimizer and the schedule step.

Nothing is lost: checkpoints are atomic; SIGINT finishes the step in flight, saves and prints the
resume command; a NaN/inf loss or gradient norm stops the run *before* the optimizer step, keeps
the last good checkpoint and names the step and micro-batch that failed.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fastmid.config import ConfigError, TrainConfig, dump_yaml
from fastmid.errors import FastmidError
from fastmid.models.band import BandPlan, apply_band, count_parameters
from fastmid.models.execution import install_execution_policy
from fastmid.models.families import decoder_layers
from fastmid.models.loading import load_model_and_tokenizer
from fastmid.models.loss import causal_lm_loss_sum, count_supervised
from fastmid.train.checkpoint import (
    CheckpointError,
    TrainerState,
    capture_rng,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from fastmid.train.export import export_hf_folder, save_band_delta
from fastmid.train.logging import MetricsWriter, make_progress, peak_memory_bytes, truncate_metrics
from fastmid.train.optim import build_optimizer, build_scheduler


class RunFolderError(FastmidError, RuntimeError):
    """The output folder already holds a run (and neither --overwrite nor --resume was given)."""


class NonFiniteLossError(FastmidError, RuntimeError):
    """A NaN/inf loss or gradient norm; raised before the optimizer step of that step (exit 1)."""

    exit_code = 1


class TrainingInterrupted(FastmidError, RuntimeError):
    """SIGINT: a checkpoint was saved; the message holds the resume command (exit 130)."""

    exit_code = 130


@dataclass
class MicroBatchRef:
    """Where a micro-batch comes from: epoch, position in the run, example indices."""

    position: int
    epoch: int
    indices: list[int]


class Trainer:
    """A Mid-Block SFT run: ``Trainer(cfg).run()`` returns the summary dict.

    Build order: output folder -> model and tokenizer -> band plan -> ``apply_band`` -> execution
    policy (prefix ``no_grad``, checkpointing) -> kernels -> data -> optimizer and schedule ->
    resume. Every piece is a function call; the loop knows no model family.
    """

    def __init__(self, cfg: TrainConfig, console: Console | None = None) -> None:
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        self.out = Path(cfg.output)
        self._interrupted = False

    # ---- setup ------------------------------------------------------------------------------

    # Settings that fix the data order, the band and the loss; a resumed run must match them.
    RESUME_KEYS = (
        "model", "band", "layers", "placement", "train_embeddings", "train_lm_head",
        "train_final_norm", "data", "eval_data", "eval_fraction", "format", "split",
        "max_examples", "shuffle_seed", "max_seq_len", "truncation", "train_on_prompt",
        "last_turn_only", "skip_bad_rows", "group_by_length", "micro_batch", "grad_accum", "seed",
    )  # fmt: skip

    def _check_output(self) -> None:
        """Refuse to start where a run would be lost; nothing is deleted here."""
        cfg, out = self.cfg, self.out
        holds_run = (out / "config.yaml").is_file() or (out / "checkpoints").is_dir()
        if cfg.resume is not None:
            self._check_resume_matches()
            return
        if holds_run and not cfg.overwrite:
            raise RunFolderError(
                f"{out} already holds a run; continue it with "
                f"`fastmid train {out / 'config.yaml'} --resume latest`, "
                f"replace it with --overwrite, or choose another --output"
            )
        if out.exists() and any(out.iterdir()) and not holds_run and not cfg.overwrite:
            raise RunFolderError(
                f"{out} exists and is not empty (and is not a fastmid run); choose another "
                "--output or pass --overwrite"
            )

    def _check_resume_matches(self) -> None:
        path = resolve_resume(self.cfg.resume, self.out)  # type: ignore[arg-type]
        saved = json.loads((path / "trainer_state.json").read_text())["config"]
        current = self.cfg.to_dict()
        diff = [k for k in self.RESUME_KEYS if k in saved and saved[k] != current.get(k)]
        if diff:
            shown = ", ".join(f"{k}: {saved[k]!r} -> {current.get(k)!r}" for k in diff)
            raise CheckpointError(
                f"--resume {path}: this run's settings differ from the checkpoint's ({shown}); "
                f"resume with the run's own config: `fastmid train "
                f"{path.parent.parent / 'config.yaml'} --resume {self.cfg.resume}`"
            )

    def _prepare_output(self) -> None:
        """Called once model and data are loaded: only now is an old run replaced."""
        cfg, out = self.cfg, self.out
        if cfg.resume is None and cfg.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)

    def setup(self) -> None:
        """Load everything; after it, :meth:`train` can run."""
        cfg = self.cfg
        self._check_output()
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer = load_model_and_tokenizer(cfg.model)
        self.device = next(self.model.parameters()).device
        L = len(decoder_layers(self.model))
        self.plan = BandPlan.parse(L, cfg.band, cfg.layers, cfg.placement, cfg.seed)
        extras = dict(
            train_embeddings=cfg.train_embeddings,
            train_lm_head=cfg.train_lm_head,
            train_final_norm=cfg.train_final_norm,
        )
        self.trainable = apply_band(self.model, self.plan, **extras)
        self.counts = count_parameters(self.model, self.plan, **extras)
        if self.device.type == "cuda":
            # fp32 master weights for what trains; bf16 for the frozen rest (design section 4).
            for p in self.trainable:
                p.data = p.data.float()
        ids = {id(p) for p in self.trainable}
        self.trainable_names = [n for n, p in self.model.named_parameters() if id(p) in ids]
        self.policy = install_execution_policy(
            self.model, self.plan, grad_checkpointing=cfg.grad_checkpointing
        )
        self.kernels_enabled = self._setup_kernels()
        self._setup_data()
        steps_per_epoch = math.ceil(len(self.micro_batches_of_epoch(0)) / cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        self.optimizer = build_optimizer(
            [(n, p) for n, p in self.model.named_parameters() if p.requires_grad],
            cfg.optim,
            cfg.lr,
            cfg.weight_decay,
        )
        self.scheduler = build_scheduler(
            self.optimizer, self.total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio
        )
        self._prepare_output()
        self.state = TrainerState(0, 0, 0, 0, 0.0, {}, self.plan.to_dict(), cfg.to_dict())
        if cfg.resume is not None:
            path = resolve_resume(cfg.resume, self.out)
            self.state = load_checkpoint(
                path, self.model, self.trainable_names, self.optimizer, self.scheduler
            )
            restore_rng(self.state.rng)
            truncate_metrics(self.out / "metrics.jsonl", self.state.step)
            self.console.print(f"resumed from {path} at step {self.state.step}")
            if self.state.step >= self.total_steps:
                raise RunFolderError(
                    f"{path}: the run already finished its {self.total_steps} steps; pass a "
                    "larger --max-steps to train on, or use its final/ model"
                )
        dump_yaml(cfg, self.out / "config.yaml")
        (self.out / "plan.json").write_text(json.dumps(self.plan_record(), indent=1) + "\n")

    def _setup_kernels(self) -> bool:
        from fastmid.models.patching import patch_model, resolve_kernels_flag

        try:
            enabled = resolve_kernels_flag(self.cfg.kernels, self.device)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.kernel_report = patch_model(self.model, enabled)
        return enabled

    def _setup_data(self) -> None:
        from fastmid.data import DataError, build_sft_examples, split_eval

        cfg = self.cfg
        opts = dict(
            max_seq_len=cfg.max_seq_len,
            format=cfg.format,
            truncation=cfg.truncation,
            train_on_prompt=cfg.train_on_prompt,
            last_turn_only=cfg.last_turn_only,
            skip_bad_rows=cfg.skip_bad_rows,
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
            self.eval_examples, _ = build_sft_examples(cfg.eval_data, self.tokenizer, **opts)
            self.train_examples = examples
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
        self.pad_token_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )

    def micro_batches_of_epoch(self, epoch: int) -> list[list[int]]:
        """Example indices of each micro-batch in ``epoch``: a seeded permutation (or seeded
        length-grouped order), cut into ``micro_batch``-sized pieces; the last may be smaller."""
        cache = getattr(self, "_epoch_cache", None)
        if cache is not None and cache[0] == epoch:
            return cache[1]
        n, mb, seed = len(self.train_examples), self.cfg.micro_batch, self.cfg.seed
        if self.cfg.group_by_length:
            from fastmid.data import LengthGroupedSampler

            lengths = [len(e["input_ids"]) for e in self.train_examples]
            order = list(LengthGroupedSampler(lengths, mb, seed + epoch))
        else:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=gen).tolist()
        batches = [order[i : i + mb] for i in range(0, n, mb)]
        self._epoch_cache = (epoch, batches)
        return batches

    def micro_batch_at(self, position: int) -> MicroBatchRef:
        """The micro-batch at global ``position`` (epochs follow one another)."""
        per_epoch = len(self.micro_batches_of_epoch(0))
        epoch, k = divmod(position, per_epoch)
        return MicroBatchRef(position, epoch, self.micro_batches_of_epoch(epoch)[k])

    def collate(
        self, indices: list[int], examples: list[dict] | None = None
    ) -> dict[str, torch.Tensor]:
        """Right-padded batch on the model's device."""
        from fastmid.data import collate_batch

        src = self.train_examples if examples is None else examples
        batch = collate_batch([src[i] for i in indices], self.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    # ---- loss -------------------------------------------------------------------------------

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Token-sum loss and supervised count of one micro-batch (fused kernels when enabled)."""
        ctx = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with ctx:
            loss_sum, n = causal_lm_loss_sum(
                self.model,
                batch["input_ids"],
                batch["attention_mask"],
                batch["labels"],
                position_ids=batch.get("position_ids"),
                fused=self.kernels_enabled,
            )
        return loss_sum, int(n)

    @torch.no_grad()
    def eval_loss(self) -> float | None:
        """Token-mean loss over up to ``eval_batches`` micro-batches of the held-out split."""
        if not self.eval_examples:
            return None
        self.model.eval()
        total, count = 0.0, 0
        mb = self.cfg.micro_batch
        for b in range(min(self.cfg.eval_batches, math.ceil(len(self.eval_examples) / mb))):
            idx = list(range(b * mb, min((b + 1) * mb, len(self.eval_examples))))
            loss_sum, n = self.loss_sum(self.collate(idx, self.eval_examples))
            total += float(loss_sum)
            count += n
        self.model.train()
        return total / count if count else None

    # ---- the loop ---------------------------------------------------------------------------

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._interrupted:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._interrupted = True
        self.console.print("[yellow]interrupt: finishing this step, then saving a checkpoint[/]")

    def save(self) -> Path:
        """Write a checkpoint of the current step."""
        self.state.rng = capture_rng()
        return save_checkpoint(
            self.out / "checkpoints",
            self.model,
            self.trainable_names,
            self.optimizer,
            self.scheduler,
            self.state,
            self.cfg.keep_last,
        )

    def resume_command(self) -> str:
        """The command that continues this run."""
        return f"fastmid train {self.out / 'config.yaml'} --resume latest"

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's record.

        Raises:
            NonFiniteLossError: NaN/inf loss or gradient norm (before the optimizer step).
        """
        cfg, state = self.cfg, self.state
        refs = [self.micro_batch_at(state.micro_batches + k) for k in range(cfg.grad_accum)]
        batches = [self.collate(r.indices) for r in refs]
        window_supervised = sum(count_supervised(b["labels"]) for b in batches)
        window_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for ref, batch in zip(refs, batches, strict=True):
            loss_sum, _n = self.loss_sum(batch)
            if not torch.isfinite(loss_sum):
                raise NonFiniteLossError(
                    f"non-finite loss ({float(loss_sum.detach())}) at step {state.step + 1}, micro-batch "
                    f"{ref.position} (epoch {ref.epoch}, examples {ref.indices}); the optimizer did "
                    f"not step; the last good checkpoint is kept in {self.out / 'checkpoints'}"
                )
            if window_supervised > 0:
                (loss_sum / window_supervised).backward()
            loss_total += float(loss_sum.detach())
        params = [p for p in self.trainable if p.grad is not None]
        if params:
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        else:
            grad_norm = 0.0
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"non-finite gradient norm at step {state.step + 1} (micro-batches "
                f"{refs[0].position}..{refs[-1].position}); the optimizer did not step; the last "
                f"good checkpoint is kept in {self.out / 'checkpoints'}"
            )
        lr = self.optimizer.param_groups[0]["lr"]
        if window_supervised > 0:
            self.optimizer.step()
        self.scheduler.step()
        state.step += 1
        state.micro_batches += cfg.grad_accum
        state.tokens += window_tokens
        state.supervised_tokens += window_supervised
        return {
            "step": state.step,
            "loss": loss_total / window_supervised if window_supervised else 0.0,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": window_tokens,
            "supervised_tokens": window_supervised,
        }

    def train(self) -> dict[str, Any]:
        """Run the remaining steps; returns the last step's record (or {} if none ran)."""
        cfg, state = self.cfg, self.state
        metrics = MetricsWriter(self.out / "metrics.jsonl")
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        self.model.train()
        last: dict[str, Any] = {}
        base_elapsed = state.elapsed_s
        t_start = time.perf_counter()
        try:
            with make_progress(self.console) as progress:
                task = progress.add_task(
                    "train", total=self.total_steps, completed=state.step, loss="-", lr="-", tps="-"
                )
                while state.step < self.total_steps:
                    t0 = time.perf_counter()
                    record = self.train_step()
                    dt = time.perf_counter() - t0
                    state.elapsed_s = base_elapsed + time.perf_counter() - t_start
                    record["tokens_per_s"] = record["tokens"] / dt if dt > 0 else 0.0
                    record["step_time_s"] = dt
                    record["peak_memory_bytes"] = peak_memory_bytes(self.device)
                    record["elapsed_s"] = state.elapsed_s
                    at_end = state.step == self.total_steps
                    if cfg.eval_every and (state.step % cfg.eval_every == 0 or at_end):
                        record["eval_loss"] = self.eval_loss()
                    if state.step % cfg.log_every == 0 or at_end or "eval_loss" in record:
                        metrics.write(record)
                    progress.update(
                        task,
                        completed=state.step,
                        loss=f"{record['loss']:.4f}",
                        lr=f"{record['lr']:.2e}",
                        tps=f"{record['tokens_per_s']:.0f}",
                    )
                    last = record
                    if cfg.save_every and state.step % cfg.save_every == 0 and not at_end:
                        self.save()
                    if self._interrupted:
                        path = self.save()
                        raise TrainingInterrupted(
                            f"interrupted at step {state.step}; checkpoint saved to {path}. "
                            f"Resume with: {self.resume_command()}"
                        )
        finally:
            signal.signal(signal.SIGINT, previous)
            metrics.close()
        self.save()
        return last

    # ---- records ----------------------------------------------------------------------------

    def plan_record(self) -> dict[str, Any]:
        """``plan.json``: the band, parameter counts, data statistics."""
        stats = getattr(self, "data_stats", None)
        return {
            "band": self.plan.to_dict(),
            "parameters": self.counts.to_dict(),
            "model": self.cfg.model,
            "model_type": self.model.config.model_type,
            "execution": {
                "no_grad_prefix": self.policy.no_grad_prefix,
                "grad_checkpointing": self.policy.grad_checkpointing,
                "roles": self.policy.roles,
            },
            "data": stats.to_dict() if stats is not None and hasattr(stats, "to_dict") else None,
            "train_examples": len(self.train_examples),
            "eval_examples": len(self.eval_examples),
            "total_steps": self.total_steps,
        }

    def export(self) -> Path:
        """Write ``final/`` (HF folder) and ``band_delta.safetensors``."""
        dtype = self.model.config.dtype if self.device.type == "cuda" else None
        final = export_hf_folder(self.model, self.tokenizer, self.out / "final", dtype=dtype)
        save_band_delta(
            self.model,
            self.trainable_names,
            self.out / "band_delta.safetensors",
            self.plan.to_dict(),
        )
        return final


def attention_implementation(model: torch.nn.Module) -> str:
    """Which attention ran: the config's ``_attn_implementation`` (sdpa, flash_attention_2, eager)."""
    return str(getattr(model.config, "_attn_implementation", "unknown"))
