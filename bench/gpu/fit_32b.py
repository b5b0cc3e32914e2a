"""Does a Qwen2.5-32B Mid-Block step fit one GPU? Measure it beside `fastmid plan` (issue 15).

    python bench/gpu/fit_32b.py                  # bf16, ao_adamw8bit, optimizer in backward,
                                                 # checkpointing, seq 4096 x micro-batch 1, 3 steps
    python bench/gpu/fit_32b.py --recommended    # the mode make_plan recommends, when it does
    python bench/gpu/fit_32b.py --smoke --out /tmp/fit   # CPU, tiny model of the same architecture

The model is built from ``--config`` (a transformers ``config.json``; default
``bench/configs/qwen2.5-32b.json``) with random weights, nothing is downloaded:

1. **Materialize** (fastest path, no transformers init): the ``*ForCausalLM`` is built on the meta
   device (module tree only), cast there to the run's weight dtype (bf16 unless ``--precision
   fp32``), moved with ``Module.to_empty(device=...)`` (one uninitialized allocation per tensor,
   about 770 for 32B) and filled in place: ``normal_(0, 0.02)`` for matrices, ones for norm
   weights, zeros for biases, each matrix from its own seeded generator on the device (one
   kernel per tensor; the 61 GiB of bf16 weights take about a second on an H200, bounded by
   memory bandwidth). transformers' own initialization (constructing under ``torch.device
   ("cuda")``) would also run on the GPU, but through per-module ``_init_weights`` calls whose
   cost and dtype handling change between transformers versions. Non-persistent buffers (the
   rotary ``inv_freq``) are rebuilt on the device from the config. The seeded generators make the
   initial weights reproducible, so the band's weight change after training is computed exactly
   by regenerating each initial tensor, one at a time, instead of keeping a 37 GB copy.
2. **Set up as ``fastmid train`` does** (``MidBlockRecipe.setup``): ``BandPlan.parse`` (default
   band ``0.2:0.8``: layers 13..50 of 64), ``apply_band``, ``PrecisionPolicy.cast_trainable``,
   ``install_execution_policy(grad_checkpointing=...)``, ``patch_model`` with the kernels
   ``--kernels auto`` resolves (Triton on CUDA), then ``OptimizerInBackward`` around
   ``build_optimizer`` (or ``build_optimizer`` alone) and ``build_scheduler``.
3. **Train ``--steps`` steps** with ``fastmid.train.recipe.train_step`` on random token ids
   (``--micro-batch`` x ``--seq-len``, labels on the second half of each sequence), timing each
   step (CUDA synchronized). Step 1 includes torch.compile of torchao's optimizer step (one
   kernel per parameter shape: 6 for Qwen2).
4. **Report** peak allocated and reserved memory (``torch.cuda.max_memory_allocated`` /
   ``max_memory_reserved``, over the whole run) beside the Mid-Block column of
   ``fastmid.models.plan_report.make_plan`` for the same mode (each line and the total, GiB = 2^30
   bytes, and the difference in percent), the step times, and the band's weight change, into
   ``fit_32b.json`` and ``fit_32b.md`` under ``--out`` (default ``bench/results``). A CUDA
   out-of-memory error is a result too: the files are written with ``"status": "oom"`` and the
   peaks so far, and the exit status is 2.

``--recommended``: when ``make_plan``'s result has a ``recommended`` entry (``{"flags": [...],
"total_bytes", "headroom_bytes"}``) its ``fastmid train`` flags replace the mode flags given here
(flags this script has no use for are listed as ignored); when it has none, the report says so and
the given flags run.

``--smoke`` (CPU, seconds): a config of the same architecture derived from ``--config`` (hidden
64, intermediate 128, 8 layers, 4 heads, 2 KV heads, vocab 1000, seq 64) is written to ``--out``
and trained the same way; the measured peak is the process's peak resident set size
(``resource.getrusage``), which includes the Python and torch runtime, so its difference to the
plan says nothing about the plan. ``--precision bf16`` with ``ao_adamw8bit`` compiles torchao's
step on CPU too (seconds per parameter shape); ``--optim adamw`` skips that.

Needs torch, transformers, safetensors, torchao (for ``ao_*``) and Triton (CUDA kernels) beside
fastmid; bitsandbytes only for ``--optim adamw8bit``/``paged_adamw8bit``. ``train_step`` comes from
``fastmid.train.recipe``; where that module cannot be imported (it also needs rich, pyyaml and
scipy) a copy of its two step paths below runs instead, and the report names which ran.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from fastmid.labels import IGNORE_INDEX  # noqa: E402
from fastmid.models.band import (  # noqa: E402
    BandPlan,
    apply_band,
    count_parameters,
    install_execution_policy,
)
from fastmid.models.families import decoder_layers, family_for_config  # noqa: E402
from fastmid.models.loading import (  # noqa: E402
    attention_implementation_for,
    load_config,
    quiet_torchao,
)
from fastmid.models.loss import batch_loss_sum, count_supervised  # noqa: E402
from fastmid.models.memory import resolve_plan_optim  # noqa: E402
from fastmid.models.patching import patch_model, resolve_kernels_flag  # noqa: E402
from fastmid.models.plan_report import make_plan  # noqa: E402
from fastmid.models.precision import PrecisionPolicy  # noqa: E402
from fastmid.train.optim import OptimizerInBackward, build_optimizer, build_scheduler  # noqa: E402

GIB = 2**30
REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "bench" / "configs" / "qwen2.5-32b.json"
DEFAULT_OUT = REPO / "bench" / "results"
INIT_STD = 0.02
PLAN_LINES = ("weights", "gradients", "optimizer_states", "activations", "logits", "total")
SMOKE_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 8,
    "max_window_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 4096,
    "sliding_window": 4096,
}
SMOKE_SEQ_LEN = 64


# ---- arguments -----------------------------------------------------------------------------


def add_mode_args(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The mode flags, spelled as ``fastmid train`` spells them where it has them (so the plan's
    recommended flags parse here). ``defaults=False`` leaves absent flags out of the namespace."""

    def d(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--precision", choices=("bf16", "bf16-master", "fp32", "auto"), default=d("bf16")
    )
    parser.add_argument(
        "--optim",
        choices=("auto", "ao_adamw8bit", "ao_adamw4bit", "adamw", "adamw8bit", "paged_adamw8bit"),
        default=d("auto"),
        help="auto: ao_adamw8bit under bf16, else adamw8bit",
    )
    parser.add_argument(
        "--optimizer-in-backward", action=argparse.BooleanOptionalAction, default=d(True)
    )
    parser.add_argument(
        "--optimizer-offload", action=argparse.BooleanOptionalAction, default=d(False)
    )
    parser.add_argument(
        "--grad-checkpointing", action=argparse.BooleanOptionalAction, default=d(True)
    )
    parser.add_argument(
        "--seq-len", "--max-seq-len", dest="seq_len", type=int, default=d(None),
        help="tokens per sequence (default 4096; 64 with --smoke)",
    )  # fmt: skip
    parser.add_argument("--micro-batch", type=int, default=d(1))
    parser.add_argument("--band", default=d("0.2:0.8"), help="band fractions START:END")
    parser.add_argument("--kernels", choices=("auto", "on", "off"), default=d("auto"))
    parser.add_argument("--lr", type=float, default=d(3e-4), help="constant, no warm-up")
    parser.add_argument("--weight-decay", type=float, default=d(0.0))
    parser.add_argument(
        "--grad-clip", type=float, default=d(None),
        help="default 1.0; 0 with --optimizer-in-backward or --optimizer-offload (as fastmid "
        "train requires)",
    )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mode_args(parser)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="a transformers config.json")
    parser.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    parser.add_argument(
        "--recommended", action="store_true", help="run the mode make_plan recommends"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model of the same architecture")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for fit_32b.json/.md")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--results-json", default=None,
        help="also merge the report, as it grows, into this results file of bench/gpu/run_all.sh",
    )  # fmt: skip
    parser.add_argument("--results-case", default="fit_32b")
    return parser.parse_args(argv)


def apply_flags(args: argparse.Namespace, flags: list[Any]) -> tuple[list[str], list[str]]:
    """Set the mode flags of ``flags`` (``fastmid train`` spelling) on ``args``.

    Returns:
        ``(applied, ignored)``: the flags taken, and those this script has no use for.
    """
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_mode_args(parser, defaults=False)
    words = [str(f) for f in flags]
    try:
        known, unknown = parser.parse_known_args(words)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise SystemExit(
            f"fit_32b: cannot read the plan's recommended flags {words}: {exc}"
        ) from None
    for key, value in vars(known).items():
        setattr(args, key, value)
    applied = [w for w in words if w not in unknown]
    return applied, unknown


def resolve_mode(raw: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """A copy of ``raw`` with ``auto`` precision and optimizer resolved as ``fastmid train``
    resolves them, and the sequence-length and clip defaults filled in."""
    args = argparse.Namespace(**vars(raw))
    if args.precision == "auto":  # fastmid.config.resolve_precision
        args.precision = "bf16-master" if device.type == "cuda" else "fp32"
    args.optim = resolve_plan_optim(args.optim, args.precision)
    if args.seq_len is None:
        args.seq_len = SMOKE_SEQ_LEN if args.smoke else 4096
    if args.grad_clip is None:
        args.grad_clip = 0.0 if (args.optimizer_in_backward or args.optimizer_offload) else 1.0
    if args.optimizer_in_backward and args.optimizer_offload:
        raise SystemExit(
            "fit_32b: --optimizer-in-backward and --optimizer-offload exclude each other"
        )
    return args


def mode_dict(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "precision", "optim", "optimizer_in_backward", "optimizer_offload", "grad_checkpointing",
        "seq_len", "micro_batch", "steps", "band", "kernels", "lr", "weight_decay", "grad_clip",
    )  # fmt: skip
    return {k: getattr(args, k) for k in keys}


# ---- the plan ------------------------------------------------------------------------------


def plan_for(config_path: str, args: argparse.Namespace, gpu_memory_gib: float) -> dict[str, Any]:
    """``make_plan`` for the run's mode (keywords it does not take are left out)."""
    import inspect

    kwargs = {
        "band": args.band,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "gpus": 1,
        "gpu_memory_gib": gpu_memory_gib,
        "optim": args.optim,
        "checkpointing": args.grad_checkpointing,
        "precision": args.precision,
        "optimizer_in_backward": args.optimizer_in_backward,
        "optimizer_offload": args.optimizer_offload,
    }
    params = inspect.signature(make_plan).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return make_plan(config_path, **kwargs)


def planned_lines(plan: dict[str, Any]) -> dict[str, Any]:
    mid = plan["memory"]["mid_block"]
    return {
        "bytes": {k: int(mid["bytes"][k]) for k in PLAN_LINES},
        "gib": {k: mid["bytes"][k] / GIB for k in PLAN_LINES},
        "host_memory_bytes": int(mid["bytes"].get("host_memory", 0)),
        "total_bytes": int(mid["bytes"]["total"]),
        "total_gib": mid["bytes"]["total"] / GIB,
        "trainable_parameters": mid["trainable_parameters"],
        "fits": mid["fits"],
        "gpu_memory_gib": mid["gpu_memory_gib"],
        "setup": plan["setup"],
        "activation_model": plan.get("activation_model"),
    }


# ---- the model -----------------------------------------------------------------------------


def smoke_config(source: str, out: Path) -> Path:
    """Write a tiny config of ``source``'s architecture to ``out`` and return its path."""
    data = json.loads(Path(source).read_text())
    data.update(SMOKE_SIZES)
    data.pop("head_dim", None)  # derived from hidden / heads again
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(data.get(key), int):
            data[key] = SMOKE_SIZES["vocab_size"] - 1  # inside the tiny vocabulary
    path = out / "fit_32b_smoke_config.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def init_tensor(name: str, t: torch.Tensor, index: int, seed: int) -> None:
    """The cheap seeded initialization, in place: ``normal(0, 0.02)`` for matrices (own generator,
    seeded ``seed * 100003 + index``), ones for norm weights, zeros for biases."""
    with torch.no_grad():
        if t.ndim >= 2:
            gen = torch.Generator(device=t.device).manual_seed(seed * 100003 + index)
            t.normal_(0.0, INIT_STD, generator=gen)
        elif name.endswith("bias"):
            t.zero_()
        else:
            t.fill_(1.0)


def rebuild_buffers(model: torch.nn.Module, device: torch.device) -> list[str]:
    """Recompute the non-persistent buffers that ``to_empty`` left uninitialized (the rotary
    embeddings' ``inv_freq``) by constructing those modules again on ``device``.

    Returns:
        The rebuilt modules' names.

    Raises:
        RuntimeError: a buffer outside a rotary embedding (its value would be garbage).
    """
    rebuilt = []
    for name, module in list(model.named_modules()):
        if not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        with torch.device(device):
            fresh = type(module)(module.config)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)
        rebuilt.append(name)
    covered = tuple(n + "." for n in rebuilt)
    stray = [n for n, _ in model.named_buffers() if not n.startswith(covered)]
    if stray:
        raise RuntimeError(f"buffers with no known initialization after to_empty: {stray}")
    return rebuilt


def materialize(
    config: Any, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build ``config``'s causal LM on the meta device and materialize it on ``device`` in
    ``dtype`` with the seeded initialization (module docstring)."""
    from transformers import AutoModelForCausalLM

    sync(device)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attention_implementation_for(device)
        )
    model.to(dtype)  # meta: metadata only
    t_meta = time.perf_counter()
    model.to_empty(device=device)
    sync(device)
    t_alloc = time.perf_counter()
    for index, (name, p) in enumerate(model.named_parameters()):
        init_tensor(name, p, index, seed)
    rebuilt = rebuild_buffers(model, device)
    sync(device)
    t_init = time.perf_counter()
    model.config.use_cache = False
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return model, {
        "method": "meta-device build, to_empty, in-place seeded init (normal 0.02 / ones / zeros)",
        "dtype": str(dtype).removeprefix("torch."),
        "parameter_bytes": nbytes,
        "parameter_gib": nbytes / GIB,
        "attention": str(getattr(model.config, "_attn_implementation", "unknown")),
        "rebuilt_buffers": rebuilt,
        "meta_build_s": t_meta - t0,
        "allocate_s": t_alloc - t_meta,
        "init_s": t_init - t_alloc,
        "total_s": t_init - t0,
    }


def band_weight_delta(
    model: torch.nn.Module, trainable: set[int], dtype: torch.dtype, seed: int
) -> dict[str, float]:
    """``||w - w0||`` over the band, w0 regenerated tensor by tensor from the seeded init."""
    sq_delta = torch.zeros((), dtype=torch.float64)
    sq_init = torch.zeros((), dtype=torch.float64)
    changed = total = 0
    with torch.no_grad():
        for index, (name, p) in enumerate(model.named_parameters()):
            if id(p) not in trainable:
                continue
            w0 = torch.empty(p.shape, dtype=dtype, device=p.device)
            init_tensor(name, w0, index, seed)
            diff = p.detach().float() - w0.float()
            sq_delta += float(diff.pow(2).sum())
            sq_init += float(w0.float().pow(2).sum())
            changed += int(bool((diff != 0).any()))
            total += 1
            del w0, diff
    delta = math.sqrt(float(sq_delta))
    init = math.sqrt(float(sq_init))
    return {
        "l2_norm": delta,
        "relative": delta / init if init else float("nan"),
        "tensors_changed": changed,
        "tensors": total,
    }


# ---- the steps -----------------------------------------------------------------------------


def import_train_step() -> tuple[Any, str]:
    """``fastmid.train.recipe.train_step``, or the copy below where the recipe does not import."""
    try:
        from fastmid.train.recipe import train_step

        return train_step, "fastmid.train.recipe.train_step"
    except ImportError as exc:
        return mirror_train_step, f"local copy of train_step (recipe import failed: {exc})"


def mirror_train_step(
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    clip_params: list[torch.nn.Parameter],
    grad_clip: float,
    fused: bool = False,
    precision: PrecisionPolicy | None = None,
) -> Any:
    """``fastmid.train.recipe.train_step`` for one micro-batch (both optimizer paths), without
    the recipe's imports (rich, pyyaml, scipy). Returns an object with the same fields."""
    from types import SimpleNamespace

    (batch,) = micro_batches
    supervised = count_supervised(batch["labels"])
    lr = float(optimizer.param_groups[0]["lr"])
    ctx = precision.autocast(batch["input_ids"].device) if precision else nullcontext()
    in_backward = isinstance(optimizer, OptimizerInBackward)
    if in_backward:
        optimizer.begin_step()
    else:
        optimizer.zero_grad(set_to_none=True)
    try:
        with ctx:
            loss_sum, _n = batch_loss_sum(model, batch, fused)
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(f"non-finite loss {float(loss_sum)}")
        (loss_sum / supervised).backward()
    finally:
        if in_backward:
            grad_norm, finite = optimizer.end_step()
    if in_backward:
        grad_bytes = optimizer.grad_bytes_peak
        if not finite:
            raise FloatingPointError(f"non-finite gradient (norm {grad_norm})")
    else:
        params = [p for p in clip_params if p.grad is not None]
        grad_bytes = sum(p.grad.untyped_storage().nbytes() for p in params)
        max_norm = grad_clip if grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    scheduler.step()
    return SimpleNamespace(
        loss=float(loss_sum.detach()) / supervised,
        grad_norm=grad_norm,
        lr=lr,
        tokens=int(batch["attention_mask"].sum()),
        supervised_tokens=supervised,
        grad_bytes=grad_bytes,
    )


def random_batches(
    n: int, micro_batch: int, seq_len: int, vocab: int, device: torch.device, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Random token ids; labels on the second half of each sequence (-100 on the first)."""
    gen = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=gen)
        labels = ids.clone()
        labels[:, : seq_len // 2] = IGNORE_INDEX
        batches.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": torch.ones_like(ids).to(device),
                "labels": labels.to(device),
            }
        )
    return batches


# ---- measurement ---------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def peaks(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        alloc = int(torch.cuda.max_memory_allocated(device))
        reserved = int(torch.cuda.max_memory_reserved(device))
        stats = torch.cuda.memory_stats(device)
        return {
            "source": "torch.cuda.max_memory_allocated / max_memory_reserved",
            "peak_allocated_bytes": alloc,
            "peak_reserved_bytes": reserved,
            "peak_allocated_gib": alloc / GIB,
            "peak_reserved_gib": reserved / GIB,
            "allocated_now_bytes": int(torch.cuda.memory_allocated(device)),
            "alloc_retries": int(stats.get("num_alloc_retries", 0)),
            "ooms": int(stats.get("num_ooms", 0)),
        }
    rss = peak_rss_bytes()
    return {
        "source": "resource.getrusage ru_maxrss (process peak RSS, runtime included)",
        "peak_rss_bytes": rss,
        "peak_rss_gib": rss / GIB,
    }


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "total_memory_bytes": int(props.total_memory),
            "total_memory_gib": props.total_memory / GIB,
        }
    cpu = platform.processor() or platform.machine() or "cpu"
    return {"type": device.type, "name": f"CPU ({cpu}, {os.cpu_count()} cores)"}


def compare(
    measured: dict[str, Any], planned: dict[str, Any], after_setup: dict[str, Any] | None
) -> dict[str, Any]:
    """Measured peaks against the plan's Mid-Block total: ``(measured - planned) / planned``.

    On CUDA also a breakdown beside the plan's lines: ``weights`` = allocated after setup (the
    model, cast; the token batches are a few KB), ``optimizer_states`` = what the steps left
    allocated on top (the states; no gradient outlives a step in backward), ``transient`` = peak
    minus what stays (gradients, activations, logits and workspace at the worst moment).
    """
    total = planned["total_bytes"]
    out: dict[str, Any] = {"planned_total_bytes": total, "planned_total_gib": total / GIB}
    keys = (
        ("peak_allocated", "peak_reserved") if "peak_allocated_bytes" in measured else ("peak_rss",)
    )
    for key in keys:
        value = measured[f"{key}_bytes"]
        out[f"{key}_gib"] = value / GIB
        out[f"{key}_minus_plan_gib"] = (value - total) / GIB
        out[f"{key}_vs_plan_percent"] = 100.0 * (value - total) / total if total else None
    if "peak_allocated_bytes" in measured and after_setup and "allocated_now_bytes" in after_setup:
        weights = after_setup["allocated_now_bytes"]
        stays = measured["allocated_now_bytes"]
        plan = planned["bytes"]
        rows = {
            "weights": (weights, plan["weights"]),
            "optimizer_states": (stays - weights, plan["optimizer_states"]),
            "transient": (
                measured["peak_allocated_bytes"] - stays,
                plan["gradients"] + plan["activations"] + plan["logits"],
            ),
        }
        out["breakdown"] = {
            name: {
                "measured_bytes": m,
                "planned_bytes": pl,
                "measured_gib": m / GIB,
                "planned_gib": pl / GIB,
                "vs_plan_percent": 100.0 * (m - pl) / pl if pl else None,
            }
            for name, (m, pl) in rows.items()
        }
        out["breakdown_note"] = (
            "transient is planned as gradients + activations + logits; measured as peak "
            "allocated minus what stays allocated after the last step"
        )
    return out


def is_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, also one re-raised by torch.compile or autograd."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "torchao", "triton", "bitsandbytes"):
        try:  # metadata only: importing bitsandbytes on CPU prints notices
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---- the run -------------------------------------------------------------------------------


# (results file, case) of bench/gpu/run_all.sh, set by main(): the report is merged there after the
# plan, the build, the setup and every step, so a run stopped by its time box keeps what it had.
PUBLISH: tuple[str | None, str] = (None, "fit_32b")


def publish(report: dict[str, Any]) -> None:
    path, case = PUBLISH
    if not path:
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_results

    gpu_results.merge_case(path, case, {"report": report})


def log(msg: str) -> None:
    print(f"[fit_32b {time.perf_counter() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def run(raw: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Do the run; return the report and the exit status (0, or 2 after a CUDA OOM)."""
    args = raw  # until the mode is resolved below
    t_imported = time.perf_counter()
    quiet_torchao()
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fit_32b: no CUDA device here; use --smoke (CPU) or --device cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config_path = str(smoke_config(args.config, out) if args.smoke else Path(args.config))
    dev = device_info(device)
    gpu_gib = dev.get("total_memory_gib", 141.0)
    report: dict[str, Any] = {
        "script": "bench/gpu/fit_32b.py",
        "argv": raw.argv,
        "status": "running",
        "smoke": args.smoke,
        "device": dev,
        "config": config_path,
        "versions": versions(),
        "env": {"PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")},
    }

    rec: dict[str, Any] = {"asked": args.recommended}
    if raw.recommended:
        first = plan_for(config_path, resolve_mode(raw, device), gpu_gib)
        given = first.get("recommended")
        if isinstance(given, dict) and given.get("flags") is not None:
            applied, ignored = apply_flags(raw, list(given["flags"]))
            rec.update(
                available=True,
                flags=[str(f) for f in given["flags"]],
                applied=applied,
                ignored=ignored,
                total_bytes=given.get("total_bytes"),
                headroom_bytes=given.get("headroom_bytes"),
            )
            log(f"recommended flags: {' '.join(rec['flags'])} (ignored: {ignored or 'none'})")
        else:
            rec.update(
                available=False,
                note="make_plan returned no 'recommended' entry; the given flags ran",
            )
            log("make_plan has no 'recommended' entry: running the given flags")
    report["recommended"] = rec
    args = resolve_mode(raw, device)
    report["mode"] = mode_dict(args)
    log(f"mode: {json.dumps(report['mode'])}; device {dev['name']}")

    plan = plan_for(config_path, args, gpu_gib)
    report["planned"] = planned_lines(plan)
    publish(report)
    log(
        f"plan: Mid-Block total {report['planned']['total_gib']:.2f} GiB "
        f"({', '.join(f'{k} {v:.2f}' for k, v in report['planned']['gib'].items())})"
    )

    policy = PrecisionPolicy.from_name(args.precision)
    config = load_config(config_path)
    family_for_config(config)
    report["model"] = {
        k: getattr(config, k, None)
        for k in (
            "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "vocab_size",
        )
    }  # fmt: skip
    measured_key = "measured"
    try:
        model, mat = materialize(config, policy.weight_dtype, device, args.seed)
        report["materialize"] = mat
        publish(report)
        log(
            f"materialized {mat['parameter_gib']:.2f} GiB of {mat['dtype']} weights in "
            f"{mat['total_s']:.1f} s (meta {mat['meta_build_s']:.1f}, allocate "
            f"{mat['allocate_s']:.1f}, init {mat['init_s']:.1f})"
        )
        t_setup = time.perf_counter()
        n_layers = len(decoder_layers(model))
        band = BandPlan.parse(n_layers, args.band, None, None, args.seed)
        if list(band.indices) != plan["band"]["indices"]:
            raise RuntimeError(f"band {band.indices} differs from the plan's {plan['band']}")
        trainable = apply_band(model, band)
        counts = count_parameters(model, band)
        policy.cast_trainable(trainable)
        install_execution_policy(model, band, grad_checkpointing=args.grad_checkpointing)
        kernels = patch_model(model, resolve_kernels_flag(args.kernels, device))
        fused = kernels.loss == "fused_linear_cross_entropy"
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if args.optimizer_in_backward:
            optimizer: Any = OptimizerInBackward(
                named, lambda one: build_optimizer(one, args.optim, args.lr, args.weight_decay)
            )
        else:
            optimizer = build_optimizer(
                named, args.optim, args.lr, args.weight_decay, offload=args.optimizer_offload
            )
        scheduler = build_scheduler(optimizer, args.steps, 0, "constant")
        train_step, step_source = import_train_step()
        batches = random_batches(
            args.steps, args.micro_batch, args.seq_len, config.vocab_size, device, args.seed
        )
        model.train()
        band_dict = band.to_dict()
        band_dict["describe"] = band.describe()
        report.update(
            band=band_dict,
            parameters=counts.to_dict(),
            kernels=kernels.to_dict(),
            fused_loss=fused,
            train_step=step_source,
            setup_s=time.perf_counter() - t_setup,
        )
        log(f"band {band.describe()}, {counts.trainable:,} trainable; kernels {kernels.to_dict()}")
        sync(device)
        report["after_setup"] = peaks(device)
        publish(report)
        steps: list[dict[str, Any]] = []
        report["steps"] = steps
        for k, batch in enumerate(batches):
            sync(device)
            t0 = time.perf_counter()
            result = train_step(
                model, [batch], optimizer, scheduler, trainable, args.grad_clip, fused, policy
            )
            sync(device)
            dt = time.perf_counter() - t0
            record = {
                "step": k + 1,
                "loss": result.loss,
                "grad_norm": result.grad_norm,
                "lr": result.lr,
                "tokens": result.tokens,
                "supervised_tokens": result.supervised_tokens,
                "grad_bytes": result.grad_bytes,
                "step_time_s": dt,
                "tokens_per_s": result.tokens / dt if dt > 0 else None,
                **{
                    f"{key}_after": value
                    for key, value in peaks(device).items()
                    if key.endswith("_bytes")
                },
            }
            steps.append(record)
            publish(report)
            log(
                f"step {k + 1}: loss {result.loss:.4f}, grad norm {result.grad_norm:.3g}, "
                f"{dt:.2f} s, {record['tokens_per_s']:.0f} tok/s"
            )
        report[measured_key] = peaks(device)  # before the delta below allocates anything
        later = steps[1:] or steps
        report["step_time"] = {
            "first_s": steps[0]["step_time_s"],
            "mean_after_first_s": sum(s["step_time_s"] for s in later) / len(later),
            "note": "step 1 includes torch.compile of torchao's optimizer step"
            if args.optim.startswith("ao_")
            else "no compiled optimizer step",
        }
        ids = {id(p) for p in trainable}
        report["band_weight_delta"] = band_weight_delta(model, ids, policy.weight_dtype, args.seed)
        report["status"] = "ok"
        status = 0
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        report["status"] = "oom"
        report["error"] = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        report[measured_key] = peaks(device)
        log(f"CUDA out of memory: {report['error']}")
        status = 2
    if report.get(measured_key):
        report["comparison"] = compare(
            report[measured_key], report["planned"], report.get("after_setup")
        )
    report["timing"] = {
        "imports_s": t_imported - T_START,
        "total_s": time.perf_counter() - T_START,
    }
    return report, status


def gib(value: float) -> str:
    """GiB with two decimals, more for the smoke run's tiny sizes."""
    return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.5f}"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    dev, mode, planned = report["device"], report["mode"], report["planned"]
    measured = report.get("measured", {})
    comp = report.get("comparison", {})
    name = Path(report["config"]).stem
    title = (
        f"smoke run, tiny model shaped like {report['model']['model_type']}"
        if report["smoke"]
        else name
    )
    lines = [
        f"# Mid-Block fit on one device: {title} on {dev['name']}",
        "",
        f"Device: **{dev['name']}**"
        + (f" ({dev['total_memory_gib']:.1f} GiB)" if "total_memory_gib" in dev else "")
        + f". Status: **{report['status']}**"
        + (f" ({report['error']})" if report.get("error") else "")
        + ".",
        "",
        f"`python bench/gpu/fit_32b.py {' '.join(report['argv'])}`; config `{report['config']}`; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        "",
        "Mode: " + ", ".join(f"{k} `{v}`" for k, v in mode.items()) + ".",
        "",
    ]
    rec = report["recommended"]
    if rec.get("asked"):
        if rec.get("available"):
            lines += [
                f"Recommended by the plan: `{' '.join(rec['flags'])}`"
                + (f" (ignored here: `{' '.join(rec['ignored'])}`)" if rec["ignored"] else ""),
                "",
            ]
        else:
            lines += [f"--recommended: {rec['note']}.", ""]
    if "band" in report:
        p = report["parameters"]
        lines += [
            f"Band: {report['band']['describe']}, {p['trainable']:,} of {p['total']:,} "
            f"parameters train; kernels: {report['kernels']['enabled']} (loss "
            f"{report['kernels']['loss']}, attention {report['kernels']['attention']}); step: "
            f"{report['train_step']}.",
            "",
        ]
    if "materialize" in report:
        m = report["materialize"]
        lines += [
            f"Materialized {m['parameter_gib']:.2f} GiB of {m['dtype']} weights in "
            f"{m['total_s']:.2f} s (meta build {m['meta_build_s']:.2f} s, allocate "
            f"{m['allocate_s']:.2f} s, init {m['init_s']:.2f} s).",
            "",
        ]
    lines += ["## Memory: measured peak vs the plan's Mid-Block column (GiB = 2^30 bytes)", ""]
    lines += ["| line | planned GiB |", "| --- | ---: |"]
    lines += [f"| {k.replace('_', ' ')} | {gib(v)} |" for k, v in planned["gib"].items()]
    for key, label in (
        ("peak_allocated", "measured peak allocated"),
        ("peak_reserved", "measured peak reserved"),
        ("peak_rss", "measured peak RSS (process)"),
    ):
        if f"{key}_bytes" in measured:
            pct = comp.get(f"{key}_vs_plan_percent")
            diff = f" ({pct:+.1f}% vs plan total)" if pct is not None else ""
            lines.append(f"| **{label}** | **{gib(measured[f'{key}_bytes'] / GIB)}**{diff} |")
    lines += [
        "",
        f"Plan fits in {planned['gpu_memory_gib']:.1f} GiB: {planned['fits']}; source of the "
        f"measurement: {measured.get('source', '-')}.",
        "",
    ]
    if "breakdown" in comp:
        lines += [
            "| part | measured GiB | planned GiB | difference |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, row in comp["breakdown"].items():
            pct = row["vs_plan_percent"]
            lines.append(
                f"| {name.replace('_', ' ')} | {gib(row['measured_gib'])} | "
                f"{gib(row['planned_gib'])} | {'-' if pct is None else f'{pct:+.1f}%'} |"
            )
        lines += ["", f"({comp['breakdown_note']}.)", ""]
    if report.get("steps"):
        lines += [
            "## Steps",
            "",
            "| step | loss | grad norm | time s | tokens/s | peak after step GiB |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in report["steps"]:
            peak = s.get("peak_allocated_bytes_after", s.get("peak_rss_bytes_after", 0))
            lines.append(
                f"| {s['step']} | {s['loss']:.4f} | {s['grad_norm']:.4g} | {s['step_time_s']:.2f} "
                f"| {s['tokens_per_s'] or 0:.0f} | {gib(peak / GIB)} |"
            )
        lines.append("")
        if "step_time" in report:
            st = report["step_time"]
            lines += [
                f"Step 1: {st['first_s']:.2f} s ({st['note']}); later steps: "
                f"{st['mean_after_first_s']:.2f} s on average.",
                "",
            ]
    if "band_weight_delta" in report:
        d = report["band_weight_delta"]
        lines += [
            f"Band weight change ||w - w0||: {d['l2_norm']:.4g} (relative {d['relative']:.3g}; "
            f"{d['tensors_changed']} of {d['tensors']} tensors changed).",
            "",
        ]
    lines.append(f"Total wall time {report['timing']['total_s']:.1f} s.")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    global PUBLISH
    PUBLISH = (args.results_json, args.results_case)
    report, status = run(args)
    out = Path(args.out)
    (out / "fit_32b.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, out / "fit_32b.md")
    publish(report)
    log(f"wrote {out / 'fit_32b.json'} and fit_32b.md ({report['status']})")
    return status


if __name__ == "__main__":
    sys.exit(main())
