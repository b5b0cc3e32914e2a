"""The ``fastmid`` command line (typer). Thin: parse flags, build a config, call the library.

Commands: ``train``, ``plan``, ``eval``, ``analyze``, ``data inspect``. Known errors print one line
(``error: ...``) and exit 2; an interrupted run exits 130 after saving; a non-finite loss exits 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="fastmid: Mid-Block tuning (train the middle band of decoder layers) and layer-wise "
    "analysis of where fine-tuning changes a model.",
)
data_app = typer.Typer(no_args_is_help=True, help="Look at SFT data before training on it.")
app.add_typer(data_app, name="data")

err_console = Console(stderr=True)


def _run(fn: Callable[[], Any]) -> Any:
    """Call ``fn``; a :class:`~fastmid.errors.FastmidError` becomes one line and its exit code."""
    from fastmid.errors import FastmidError

    try:
        return fn()
    except FastmidError as exc:
        if exc.exit_code == 130:
            err_console.print(f"[yellow]{exc}[/]", highlight=False)
        else:
            err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(exc.exit_code) from None


@app.command()
def train(
    config: Path | None = typer.Argument(None, help="YAML config; flags override its keys."),
    model: str | None = typer.Option(None, help="default | HF folder | .gguf | cached repo id"),
    data: str | None = typer.Option(None, help="builtin:arith | files/folders, comma-separated"),
    eval_data: str | None = typer.Option(None, help="held-out data (else --eval-fraction)"),
    eval_fraction: float | None = typer.Option(None, help="share carved off for eval loss"),
    format: str | None = typer.Option(None, help="force the data format"),
    split: str | None = typer.Option(None, help="dataset split to train on"),
    max_examples: int | None = typer.Option(None, help="use at most this many examples"),
    band: str | None = typer.Option(None, help="fractions START:END of depth (default 0.2:0.8)"),
    layers: str | None = typer.Option(None, help="explicit layers, e.g. 6-23 or 3,5,9"),
    placement: str | None = typer.Option(None, help="first|last|middle|random (ablations)"),
    max_steps: int | None = typer.Option(None, help="optimizer steps (overrides --epochs)"),
    epochs: float | None = typer.Option(None, help="passes over the data when no --max-steps"),
    micro_batch: int | None = typer.Option(None, help="sequences per micro-batch"),
    grad_accum: int | None = typer.Option(None, help="micro-batches per optimizer step"),
    lr: float | None = typer.Option(None, help="peak learning rate"),
    warmup_steps: int | None = typer.Option(None, help="linear warm-up steps"),
    schedule: str | None = typer.Option(None, help="cosine | constant"),
    weight_decay: float | None = typer.Option(None, help="AdamW weight decay (matrices only)"),
    grad_clip: float | None = typer.Option(None, help="global grad-norm clip (0 = off)"),
    max_seq_len: int | None = typer.Option(None, help="tokens per sequence"),
    truncation: str | None = typer.Option(None, help="prompt-left | drop"),
    optim: str | None = typer.Option(None, help="adamw8bit | adamw | paged_adamw8bit"),
    grad_checkpointing: bool | None = typer.Option(
        None, "--grad-checkpointing/--no-grad-checkpointing", help="checkpoint band+suffix layers"
    ),
    kernels: str | None = typer.Option(None, help="auto | on | off (Triton kernels)"),
    eval_every: int | None = typer.Option(None, help="eval loss every N steps (0 = off)"),
    save_every: int | None = typer.Option(None, help="checkpoint every N steps"),
    keep_last: int | None = typer.Option(None, help="checkpoints to keep"),
    eval_accuracy: bool | None = typer.Option(
        None, "--eval-accuracy/--no-eval-accuracy", help="exact-match eval before and after"
    ),
    eval_n: int | None = typer.Option(None, help="problems in the accuracy eval"),
    output: str | None = typer.Option(None, help="run folder"),
    overwrite: bool | None = typer.Option(None, "--overwrite", help="replace an existing run"),
    resume: str | None = typer.Option(None, help="checkpoint folder or 'latest'"),
    seed: int | None = typer.Option(None, help="random seed"),
    skip_bad_rows: bool | None = typer.Option(
        None, "--skip-bad-rows", help="skip and count malformed rows"
    ),
    train_embeddings: bool | None = typer.Option(
        None, "--train-embeddings", help="also train the input embeddings (tied lm_head too)"
    ),
    train_lm_head: bool | None = typer.Option(None, "--train-lm-head", help="also train lm_head"),
    train_final_norm: bool | None = typer.Option(
        None, "--train-final-norm", help="also train the final norm"
    ),
    train_on_prompt: bool | None = typer.Option(None, "--train-on-prompt"),
    last_turn_only: bool | None = typer.Option(None, "--last-turn-only"),
) -> None:
    """Train the band (default: SmolLM2-135M-Instruct on builtin:arith: 90 steps, about 10 minutes
    of training on 2 CPU cores plus 2-3 minutes of before/after accuracy evaluation)."""
    overrides = {k: v for k, v in locals().items() if k != "config"}

    def go() -> None:
        from fastmid.config import build_config
        from fastmid.train.recipe import run_train

        cfg = build_config(config, overrides)
        run_train(cfg, err_console)

    _run(go)


@app.command()
def plan(
    model: str = typer.Option("default", help="default | folder | .gguf | repo id | config.json"),
    band: str | None = typer.Option(None, help="fractions START:END (default 0.2:0.8)"),
    layers: str | None = typer.Option(None, help="explicit layers, e.g. 6-23"),
    seq_len: int = typer.Option(4096, help="tokens per sequence"),
    micro_batch: int = typer.Option(1, help="sequences per micro-batch"),
    gpus: int = typer.Option(1, help="GPUs (FSDP2 shards weights, grads, states)"),
    gpu_memory: float = typer.Option(141.0, help="memory per GPU, GiB"),
    optim: str = typer.Option("adamw8bit", help="adamw8bit | adamw"),
    checkpointing: bool = typer.Option(True, "--checkpointing/--no-checkpointing"),
    as_json: bool = typer.Option(False, "--json", help="print JSON only"),
) -> None:
    """Show which layers train and whether the run fits in GPU memory."""

    def go() -> None:
        from fastmid.models.plan_report import make_plan, print_plan

        result = make_plan(
            model, band, layers, seq_len, micro_batch, gpus, gpu_memory, optim, checkpointing
        )
        if as_json:
            sys.stdout.write(json.dumps(result, indent=1) + "\n")
        else:
            print_plan(result, Console())

    _run(go)


@app.command("eval")
def eval_cmd(
    model: str = typer.Option("default", help="model to evaluate"),
    data: str = typer.Option("builtin:arith:test", help="builtin:arith:test or GSM8K JSONL"),
    n: int = typer.Option(200, help="number of problems"),
    max_new_tokens: int = typer.Option(256, help="generation budget per problem"),
    batch_size: int = typer.Option(16, help="prompts per generation batch"),
    as_json: bool = typer.Option(False, "--json", help="print JSON only"),
) -> None:
    """Exact-match accuracy (GSM8K convention) with a 95% CI, and mean answer loss."""

    def go() -> None:
        from fastmid.eval.exact_match import run_eval

        result = run_eval(model, data, n, max_new_tokens, batch_size)
        if as_json:
            sys.stdout.write(json.dumps(result.to_dict(), indent=1) + "\n")
            return
        lo, hi = result.ci95
        Console().print(
            f"{model} on {data}: accuracy {result.accuracy:.1%} ({result.correct}/{result.n}), "
            f"95% CI [{lo:.1%}, {hi:.1%}]"
            + (f", answer loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
        )

    _run(go)


@data_app.command("inspect")
def data_inspect(
    data: str = typer.Option(..., help="builtin:arith | files/folders, comma-separated"),
    model: str = typer.Option("default", help="whose tokenizer and chat template"),
    max_seq_len: int = typer.Option(2048, help="tokens per sequence"),
    n: int = typer.Option(2, help="examples to render"),
    format: str | None = typer.Option(None, help="force the data format"),
    split: str = typer.Option("train", help="dataset split"),
    max_examples: int | None = typer.Option(None, help="read at most this many examples"),
    truncation: str = typer.Option("prompt-left", help="prompt-left | drop"),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="skip and count bad rows"),
    train_on_prompt: bool = typer.Option(False, "--train-on-prompt"),
    last_turn_only: bool = typer.Option(False, "--last-turn-only"),
) -> None:
    """Format, counts, token statistics, and examples with the trained tokens highlighted."""

    def go() -> None:
        from fastmid.data.inspect import inspect_data
        from fastmid.models.loading import load_tokenizer

        inspect_data(
            data,
            load_tokenizer(model),
            max_seq_len=max_seq_len,
            n=n,
            format=format,
            split=split,
            max_examples=max_examples,
            truncation=truncation,
            skip_bad_rows=skip_bad_rows,
            train_on_prompt=train_on_prompt,
            last_turn_only=last_turn_only,
            console=Console(),
        )

    _run(go)


@app.command()
def analyze(
    base: str = typer.Option(..., help="base model"),
    tuned: str | None = typer.Option(None, help="tuned model (omit for single-model metrics)"),
    data: str = typer.Option("builtin:arith", help="data to run both models on"),
    max_tokens: int = typer.Option(20000, help="tokens to analyse"),
    max_seq_len: int = typer.Option(512, help="tokens per sequence"),
    batch_size: int = typer.Option(8, help="sequences per forward"),
    mask_bos: bool = typer.Option(False, "--mask-bos", help="exclude the first position"),
    grad_norms: bool = typer.Option(False, "--grad-norms", help="per-layer SFT grad norms"),
    entropy_tokens: int = typer.Option(
        128, help="tokens per prompt for entropy and effective rank (0: all)"
    ),
    output: Path = typer.Option(Path("analysis"), help="output folder"),
) -> None:
    """Layer-wise base-vs-tuned analysis (CKA, weight change, entropy, grad norms) + band advice."""

    def go() -> None:
        from fastmid.analysis.analyze import run_analysis
        from fastmid.analysis.heap import keep_freed_memory

        # Each batch frees and reallocates every layer's outputs: keep that memory (see heap.py).
        keep_freed_memory()

        run_analysis(
            base=base,
            tuned=tuned,
            data=data,
            max_tokens=max_tokens,
            max_seq_len=max_seq_len,
            batch_size=batch_size,
            mask_bos=mask_bos,
            grad_norms=grad_norms,
            entropy_tokens=entropy_tokens,
            output_dir=output,
            console=Console(),
        )

    _run(go)


if __name__ == "__main__":  # pragma: no cover
    app()
