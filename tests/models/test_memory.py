"""Memory estimator: hand formulas on a small config, autograd's saved tensors, bitsandbytes' and
torchao's optimizer states, every --precision."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_config, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from fastmid import config as train_config
from fastmid.models import memory
from fastmid.models.band import BandPlan, apply_band
from fastmid.models.memory import (
    GIB,
    BlockShape,
    MemoryPlanError,
    TrainingSetup,
    adamw8bit_state_bytes,
    ao_adamw4bit_state_bytes,
    ao_adamw8bit_state_bytes,
    build_meta_model,
    estimate_all,
    estimate_full,
    estimate_lora,
    estimate_mid_block,
)
from fastmid.models.plan_report import make_plan, print_plan
from fastmid.train.optim import OptimizerInBackward, build_optimizer, import_torchao_optim

CONFIGS = Path(__file__).resolve().parents[2] / "bench" / "configs"

# A small Llama (I is the field's name for the intermediate size): h=64, q=4*16=64, kv=2*16=32, I=160, 10 layers, vocab 300, untied.
H, NH, NKV, D, I, L, V = 64, 4, 2, 16, 160, 10, 300  # noqa: E741
Q, KV = NH * D, NKV * D


def small_config(**kw) -> LlamaConfig:
    args = dict(
        hidden_size=H,
        intermediate_size=I,
        num_attention_heads=NH,
        num_key_value_heads=NKV,
        head_dim=D,
        num_hidden_layers=L,
        vocab_size=V,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    args.update(kw)
    return tiny_config("llama", **args)


# ---- hand formulas (written from the module tree of a Llama layer, not from the estimator) ----

# name -> numel of one layer's parameters
LAYER_TENSORS = {
    "q": H * Q,
    "k": H * KV,
    "v": H * KV,
    "o": Q * H,
    "gate": H * I,
    "up": H * I,
    "down": I * H,
    "norm1": H,
    "norm2": H,
}
P_LAYER = sum(LAYER_TENSORS.values())
P_TOTAL = L * P_LAYER + 2 * V * H + H


def bnb_bytes(n: int) -> int:
    """AdamW8bit state by hand: fp32 below 4096 elements, else uint8 x2 + fp32 absmax per 256."""
    return 8 * n if n < 4096 else 2 * n + 2 * 4 * -(-n // 256)


def test_tiny_parameter_count_matches_module_tree() -> None:
    model = build_meta_model(small_config())
    assert sum(p.numel() for p in model.parameters()) == P_TOTAL
    assert all(p.is_meta for p in model.parameters())


def test_mid_block_estimate_by_hand() -> None:
    model = build_meta_model(small_config())
    plan = BandPlan.from_fractions(L, 0.2, 0.8)  # layers 2..7
    assert plan.indices == tuple(range(2, 8))
    tokens = 3 * 50
    setup = TrainingSetup(seq_len=50, micro_batch=3, gpus=1, gpu_memory_gib=1.0)
    est = estimate_mid_block(model, plan, setup)

    trained = 6 * P_LAYER
    frozen = P_TOTAL - trained
    assert est.trainable_parameters == trained
    assert est.weights == frozen * 2 + trained * (4 + 2)
    assert est.gradients == trained * 4
    assert est.optimizer_states == 6 * sum(bnb_bytes(n) for n in LAYER_TENSORS.values())

    # Checkpointing: 8 layers (band 2..7, suffix 8, 9) keep their bf16 input; one band layer
    # is recomputed at a time; the final norm keeps its fp32 input and rsqrt.
    band_layer = 22 * H + 4 * Q + 4 * KV + 8 * I + 4 * NH + 8
    head = 4 * H + 4
    assert est.activations == tokens * (8 * 2 * H + band_layer + head)
    assert est.logits == tokens * V * (2 + 4 + 4)
    assert est.total == sum(
        (est.weights, est.gradients, est.optimizer_states, est.activations, est.logits)
    )

    no_ckpt = estimate_mid_block(
        model, plan, TrainingSetup(seq_len=50, micro_batch=3, checkpointing=False)
    )
    first_band = band_layer - (4 * H + 4)
    frozen_layer = 8 * H + 4 * Q + 4 * KV + 6 * I + 4 * NH + 8
    assert no_ckpt.activations == tokens * (first_band + 5 * band_layer + 2 * frozen_layer + head)


def test_fsdp_shards_states_not_activations() -> None:
    """FSDP2 over 4 GPUs, by hand: every dim 0 here divides by 4, so every chunk is a quarter."""
    model = build_meta_model(small_config())
    plan = BandPlan.from_fractions(L, 0.2, 0.8)
    one = estimate_mid_block(model, plan, TrainingSetup(seq_len=64, gpus=1))
    four = estimate_mid_block(model, plan, TrainingSetup(seq_len=64, gpus=4))
    trained = 6 * P_LAYER
    frozen = P_TOTAL - trained
    fsdp = four.fsdp
    assert fsdp is not None and one.fsdp is None
    # Units: ten layers, the (untied) embeddings, the root with the final norm and lm_head.
    names = [u.name for u in fsdp.units]
    assert names == [f"model.layers.{i}" for i in range(L)] + ["model.embed_tokens", "<root>"]
    assert fsdp.units[-1].modules == ("model.norm", "lm_head")
    assert [u.reshard_after_forward for u in fsdp.units] == [True] * (L + 1) + [False]
    assert sum(u.parameters for u in fsdp.units) == P_TOTAL
    # bf16-master: fp32 band masters and bf16 frozen weights, a quarter each; the root (lm_head
    # and final norm) and two decoder layers unsharded in bf16, the gather dtype.
    rank = fsdp.peak
    assert rank.parameter_shards == (frozen * 2 + trained * 4) // 4
    assert rank.root_unsharded == (V * H + H) * 2
    assert rank.all_gather_buffers == 2 * 2 * P_LAYER
    assert (
        four.weights
        == rank.weights
        == (frozen * 2 + trained * 4) // 4 + (V * H + H) * 2 + (4 * P_LAYER)
    )
    # Gradients: fp32 quarters (6P bytes for the 6 band layers of P elements). Backward reduces
    # layers 7..3 as it leaves each; layer 2, whose input comes from the no-grad prefix, reduces
    # in the final callback. Just before: five fp32 quarters (5P), layer 2's unsharded bf16
    # gradients (2P) and the fp32 reduce-scatter input FSDP2 keeps for layer 3 (4P): 11P, 5P
    # above the shards.
    assert rank.gradient_shards == trained * 4 // 4 == 6 * P_LAYER
    assert rank.reduce_scatter == 5 * P_LAYER
    assert rank.gradient_accumulation == 0
    assert four.gradients == 11 * P_LAYER
    # --optim auto is ao_adamw8bit on several GPUs. Its 8-bit state needs a local chunk of >= 4096
    # elements: q and o (4096) and gate/up/down (10240) qualify on one GPU, but their quarters
    # (1024, 2560) do not, so every band tensor keeps two fp32 states (8 bytes per element).
    assert four.fsdp is not None and TrainingSetup(gpus=4).optim == "ao_adamw8bit"
    assert rank.optimizer_states == four.optimizer_states == 8 * trained // 4
    assert rank.fp32_state_tensors == 6 * len(LAYER_TENSORS)
    assert four.activations == one.activations
    assert four.logits == one.logits
    assert four.to_dict()["fsdp"]["ranks"][0]["total"] == rank.total

    # Gradient accumulation: unsharded fp32 band gradients between micro-batches (24P). In the
    # last micro-batch layer 7's bf16 gradients are added into them, then its reduce-scatter
    # input (4P) is filled from them: 28P.
    accum = estimate_mid_block(model, plan, TrainingSetup(seq_len=64, gpus=4, grad_accum=2))
    assert accum.fsdp is not None
    assert accum.fsdp.peak.gradient_accumulation == trained * 4 == 24 * P_LAYER
    assert accum.gradients == 28 * P_LAYER
    assert estimate_mid_block(model, plan, TrainingSetup(seq_len=64, grad_accum=2)) == one


def test_fsdp_uneven_chunks_tied_embeddings_and_full_ft_by_hand() -> None:
    """Three GPUs: dim 0 of 64 splits 22/22/20, of 32 11/11/10, of 160 54/54/52 and of 300
    100 x 3; every rank stores chunks padded to the first one. Tied embeddings live in the root."""
    model = build_meta_model(small_config(tie_word_embeddings=True))
    plan = BandPlan.from_fractions(L, 0.2, 0.8)  # layers 2..7
    setup = TrainingSetup(seq_len=16, gpus=3, precision="fp32", optim="adamw")
    est = estimate_mid_block(model, plan, setup)
    assert est.fsdp is not None
    assert [u.name for u in est.fsdp.units][-2:] == ["model.layers.9", "<root>"]
    assert est.fsdp.units[-1].modules == ("model.embed_tokens", "model.norm")
    # Padded chunks: rows x row length per parameter of a layer (q, k, v, o, gate, up, down,
    # two norms), the tied embedding and the final norm.
    padded_layer = 22 * 64 + 11 * 64 + 11 * 64 + 22 * 64 + 54 * 64 + 54 * 64 + 22 * 160 + 22 + 22
    local = {
        0: 22 * 64 + 11 * 64 + 11 * 64 + 22 * 64 + 54 * 64 + 54 * 64 + 22 * 160 + 22 + 22,
        2: 20 * 64 + 10 * 64 + 10 * 64 + 20 * 64 + 52 * 64 + 52 * 64 + 20 * 160 + 20 + 20,
    }
    ranks = est.fsdp.ranks
    assert ranks[0].parameter_shards == ranks[2].parameter_shards
    assert ranks[0].parameter_shards == 4 * (L * padded_layer + 100 * H + 22)
    assert ranks[0].gradient_shards == 4 * 6 * padded_layer
    # adamw: 8 bytes per element of the local (unpadded) chunk, so the last rank holds less.
    assert ranks[0].optimizer_states == 8 * 6 * local[0]
    assert ranks[2].optimizer_states == 8 * 6 * local[2]
    assert est.fsdp.peak.rank == 0 and est.optimizer_states == ranks[0].optimizer_states
    # Unsharded: padded to 3 chunks (66, 33, 162 and 66 rows), fp32 under fp32.
    padded_full = 66 * 64 + 33 * 64 + 33 * 64 + 66 * 64 + 162 * 64 + 162 * 64 + 66 * 160 + 66 + 66
    assert ranks[0].all_gather_buffers == 2 * 4 * padded_full
    assert ranks[0].root_unsharded == 4 * (300 * H + 66)
    # Before layer 2 (deferred: its input needs no gradient) reduces: five padded fp32 gradient
    # chunks, its own unsharded fp32 gradients and the padded input kept for layer 3.
    peak = 4 * (5 * padded_layer + P_LAYER + padded_full)
    assert ranks[0].gradients == peak
    assert ranks[0].reduce_scatter == peak - 4 * 6 * padded_layer

    # Full fine-tuning: every unit trains (fp32: gradient shards = parameter shards). The root
    # (tied embeddings and the final norm: 19,264 elements) has its gradients first and reduces
    # last, so they stay unsharded through the whole backward; layer 0 (whose input, the trained
    # embeddings' output, needs a gradient) reduces as it ends: the peak is just before that.
    full = estimate_full(model, setup)
    assert full.fsdp is not None
    assert full.fsdp.peak.gradient_shards == full.fsdp.peak.parameter_shards
    full_peak = 4 * ((V * H + H) + 9 * padded_layer + P_LAYER + padded_full)
    assert full.fsdp.peak.gradients == full_peak


def test_fsdp_refuses_what_fsdp2_cannot_run() -> None:
    """The rules of fastmid.train.distributed.check_settings, one line each."""
    from fastmid.train import distributed

    assert memory.FSDP_OPTIMIZERS == distributed.FSDP_OPTIMIZERS
    assert (memory.AO_MIN_QUANT_SIZE, memory.AO8_BLOCKSIZE, memory.AO4_BLOCKSIZE) == (
        distributed.TORCHAO_MIN_QUANT_NUMEL,
        distributed.TORCHAO_BLOCK_SIZE["ao_adamw8bit"],
        distributed.TORCHAO_BLOCK_SIZE["ao_adamw4bit"],
    )
    for optim in ("adamw8bit", "paged_adamw8bit"):
        with pytest.raises(MemoryPlanError, match=f"--optim {optim} .*FSDP2") as err:
            TrainingSetup(optim=optim, gpus=2)  # type: ignore[arg-type]
        assert "\n" not in str(err.value) and "adamw, ao_adamw8bit, ao_adamw4bit" in str(err.value)
    for precision in ("fp32", "bf16-master", "bf16"):
        assert TrainingSetup(precision=precision, gpus=2).optim == "ao_adamw8bit"  # type: ignore[arg-type]
        # The same rule as train's --optim auto with several processes.
        assert train_config.resolve_optim("auto", precision, distributed=True) == "ao_adamw8bit"
    with pytest.raises(MemoryPlanError, match="--optimizer-in-backward.*FSDP2"):
        TrainingSetup(optim="adamw", gpus=2, optimizer_in_backward=True)
    with pytest.raises(MemoryPlanError, match="--optimizer-offload.*--gpus 2"):
        TrainingSetup(optim="adamw", gpus=2, optimizer_offload=True)
    with pytest.raises(MemoryPlanError, match="--grad-accum 1"):
        TrainingSetup(optimizer_in_backward=True, grad_accum=2)
    with pytest.raises(MemoryPlanError, match="--grad-accum"):
        TrainingSetup(grad_accum=0)


def test_full_and_lora_by_hand() -> None:
    model = build_meta_model(small_config())
    tokens = 40
    setup = TrainingSetup(seq_len=tokens, optim="adamw", checkpointing=False, lora_rank=4)
    full = estimate_full(model, setup)
    assert full.weights == P_TOTAL * 6
    assert full.gradients == P_TOTAL * 4
    assert full.optimizer_states == P_TOTAL * 8
    full_layer = 26 * H + 4 * Q + 4 * KV + 8 * I + 4 * NH + 8
    assert full.activations == tokens * (L * full_layer + 10 * H + 12)

    r = 4
    per_layer = r * ((H + Q) + 2 * (H + KV) + (Q + H) + 2 * (H + I) + (I + H))
    lora = estimate_lora(model, setup)
    assert lora.trainable_parameters == L * per_layer
    assert lora.weights == P_TOTAL * 2 + L * per_layer * 6
    assert lora.gradients == L * per_layer * 4
    assert lora.optimizer_states == L * per_layer * 8  # fp32 AdamW whatever --optim says
    lora_layer = 18 * H + 6 * Q + 4 * KV + 8 * I + 4 * NH + 8 + 14 * r
    first_lora_layer = lora_layer - (4 * H + 4)  # embeddings frozen: layer 0's input needs no grad
    head = 4 * H + 4
    assert lora.activations == tokens * ((L - 1) * lora_layer + first_lora_layer + head)


def test_adamw8bit_bytes_match_bitsandbytes_state() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    sizes = (100, 4095, 4096, 5000, 256 * 7 + 1)
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p, n in zip(params, sizes, strict=True):
        state = opt.state[p]
        # The two 256-entry quantization maps are shared by all tensors, not per-tensor state.
        nbytes = sum(
            v.numel() * v.element_size()
            for k, v in state.items()
            if torch.is_tensor(v) and k in ("state1", "state2", "absmax1", "absmax2")
        )
        assert adamw8bit_state_bytes(n) == nbytes, n


# ---- precisions and optimizers (bytes per parameter: the module docstring's tables) ----------

# --precision -> bytes per frozen weight, per trained weight (with the bf16 autocast copy under
# bf16-master: 4 + 2), per stored trained weight (what FSDP2 shards), per gradient element.
PRECISION_BYTES = {
    "fp32": (4, 4, 4, 4),
    "bf16-master": (2, 4 + 2, 4, 4),
    "bf16": (2, 2, 2, 2),
}


def ao8_bytes(n: int, param_bytes: int) -> int:
    """torchao AdamW8bit state by hand: quantized only for n >= 4096 and a multiple of 256, then
    per state uint8 codes + an fp32 scale per 256 + its own fp32[256] map; else two states of
    the parameter's dtype."""
    if n >= 4096 and n % 256 == 0:
        return 2 * (n + 4 * (n // 256) + 4 * 256)
    return 2 * param_bytes * n


def test_plan_choices_mirror_the_config() -> None:
    """models/ cannot import fastmid.config: its copies of the choices and of the auto rules
    must agree with it (auto precision: the CUDA default)."""
    assert memory.OPTIMIZERS == tuple(o for o in train_config.OPTIMIZERS if o != "auto")
    assert memory.PRECISIONS == tuple(p for p in train_config.PRECISIONS if p != "auto")
    assert memory.STOCHASTIC_ROUNDING_OPTIMIZERS == train_config.STOCHASTIC_ROUNDING_OPTIMIZERS
    for precision in train_config.PRECISIONS:
        resolved = train_config.resolve_precision(precision, "cuda")
        for optim in train_config.OPTIMIZERS:
            expected = train_config.resolve_optim(optim, resolved)
            if resolved == "bf16" and expected not in train_config.STOCHASTIC_ROUNDING_OPTIMIZERS:
                continue  # refused (next test)
            setup = TrainingSetup(precision=precision, optim=optim)  # type: ignore[arg-type]
            assert (setup.precision, setup.optim) == (resolved, expected), (precision, optim)
    assert (TrainingSetup().precision, TrainingSetup().optim) == ("bf16-master", "adamw8bit")


def test_bf16_refuses_optimizers_without_stochastic_rounding() -> None:
    for optim in ("adamw8bit", "paged_adamw8bit", "adamw"):
        with pytest.raises(MemoryPlanError, match=f"--optim {optim} .*--precision bf16"):
            TrainingSetup(precision="bf16", optim=optim)  # type: ignore[arg-type]
    assert TrainingSetup(precision="bf16").optim == "ao_adamw8bit"
    with pytest.raises(MemoryPlanError, match="--precision 'fp16'"):
        TrainingSetup(precision="fp16")  # type: ignore[arg-type]


@pytest.mark.parametrize("precision", ["fp32", "bf16-master", "bf16"])
def test_weights_gradients_and_states_per_precision_by_hand(precision: str) -> None:
    frozen_b, trained_b, stored_b, grad_b = PRECISION_BYTES[precision]
    compute_b = 4 if precision == "fp32" else 2
    model = build_meta_model(small_config())
    plan = BandPlan.from_fractions(L, 0.2, 0.8)  # layers 2..7
    trained = 6 * P_LAYER
    frozen = P_TOTAL - trained
    setup = TrainingSetup(seq_len=16, precision=precision, optim="ao_adamw8bit")  # type: ignore[arg-type]
    mid = estimate_mid_block(model, plan, setup)
    assert mid.weights == frozen * frozen_b + trained * trained_b
    assert mid.gradients == trained * grad_b
    # torchao's unquantized states (k/v 2048, norms 64) take the trained weight's dtype.
    assert mid.optimizer_states == 6 * sum(ao8_bytes(n, stored_b) for n in LAYER_TENSORS.values())

    # Full fine-tuning in the same precision: every parameter trains.
    full = estimate_full(model, setup)
    assert full.weights == P_TOTAL * trained_b
    assert full.gradients == P_TOTAL * grad_b

    # FSDP2 over 4 GPUs (every dim 0 divides by 4): stored weights in quarters; the root (lm_head,
    # final norm) and two decoder layers unsharded in the compute dtype. Gradients at their peak
    # (just before the first band layer reduces): the other five layers' quarters, its
    # compute-dtype gradients and the fp32 reduce-scatter input kept for the layer above.
    four = estimate_mid_block(model, plan, dataclasses.replace(setup, gpus=4))
    assert four.weights == (frozen * frozen_b + trained * stored_b) // 4 + compute_b * (
        V * H + H + 2 * P_LAYER
    )
    assert four.gradients == 5 * P_LAYER * grad_b // 4 + (compute_b + 4) * P_LAYER

    # LoRA keeps its own setup (bf16 base, fp32 adapters) whatever the precision.
    master = TrainingSetup(seq_len=16, precision="bf16-master", optim="ao_adamw8bit")
    assert estimate_lora(model, setup) == estimate_lora(model, master)


def _state_nbytes(state: torch.Tensor) -> int:
    """Bytes of one optimizer state: a plain tensor, or the inner tensors of torchao's subclass."""
    if type(state) is torch.Tensor:
        return state.nbytes
    names, _ = state.__tensor_flatten__()
    return sum(getattr(state, name).nbytes for name in names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torchao_state_bytes_match_real_states(dtype: torch.dtype) -> None:
    """torchao's states as its step() creates them (``_new_buffer``: exp_avg signed, exp_avg_sq
    unsigned), without calling step() (which compiles per shape)."""
    ao = import_torchao_optim()
    # 4095: too small; 33 x 128 = 4224: a multiple of 128, not of 256 (4-bit quantized, 8-bit
    # plain); 5000: a multiple of neither; the rest quantized by both.
    shapes = [(100,), (4095,), (64, 64), (33, 128), (5000,), (64, 160), (20, 256)]
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in shapes]
    for cls, estimate in (
        (ao.AdamW8bit, ao_adamw8bit_state_bytes),
        (ao.AdamW4bit, ao_adamw4bit_state_bytes),
    ):
        opt = cls(params, lr=1e-3, bf16_stochastic_round=True)
        for p in params:
            real = sum(_state_nbytes(opt._new_buffer(p, signed)) for signed in (True, False))
            assert estimate(p.numel(), p.element_size()) == real, (cls.__name__, tuple(p.shape))


# ---- --optimizer-in-backward and --optimizer-offload ------------------------------------------

# The small Llama's largest tensors: gate, up and down, 64 x 160 = 10240 elements each (q and o
# are 64 x 64 = 4096, k and v 64 x 32 = 2048, the norms 64); embeddings and lm_head 300 x 64.
LARGEST_LAYER_TENSOR = 10240
# torchao's CPUOffloadOptimizer keeps tensors of < 4096 elements on the GPU: k, v and the norms.
KEPT = [2048, 2048, 64, 64]  # k, v, norm1, norm2
MOVED = [4096, 4096, 10240, 10240, 10240]  # q, o (exactly 4096: offloaded), gate, up, down
assert sorted(KEPT + MOVED) == sorted(LAYER_TENSORS.values())


@pytest.mark.parametrize(
    ("precision", "optim", "grad_b"),
    [("fp32", "adamw", 4), ("bf16-master", "adamw8bit", 4), ("bf16", "ao_adamw8bit", 2)],
)
def test_optimizer_in_backward_keeps_one_gradient_by_hand(
    precision: str, optim: str, grad_b: int
) -> None:
    model = build_meta_model(small_config())
    plan = BandPlan.from_fractions(L, 0.2, 0.8)  # layers 2..7
    setup = TrainingSetup(
        seq_len=16,
        precision=precision,  # type: ignore[arg-type]
        optim=optim,  # type: ignore[arg-type]
        optimizer_in_backward=True,
    )
    ordinary = dataclasses.replace(setup, optimizer_in_backward=False)
    mid, mid_ordinary = (
        estimate_mid_block(model, plan, setup),
        estimate_mid_block(model, plan, ordinary),
    )
    assert mid.gradients == 10240 * grad_b  # one gate/up/down gradient
    assert mid_ordinary.gradients == 6 * P_LAYER * grad_b
    # States, weights, activations as without the option; nothing on the host.
    for name in ("weights", "optimizer_states", "activations", "logits"):
        assert getattr(mid, name) == getattr(mid_ordinary, name), name
    assert mid.host_memory == 0
    assert mid.total == mid_ordinary.total - (6 * P_LAYER - 10240) * grad_b

    # Full fine-tuning: the largest tensor is the embedding (or the untied lm_head), 300 x 64.
    full = estimate_full(model, setup)
    assert full.gradients == V * H * grad_b == 19200 * grad_b

    # FSDP2 reduce-scatters after the accumulate hook: several GPUs refuse the step in backward.
    with pytest.raises(MemoryPlanError, match="FSDP2"):
        dataclasses.replace(setup, gpus=4)

    # LoRA keeps its ordinary step.
    assert estimate_lora(model, setup) == estimate_lora(model, ordinary)


def test_optimizer_offload_keeps_small_states_on_the_gpu_by_hand() -> None:
    model = build_meta_model(small_config())
    plan = BandPlan.from_fractions(L, 0.2, 0.8)  # layers 2..7
    setup = TrainingSetup(seq_len=16, optim="adamw", optimizer_offload=True, gpu_memory_gib=1.0)
    ordinary = dataclasses.replace(setup, optimizer_offload=False)
    mid, mid_ordinary = (
        estimate_mid_block(model, plan, setup),
        estimate_mid_block(model, plan, ordinary),
    )
    # bf16-master: fp32 masters (4 bytes) and fp32 AdamW states (8 bytes per element).
    assert mid.optimizer_states == 6 * 8 * (2048 + 2048 + 64 + 64) == 202752
    moved = 4096 + 4096 + 3 * 10240
    # A pinned fp32 copy of each offloaded weight, a pinned fp32 gradient buffer, its states.
    assert mid.host_memory == 6 * (4 * moved + 4 * moved + 8 * moved) == 3735552
    assert mid.gradients == mid_ordinary.gradients == 6 * P_LAYER * 4  # the GPU keeps them
    assert mid_ordinary.optimizer_states == 6 * P_LAYER * 8 and mid_ordinary.host_memory == 0
    # The host is no part of the GPU total nor of fits.
    assert mid.total == mid.weights + mid.gradients + 202752 + mid.activations + mid.logits
    assert mid.total == mid_ordinary.total - 6 * 8 * moved
    tight = dataclasses.replace(setup, gpu_memory_gib=mid.total / GIB)
    assert estimate_mid_block(model, plan, tight).fits  # although total + host > that memory
    assert mid.to_dict()["bytes"]["host_memory"] == 3735552
    assert mid.to_dict()["bytes"]["total"] == mid.total

    # bf16 with torchao 8-bit: bf16 copies and buffers (2 + 2), states quantized where they can.
    bf16 = TrainingSetup(seq_len=16, precision="bf16", optimizer_offload=True)
    est = estimate_mid_block(model, plan, bf16)
    assert est.optimizer_states == 6 * sum(ao8_bytes(n, 2) for n in KEPT) == 6 * 4 * 4224
    assert est.host_memory == 6 * (4 * moved + sum(ao8_bytes(n, 2) for n in MOVED))

    # Full fine-tuning: embeddings and lm_head (19200 each) are offloaded too; all norms stay.
    full = estimate_full(model, setup)
    full_kept = L * (2048 + 2048 + 64 + 64) + 64
    full_moved = L * moved + 2 * V * H
    assert full_kept + full_moved == P_TOTAL
    assert full.optimizer_states == 8 * full_kept
    assert full.host_memory == 16 * full_moved

    # Several GPUs: fastmid train has no offload under FSDP2, so the plan refuses it.
    with pytest.raises(MemoryPlanError, match="--optimizer-offload.*--gpus 4"):
        dataclasses.replace(setup, gpus=4)

    assert estimate_lora(model, setup) == estimate_lora(model, ordinary)


def test_optimizer_options_follow_the_config_rules() -> None:
    with pytest.raises(MemoryPlanError, match="--optimizer-offload.*--optimizer-in-backward"):
        TrainingSetup(optimizer_in_backward=True, optimizer_offload=True)
    with pytest.raises(MemoryPlanError, match="paged_adamw8bit.*--optimizer-offload"):
        TrainingSetup(optim="paged_adamw8bit", optimizer_offload=True)
    assert TrainingSetup(optim="paged_adamw8bit", optimizer_in_backward=True).optimizer_in_backward
    for optim in ("auto", "adamw", "adamw8bit", "ao_adamw8bit", "ao_adamw4bit"):
        setup = TrainingSetup(optim=optim, optimizer_offload=True)  # type: ignore[arg-type]
        assert setup.optimizer_offload


def _grad_bytes(params) -> int:
    return sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)


def test_optimizer_in_backward_measured_gradients_fit_the_plan() -> None:
    """One real step of a band under OptimizerInBackward (fp32 on CPU): the sampled peak of live
    .grad storages is at most the plan's in-backward gradients; an ordinary backward holds
    exactly the plan's ordinary gradients."""
    config = small_config()
    plan = BandPlan.from_fractions(L, 0.2, 0.8)
    setup = TrainingSetup(seq_len=16, precision="fp32", optim="adamw", optimizer_in_backward=True)
    meta = build_meta_model(config)
    planned = estimate_mid_block(meta, plan, setup).gradients
    planned_ordinary = estimate_mid_block(
        meta, plan, dataclasses.replace(setup, optimizer_in_backward=False)
    ).gradients
    ids = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(0))

    model = tiny_model(config=config, seed=0)
    trainable = apply_band(model, plan)
    largest = max(p.numel() * p.element_size() for p in trainable)  # of the real fp32 tensors
    before = [p.detach().clone() for p in trainable]
    optimizer = OptimizerInBackward(
        list(model.named_parameters()), lambda named: build_optimizer(named, "adamw", 1e-3)
    )
    optimizer.begin_step()
    model(input_ids=ids, labels=ids).loss.backward()
    grad_norm, finite = optimizer.end_step()
    assert finite and grad_norm > 0
    assert all(p.grad is None for p in model.parameters())  # freed in the hooks
    assert all(not torch.equal(p, b) for p, b in zip(trainable, before, strict=True))  # stepped
    assert largest <= optimizer.grad_bytes_peak <= planned
    optimizer.remove_hooks()

    ordinary = tiny_model(config=config, seed=0)
    trained = apply_band(ordinary, plan)
    build_optimizer(list(ordinary.named_parameters()), "adamw", 1e-3)
    ordinary(input_ids=ids, labels=ids).loss.backward()
    assert _grad_bytes(ordinary.parameters()) == _grad_bytes(trained) == planned_ordinary
    assert planned_ordinary == 6 * P_LAYER * 4


# ---- activation formulas against autograd's saved tensors ------------------------------------


def _saved_bytes_per_token(
    model, layers, layer: int, seq: int = 24, autocast: bool = True, end=None
) -> float:
    """Bytes autograd saves inside ``layers[layer]`` per token, under CPU bf16 autocast (or none,
    as ``--precision fp32`` and ``bf16`` run). With ``end``, from ``layers[layer]``'s input to
    the output of module ``end`` (the final norm through ``lm_head``).

    Two batch sizes with the same sequence length: the difference removes everything that does
    not scale with tokens (autocast's bf16 weight copies, RoPE cos/sin shared by the batch).
    """
    end = layers[layer] if end is None else end

    def run(batch: int) -> int:
        seen: dict[int, int] = {}
        inside = [False]

        def pack(t: torch.Tensor) -> torch.Tensor:
            if inside[0]:
                seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        pre = layers[layer].register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
        post = end.register_forward_hook(lambda *a: inside.__setitem__(0, False))
        ids = torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(batch))
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
                model(input_ids=ids)
        finally:
            pre.remove()
            post.remove()
        return sum(seen.values())

    return (run(3) - run(1)) / (2 * seq)


@pytest.fixture(scope="module")
def base_model() -> LlamaForCausalLM:
    return tiny_model(config=small_config(num_hidden_layers=3), seed=0).eval()


def _mixed_precision(model: torch.nn.Module, trained_layers: set[int]) -> torch.nn.Module:
    """Design section 4 on CPU: trained weights fp32 masters, frozen weights bf16."""
    model = copy.deepcopy(model)
    for name, p in model.named_parameters():
        idx = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        p.requires_grad_(idx in trained_layers)
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return model


def test_activation_formulas_match_saved_tensors(base_model) -> None:
    shape = BlockShape.from_config(base_model.config)
    assert (shape.q_width, shape.kv_width) == (Q, KV)
    band = _mixed_precision(base_model, {0, 1})
    layers = band.model.layers
    assert _saved_bytes_per_token(band, layers, 1) == shape.band_layer() == 3096
    assert _saved_bytes_per_token(band, layers, 0) == shape.band_layer(input_requires_grad=False)
    assert _saved_bytes_per_token(band, layers, 2) == shape.frozen_layer() == 1880

    full = copy.deepcopy(base_model).float()
    assert _saved_bytes_per_token(full, full.model.layers, 1) == shape.full_layer()


def test_lora_activation_formula_matches_saved_tensors(base_model) -> None:
    peft = pytest.importorskip("peft")
    r = 4
    model = copy.deepcopy(base_model).to(torch.bfloat16)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=r, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    )
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    layers = model.base_model.model.model.layers
    shape = BlockShape.from_config(base_model.config)
    assert _saved_bytes_per_token(model, layers, 1) == shape.lora_layer(r)
    assert _saved_bytes_per_token(model, layers, 0) == shape.lora_layer(
        r, input_requires_grad=False
    )


def _uniform_precision(model: torch.nn.Module, dtype: torch.dtype, trained: set) -> torch.nn.Module:
    """--precision fp32 / bf16 on CPU: every weight in ``dtype``; layers in ``trained`` train
    (``None`` in ``trained``: embeddings, final norm and lm_head too)."""
    model = copy.deepcopy(model).to(dtype)
    for name, p in model.named_parameters():
        idx = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        p.requires_grad_(idx in trained)
    return model


# Per token, h=64, q=64, kv=32, I=160, n=4 (hand arithmetic of the docstring's formulas):
#   bf16-master band 22h+4q+4kv+8I+4n+8 = 3096, full 26h+... = 3352, frozen 8h+4q+4kv+6I+4n+8
#   = 1880, full head 10h+12 = 652; fp32 band 24h+8q+8kv+16I+4n+8 = 4888, frozen
#   8h+8q+8kv+12I+4n+8 = 3224, full head 12h+12 = 780; bf16 band 16h+4q+4kv+8I+4n+8 = 2712,
#   frozen 1880, full head 8h+12 = 524. First band layer: band - (4h+4); Mid-Block head 4h+4.
@pytest.mark.parametrize(
    ("precision", "band", "frozen", "full", "full_head"),
    [
        ("bf16-master", 3096, 1880, 3352, 652),
        ("fp32", 4888, 3224, 4888, 780),
        ("bf16", 2712, 1880, 2712, 524),
    ],
)
def test_activation_formulas_per_precision_match_saved_tensors(
    base_model, precision: str, band: int, frozen: int, full: int, full_head: int
) -> None:
    shape = BlockShape.from_config(base_model.config)
    autocast = precision == "bf16-master"
    if autocast:
        mid = _mixed_precision(base_model, {0, 1})
        everything = copy.deepcopy(base_model).float()
    else:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        mid = _uniform_precision(base_model, dtype, {0, 1})
        everything = _uniform_precision(base_model, dtype, {None, 0, 1, 2})

    def saved(model, layer: int) -> float:
        return _saved_bytes_per_token(model, model.model.layers, layer, autocast=autocast)

    def saved_head(model) -> float:  # final norm through lm_head (the embedding's indices: 8)
        norm = [model.model.norm]
        return _saved_bytes_per_token(model, norm, 0, autocast=autocast, end=model.lm_head)

    h = shape.hidden_size
    assert saved(mid, 1) == shape.band_layer(precision=precision) == band
    assert saved(mid, 0) == shape.band_layer(False, precision) == band - (4 * h + 4)
    assert saved(mid, 2) == shape.frozen_layer(precision) == frozen
    assert saved_head(mid) == shape.head(False, precision) == 4 * h + 4
    assert saved(everything, 1) == shape.full_layer(precision) == full
    assert saved_head(everything) + 8 == shape.head(True, precision) == full_head


@pytest.mark.parametrize(
    ("precision", "a", "band", "full_head"), [("fp32", 4, 4888, 780), ("bf16", 2, 2712, 524)]
)
def test_activations_and_logits_per_precision_by_hand(
    precision: str, a: int, band: int, full_head: int
) -> None:
    """Without autocast a checkpointed layer keeps its input in the weights' dtype (``a`` bytes),
    the logits are ``a`` bytes wide, then fp32 log-probabilities and their fp32 gradient."""
    model = build_meta_model(small_config())
    plan = BandPlan.from_fractions(L, 0.2, 0.8)  # band 2..7, suffix 8, 9
    tokens = 3 * 50
    setup = TrainingSetup(seq_len=50, micro_batch=3, precision=precision)  # type: ignore[arg-type]
    est = estimate_mid_block(model, plan, setup)
    assert est.activations == tokens * (8 * a * H + band + 4 * H + 4)
    assert est.logits == tokens * V * (a + 4 + 4)
    full = estimate_full(model, setup)
    assert full.activations == tokens * (L * a * H + band + full_head)
    assert full.logits == est.logits


# ---- published models ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "billions", "layers"),
    [("qwen2.5-32b", 32.76, 64), ("llama-3.1-8b", 8.03, 32), ("olmo-2-1124-7b", 7.30, 32)],
)
def test_published_sizes(name: str, billions: float, layers: int) -> None:
    plan = make_plan(CONFIGS / f"{name}.json", seq_len=1024)
    assert round(plan["parameters"]["total"] / 1e9, 2) == billions
    assert plan["model"]["num_hidden_layers"] == layers
    assert plan["model"]["tie_word_embeddings"] is False


def test_qwen25_32b_default_band_and_report(capsys) -> None:
    plan = make_plan(CONFIGS / "qwen2.5-32b.json")
    assert plan["band"]["indices"] == list(range(13, 51))
    assert plan["band"]["size"] == 38
    # 64 layers of 487,605,248 parameters: q/k/v carry biases in Qwen2.
    per_layer = (5120 * 5120 + 5120) + 2 * (5120 * 1024 + 1024) + 5120 * 5120
    per_layer += 3 * 5120 * 27648 + 2 * 5120
    assert plan["parameters"]["trainable"] == 38 * per_layer
    assert json.loads(json.dumps(plan)) == plan
    mid = plan["memory"]["mid_block"]
    assert mid["gib"]["total"] == pytest.approx(mid["bytes"]["total"] / GIB, abs=1e-3)
    assert set(plan["memory"]) == {"mid_block", "full", "lora"}

    from rich.console import Console

    console = Console(width=120, record=True)
    print_plan(plan, console)
    text = console.export_text()
    assert "13..50" in text and "LoRA r=16" in text and "fits in 141 GiB" in text


def test_qwen25_32b_bf16_band() -> None:
    """The issue's numbers: under --precision bf16 the 32.76 B weights take 61 GiB, the band's
    18.53 B bf16 gradients 34.5 GiB and its 8-bit states 35 GiB."""
    plan = make_plan(CONFIGS / "qwen2.5-32b.json", precision="bf16")
    assert (plan["setup"]["precision"], plan["setup"]["optim"]) == ("bf16", "ao_adamw8bit")
    h, kv, inter, vocab = 5120, 1024, 27648, 152064
    # One Qwen2 layer's tensors: q/k/v weights and biases, o, gate/up/down, two norms.
    tensors = [h * h, h, h * kv, kv, h * kv, kv, h * h, h * inter, h * inter, inter * h, h, h]
    per_layer = sum(tensors)
    total = 64 * per_layer + 2 * vocab * h + h
    mid = plan["memory"]["mid_block"]
    assert mid["bytes"]["weights"] == 2 * total
    assert mid["bytes"]["gradients"] == 2 * 38 * per_layer
    assert mid["bytes"]["optimizer_states"] == 38 * sum(ao8_bytes(n, 2) for n in tensors)
    gib = mid["gib"]
    assert (round(gib["weights"]), round(gib["gradients"], 1), round(gib["optimizer_states"])) == (
        61,
        34.5,
        35,
    )


def test_qwen25_32b_optimizer_options() -> None:
    """Qwen2.5-32B under --precision bf16: in backward one 5120 x 27648 bf16 gradient lives at a
    time; offload keeps on the GPU only the states of the k/v biases (1024 elements, plain bf16
    states in torchao) and pins bf16 copies, gradient buffers and states of the rest."""
    h, kv, inter = 5120, 1024, 27648
    tensors = [h * h, h, h * kv, kv, h * kv, kv, h * h, h * inter, h * inter, inter * h, h, h]
    per_layer = sum(tensors)
    path = CONFIGS / "qwen2.5-32b.json"
    mid = make_plan(path, precision="bf16", optimizer_in_backward=True)["memory"]["mid_block"]
    assert mid["bytes"]["gradients"] == 2 * h * inter == 283115520
    assert mid["bytes"]["host_memory"] == 0
    off = make_plan(path, precision="bf16", optimizer_offload=True)["memory"]["mid_block"]
    assert off["bytes"]["gradients"] == 2 * 38 * per_layer
    assert off["bytes"]["optimizer_states"] == 38 * 2 * (2 * 2 * kv) == 311296
    moved = [n for n in tensors if n >= 4096]
    assert len(moved) == 10  # all but the two 1024-element biases
    host = 38 * (4 * sum(moved) + sum(ao8_bytes(n, 2) for n in moved))
    assert off["bytes"]["host_memory"] == host
    assert off["bytes"]["total"] == sum(
        off["bytes"][k]
        for k in ("weights", "gradients", "optimizer_states", "activations", "logits")
    )


def test_bad_settings_name_the_flag(tmp_path) -> None:
    with pytest.raises(MemoryPlanError, match="--seq-len"):
        TrainingSetup(seq_len=0)
    with pytest.raises(MemoryPlanError, match="--optim 'sgd'"):
        TrainingSetup(optim="sgd")  # type: ignore[arg-type]
    with pytest.raises(MemoryPlanError, match="--gpu-memory"):
        TrainingSetup(gpu_memory_gib=0)


def test_fits_flag_follows_gpu_memory() -> None:
    model = build_meta_model(small_config())
    plan = BandPlan.from_fractions(L, 0.2, 0.8)
    big = estimate_all(model, plan, TrainingSetup(seq_len=32, gpu_memory_gib=1.0))
    assert all(e.fits for e in big.values())
    small = estimate_all(model, plan, TrainingSetup(seq_len=32, gpu_memory_gib=1e-4))
    assert not any(e.fits for e in small.values())
