"""Case 3 of the prepared GPU run: fastmid's Mid-Block step on an 8B-shaped model (issue 24).

    python bench/gpu/step_8b.py [--results-json R.json] [--seq-len 4096] [--smoke]

A Llama-3.1-8B-shaped model (``bench/configs/llama-3.1-8b.json``) with random weights is built on
the GPU (``fit_32b.materialize``: bf16, seeded), set up as ``fastmid train`` sets it up
(``BandPlan`` 0.2:0.8 = layers 6..25 of 32, ``apply_band``, ``PrecisionPolicy.cast_trainable``,
``install_execution_policy``, ``patch_model``, ``fuse_frozen_layers``, ``build_optimizer``,
``build_scheduler``), and stepped by ``fastmid.train.recipe.train_step``, the recipe's own step
(forward, token-sum loss at supervised positions, backward, global-norm clip, optimizer, schedule).

Mode (default): what ``fastmid train`` runs on CUDA with no flags and what ``fastmid plan``
recommends for this model on one H200: ``--precision bf16-master`` (bf16 autocast, fp32 band
masters), ``--optim adamw8bit`` (bitsandbytes), clip 1.0, micro-batch 1 x seq 4096, no
activation checkpointing (the FLOP count below is then the work done). Arms, one after another
on the same model and optimizer (``--arms``):

* ``default``: kernels on (``--kernels auto`` on CUDA), no packing, frozen layers unfused;
* ``kernels_off``: the same with ``--kernels off`` (eager RMSNorm/SwiGLU/RoPE, eager loss);
* ``packing``: kernels on, one row of 4096 tokens packed from examples of 256..1024 tokens
  (block-diagonal SDPA mask; ``--packing``);
* ``fuse_frozen``: kernels on, ``--fuse-frozen`` (packed q/k/v and gate/up GEMMs, fused add+norm
  in the frozen layers);
* ``all_on``: kernels, packing and fused frozen layers together.

Each arm: ``--warmup`` steps, then ``--steps`` timed steps (CUDA synchronized); reported:
median step time, tokens/s, model FLOPs per step and MFU (``gpu_common.FLOP_FORMULA``) against
the datasheet's 989.5 TFLOP/s and the bf16 matmul rate measured at the start of the run, peak
allocated and reserved memory, losses. Every arm is merged into the results file as it ends. An
arm that fails (out of memory included) is recorded and the next one runs. ``--budget-s`` stops
starting new arms.

``--smoke``: a tiny model of the same architecture on the CPU, seq 64, one step per arm, kernels
through the Triton interpreter, ``adamw`` (seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # the kernels run on CPU tensors through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fit_32b as fit  # noqa: E402
import gpu_common as common  # noqa: E402
import gpu_results  # noqa: E402
import torch  # noqa: E402
from fastmid.kernels import use_backend  # noqa: E402

from fastmid.models.band import (  # noqa: E402
    BandPlan,
    apply_band,
    count_parameters,
    install_execution_policy,
)
from fastmid.models.families import decoder_layers  # noqa: E402
from fastmid.models.fused_frozen import fuse_frozen_layers, unfuse_frozen_layers  # noqa: E402
from fastmid.models.loading import load_config, quiet_bitsandbytes, quiet_torchao  # noqa: E402
from fastmid.models.patching import patch_model, unpatch_model  # noqa: E402
from fastmid.models.precision import PrecisionPolicy  # noqa: E402
from fastmid.train.optim import build_optimizer, build_scheduler  # noqa: E402
from fastmid.train.recipe import train_step  # noqa: E402

ARMS = {
    "default": {"kernels": True, "packing": False, "fuse": False},
    "kernels_off": {"kernels": False, "packing": False, "fuse": False},
    "packing": {"kernels": True, "packing": True, "fuse": False},
    "fuse_frozen": {"kernels": True, "packing": False, "fuse": True},
    "all_on": {"kernels": True, "packing": True, "fuse": True},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(common.CONFIGS / "llama-3.1-8b.json"))
    p.add_argument("--seq-len", type=int, default=None, help="default 4096 (64 with --smoke)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="timed steps per arm (3; smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per arm (1; smoke 0)")
    p.add_argument("--precision", default="bf16-master", choices=("bf16-master", "bf16", "fp32"))
    p.add_argument("--optim", default=None, help="default adamw8bit (adamw with --smoke)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new arm after")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--results-json", default=None)
    p.add_argument("--results-case", default="step_8b")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    clock = common.Clock(a.budget_s)
    quiet_torchao()
    quiet_bitsandbytes()
    device = torch.device("cpu" if a.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("step_8b: no CUDA device (use --smoke on a CPU)")
    seq = a.seq_len or (64 if a.smoke else 4096)
    a.steps = a.steps if a.steps is not None else (1 if a.smoke else 3)
    a.warmup = a.warmup if a.warmup is not None else (0 if a.smoke else 1)
    optim = a.optim or ("adamw" if a.smoke else "adamw8bit")

    def out(results: dict) -> None:
        gpu_results.merge_case(a.results_json, a.results_case, results)

    config_path = a.config
    if a.smoke:
        config_path = str(common.smoke_config(a.config, common.scratch_dir()))
    config = load_config(config_path)
    policy = PrecisionPolicy.from_name(a.precision)
    machine = gpu_results.machine_peaks(a.results_json)
    if device.type == "cuda" and not machine.get("bf16_matmul_tflops"):
        import env_probe

        machine = {
            "bf16_matmul_tflops": round(
                env_probe.matmul_tflops(torch, "cuda", 8192, torch.bfloat16), 1
            ),
            "spec_bf16_tflops": gpu_results.H200_BF16_DENSE_TFLOPS
            if any(n in torch.cuda.get_device_name(0) for n in ("H100", "H200"))
            else None,
            "note": "measured by step_8b.py (the env case left none)",
        }

    model, mat = fit.materialize(config, policy.weight_dtype, device, a.seed)
    plan = BandPlan.parse(len(decoder_layers(model)), "0.2:0.8", None, None, a.seed)
    trainable = apply_band(model, plan)
    counts = count_parameters(model, plan)
    policy.cast_trainable(trainable)
    install_execution_policy(model, plan, grad_checkpointing=a.grad_checkpointing)
    layer_counts = common.layer_counts(model, plan)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optim_note = ""
    try:
        optimizer = build_optimizer(named, optim, 1e-5, 0.0)
    except Exception as exc:  # bitsandbytes missing or broken: say so and measure with adamw
        optim_note = f"{optim} unavailable ({str(exc).splitlines()[0][:200]}); adamw instead"
        optim = "adamw"
        optimizer = build_optimizer(named, optim, 1e-5, 0.0)
    scheduler = build_scheduler(optimizer, 10_000, 0, "constant")
    model.train()
    vocab = int(config.vocab_size)
    plain, plain_lengths = common.plain_batch(a.micro_batch, seq, vocab, device, a.seed)
    packed, packed_lengths = common.packed_batch(a.micro_batch, seq, vocab, device, a.seed)
    out({
        "model": {k: getattr(config, k, None) for k in (
            "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "config": str(Path(config_path).name), "smoke": a.smoke, "device": str(device),
        "mode": {"precision": a.precision, "optim": optim, "grad_clip": 1.0, "seq_len": seq,
                 "micro_batch": a.micro_batch, "grad_checkpointing": a.grad_checkpointing,
                 "attention": str(getattr(model.config, "_attn_implementation", None)),
                 "warmup_steps": a.warmup, "timed_steps": a.steps},
        "optim_note": optim_note, "band": plan.describe(), "parameters": counts.to_dict(),
        "layer_counts": layer_counts, "materialize_s": round(mat["total_s"], 2),
        "machine": machine, "flop_formula": common.FLOP_FORMULA,
        "packed_examples_per_row": [len(r) for r in packed_lengths],
    })  # fmt: skip
    print(f"step_8b: {counts.trainable:,} trainable, band {plan.describe()}, optim {optim}")

    arms: dict[str, dict] = {}
    for name in [n for n in a.arms.split(",") if n]:
        setting = ARMS[name]
        arm: dict = {"arm": name, **setting}
        if clock.spent():
            arm.update(status="skipped", reason=f"case budget ({a.budget_s:.0f} s) spent")
            arms[name] = arm
            out({"arms": {name: arm}})
            continue
        try:
            unfuse_frozen_layers(model)
            unpatch_model(model)
            report = patch_model(model, setting["kernels"])
            fused_loss = report.loss == "fused_linear_cross_entropy"
            fuse = fuse_frozen_layers(
                model, plan, enabled=setting["fuse"], off_reason="off in this arm",
                backend="auto" if setting["kernels"] else "torch",
            )  # fmt: skip
            batch, lengths = (
                (packed, packed_lengths) if setting["packing"] else (plain, plain_lengths)
            )
            ctx = (
                use_backend("triton")
                if a.smoke and setting["kernels"]
                else contextlib.nullcontext()
            )
            common.free(device)
            common.reset_peaks(device)
            times, losses, supervised = [], [], 0
            with ctx:
                for k in range(a.warmup + a.steps):
                    common.sync(device)
                    t0 = time.perf_counter()
                    result = train_step(
                        model, [batch], optimizer, scheduler, trainable, 1.0, fused_loss, policy
                    )
                    common.sync(device)
                    dt = time.perf_counter() - t0
                    losses.append(round(result.loss, 5))
                    supervised = result.supervised_tokens
                    if k >= a.warmup:
                        times.append(dt)
            step_s = statistics.median(times)
            flops = common.step_flops(layer_counts, lengths, supervised)
            arm.update(
                status="ok",
                kernels_report={"loss": report.loss, "norms": report.norms, "mlps": report.mlps,
                                "rope": report.rope},
                fused_frozen_layers=len(fuse.layers),
                step_time_s=round(step_s, 4),
                step_times_s=[round(t, 4) for t in times],
                tokens=flops["tokens"],
                supervised_tokens=supervised,
                tokens_per_s=round(flops["tokens"] / step_s, 1),
                flops_per_step=flops,
                losses=losses,
                **common.mfu(flops["total"], step_s, machine),
                **common.peaks(device),
            )  # fmt: skip
            half = flops["total"] - flops["attention"] / 2
            arm["mfu_spec_causal_attention"] = common.mfu(half, step_s, machine)["mfu_spec"]
        except Exception as exc:  # out of memory, a kernel error: record it, run the next arm
            arm.update(status="failed", error=f"{type(exc).__name__}: {str(exc)[:400]}",
                       **common.peaks(device))  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
        common.free(device)
        arms[name] = arm
        out({"arms": {name: arm}})
        print(f"step_8b arm {name}: {arm.get('status')} {arm.get('tokens_per_s')} tok/s, "
              f"MFU(spec) {arm.get('mfu_spec')}, peak {arm.get('peak_allocated_gib')} GiB "
              f"{arm.get('error', '')}", flush=True)  # fmt: skip

    try:
        import flash_attn  # noqa: F401

        fa = "not measured: this script builds the model with SDPA"
    except ImportError:
        fa = "flash-attn is not installed here (the variable-length packed path needs it)"
    arms["packing_flash_attention_2"] = {"arm": "packing_flash_attention_2", "status": "skipped",
                                         "reason": fa}  # fmt: skip
    out({"arms": {"packing_flash_attention_2": arms["packing_flash_attention_2"]},
         "wall_s": round(clock.elapsed(), 1)})  # fmt: skip
    return finish(a, arms)


def finish(a: argparse.Namespace, arms: dict[str, dict]) -> int:
    """Exit status 1 when no arm ran; failed arms beside good ones are named in the case's note."""
    failed = [n for n, v in arms.items() if v.get("status") == "failed"]
    if not any(v.get("status") == "ok" for v in arms.values()):
        return 1
    if failed:
        gpu_results.merge_case(
            a.results_json, a.results_case, {"case_reason": f"arms failed: {', '.join(failed)}"}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
