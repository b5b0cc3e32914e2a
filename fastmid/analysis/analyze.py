"""``fastmid analyze``: run base and tuned models over the same tokens and measure every layer.

Flow: load both models (and one tokenizer) -> tokenize the data with the SFT pipeline
(``fastmid.data.build_sft_examples``) up to a token budget -> right-padded batches -> for each
group of decoder layers that fits the memory budget, for each batch: capture the group's outputs of
both models (:mod:`fastmid.analysis.capture`), then feed the accumulators (streaming CKA, pooled
cosine, matrix entropy and effective rank) with padding (and optionally the first position)
masked: on CPU the per-token work runs one layer per core (:mod:`fastmid.analysis.parallel`),
then the CKA products one layer at a time on all cores (BLAS) -> weight change from the two state
dicts -> optional gradient norms at the base model -> band advice -> ``analysis.json``/``.csv``/``.png`` and a console table.

Everything per token is streamed, so memory does not grow with ``max_tokens``; the CKA running
sums (float64, ``(2 d + 3)^2`` numbers per layer) are what may force several layer groups on wide
models.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fastmid.analysis.advice import default_band, depth_pattern, recommend_band
from fastmid.analysis.capture import layer_outputs
from fastmid.analysis.cka import PreparedBlock, StreamingCKA
from fastmid.analysis.metrics import (
    ENTROPY_TOKENS,
    MetricsError,
    PooledCosine,
    SpectralMeans,
    layer_grad_norms,
    weight_change,
)
from fastmid.analysis.parallel import LayerParallel
from fastmid.analysis.report import REPORT_FILES, print_table, write_report
from fastmid.analysis.results import AnalysisResult, LayerMetrics
from fastmid.data import pad_token_id
from fastmid.errors import FastmidError
from fastmid.kernels import Backend, cka_accumulation_path
from fastmid.models.families import decoder_layers
from fastmid.progress import make_progress


class AnalysisError(FastmidError, ValueError):
    """Inputs ``fastmid analyze`` cannot compare; the message names the flag and what to do."""


# ---- data -------------------------------------------------------------------------------------


def analysed_positions(length: int, mask_bos: bool) -> int:
    """Tokens of a sequence of ``length`` that the per-token metrics see."""
    return max(length - (1 if mask_bos else 0), 0)


def take_token_budget(
    examples: Sequence[dict[str, list[int]]], max_tokens: int, mask_bos: bool
) -> list[dict[str, list[int]]]:
    """The first examples whose analysed tokens add up to ``max_tokens``, the last one truncated.

    Truncating the end of a sequence leaves the hidden states of its earlier tokens unchanged
    (causal attention), so the budget is met exactly without bias.

    Args:
        examples: dicts with ``input_ids`` and ``labels`` (lists of token ids).
        max_tokens: token budget (> 0).
        mask_bos: the first position of each sequence is not counted (it is masked).

    Returns:
        The selected examples (copies of the lists where truncated).
    """
    out: list[dict[str, list[int]]] = []
    used = 0
    for ex in examples:
        if used >= max_tokens:
            break
        n = analysed_positions(len(ex["input_ids"]), mask_bos)
        if n == 0:
            continue
        room = max_tokens - used
        if n > room:
            keep = room + (1 if mask_bos else 0)
            ex = {k: list(v[:keep]) for k, v in ex.items()}
            n = room
        out.append(ex)
        used += n
    return out


def load_examples(
    data: str,
    tokenizer: Any,
    max_tokens: int,
    max_seq_len: int,
    mask_bos: bool,
    split: str = "train",
    *,
    format: str | None = None,
    truncation: str = "prompt-left",
    train_on_prompt: bool = False,
    last_turn_only: bool = False,
    skip_bad_rows: bool = False,
    console: Any = None,
) -> list[dict[str, list[int]]]:
    """Tokenize ``data`` with the SFT pipeline until ``max_tokens`` analysed tokens are reached.

    ``format`` ... ``skip_bad_rows`` are passed to the pipeline, as in training; ``console``
    shows the pipeline's progress when a round tokenizes many conversations (its ``console``).

    Asks ``fastmid.data.build_sft_examples`` for 64 examples, then doubles until the budget is met
    or the source runs dry, so a large data set is never tokenized in full.

    Raises:
        AnalysisError: the data yields no token (names ``--data``).
        fastmid.data.DataError: unreadable data (raised by the data pipeline).
    """
    from fastmid.data import build_sft_examples

    want = 64
    while True:
        examples, _stats = build_sft_examples(
            data,
            tokenizer,
            split=split,
            max_seq_len=max_seq_len,
            max_examples=want,
            format=format,
            truncation=truncation,
            train_on_prompt=train_on_prompt,
            last_turn_only=last_turn_only,
            skip_bad_rows=skip_bad_rows,
            console=console,
        )
        chosen = take_token_budget(examples, max_tokens, mask_bos)
        got = sum(analysed_positions(len(e["input_ids"]), mask_bos) for e in chosen)
        if got >= max_tokens or len(examples) < want:
            break
        want *= 2
    if not chosen:
        raise AnalysisError(f"--data {data}: no tokens to analyse (split '{split}')")
    return chosen


def make_batches(
    examples: Sequence[dict[str, list[int]]], batch_size: int, pad_token_id: int
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches (``fastmid.data.collate_batch``), longest sequences first.

    Sorting by length keeps padding (wasted compute) small; every metric is a sum or mean over
    tokens or prompts, so the order does not change results.

    Returns:
        Dicts with ``input_ids``, ``attention_mask``, ``labels``: (batch, seq) int64.
    """
    from fastmid.data import collate_batch

    order = sorted(examples, key=lambda e: -len(e["input_ids"]))
    return [
        collate_batch(list(order[i : i + batch_size]), pad_token_id)
        for i in range(0, len(order), batch_size)
    ]


def token_mask(attention_mask: torch.Tensor, mask_bos: bool) -> torch.Tensor:
    """(batch, seq) bool of analysed tokens: real (non-padding) tokens, minus position 0 if
    ``mask_bos`` (right padding puts every sequence's first token at position 0)."""
    mask = attention_mask.to(torch.bool).clone()
    if mask_bos:
        mask[:, 0] = False
    return mask


# ---- memory plan ------------------------------------------------------------------------------


def layer_state_bytes(hidden_base: int, hidden_tuned: int, batch_tokens: int, paired: bool) -> int:
    """Bytes held per layer while a group is analysed: CKA running sums (float64) and one
    prepared CKA block (float64 rows, :meth:`StreamingCKA.block_bytes`) when paired, plus the
    captured outputs of one batch (float32) of each model."""
    cka = 0
    if paired:
        cka = StreamingCKA.state_bytes(hidden_base, hidden_tuned) + StreamingCKA.block_bytes(
            batch_tokens, hidden_base, hidden_tuned
        )
    acts = 4 * batch_tokens * (hidden_base + (hidden_tuned if paired else 0))
    return cka + acts


def worker_temp_bytes(hidden_base: int, hidden_tuned: int, batch_tokens: int, paired: bool) -> int:
    """Bytes of temporaries one statistics worker holds while it processes a layer: masked
    float32 copies, float64 pooled sums and the float32 spectra input of each model, bounded by
    ``40 * batch_tokens * (hidden_base + hidden_tuned)`` (measured on SmolLM2: about 63 MiB per
    worker for 1,312 padded tokens, hidden 576 + 576). glibc keeps each thread's freed memory in
    that thread's arena, so this counts once per worker, not once per layer."""
    return 40 * batch_tokens * (hidden_base + (hidden_tuned if paired else 0))


def plan_layer_groups(num_layers: int, bytes_per_layer: int, budget_bytes: int) -> list[list[int]]:
    """Split ``range(num_layers)`` into consecutive groups whose state fits ``budget_bytes``.

    Every group holds at least one layer, even when one layer alone exceeds the budget.
    """
    per_group = max(1, budget_bytes // max(bytes_per_layer, 1))
    return [list(range(i, min(i + per_group, num_layers))) for i in range(0, num_layers, per_group)]


def default_memory_budget(device: torch.device) -> int:
    """Half the free memory of ``device`` (CUDA: ``mem_get_info``; CPU: psutil available), bytes."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 2
    import psutil

    return psutil.virtual_memory().available // 2


# ---- the measurement pass ---------------------------------------------------------------------


@dataclass
class _LayerAccumulators:
    cka: StreamingCKA | None
    cosine: PooledCosine | None
    spectra_base: SpectralMeans
    spectra_tuned: SpectralMeans | None


def measure_layers(
    base: torch.nn.Module,
    tuned: torch.nn.Module | None,
    batches: Sequence[dict[str, torch.Tensor]],
    mask_bos: bool = False,
    memory_budget_bytes: int | None = None,
    backend: Backend = "auto",
    on_batch: Callable[[int, int], None] | None = None,
    entropy_tokens: int | None = ENTROPY_TOKENS,
    workers: int | None = None,
) -> tuple[list[LayerMetrics], int]:
    """Representation metrics of every decoder layer over the batches.

    Args:
        base: the base ``*ForCausalLM`` model.
        tuned: the tuned model (same number of decoder layers, same tokenizer), or None for the
            single-model metrics (entropy and effective rank of ``base``).
        batches: dicts with ``input_ids`` and ``attention_mask`` (batch, seq), right-padded.
        mask_bos: exclude position 0 of every sequence.
        memory_budget_bytes: per-group state limit; default :func:`default_memory_budget`.
        backend: CKA statistics path (``auto``: Triton on CUDA, float64 torch on CPU).
        on_batch: called as ``on_batch(done, total)`` after each (group, batch) step.
        entropy_tokens: tokens per prompt for matrix entropy and effective rank (the first
            ones; default 128, the paper's truncation; None or 0: all).
        workers: threads for the per-layer statistics on CPU
            (:class:`fastmid.analysis.parallel.LayerParallel`); default torch's thread count.
            Always 1 on CUDA and for the Triton CKA path.

    Returns:
        ``(rows, n_tokens)``: one :class:`LayerMetrics` per layer (representation metrics filled)
        and the number of analysed tokens.

    Raises:
        AnalysisError: the models differ in depth.
        MetricsError: NaN/inf activations in an analysed token (names the layer and model).
        CKAError: fewer than 4 tokens.
    """
    L = len(decoder_layers(base))
    if tuned is not None and len(decoder_layers(tuned)) != L:
        raise AnalysisError(
            f"--base has {L} decoder layers but --tuned has {len(decoder_layers(tuned))}: "
            "layer-wise comparison needs the same depth"
        )
    if tuned is not None and tuned.config.hidden_size != base.config.hidden_size:
        # CKA would compare any widths, but weight change and pooled cosine need equal shapes:
        # a tuned model of another width is another architecture, not a fine-tune.
        raise AnalysisError(
            f"--base has hidden size {base.config.hidden_size} but --tuned has "
            f"{tuned.config.hidden_size}: compare a model with a fine-tune of itself"
        )
    device = next(base.parameters()).device
    tuned_device = next(tuned.parameters()).device if tuned is not None else device
    hidden_b = int(base.config.hidden_size)
    hidden_t = int(tuned.config.hidden_size) if tuned is not None else 0
    max_tokens = max((int(b["input_ids"].numel()) for b in batches), default=0)
    if (
        device.type != "cpu"
        or tuned_device.type != "cpu"
        # Triton's CPU interpreter (tests) keeps global state and is not thread-safe.
        or (tuned is not None and cka_accumulation_path(backend, torch.empty(0)) == "triton")
    ):
        workers = 1
    workers = max(1, int(workers or torch.get_num_threads()))
    budget = memory_budget_bytes or default_memory_budget(device)
    paired = tuned is not None
    temporaries = workers * worker_temp_bytes(hidden_b, hidden_t, max_tokens, paired)
    groups = plan_layer_groups(
        L,
        layer_state_bytes(hidden_b, hidden_t, max_tokens, paired),
        max(budget - temporaries, 0),
    )
    rows = [LayerMetrics(index=i, depth_fraction=(i + 1) / L) for i in range(L)]
    total_steps, done = len(groups) * len(batches), 0
    n_tokens = sum(int(token_mask(b["attention_mask"], mask_bos).sum()) for b in batches)
    with LayerParallel(workers) as pool:
        for group in groups:
            acc = {
                i: _LayerAccumulators(
                    cka=StreamingCKA(f"layer {i}", backend=backend) if tuned is not None else None,
                    cosine=PooledCosine() if tuned is not None else None,
                    spectra_base=SpectralMeans(entropy_tokens),
                    spectra_tuned=SpectralMeans(entropy_tokens) if tuned is not None else None,
                )
                for i in group
            }
            for batch in batches:
                ids = batch["input_ids"]
                attn = batch["attention_mask"]
                mask = token_mask(attn, mask_bos)
                hb = layer_outputs(base, ids.to(device), attn.to(device), group)
                ht = (
                    layer_outputs(tuned, ids.to(tuned_device), attn.to(tuned_device), group)
                    if tuned is not None
                    else {}
                )

                blocks: dict[int, PreparedBlock] = {}
                pool.run(functools.partial(_update_layer, acc, hb, ht, mask, blocks), group)
                # The (D, D) CKA products run here, one layer after another, on BLAS's own
                # threads (every core); interleaving them with the workers' torch ops would make
                # the two thread pools wait on each other.
                for i in group:
                    if i in blocks:
                        acc[i].cka.accumulate(blocks.pop(i))  # type: ignore[union-attr]
                del hb, ht
                done += 1
                if on_batch is not None:
                    on_batch(done, total_steps)
            _collect(rows, acc, group, tuned is not None)
    return rows, n_tokens


def _update_layer(
    acc: dict[int, _LayerAccumulators],
    hb: dict[int, torch.Tensor],
    ht: dict[int, torch.Tensor],
    mask: torch.Tensor,
    blocks: dict[int, PreparedBlock],
    i: int,
) -> None:
    # One layer's per-token work for a batch; runs on a LayerParallel worker. The CKA block is
    # only prepared here and accumulated by the caller (see measure_layers).
    a = acc[i]
    m = mask.to(hb[i].device)
    _check_finite(hb[i], m, i, "base model's" if a.cka is not None else "model's")
    a.spectra_base.update(hb[i], m)
    if a.cka is not None:
        y = ht[i].to(hb[i].device)
        _check_finite(y, m, i, "tuned model's")
        blocks[i] = a.cka.prepare(hb[i], y, m)
        a.cosine.update(hb[i], y, m)  # type: ignore[union-attr]
        a.spectra_tuned.update(y, m)  # type: ignore[union-attr]


def _check_finite(h: torch.Tensor, mask: torch.Tensor, layer: int, side: str) -> None:
    # Non-finite values in padding are harmless (every metric masks them out); in an analysed
    # token they would surface as an eigensolver failure that names nothing.
    if bool(torch.isfinite(h).all()):
        return
    if bool(((~torch.isfinite(h)).any(-1) & mask).any()):
        raise MetricsError(
            f"layer {layer}: the {side} output holds NaN or inf values; its activations "
            "overflowed (load it in float32 rather than float16/bfloat16) or its weights are broken"
        )


def _collect(
    rows: list[LayerMetrics],
    acc: dict[int, _LayerAccumulators],
    group: Sequence[int],
    paired: bool,
) -> None:
    for i in group:
        a = acc[i]
        rows[i].entropy_base, rows[i].erank_base = a.spectra_base.compute()
        if paired:
            r = a.cka.compute()  # type: ignore[union-attr]
            rows[i].cka_debiased, rows[i].cka_biased = r.debiased, r.biased
            rows[i].cosine = a.cosine.compute()  # type: ignore[union-attr]
            rows[i].entropy_tuned, rows[i].erank_tuned = a.spectra_tuned.compute()  # type: ignore[union-attr]


def fill_weight_change(
    rows: list[LayerMetrics], base: torch.nn.Module, tuned: torch.nn.Module
) -> None:
    """Write :func:`fastmid.analysis.metrics.weight_change` into ``rows`` (in place)."""
    for wc in weight_change(base, tuned):
        row = rows[wc.layer]
        row.weight_change = wc.total
        row.weight_change_attention = wc.attention
        row.weight_change_mlp = wc.mlp
        row.weight_change_norm = wc.norm


def check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Refuse an ``--output`` that the report cannot be written to, or that holds an earlier
    analysis (unless ``overwrite``); checked before any model loads, so a mistake costs nothing.

    Only the report's own files count as an earlier analysis: other files in the folder are
    never touched, so a folder that merely holds them is fine.

    Raises:
        AnalysisError: naming the folder (or the file in the way) and what to do.
    """
    out = Path(output_dir)
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == out else f" ({path} is a file)"
                raise AnalysisError(
                    f"--output {out} is not a folder{where}; choose a folder for the report"
                )
            break
    blocked = [name for name in REPORT_FILES.values() if (out / name).is_dir()]
    if blocked:  # found now rather than after minutes of analysis
        raise AnalysisError(
            f"--output: cannot write {out / blocked[0]} (a folder is in the way); move it or "
            "choose another --output"
        )
    earlier = [name for name in REPORT_FILES.values() if (out / name).exists()]
    if earlier and not overwrite:
        raise AnalysisError(
            f"--output {out} holds an earlier analysis ({', '.join(earlier)}); pass --overwrite "
            "to replace it, or choose another --output"
        )


def _same_tokenizer(a: Any, b: Any) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


# ---- entry point ------------------------------------------------------------------------------


def run_analysis(
    base: str,
    tuned: str | None,
    data: str,
    max_tokens: int = 20000,
    max_seq_len: int = 512,
    batch_size: int = 8,
    mask_bos: bool = False,
    grad_norms: bool = False,
    output_dir: str | Path | None = "analysis",
    console: Any = None,
    *,
    split: str = "train",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    memory_budget_bytes: int | None = None,
    threshold: float = 0.5,
    title: str | None = None,
    entropy_tokens: int = ENTROPY_TOKENS,
    format: str | None = None,
    truncation: str = "prompt-left",
    train_on_prompt: bool = False,
    last_turn_only: bool = False,
    skip_bad_rows: bool = False,
    overwrite: bool = False,
) -> AnalysisResult:
    """``fastmid analyze``: layer-wise comparison of a base and a tuned model, with band advice.

    Args:
        base: base model source (``"default"``, HF folder, ``.gguf``, cached repo id).
        tuned: tuned model source, or None for single-model metrics (entropy, effective rank,
            and gradient norms with ``grad_norms``). The same source as ``base`` reuses the
            loaded model.
        data: data source for ``fastmid.data.build_sft_examples`` (e.g. ``"builtin:arith"``).
        max_tokens: analysed tokens (padding and masked positions excluded), > 0.
        max_seq_len: tokens per sequence (longer examples are truncated by the data pipeline).
        batch_size: sequences per forward pass.
        mask_bos: exclude the first position of every sequence (an attention sink with outsized
            activations in many models).
        grad_norms: also compute per-layer gradient norms of the SFT loss at the base model.
        output_dir: folder for ``analysis.json``/``.csv``/``.png``; None writes nothing.
        console: a ``rich.console.Console`` for the progress and the table; None is silent.
            Progress covers the (layer group, batch) steps of the layer statistics and the
            batches of ``grad_norms`` (and tokenization of large data): a rich bar on a
            terminal, else plain lines (``analyze: layer statistics 5/50 elapsed 0:00:12 ETA
            0:01:48``), one per tenth of the steps and at least one a minute.
        split: data split.
        device: default CUDA if available, else CPU.
        dtype: model dtype; default float32 on CPU, bfloat16 on CUDA.
        memory_budget_bytes: per-group state limit (bytes); default half the free memory.
        threshold: tau of the band rule (:mod:`fastmid.analysis.advice`).
        title: first line of the PNG title.
        entropy_tokens: tokens per prompt for matrix entropy and effective rank (each prompt's
            first ones; default 128 as in the paper; 0 uses all).
        format, truncation, train_on_prompt, last_turn_only, skip_bad_rows: the data pipeline's
            options, as in training (``fastmid.data.build_sft_examples``).
        overwrite: replace the report files of an earlier analysis in ``output_dir``; without it
            such a folder is refused before anything loads.

    Returns:
        :class:`AnalysisResult` (also written to ``output_dir``).

    Raises:
        AnalysisError: bad numeric flags, different tokenizers or depths, no data, an
            ``output_dir`` that is a file or holds an earlier analysis (without ``overwrite``).
        ReportWriteError: the report cannot be written (names the path).
        ModelSourceError: an unloadable ``--base``/``--tuned``.
        MetricsError: NaN/inf activations in an analysed token (names the layer and model).
        CKAError: fewer than 4 analysed tokens.
    """
    from fastmid.models.loading import load_model_and_tokenizer

    for flag, value in (
        ("--max-tokens", max_tokens),
        ("--max-seq-len", max_seq_len),
        ("--batch-size", batch_size),
    ):
        if value < 1:
            raise AnalysisError(f"{flag} must be a positive integer, got {value}")
    if entropy_tokens < 0 or entropy_tokens == 1:
        raise AnalysisError(
            f"--entropy-tokens must be 0 (all tokens) or at least 2 (entropy needs two tokens), "
            f"got {entropy_tokens}"
        )
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    t0 = time.perf_counter()
    base_model, tokenizer = load_model_and_tokenizer(base, dtype=dtype, device=device)
    tuned_model = None
    if tuned is not None:
        if str(tuned) == str(base):
            tuned_model = base_model
        else:
            tuned_model, tuned_tok = load_model_and_tokenizer(tuned, dtype=dtype, device=device)
            if not _same_tokenizer(tokenizer, tuned_tok):
                raise AnalysisError(
                    f"--tuned {tuned} has a different tokenizer from --base {base}: the models "
                    "must read the same tokens"
                )
    t_load = time.perf_counter()
    examples = load_examples(
        data,
        tokenizer,
        max_tokens,
        max_seq_len,
        mask_bos,
        split,
        format=format,
        truncation=truncation,
        train_on_prompt=train_on_prompt,
        last_turn_only=last_turn_only,
        skip_bad_rows=skip_bad_rows,
        console=_progress_console(console),
    )
    batches = make_batches(examples, batch_size, pad_token_id(tokenizer))
    t_data = time.perf_counter()

    progress = _progress(_progress_console(console))
    with progress:
        task = progress.add_task("analyze: layer statistics", total=None)

        def on_batch(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        rows, n_tokens = measure_layers(
            base_model,
            tuned_model,
            batches,
            mask_bos,
            memory_budget_bytes,
            on_batch=on_batch,
            entropy_tokens=entropy_tokens,
        )
    t_stats = time.perf_counter()
    if tuned_model is not None:
        fill_weight_change(rows, base_model, tuned_model)
    if grad_norms:
        if console is not None:
            console.print("analyze: gradient norms of the SFT loss at the base model")
        progress = _progress(_progress_console(console))
        with progress:
            task = progress.add_task("analyze: gradient norms", total=len(batches))
            norms = layer_grad_norms(
                base_model,
                batches,
                on_batch=lambda done, total: progress.update(task, completed=done, total=total),
            )
        for row, g in zip(rows, norms, strict=True):
            row.grad_norm = g
    t_grad = time.perf_counter()

    L = len(rows)
    result = AnalysisResult(
        layers=rows,
        num_hidden_layers=L,
        current_band=default_band(L),
        advice=recommend_band(rows, threshold),
        pattern=depth_pattern(rows),
        config={
            "base": str(base),
            "tuned": None if tuned is None else str(tuned),
            "data": data,
            "split": split,
            "max_tokens": max_tokens,
            "max_seq_len": max_seq_len,
            "batch_size": batch_size,
            "mask_bos": mask_bos,
            "entropy_tokens": entropy_tokens,
            "grad_norms": grad_norms,
            "device": str(next(base_model.parameters()).device),
            "dtype": str(next(base_model.parameters()).dtype),
            "hidden_states": "decoder-layer outputs (before the final norm)",
        },
        n_tokens=n_tokens,
        n_prompts=len(examples),
        seconds={
            "load": t_load - t0,
            "data": t_data - t_load,
            "stats": t_stats - t_data,
            "grad_norms": t_grad - t_stats,
            "total": t_grad - t0,
        },
    )
    if output_dir is not None:
        write_report(result, output_dir, title)
    if console is not None:
        print_table(result, console)
        if result.files:
            console.print(f"wrote {', '.join(result.files.values())}")
    return result


# Plain progress lines (a console that is not a terminal) per analysis stage: one per tenth of
# its steps, besides the one printed at least every minute.
PROGRESS_PLAIN_LINES = 10


def _progress_console(console: Any) -> Any:
    """Where progress goes: ``console`` itself, except that progress meant for stdout goes to
    stderr when stdout is not a terminal (stdout carries the result table, which a pipe or a log
    reader should get alone)."""
    if console is not None and console.file is sys.stdout and not console.is_terminal:
        return Console(stderr=True, soft_wrap=True, no_color=console.no_color)
    return console


def _progress(console: Any) -> Any:
    """The progress of one stage (:func:`fastmid.progress.make_progress`): a transient rich bar
    on a terminal, else plain lines, as the total is known only once the stage starts."""
    return make_progress(
        console,
        label="[progress.description]{task.description}",
        eta=True,
        transient=True,
        plain_lines=PROGRESS_PLAIN_LINES,
    )
