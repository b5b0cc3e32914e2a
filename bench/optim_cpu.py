"""The optimizer step on CPU over the default band's tensors, and its share of a default step.

    python bench/optim_cpu.py [--rounds 4] [--steps-per-round 3] [--threads 2]
                              [--default-steps 8] [--arms fastmid,fused,...]

The tensors are those of SmolLM2-135M-Instruct's default band, layers 6..23 of 30 (band 0.2:0.8):
per layer q (576x576), k and v (192x576), o (576x576), gate and up (1536x576), down (576x1536)
and the two RMSNorm weights (576), 63,721,728 parameters in 162 tensors, fp32. The shapes come
from a ``LlamaConfig`` with SmolLM2's sizes built on the meta device (no weights are loaded); the
values are N(0, 0.02) weights and fixed N(0, 1e-3) gradients (every arm steps the same ones).
The param groups are fastmid's (:func:`fastmid.train.optim.param_groups`: matrices with the
default weight decay, norms without), lr and betas the defaults of ``fastmid train``.

Arms, each with its own copy of the parameters, all in one process:

* ``bnb``: bitsandbytes ``AdamW8bit`` (``min_8bit_size=4096``), fastmid's CPU default before
  ``fastmid.train.adamw8bit_cpu``;
* ``fastmid``: :class:`fastmid.train.adamw8bit_cpu.AdamW8bitCPU`, the fused 8-bit kernel (same
  states as ``bnb``);
* ``fastmid_torch``: the same class on its torch backend (where no C compiler is found);
* ``ao``: torchao ``AdamW8bit`` (``torch.compile`` of its step on the first call);
* ``foreach``: ``torch.optim.AdamW(foreach=True)``, fp32 states;
* ``fused``: ``torch.optim.AdamW(fused=True)``, fp32 states.

Each arm steps once outside the medians (state allocation, torchao's compile with a fresh
inductor cache unless ``--warm-compile-cache``: reported as ``warmup_s``), then ``--rounds`` rounds in which every arm steps ``--steps-per-round`` times, the
arm order rotating from round to round, so that noise on a shared machine hits all arms alike.
Reported per arm: the median step time, its spread, and the ratio to ``fused`` (median of the
per-round ratios). The kernel's build time (a fresh compile, no cache) is reported too.

Share of a default step: ``--default-steps N`` (0 skips it) runs ``fastmid train`` with the default
settings for N steps (no accuracy eval, no held-out eval) and takes the median ``step_time_s``
of steps 2..N. Which 8-bit optimizer that run used is read from its summary; the share of an arm
is its step time over the default step with that arm in place of the run's own optimizer
(``T - t_run + t_arm``).

Writes ``bench/results/optim_cpu.json`` and ``bench/results/optim_cpu.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_name  # bench/ is on sys.path when a script runs

RESULTS = Path(__file__).parent / "results"
ARMS = ("bnb", "fastmid", "fastmid_torch", "ao", "foreach", "fused")


def band_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of the default band's trainable tensors, from SmolLM2-135M's config on
    the meta device."""
    import transformers

    from fastmid.models.band import BandPlan

    config = transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    plan = BandPlan.from_fractions(config.num_hidden_layers, 0.2, 0.8)
    prefixes = tuple(f"model.layers.{i}." for i in plan.indices)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if n.startswith(prefixes)]


def defaults() -> dict:
    """``lr``, ``weight_decay`` of ``fastmid train`` (TrainConfig's field defaults)."""
    from fastmid.config import TrainConfig

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {"lr": fields["lr"], "weight_decay": fields["weight_decay"]}


def build_arm(name: str, named: list, hp: dict) -> torch.optim.Optimizer:
    """The optimizer of arm ``name`` over ``named`` with fastmid's param groups."""
    from fastmid.train.optim import MIN_8BIT_SIZE, import_torchao_optim, param_groups

    groups = param_groups(named, hp["weight_decay"])
    if name == "bnb":
        from fastmid.models.loading import quiet_bitsandbytes

        quiet_bitsandbytes()
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=hp["lr"], min_8bit_size=MIN_8BIT_SIZE)
    if name in ("fastmid", "fastmid_torch"):
        from fastmid.train.adamw8bit_cpu import AdamW8bitCPU

        backend = "native" if name == "fastmid" else "torch"
        return AdamW8bitCPU(groups, lr=hp["lr"], backend=backend)
    if name == "ao":
        return import_torchao_optim().AdamW8bit(groups, lr=hp["lr"], bf16_stochastic_round=True)
    if name == "foreach":
        return torch.optim.AdamW(groups, lr=hp["lr"], foreach=True)
    if name == "fused":
        return torch.optim.AdamW(groups, lr=hp["lr"], fused=True)
    raise ValueError(f"unknown arm {name}")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's tensors (shared ones once; torchao's subclasses by their parts)."""
    seen, total = set(), 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
            for inner in t.__tensor_flatten__()[0]:
                add(getattr(t, inner))
            return
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                add(v)
    return total


def kernel_build_s() -> dict:
    """A fresh build of the fused kernel (temporary folder, no cache), seconds, and its ISA."""
    from fastmid.train import adamw8bit_cpu as A

    compiler = A._compiler()
    if compiler is None:
        return {"build_s": None, "isa": None, "status": A.native_status()}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = A._build(compiler, Path(tmp))
        build = time.perf_counter() - t0
        isa = A._Native(path).isa
    return {"build_s": build, "isa": isa, "compiler": compiler, "status": A.native_status()}


def default_step(steps: int) -> dict | None:
    """Median ``step_time_s`` of steps 2..``steps`` of a default ``fastmid train``."""
    if steps < 2:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [
            sys.executable, "-m", "fastmid.cli", "train", "--output", str(out), "--overwrite",
            "--max-steps", str(steps), "--eval-every", "0", "--save-every", "0",
            "--no-eval-accuracy",
        ]  # fmt: skip
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
        summary = json.loads((out / "summary.json").read_text())
    times = [r["step_time_s"] for r in records if r.get("step_time_s") and r["step"] >= 2]
    return {
        "steps": steps,
        "step_times_s": times,
        "median_s": statistics.median(times),
        "optimizer": summary.get("optimizer"),
        "command": " ".join(["fastmid", "train", *cmd[7:]]),  # without the temporary output
    }


def default_adamw8bit_arm() -> str:
    """The arm that ``build_optimizer(..., "adamw8bit")`` builds on CPU in this checkout."""
    from fastmid.train.optim import build_optimizer

    p = torch.nn.Parameter(torch.zeros(64, 64))
    cls = type(build_optimizer([("w", p)], "adamw8bit", lr=1e-3))
    return "fastmid" if cls.__name__ == "AdamW8bitCPU" else "bnb"


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    shapes = band_shapes()
    hp = defaults()
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) * 1e-3 for _n, s in shapes]
    weights = [torch.randn(s, generator=gen) * 0.02 for _n, s in shapes]
    arms: dict[str, dict] = {}
    for name in args.arms:
        named = [
            (n, torch.nn.Parameter(w.clone())) for (n, _s), w in zip(shapes, weights, strict=True)
        ]
        for (_n, p), g in zip(named, grads, strict=True):
            p.grad = g  # shared, read-only for every optimizer here
        opt = build_arm(name, named, hp)
        print(f"{name}: warm-up step", flush=True)
        t0 = time.perf_counter()
        opt.step()
        warmup = time.perf_counter() - t0
        arms[name] = {"opt": opt, "warmup_s": warmup, "times": [], "round_medians": []}
        print(f"{name}: warm-up {warmup:.2f} s", flush=True)
    names = list(arms)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            samples = []
            for _ in range(args.steps_per_round):
                t0 = time.perf_counter()
                arms[name]["opt"].step()
                samples.append(time.perf_counter() - t0)
            arms[name]["times"] += samples
            arms[name]["round_medians"].append(statistics.median(samples))
        print(
            f"round {r + 1}: "
            + ", ".join(f"{n} {arms[n]['round_medians'][-1]:.3f}" for n in names),
            flush=True,
        )
    rows = {}
    for name, a in arms.items():
        times = sorted(a["times"])
        row = {
            "median_s": statistics.median(times),
            "min_s": times[0],
            "max_s": times[-1],
            "times_s": a["times"],
            "warmup_s": a["warmup_s"],
            "state_bytes": state_bytes(a["opt"]),
        }
        if "fused" in arms:
            ratios = [
                x / y
                for x, y in zip(a["round_medians"], arms["fused"]["round_medians"], strict=True)
            ]
            row["vs_fused"] = statistics.median(ratios)
        rows[name] = row
    return {
        "arms": rows,
        "tensors": len(shapes),
        "parameters": sum(w.numel() for w in weights),
        "hp": hp,
    }


def markdown(result: dict) -> str:
    arms = result["arms"]
    lines = [
        "# The optimizer step on CPU: default band of SmolLM2-135M-Instruct",
        "",
        f"`{result['command']}` on {result['machine']} ({result['cpus']} CPUs, "
        f"{result['threads']} torch threads; a shared machine), {result['date']}; torch "
        f"{result['versions']['torch']}, bitsandbytes {result['versions']['bitsandbytes']}, "
        f"torchao {result['versions']['torchao']}. {result['parameters']:,} fp32 parameters in "
        f"{result['tensors']} tensors (layers 6..23), one process, {result['rounds']} interleaved "
        f"rounds x {result['steps_per_round']} steps per arm; medians. Warm-up: the first step "
        f"(states allocated; torchao compiles; inductor's cache {result['inductor_cache']}), not "
        "in the medians.",
        "",
        "| arm | states | step (s), median | min .. max | vs fused | warm-up (s) | state (MiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    what = {
        "bnb": "bitsandbytes AdamW8bit",
        "fastmid": "fastmid AdamW8bitCPU (fused kernel)",
        "fastmid_torch": "fastmid AdamW8bitCPU (torch backend)",
        "ao": "torchao AdamW8bit",
        "foreach": "torch AdamW foreach",
        "fused": "torch AdamW fused",
    }
    for name, a in arms.items():
        states = "fp32" if name in ("foreach", "fused") else "8-bit"
        ratio = f"{a['vs_fused']:.2f}" if "vs_fused" in a else "-"
        lines.append(
            f"| {what[name]} | {states} | {a['median_s']:.3f} | {a['min_s']:.3f} .. "
            f"{a['max_s']:.3f} | {ratio} | {a['warmup_s']:.2f} | {a['state_bytes'] / 2**20:.0f} |"
        )
    if {"fastmid", "bnb", "fused"} <= set(arms):
        fm, bnb, fused = arms["fastmid"], arms["bnb"], arms["fused"]
        lines += [
            "",
            f"The fused 8-bit kernel: {fm['median_s']:.3f} s, {bnb['median_s'] / fm['median_s']:.1f}x "
            f"faster than bitsandbytes with the same states, {fm['vs_fused']:.2f}x torch's fused "
            f"fp32 AdamW ({fused['median_s']:.3f} s) with a quarter of its state memory.",
        ]
    k = result["kernel"]
    lines += [
        "",
        f"vs fused: the median over rounds of (arm's round median / fused's round median). "
        f"Kernel: {k['status']}; a fresh build (no cache) took "
        + (f"{k['build_s']:.2f} s" if k.get("build_s") is not None else "- (no compiler)")
        + "; later processes load the cached library.",
    ]
    d = result.get("default_step")
    if d:
        t, used = d["median_s"], d["optimizer"]
        own = result.get("default_optimizer_arm")
        lines += [
            "",
            f"**Share of a default step**: `{d['command']}`: median step {t:.2f} s over steps "
            f"2..{d['steps']} (`--optim {used}`"
            + (f", timed above as `{own}`" if own else "")
            + "). With each 8-bit arm in its place:",
            "",
            "| arm | step (s) | share of the default step |",
            "| --- | ---: | ---: |",
        ]
        base = t - (arms[own]["median_s"] if own in arms else 0.0)
        for name, a in arms.items():
            step = base + a["median_s"]
            lines.append(f"| {what[name]} | {step:.2f} | {a['median_s'] / step:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--default-steps", type=int, default=8, help="0: skip the default run")
    ap.add_argument(
        "--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS)
    )
    ap.add_argument("--out", default=str(RESULTS), help="folder of optim_cpu.json/.md")
    ap.add_argument(
        "--warm-compile-cache",
        action="store_true",
        help="keep inductor's on-disk cache (default: a fresh one, so torchao compiles cold)",
    )
    args = ap.parse_args()
    args.arms = [a for a in args.arms.split(",") if a]
    if not args.warm_compile_cache:  # read when torchao first compiles, after this
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="optim-cpu-inductor-")
    from fastmid.models.loading import quiet_bitsandbytes
    from fastmid.train.optim import import_torchao_optim

    quiet_bitsandbytes()  # their import notices to logging, not the console
    import_torchao_optim()
    import bitsandbytes
    import torchao

    result = {
        "command": "python bench/optim_cpu.py " + " ".join(sys.argv[1:]),
        "machine": cpu_name(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
        "versions": {
            "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "torchao": torchao.__version__,
            "python": platform.python_version(),
        },
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
        "kernel": kernel_build_s(),
        "inductor_cache": "warm" if args.warm_compile_cache else "cold, a fresh folder",
    }
    result |= measure(args)
    result["default_step"] = default_step(args.default_steps)
    if result["default_step"]:
        result["default_optimizer_arm"] = default_adamw8bit_arm()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "optim_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "optim_cpu.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
