"""Per-GPU memory estimate of one training step: Mid-Block tuning beside full fine-tuning and LoRA.

Everything is counted in bytes and reported in GiB (2^30 bytes). The model is never loaded: the
parameter counts come from transformers' real module tree built on the ``meta`` device
(:func:`build_meta_model`), so they are exact; the activation terms follow from the config.

Precision policy (``--precision``, design section 4, :mod:`fastmid.models.precision`). ``fp32``:
every weight fp32, no autocast. ``bf16-master`` (the CUDA default, so what ``auto`` means here:
the plan is a GPU estimate): bf16 compute under ``torch.autocast``, frozen weights stored in bf16,
trained weights kept as fp32 master copies. ``bf16``: every weight bf16, trained ones too, no
autocast; the optimizer writes the update back with stochastic rounding, so only ``ao_adamw8bit``
and ``ao_adamw4bit`` are accepted (:data:`STOCHASTIC_ROUNDING_OPTIMIZERS`). Bytes per parameter:

==============  ======  ===============  ======
parameter       fp32    bf16-master      bf16
==============  ======  ===============  ======
frozen weight   4       2                2
trained weight  4       4 + 2 (a)        2
gradient        4       4                2
==============  ======  ===============  ======

(a) the fp32 master plus the bf16 copy autocast caches in forward and the matmuls save for
backward (a slight over-count for norm vectors, which are not cast). Gradients take the trained
weight's dtype. With activation checkpointing the matmuls save nothing in forward, but autocast's
cache still holds every band copy until the autocast region (the forward) ends: 8 checkpointed
4096 x 4096 linears under CPU autocast raised the resident set by 408 MiB inside the region and
152 MiB after it (their bf16 copies are 256 MiB). At the backward peak only the layer being
recomputed has its copies again. The plan counts the whole band's copies, the end-of-forward
figure; measured at the backward peak it is 2 bytes per trained element beyond one layer's too
high, which ``tests/models/test_memory_measured.py`` does not compare.

Optimizer states per trained element (``--optim``; ``auto`` is ``ao_adamw8bit`` under ``bf16``,
else ``adamw8bit``, as :func:`fastmid.config.resolve_optim`):

===================================  ======================================================
AdamW (``adamw``)                    8 (``exp_avg`` + ``exp_avg_sq`` in fp32)
``adamw8bit``, ``paged_adamw8bit``   tensors of >= 4096 elements: 2 (two uint8 states) plus
                                     two fp32 absmax values per block of 256 elements;
                                     smaller tensors keep fp32 states, 8 (bitsandbytes 0.50
                                     ``Optimizer2State.init_state``: ``min_8bit_size=4096``,
                                     ``blocksize = 256``; the paged variant pages the same
                                     states to host memory under pressure). The two shared
                                     256-entry quantization maps are not counted
``ao_adamw8bit`` (torchao 0.18       tensors of >= 4096 elements whose size is a multiple of
``AdamW8bit``)                       256: 2 (uint8 codes of both states) plus one fp32 scale
                                     per block of 256 per state, plus one fp32[256]
                                     quantization map per state, 2 KiB per tensor (each
                                     ``OptimState8bit.zeros`` builds its own
                                     ``torch.tensor(qmap)``: not shared); other tensors keep
                                     two plain states in the parameter's dtype
                                     (``torch.zeros_like(p)`` in ``_AdamBase._new_buffer``):
                                     8 for fp32 weights, 4 for bf16 weights
``ao_adamw4bit`` (torchao 0.18       tensors of >= 4096 elements whose size is a multiple of
``AdamW4bit``)                       128: 1 (two 4-bit codes per uint8, ``numel / 2`` bytes
                                     per state) plus one fp32 scale per block of 128 per
                                     state, plus one fp32[16] map per state (128 bytes per
                                     tensor); other tensors as for ``ao_adamw8bit``
LoRA (r=16, all linears)             base frozen bf16 (2); adapters fp32 (4 + 2 autocast
                                     copy) with fp32 gradients (4) and fp32 AdamW states
                                     (8), peft's usual setup, whatever ``--precision`` and
                                     ``--optim`` say
===================================  ======================================================

Not counted in the states: the per-tensor ``step`` scalars. torchao computes each update in fp32
inside one compiled kernel per parameter (``single_param_adam``: fp32 copies of the weight, the
gradient and both states of that one parameter): a transient of a few fp32 copies of the largest
trained tensor (Qwen2.5-32B's 5120 x 27648 MLP matrices: 0.53 GiB per copy) that exists only in
the optimizer step, after backward has freed the activations and logits; it is not added (under
``--optimizer-in-backward`` the step runs inside backward: see below).

Optimizer in backward and optimizer offload (``--optimizer-in-backward``, ``--optimizer-offload``;
at most one of them, and no offload with ``paged_adamw8bit``, the rules of
:func:`fastmid.config.validate`) change two lines and add a host figure:

=========================  ============================  ========================================
option                     gradients (GPU)               optimizer states (GPU); host memory
=========================  ============================  ========================================
neither                    every trained tensor's        every state on the GPU; host 0
                           gradient
``--optimizer-in-          the largest trained tensor's  unchanged; host 0
backward``                 gradient (b)
``--optimizer-offload``    unchanged (c)                 GPU: the states of the trained tensors of
                                                         < 4096 elements only; host: for every
                                                         trained tensor of >= 4096 elements a
                                                         pinned copy of the weight and a pinned
                                                         gradient buffer, both in the trained
                                                         weight's dtype (``2 * trained`` bytes
                                                         per element), plus its states (d)
=========================  ============================  ========================================

(b) ``fastmid.train.optim.OptimizerInBackward``: one optimizer per trained tensor, stepped in the
tensor's ``register_post_accumulate_grad_hook``, which then frees the gradient. Autograd sets a
``.grad`` just before that hook runs, so one gradient (in the gradient dtype of the precision)
lives at a time. The states are unchanged: the per-tensor rules above apply per tensor either
way. One GPU only: with ``gpus > 1`` the plan refuses it, as ``fastmid train`` does (FSDP2
reduce-scatters a gradient after its accumulate hook has fired).
(c) torchao 0.18 ``CPUOffloadOptimizer(params, optimizer_class, offload_gradients=False,
minimal_size=4096)`` (``torchao/optim/cpu_offload.py``): the GPU keeps every gradient; tensors of
< 4096 elements stay on the GPU, stepped by an on-device optimizer of the same class.
(d) One host optimizer of the same class per offloaded tensor, on its pinned copy (the trained
dtype), so the per-tensor rules above give its states. The host figure is per GPU (a machine with
N GPUs pins N times as much); it is not part of the GPU total and not in ``fits``. One GPU only:
with ``gpus > 1`` the plan refuses it, as ``fastmid train`` does.

The LoRA column keeps its own setup under both options (no step in backward, no offload).

Not counted under ``--optimizer-in-backward``: each hook's transients, which now exist during
backward, beside the activations. The hook checks one gradient: ``grad.float().pow(2).sum()``
(under ``bf16`` an fp32 copy plus its fp32 square: 8 bytes per element of that tensor; with fp32
gradients the square only, 4) then ``torch.isfinite`` (composite ``(g == g) * (g.abs() != inf)``:
a copy in the gradient's dtype and two bool masks, 6 bytes per element with fp32 gradients, 4 with
bf16 ones). So 8 (``bf16``) or 6 (``fp32``, ``bf16-master``) bytes per element of the largest
trained tensor: 1.05 or 0.79 GiB for Qwen2.5-32B's 5120 x 27648 MLP matrices. torchao's fp32
working copies of one tensor (above) come on top while its step runs. Leave headroom for them.

Full fine-tuning uses the same precision, optimizer and options as the band (under ``bf16`` every
weight and gradient is bf16, embeddings included; its largest tensor is usually the embedding).

Activations (bytes per token per decoder layer) are counted the way Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models" (arXiv 2205.05198, Sec. 4.1)
count them: walk the block's ops and add every tensor an op saves for backward. The block is
transformers' Llama-style decoder layer (RMSNorm, q/k/v/o projections with RoPE, SwiGLU MLP) under
bf16 autocast, with SDPA/flash attention, which saves q, k, v, the output and an fp32 logsumexp
and no s x s matrix. Notation: ``h`` hidden size, ``q = num_attention_heads * head_dim``,
``kv = num_key_value_heads * head_dim``, ``I`` intermediate size, ``n = num_attention_heads``.

* RMSNorm (``x.to(fp32)``, ``pow``, ``rsqrt``, ``* weight``) saves the fp32 input (``4h``) and the
  fp32 ``rsqrt`` (4) when its input needs a gradient, plus the bf16 normalized input (``2h``) when
  its weight trains.
* A linear saves its input only when its weight trains (the input is needed for the weight
  gradient only). Under autocast each call casts its input separately, so q, k and v each keep
  their own bf16 copy of the fp32 norm output (``3 * 2h``), gate and up another two (``2 * 2h``).
* Attention: ``q`` and ``k`` after RoPE (``2q + 2kv``), ``v`` (``2kv``), the output (``2q``,
  shared with the ``o_proj`` input), logsumexp (``4n``). RoPE's ``cos``/``sin`` are shared by all
  layers and not counted. GQA runs without ``repeat_kv`` when no padding mask is passed; a padded
  batch repeats k and v to ``q`` width (``4(q - kv)`` more).
* SwiGLU: SiLU saves ``gate`` (``2I``); ``silu(gate) * up`` saves both factors (``4I``);
  ``down_proj`` saves its input (``2I``) when it trains.

Per token and layer this gives, under ``bf16-master`` (the band, first-band, frozen, full and
head totals of every precision, and the LoRA totals, are checked against autograd's saved
tensors in ``tests/models/test_memory.py``):

==============================  ==========================================================
band layer                      ``22h + 4q + 4kv + 8I + 4n + 8``
first band layer, input frozen  ``18h + 4q + 4kv + 8I + 4n + 4`` (its first norm needs no
                                input gradient)
frozen layer above the band     ``8h + 4q + 4kv + 6I + 4n + 8`` (norm inputs, q/k/v/out,
                                gate/silu/up)
frozen prefix                   0 (runs under ``torch.no_grad()``)
full fine-tuning layer          ``26h + 4q + 4kv + 8I + 4n + 8`` (fp32 embeddings make the
                                residual stream fp32, so the normalized inputs are fp32)
LoRA layer (rank r, 7 linears)  ``18h + 6q + 4kv + 8I + 4n + 8 + 14r`` (peft casts each
                                adapter input to fp32 and autocast back to bf16: one copy per
                                linear; first layer ``- 4h - 4``)
checkpointed layer              its input only (``2h``, ``4h`` for full fine-tuning), plus one
                                layer's activations recomputed at a time during backward
head                            final norm ``4h + 4``; full fine-tuning also its weight and the
                                ``lm_head`` input: ``10h + 12`` (with the embedding's indices)
==============================  ==========================================================

Without autocast (``fp32``, ``bf16``) every saved tensor has the weights' dtype, ``a`` bytes (4
under ``fp32``, 2 under ``bf16``), except inside RMSNorm, which upcasts to fp32 in every mode
(``4h + 4`` per norm whose input needs a gradient). There are no per-call casts: q, k and v save
one shared norm output (``ah``), gate and up another (``ah``); the residual stream, the normalized
inputs and the attention and MLP tensors are ``a`` bytes wide; the residual of full fine-tuning
has the same dtype as the band's (no fp32 embeddings under ``bf16``).

In general the band layer saves ``8h + 8 + 4ah + 2a(q + kv) + 4n + 4aI``, a frozen layer
``8h + 8 + 2a(q + kv) + 4n + 3aI`` and the head of full fine-tuning ``4h + 4 + 2ah + 8``:

==============================  ==================================  ================================
per token                       ``fp32`` (``a = 4``)                ``bf16`` (``a = 2``)
==============================  ==================================  ================================
band layer                      ``24h + 8q + 8kv + 16I + 4n + 8``   ``16h + 4q + 4kv + 8I + 4n + 8``
first band layer, input frozen  band layer ``- 4h - 4``             band layer ``- 4h - 4``
frozen layer above the band     ``8h + 8q + 8kv + 12I + 4n + 8``    ``8h + 4q + 4kv + 6I + 4n + 8``
                                                                    (as under ``bf16-master``)
full fine-tuning layer          the band layer                      the band layer
checkpointed layer              its input, ``4h``                   its input, ``2h``
head                            ``4h + 4``; full FT ``12h + 12``    ``4h + 4``; full FT ``8h + 12``
==============================  ==================================  ================================

Logits (the peak of the loss, :func:`fastmid.models.loss.causal_lm_loss_sum`). fastmid projects
``lm_head`` only at the rows whose shifted label is not ``-100``: ``rows = round(supervised_fraction
* tokens)`` (``TrainingSetup.supervised_fraction``). Without ``supervised_fraction`` (``None``, the
default) the plan keeps its earlier per-token figure, every position at ``(a + 8) * vocab_size``
bytes (compute-dtype logits, fp32 log-probabilities and their fp32 gradient: ``10 V``, ``12 V``
under ``fp32``), so earlier plans keep their numbers; it is not what fastmid's loss holds.

* Eager loss (``fused_loss=False``): ``12 * vocab_size`` bytes per row under every precision. The
  compute-dtype logits live only until their fp32 upcast; the peak is in backward, in
  ``log_softmax``'s: its saved fp32 output, the fp32 gradient ``nll_loss`` hands it and the fp32
  gradient it returns (4 + 4 + 4). Families with a final-logit softcap (Gemma 2/3) keep more (the
  ``tanh`` output): not counted.
* Fused loss (``fused_loss=True``, :func:`fastmid.kernels.linear_cross_entropy`, what ``--kernels``
  runs on CUDA): chunks of ``C = default_chunk_size(rows, h, V)`` rows (``next_power_of_2(ceil(
  rows / ceil(V / h)))``, about ``rows * h / V``). Peak: the selected rows and the ``(rows, h)``
  input-gradient buffer (``2 * rows * h * a_h``, ``a_h`` the residual stream's bytes) plus two fp32
  chunks of logits (``8 C V``: the next chunk is computed while the previous one is still bound);
  a single chunk is ``4 C V`` plus its copy in the ``lm_head`` dtype (``+ 2 C V`` for bf16).
  A trained ``lm_head`` (full fine-tuning) adds the kernel's fp32 weight-gradient buffer
  (``4 V h``; derived from the kernel, not measured). The CUDA figure: on CPU, which has no
  bf16 GEMM with fp32 output (``torch.mm(..., out_dtype=torch.float32)``), each bf16 chunk is
  first a bf16 GEMM output, ``2 C V`` more; the tests measure that and add it.

Measured on CPU. ``tests/models/test_memory_measured.py`` runs real training steps (SmolLM2-135M
and a random Llama of hidden 1024, every precision, optimizer and in-backward mode) and checks
every line within 5% of torch's own storage accounting. Its activations come from CPU SDPA
(``_scaled_dot_product_flash_attention_for_cpu``), which saves what CUDA's flash,
memory-efficient and cuDNN kernels and FlashAttention-2 save: q, k, v, the output and an fp32
logsumexp per head (CUDA adds two 8-byte RNG scalars per call). The rule extrapolates to CUDA as
long as one of those kernels runs: SDPA's math fallback (inputs no fused kernel accepts) saves
the ``s x s`` attention matrix and is not modelled. The loss, weight, gradient and state figures
are the same on both devices, except the CPU-only fused-loss term above.

Several GPUs (``gpus = N``, what ``fastmid train --nproc N`` runs): the FSDP2 arrangement of
``fastmid.train.distributed.shard_model`` (torch 2.13 ``fully_shard``), counted per rank
(:func:`fsdp_plan`):

* Units. Every decoder layer is one unit, resharded after its forward; the input embeddings are
  one unit unless they are tied to ``lm_head``; the root unit holds the rest (final norm,
  ``lm_head``, tied embeddings, GPT-2's position embeddings) and is not resharded after forward
  (FSDP2's default for the root), so its unsharded weights stay from the start of forward to the
  end of backward.
* Shards. FSDP2 splits every parameter on dim 0 as ``torch.chunk`` does, ``c = ceil(d0 / N)``
  rows per chunk (rank ``r`` holds ``max(0, min(c, d0 - r c))`` rows), and stores each rank's
  chunk padded to ``c`` rows. *Parameter shards*: every parameter's padded chunk in its stored
  dtype (trained: the trained dtype, the fp32 master under ``bf16-master``; frozen: the frozen
  dtype).
* Gather dtype ``a``: bf16 under ``bf16-master`` (``MixedPrecisionPolicy(param_dtype=bf16)``,
  which replaces the autocast copy), fp32 under ``fp32``, bf16 under ``bf16``. *Root,
  unsharded*: the root's weights padded to ``c N`` rows, ``a`` bytes each. *All-gather
  buffers*: two unsharded copies of the largest decoder layer: in backward the layer being
  computed and the next one, prefetched (FSDP2's default backward prefetch); in forward the
  layer being computed and its flat all-gather output, which FSDP2 keeps until the next layer's
  copy-out. The embeddings' unit is gathered only at the start of forward, before any activation
  or gradient exists, and is not added.
* *Gradient shards*: every trained parameter's padded chunk in the gradient dtype (FSDP2
  reduce-scatters in fp32, ``MixedPrecisionPolicy(reduce_dtype=fp32)``, and casts the shard back
  to the parameter's dtype). *Gradient accumulation* (``grad_accum > 1``): between micro-batches
  FSDP2 keeps every trained parameter's unsharded gradient (``set_requires_gradient_sync(
  False)``) in fp32 (the reduce dtype: bf16 gradients are upcast after each unit's backward), 4
  bytes per trained element on every rank. *Reduce-scatter*: what backward holds above
  ``max(shards, accumulation)`` at its peak (:func:`_backward_gradient_peak` replays it unit by
  unit): the unsharded gradients of the unit whose backward is ending (``a`` bytes per element)
  beside the shards reduced so far and the padded fp32 reduce-scatter input FSDP2 keeps for the
  previous unit until the next one reduces (``reduce_scatter_max_input_buffers = 1``). For
  Mid-Block the peak comes just before the first band layer reduces: its input comes from the
  no-grad prefix, so FSDP2 reduces it only in its final callback; with equal layers of ``P``
  elements that is ``(a + 4 - g / N) P`` bytes above the shards (``g``: gradient bytes).
* *Optimizer states*: the per-tensor rules above, applied to each rank's local (unpadded) chunk:
  torchao keeps 8-bit (4-bit) states only where the *local* chunk has >= 4096 elements and a
  multiple of the block (the rule of ``fastmid.train.distributed.fp32_state_parameters``), so a
  tensor can keep 8-bit states on one GPU and fp32 states on N. ``adamw``:
  8 bytes per local element. bitsandbytes' optimizers (``adamw8bit``, ``paged_adamw8bit``) fail
  on DTensor parameters: the plan refuses them, and ``--optim auto`` means ``ao_adamw8bit``.
* Activations and logits: per rank, as on one GPU (each rank runs its own micro-batches).

The plan computes every rank (later ranks can hold fewer rows) and reports the rank with the
most weights + gradients + states. ``tests/models/test_plan_fsdp_measured.py`` checks the
per-rank lines against two gloo processes on CPU within 5%. Full fine-tuning follows the same
arrangement with every parameter trained. The LoRA column divides its weights, gradients and
states by N and adds two gathered layers (an approximation: fastmid runs no LoRA).

Not counted: the CUDA context and cuBLAS workspaces (about 0.5-1 GiB), allocator fragmentation,
transient gradient buffers inside one layer's backward (beyond FSDP2's reduce-scatter line),
FSDP2's transients (a third gathered copy during a forward copy-out, the bf16 cast of an fp32
shard as all-gather input, the fp32 reduce-scatter output before its cast), the ``s x s``
boolean padding mask of a padded batch (shared by all layers). Leave some headroom.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from fastmid.errors import FastmidError
from fastmid.models.band import BandPlan, apply_band
from fastmid.models.families import (
    FamilySpec,
    decoder_layers,
    family_of,
    input_embeddings,
    output_head,
)

GIB = 2**30
BF16_BYTES = 2
FP32_BYTES = 4
BNB_BLOCKSIZE = 256
BNB_MIN_8BIT_SIZE = 4096
# torchao 0.18 (torchao/optim/adam.py, _AdamBase._new_buffer; subclass_8bit.py, subclass_4bit.py):
# quantized states only for tensors of >= 4096 elements whose size is a multiple of the block.
AO_MIN_QUANT_SIZE = 4096
AO8_BLOCKSIZE = 256
AO4_BLOCKSIZE = 128
AO8_QMAP_ENTRIES = 256  # fp32 entries of one state's quantization map (one map per state)
AO4_QMAP_ENTRIES = 16
# torchao 0.18 CPUOffloadOptimizer's default minimal_size (fastmid.train.optim keeps it): tensors of
# fewer elements stay on the GPU with an on-device optimizer.
OFFLOAD_MIN_SIZE = 4096
LORA_RANK = 16
# Families whose decoder layer is the Llama-style block the activation formulas describe.
EXACT_ACTIVATION_FAMILIES = ("llama", "mistral", "qwen2")

# The resolved --precision values (fastmid.config.PRECISIONS without "auto"; models/ cannot import
# config, so a test checks that the two agree).
Precision = Literal["fp32", "bf16-master", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# The resolved --optim values (fastmid.config.OPTIMIZERS without "auto"; a test checks it).
# paged_adamw8bit keeps the same 8-bit states, paged to host memory under pressure: same bytes.
Optim = Literal["adamw8bit", "adamw", "paged_adamw8bit", "ao_adamw8bit", "ao_adamw4bit"]
OPTIMIZERS: tuple[str, ...] = get_args(Optim)
# The only optimizers --precision bf16 accepts (= fastmid.config.STOCHASTIC_ROUNDING_OPTIMIZERS).
STOCHASTIC_ROUNDING_OPTIMIZERS: tuple[str, ...] = ("ao_adamw8bit", "ao_adamw4bit")
# What "auto" means in a plan: the plan is a GPU estimate, so the CUDA default.
AUTO_PRECISION = "bf16-master"
# The --optim values that step FSDP2's sharded (DTensor) parameters (= fastmid.train.distributed.
# FSDP_OPTIMIZERS; models/ cannot import train, so a test checks that the two agree).
FSDP_OPTIMIZERS: tuple[str, ...] = ("adamw", "ao_adamw8bit", "ao_adamw4bit")
# What --optim auto means with several GPUs: bitsandbytes' 8-bit AdamW fails on DTensors.
AUTO_FSDP_OPTIM = "ao_adamw8bit"
# FSDP2 reduces gradients in fp32 in every precision on CUDA (shard_model's
# MixedPrecisionPolicy(reduce_dtype=fp32); fp32 gradients need no cast), and accumulates unsharded
# gradients between micro-batches in that dtype.
REDUCE_BYTES = FP32_BYTES
ROOT_UNIT = "<root>"
Method = Literal["mid_block", "full", "lora"]


@dataclass(frozen=True)
class PrecisionBytes:
    """Bytes per parameter and per activation element of one ``--precision`` (module docstring).

    Attributes:
        frozen: a frozen weight.
        trained: a trained weight as stored (the fp32 master under ``bf16-master``).
        autocast_copy: the bf16 copy autocast caches per trained weight (``bf16-master`` only).
        gradient: a gradient element (the trained weight's dtype).
        compute: an activation element (and an FSDP2 all-gathered weight).
    """

    frozen: int
    trained: int
    autocast_copy: int
    gradient: int
    compute: int


PRECISION_BYTES: dict[str, PrecisionBytes] = {
    "fp32": PrecisionBytes(FP32_BYTES, FP32_BYTES, 0, FP32_BYTES, FP32_BYTES),
    "bf16-master": PrecisionBytes(BF16_BYTES, FP32_BYTES, BF16_BYTES, FP32_BYTES, BF16_BYTES),
    "bf16": PrecisionBytes(BF16_BYTES, BF16_BYTES, 0, BF16_BYTES, BF16_BYTES),
}


def resolve_plan_precision(precision: str) -> str:
    """``auto`` -> ``bf16-master`` (the CUDA default: a plan estimates GPU memory); any other
    value unchanged (:func:`fastmid.config.resolve_precision` with ``device_type="cuda"``)."""
    return AUTO_PRECISION if precision == "auto" else precision


def resolve_plan_optim(optim: str, precision: str, gpus: int = 1) -> str:
    """``auto`` -> ``ao_adamw8bit`` under ``bf16`` or on several GPUs (FSDP2 cannot step
    bitsandbytes' optimizers), else ``adamw8bit``; any other value unchanged (on one GPU the rule
    of :func:`fastmid.config.resolve_optim`, which models/ cannot import)."""
    if optim != "auto":
        return optim
    if gpus > 1:
        return AUTO_FSDP_OPTIM
    return "ao_adamw8bit" if precision == "bf16" else "adamw8bit"


def precision_bytes(precision: str) -> PrecisionBytes:
    """The :class:`PrecisionBytes` of a resolved precision.

    Raises:
        MemoryPlanError: not ``fp32``, ``bf16-master`` or ``bf16``.
    """
    if precision not in PRECISION_BYTES:
        raise MemoryPlanError(
            f"--precision '{precision}' is not known (choose auto, {', '.join(PRECISIONS)})"
        )
    return PRECISION_BYTES[precision]


class MemoryPlanError(FastmidError, ValueError):
    """An invalid memory-plan setting (sequence length, batch, GPU count, optimizer...)."""


@dataclass(frozen=True)
class BlockShape:
    """The widths of one decoder layer that set its activation memory.

    Attributes:
        hidden_size: ``h``.
        q_width: ``num_attention_heads * head_dim``.
        kv_width: ``num_key_value_heads * head_dim``.
        intermediate_size: ``I`` (MLP inner width).
        num_attention_heads: ``n`` (one fp32 logsumexp per head and token).
        vocab_size: ``V``.
    """

    hidden_size: int
    q_width: int
    kv_width: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> BlockShape:
        """Read the widths from a transformers config (``head_dim`` defaults to ``h / n``).

        Raises:
            MemoryPlanError: the config lacks ``hidden_size``, ``num_attention_heads`` or
                ``vocab_size``.
        """
        try:
            h = int(config.hidden_size)
            n = int(config.num_attention_heads)
            vocab = int(config.vocab_size)
        except (AttributeError, TypeError):
            raise MemoryPlanError(
                f"config of model_type '{getattr(config, 'model_type', '?')}' lacks hidden_size, "
                "num_attention_heads or vocab_size"
            ) from None
        head_dim = getattr(config, "head_dim", None) or h // n
        n_kv = getattr(config, "num_key_value_heads", None) or n
        inter = (
            getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
        )
        return cls(h, n * head_dim, n_kv * head_dim, int(inter), n, vocab)

    def _attention(self, a: int = BF16_BYTES) -> int:
        # q, k after RoPE; v; output (a bytes each); fp32 logsumexp per head.
        return 2 * a * self.q_width + 2 * a * self.kv_width + 4 * self.num_attention_heads

    def band_layer(self, input_requires_grad: bool = True, precision: str = "bf16-master") -> int:
        """Bytes per token saved by a trained layer: ``22h + 4q + 4kv + 8I + 4n + 8`` under
        ``bf16-master``, ``24h + 8q + 8kv + 16I + 4n + 8`` under ``fp32``,
        ``16h + 4q + 4kv + 8I + 4n + 8`` under ``bf16``.

        With ``input_requires_grad=False`` (first band layer above a frozen, no-grad prefix) the
        first norm's fp32 input and ``rsqrt`` are not saved: ``- 4h - 4``. Source: module
        docstring (Korthikanti et al. 2022 method).

        Raises:
            MemoryPlanError: unknown ``precision``.
        """
        a = precision_bytes(precision).compute
        h, i = self.hidden_size, self.intermediate_size
        first_norm = 4 * h + 4 if input_requires_grad else 0
        norms = first_norm + (4 * h + 4) + 2 * (a * h)  # + normalized input per norm weight
        if precision == "bf16-master":
            # autocast casts the fp32 norm output once per linear: q, k, v | gate, up.
            linear_inputs = 3 * 2 * h + 2 * 2 * h
        else:
            linear_inputs = 2 * a * h  # one shared norm output each for q/k/v and gate/up
        return norms + linear_inputs + self._attention(a) + 4 * a * i

    def frozen_layer(self, precision: str = "bf16-master") -> int:
        """Bytes per token saved by a frozen layer that passes gradients down:
        ``8h + 4q + 4kv + 6I + 4n + 8`` (norm inputs, attention tensors, gate/silu/up) under
        ``bf16-master`` and ``bf16``, ``8h + 8q + 8kv + 12I + 4n + 8`` under ``fp32``.

        Raises:
            MemoryPlanError: unknown ``precision``.
        """
        a = precision_bytes(precision).compute
        h, i = self.hidden_size, self.intermediate_size
        return 2 * (4 * h + 4) + self._attention(a) + 3 * a * i

    def full_layer(self, precision: str = "bf16-master") -> int:
        """Bytes per token saved by a layer under full fine-tuning: under ``bf16-master``
        ``26h + 4q + 4kv + 8I + 4n + 8`` (fp32 embeddings make the residual stream fp32, so the
        normalized inputs are fp32); under ``fp32`` and ``bf16`` the band layer (the residual
        has the weights' dtype either way).

        Raises:
            MemoryPlanError: unknown ``precision``.
        """
        extra = 2 * 2 * self.hidden_size if precision == "bf16-master" else 0
        return self.band_layer(True, precision) + extra

    def checkpoint_input(self, full: bool = False, precision: str = "bf16-master") -> int:
        """Bytes per token a checkpointed layer keeps (its input, the residual stream): ``2h``
        (``4h`` under ``fp32``, and for full fine-tuning under ``bf16-master``).

        Raises:
            MemoryPlanError: unknown ``precision``.
        """
        a = precision_bytes(precision).compute
        if full and precision == "bf16-master":
            a = FP32_BYTES
        return a * self.hidden_size

    def lora_layer(self, rank: int, input_requires_grad: bool = True) -> int:
        """Bytes per token saved by a frozen layer with LoRA on its 7 linears:
        ``18h + 6q + 4kv + 8I + 4n + 8 + 14r`` (``- 4h - 4`` when the input needs no gradient).
        """
        h, i = self.hidden_size, self.intermediate_size
        base = self.frozen_layer() - (0 if input_requires_grad else 4 * h + 4)
        adapter_inputs = 2 * (3 * h + self.q_width + 2 * h + i)  # q,k,v | o | gate,up | down
        return base + adapter_inputs + 7 * 2 * rank

    def head(self, full: bool = False, precision: str = "bf16-master") -> int:
        """Bytes per token saved after the last layer: final norm ``4h + 4``; under full
        fine-tuning (trained norm weight, ``lm_head`` input, embedding indices) ``10h + 12``
        under ``bf16-master``, ``12h + 12`` under ``fp32``, ``8h + 12`` under ``bf16``.

        Raises:
            MemoryPlanError: unknown ``precision``.
        """
        a = precision_bytes(precision).compute
        h = self.hidden_size
        if not full:
            return 4 * h + 4
        if precision == "bf16-master":
            # fp32 residual: fp32 normalized input (4h), bf16 autocast copy for lm_head (2h).
            return 4 * h + 4 + 4 * h + 2 * h + 8
        return 4 * h + 4 + 2 * a * h + 8

    def logits(self, precision: str = "bf16-master") -> int:
        """Bytes per token of the plan's earlier loss figure (``supervised_fraction=None``):
        ``10 V`` (bf16 logits, fp32 log-probabilities saved by ``log_softmax``, their fp32
        gradient); ``12 V`` under ``fp32`` (fp32 logits). fastmid's own loss holds
        :meth:`loss_row` per supervised row instead (module docstring).

        Raises:
            MemoryPlanError: unknown ``precision``.
        """
        a = precision_bytes(precision).compute
        return (a + FP32_BYTES + FP32_BYTES) * self.vocab_size

    def loss_row(self) -> int:
        """Peak bytes per supervised row of fastmid's eager loss, every precision: ``12 V``
        (``log_softmax``'s saved fp32 output, the fp32 gradient it receives and the one it
        returns, alive together in its backward; measured)."""
        return 3 * FP32_BYTES * self.vocab_size

    def fused_loss(
        self, rows: int, hidden_bytes: int, head_bytes: int, head_trains: bool = False
    ) -> int:
        """Peak bytes of :func:`fastmid.kernels.linear_cross_entropy` over ``rows`` rows on
        CUDA (module docstring): ``2 * rows * h * hidden_bytes`` (the selected rows and their
        gradient buffer) plus ``8 C V`` (two fp32 chunks of ``C = default_chunk_size(rows, h,
        V)`` rows; one chunk: ``4 C V`` plus its copy in the ``lm_head`` dtype when that is not
        fp32), plus ``4 V h`` for the fp32 weight-gradient buffer of a trained ``lm_head``.

        Args:
            rows: supervised rows of the micro-batch.
            hidden_bytes: bytes per element of the final norm's output (the residual stream).
            head_bytes: bytes per element of the ``lm_head`` weight.
            head_trains: ``lm_head`` receives a gradient (full fine-tuning).
        """
        from fastmid.kernels.linear_cross_entropy import default_chunk_size

        if rows == 0:
            return 0
        h, v = self.hidden_size, self.vocab_size
        chunk = min(rows, default_chunk_size(rows, h, v))
        if chunk < rows:
            logits = 2 * FP32_BYTES * chunk * v
        else:
            copy = head_bytes if head_bytes != FP32_BYTES else 0
            logits = (FP32_BYTES + copy) * chunk * v
        weight_grad = FP32_BYTES * v * h if head_trains else 0
        return 2 * rows * h * hidden_bytes + logits + weight_grad


@dataclass(frozen=True)
class TrainingSetup:
    """What one training step looks like on each GPU.

    Attributes:
        seq_len: tokens per sequence.
        micro_batch: sequences per GPU per forward/backward.
        gpus: GPUs sharing weights, gradients and optimizer states (FSDP2 when > 1: the
            arrangement of the module docstring, per rank).
        gpu_memory_gib: memory of one GPU in GiB (2^30 bytes); an H200 "141 GB" shows about
            140 GiB to CUDA.
        optim: one of :data:`OPTIMIZERS` or ``auto`` (``ao_adamw8bit`` under ``bf16`` or with
            ``gpus > 1``, else ``adamw8bit``); resolved on construction, so the attribute never
            reads ``auto``. With ``gpus > 1`` only :data:`FSDP_OPTIMIZERS`.
        checkpointing: non-reentrant activation checkpointing of every layer that stores
            activations (band and layers above it).
        lora_rank: rank of the LoRA baseline.
        precision: ``fp32``, ``bf16-master``, ``bf16`` or ``auto`` (``bf16-master``, the CUDA
            default: a plan estimates GPU memory); resolved on construction.
        optimizer_in_backward: ``--optimizer-in-backward``: each trained tensor steps in its
            gradient hook, which frees the gradient (module docstring).
        optimizer_offload: ``--optimizer-offload``: torchao's ``CPUOffloadOptimizer``, states of
            tensors of >= 4096 elements in pinned host memory (module docstring).
        supervised_fraction: share of the micro-batch's tokens whose shifted label is not
            ``-100`` (the rows the loss projects with ``lm_head``; answers-only SFT: the answer
            tokens' share), in [0, 1]. ``None`` (default): the plan's earlier per-token logits
            figure, kept so earlier plans keep their numbers (module docstring: logits).
        fused_loss: the loss runs :func:`fastmid.kernels.linear_cross_entropy` (``--kernels``,
            on by default on CUDA with Triton); with ``supervised_fraction=None`` every token
            counts as a row.
        grad_accum: micro-batches per optimizer step (``--grad-accum``). On one GPU it changes
            nothing (gradients accumulate in place); with ``gpus > 1`` FSDP2 keeps unsharded
            fp32 gradients between micro-batches (module docstring).

    Raises:
        MemoryPlanError: a non-positive size, an unknown precision or optimizer, and the
            combinations ``fastmid train`` refuses (one line each, naming the flag): ``bf16``
            with an optimizer that cannot round stochastically; both optimizer options; offload
            with ``paged_adamw8bit``; the step in backward with ``grad_accum > 1``; with
            ``gpus > 1`` a bitsandbytes optimizer, the step in backward or offload.
    """

    seq_len: int = 4096
    micro_batch: int = 1
    gpus: int = 1
    gpu_memory_gib: float = 141.0
    optim: Optim | Literal["auto"] = "auto"
    checkpointing: bool = True
    lora_rank: int = LORA_RANK
    precision: Precision | Literal["auto"] = "auto"
    optimizer_in_backward: bool = False
    optimizer_offload: bool = False
    supervised_fraction: float | None = None
    fused_loss: bool = False
    grad_accum: int = 1

    def __post_init__(self) -> None:
        for flag, value in (
            ("--seq-len", self.seq_len),
            ("--micro-batch", self.micro_batch),
            ("--gpus", self.gpus),
            ("--grad-accum", self.grad_accum),
            ("lora_rank", self.lora_rank),
        ):
            if not isinstance(value, int) or value < 1:
                raise MemoryPlanError(f"{flag}: must be a positive integer, got {value!r}")
        fraction = self.supervised_fraction
        if fraction is not None and not (
            isinstance(fraction, int | float) and 0 < fraction <= 1  # also refuses NaN
        ):
            raise MemoryPlanError(
                f"--supervised-fraction: must be a share of the tokens in (0, 1], got {fraction!r}"
            )
        # `not > 0` also refuses NaN; inf would plan against memory no GPU has.
        if not (self.gpu_memory_gib > 0 and math.isfinite(self.gpu_memory_gib)):
            raise MemoryPlanError(
                f"--gpu-memory: must be a finite positive number (GiB), got {self.gpu_memory_gib}"
            )
        precision = resolve_plan_precision(self.precision)
        precision_bytes(precision)  # refuses an unknown precision, naming --precision
        optim = resolve_plan_optim(self.optim, precision, self.gpus)
        if optim not in OPTIMIZERS:
            raise MemoryPlanError(
                f"--optim '{self.optim}' is not known (choose auto, {', '.join(OPTIMIZERS)})"
            )
        if precision == "bf16" and optim not in STOCHASTIC_ROUNDING_OPTIMIZERS:
            # The rule of fastmid.config.validate: round-to-nearest bf16 updates lose small steps.
            raise MemoryPlanError(
                f"--optim {optim} cannot write bf16 weights back with stochastic rounding, so "
                f"--precision bf16 does not train with it; use "
                f"{' or '.join(STOCHASTIC_ROUNDING_OPTIMIZERS)}, or --precision bf16-master"
            )
        # The rules of fastmid.config.validate (grad clipping and accumulation are no plan input).
        if self.optimizer_in_backward and self.optimizer_offload:
            raise MemoryPlanError(
                "--optimizer-offload already steps on the host while backward runs; use one of "
                "--optimizer-offload and --optimizer-in-backward"
            )
        if self.optimizer_offload and optim == "paged_adamw8bit":
            raise MemoryPlanError(
                "--optim paged_adamw8bit pages its states itself; with --optimizer-offload use "
                "adamw, adamw8bit, ao_adamw8bit or ao_adamw4bit"
            )
        if self.optimizer_in_backward and self.grad_accum > 1:
            raise MemoryPlanError(
                f"--optimizer-in-backward: the step in backward runs once per backward, so it "
                f"cannot accumulate {self.grad_accum} micro-batches; use --grad-accum 1"
            )
        if self.gpus > 1:
            _check_fsdp(optim, self.gpus, self.optimizer_in_backward, self.optimizer_offload)
        object.__setattr__(self, "precision", precision)  # frozen dataclass: resolve once
        object.__setattr__(self, "optim", optim)

    @property
    def dtype_bytes(self) -> PrecisionBytes:
        """The :class:`PrecisionBytes` of :attr:`precision`."""
        return PRECISION_BYTES[self.precision]

    @property
    def tokens(self) -> int:
        """Tokens per GPU per micro-step: ``micro_batch * seq_len``."""
        return self.micro_batch * self.seq_len

    @property
    def supervised_rows(self) -> int:
        """Rows the loss projects per micro-step: ``round(supervised_fraction * tokens)``,
        every token when ``supervised_fraction`` is None."""
        if self.supervised_fraction is None:
            return self.tokens
        return round(self.supervised_fraction * self.tokens)


def _check_fsdp(optim: str, gpus: int, in_backward: bool, offload: bool) -> None:
    """Refuse, in one line each, what FSDP2 cannot run (the rules of
    ``fastmid.train.distributed.check_settings``, which models/ cannot import)."""
    if optim not in FSDP_OPTIMIZERS:
        raise MemoryPlanError(
            f"--optim {optim} cannot step FSDP2's sharded (DTensor) parameters (bitsandbytes "
            f"issues #89, #1633); with --gpus {gpus} use {', '.join(FSDP_OPTIMIZERS)}"
        )
    if in_backward:
        raise MemoryPlanError(
            f"--optimizer-in-backward: FSDP2 reduce-scatters a gradient after its accumulate "
            f"hook has fired, so the step cannot run inside backward with --gpus {gpus}; drop "
            "--optimizer-in-backward"
        )
    if offload:
        raise MemoryPlanError(
            f"--optimizer-offload: not available with --gpus {gpus}; drop it (FSDP2 already "
            "keeps 1/N of the optimizer states per GPU)"
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU memory of one training step, in bytes.

    Attributes:
        method: ``mid_block``, ``full`` or ``lora``.
        trainable_parameters: parameters that receive updates.
        weights, gradients, optimizer_states, activations, logits: bytes per GPU.
        gpu_memory_gib: the GPU's memory in GiB, for :attr:`fits`.
        host_memory: pinned host bytes per GPU of ``--optimizer-offload`` (weight copies,
            gradient buffers and states of the offloaded tensors); 0 without offload. Not part
            of :attr:`total` nor of :attr:`fits`.
        fsdp: with ``gpus > 1`` (Mid-Block and full fine-tuning) the FSDP2 arrangement and every
            rank's lines (:class:`FsdpPlan`); ``weights``, ``gradients`` and
            ``optimizer_states`` are then those of :attr:`FsdpPlan.peak`. None on one GPU and
            for LoRA.
    """

    method: Method
    trainable_parameters: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    gpu_memory_gib: float
    host_memory: int = 0
    fsdp: FsdpPlan | None = None

    @property
    def total(self) -> int:
        """Sum of the GPU terms, bytes (not :attr:`host_memory`)."""
        return (
            self.weights + self.gradients + self.optimizer_states + self.activations + self.logits
        )

    @property
    def fits(self) -> bool:
        """``total <= gpu_memory_gib * 2^30``."""
        return self.total <= self.gpu_memory_gib * GIB

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view: bytes and GiB (rounded to 3 decimals) per term, ``fits``.

        ``host_memory`` follows ``total`` and is not part of it (pinned host memory). With
        :attr:`fsdp`, the key ``fsdp`` holds :meth:`FsdpPlan.to_dict`.
        """
        terms = {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer_states": self.optimizer_states,
            "activations": self.activations,
            "logits": self.logits,
            "total": self.total,
            "host_memory": self.host_memory,
        }
        out = {
            "method": self.method,
            "trainable_parameters": self.trainable_parameters,
            "bytes": terms,
            "gib": {k: round(v / GIB, 3) for k, v in terms.items()},
            "gpu_memory_gib": self.gpu_memory_gib,
            "fits": self.fits,
        }
        if self.fsdp is not None:
            out["fsdp"] = self.fsdp.to_dict()
        return out


# ---- building blocks -------------------------------------------------------------------------


def build_meta_model(config: Any) -> torch.nn.Module:
    """Build the ``*ForCausalLM`` of ``config`` on the meta device (no memory, no weights).

    Returns:
        The model; its parameters are meta tensors with exact shapes (tied weights tied).

    transformers imports its torchao quantizer while building a model when torchao is installed;
    torchao 0.18 then logs one line per CUDA extension it cannot load and torch one per enum it
    registers. Those loggers are held at ERROR meanwhile, so ``fastmid plan`` prints only its
    report.

    Raises:
        ValueError: transformers knows no causal LM for the config.
    """
    from transformers import AutoModelForCausalLM

    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def adamw_state_bytes(numel: int) -> int:
    """fp32 AdamW state of one tensor: ``8 * numel`` bytes (``exp_avg`` + ``exp_avg_sq``)."""
    return 2 * FP32_BYTES * numel


def adamw8bit_state_bytes(numel: int) -> int:
    """8-bit AdamW state of one tensor, bytes.

    ``numel < 4096``: fp32 states, ``8 * numel``. Otherwise two uint8 states plus two fp32
    absmax values per block of 256: ``2 * numel + 8 * ceil(numel / 256)``. Source: bitsandbytes
    0.50 ``bitsandbytes/optim/optimizer.py``, ``Optimizer2State.init_state`` (``min_8bit_size=4096``,
    ``blocksize = 256``). The two shared 256-entry quantization maps are not counted.
    """
    if numel < BNB_MIN_8BIT_SIZE:
        return adamw_state_bytes(numel)
    return 2 * numel + 2 * FP32_BYTES * math.ceil(numel / BNB_BLOCKSIZE)


def ao_adamw8bit_state_bytes(numel: int, param_bytes: int = FP32_BYTES) -> int:
    """torchao ``AdamW8bit`` state of one tensor, bytes.

    ``numel >= 4096`` and a multiple of 256: per state (``exp_avg``, ``exp_avg_sq``) uint8 codes
    (``numel``), one fp32 scale per block of 256 and its own fp32[256] quantization map:
    ``2 * numel + 8 * numel / 256 + 2048``. Otherwise two plain states in the parameter's dtype
    (``param_bytes``): ``2 * param_bytes * numel``. Source: torchao 0.18
    ``torchao/optim/adam.py`` (``_AdamBase._new_buffer``: ``numel() >= 4096 and numel() %
    block_size == 0``, else ``torch.zeros_like(p)``) and ``subclass_8bit.py``
    (``OptimState8bit.zeros``).
    """
    if numel < AO_MIN_QUANT_SIZE or numel % AO8_BLOCKSIZE:
        return 2 * param_bytes * numel
    per_state = numel + FP32_BYTES * (numel // AO8_BLOCKSIZE) + FP32_BYTES * AO8_QMAP_ENTRIES
    return 2 * per_state


def ao_adamw4bit_state_bytes(numel: int, param_bytes: int = FP32_BYTES) -> int:
    """torchao ``AdamW4bit`` state of one tensor, bytes.

    ``numel >= 4096`` and a multiple of 128: per state two 4-bit codes per uint8 (``numel / 2``),
    one fp32 scale per block of 128 and its own fp32[16] map: ``numel + 8 * numel / 128 + 128``.
    Otherwise two plain states in the parameter's dtype: ``2 * param_bytes * numel``. Source:
    torchao 0.18 ``torchao/optim/adam.py`` (``_AdamBase._new_buffer``) and ``subclass_4bit.py``
    (``OptimState4bit.zeros``).
    """
    if numel < AO_MIN_QUANT_SIZE or numel % AO4_BLOCKSIZE:
        return 2 * param_bytes * numel
    per_state = numel // 2 + FP32_BYTES * (numel // AO4_BLOCKSIZE) + FP32_BYTES * AO4_QMAP_ENTRIES
    return 2 * per_state


def optimizer_state_bytes(numels: list[int], optim: str, param_bytes: int = FP32_BYTES) -> int:
    """Optimizer state of a list of tensors (their element counts), bytes.

    Args:
        numels: element counts of the trained tensors.
        optim: a resolved optimizer (:data:`OPTIMIZERS`).
        param_bytes: bytes per element of the trained weights (4 for fp32, 2 for bf16): the
            dtype of torchao's unquantized states. bitsandbytes keeps fp32 states for small
            tensors, and ``adamw`` is only used with fp32 weights, so neither depends on it.

    Raises:
        MemoryPlanError: unknown ``optim``.
    """
    if optim == "adamw":
        return sum(adamw_state_bytes(n) for n in numels)
    if optim in ("adamw8bit", "paged_adamw8bit"):
        return sum(adamw8bit_state_bytes(n) for n in numels)
    if optim == "ao_adamw8bit":
        return sum(ao_adamw8bit_state_bytes(n, param_bytes) for n in numels)
    if optim == "ao_adamw4bit":
        return sum(ao_adamw4bit_state_bytes(n, param_bytes) for n in numels)
    raise MemoryPlanError(f"--optim '{optim}' is not known (choose {', '.join(OPTIMIZERS)})")


def offload_bytes(numels: list[int], optim: str, param_bytes: int = FP32_BYTES) -> tuple[int, int]:
    """Optimizer memory under ``--optimizer-offload``: ``(GPU state bytes, host bytes)``.

    torchao 0.18 ``CPUOffloadOptimizer(..., offload_gradients=False, minimal_size=4096)``:
    tensors of fewer than 4096 elements keep their states on the GPU; every other one gets a
    pinned host copy of the weight and a pinned host gradient buffer (``torch.empty_like``: the
    weight's dtype, ``param_bytes``) and one host optimizer of the same class, whose states follow
    :func:`optimizer_state_bytes`.

    Args:
        numels: element counts of the trained tensors.
        optim: a resolved optimizer (:data:`OPTIMIZERS`).
        param_bytes: bytes per element of the trained weights.

    Raises:
        MemoryPlanError: unknown ``optim``.
    """
    kept = [n for n in numels if n < OFFLOAD_MIN_SIZE]
    moved = [n for n in numels if n >= OFFLOAD_MIN_SIZE]
    host = 2 * param_bytes * sum(moved) + optimizer_state_bytes(moved, optim, param_bytes)
    return optimizer_state_bytes(kept, optim, param_bytes), host


def _gradients_and_optimizer(numels: list[int], setup: TrainingSetup) -> tuple[int, int, int]:
    """One GPU's ``(gradients, optimizer states, host memory)`` of the trained tensors ``numels``
    under ``setup``'s precision, optimizer and options (module docstring; several GPUs:
    :func:`fsdp_plan`)."""
    b = setup.dtype_bytes
    if setup.optimizer_in_backward:
        gradients = max(numels, default=0) * b.gradient
    else:
        gradients = sum(numels) * b.gradient
    if setup.optimizer_offload:
        states, host = offload_bytes(numels, setup.optim, b.trained)
    else:
        states, host = optimizer_state_bytes(numels, setup.optim, b.trained), 0
    return gradients, states, host


# ---- FSDP2 (gpus > 1) -------------------------------------------------------------------------


@dataclass(frozen=True)
class FsdpUnit:
    """One FSDP2 unit (one ``fully_shard`` call) of ``fastmid.train.distributed.shard_model``.

    Attributes:
        name: the module's name (``model.layers.3``, ``model.embed_tokens``) or ``<root>``.
        kind: ``layer``, ``embeddings`` or ``root``.
        modules: the modules whose parameters the unit holds (for the root: those no other unit
            holds, e.g. ``model.norm``, ``lm_head``).
        shapes: its parameters' shapes (a tied weight once).
        trained: per parameter, whether it trains.
    """

    name: str
    kind: Literal["layer", "embeddings", "root"]
    modules: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    trained: tuple[bool, ...]

    @property
    def reshard_after_forward(self) -> bool:
        """False for the root (FSDP2's default: it is needed again at the start of backward)."""
        return self.kind != "root"

    @property
    def parameters(self) -> int:
        """Elements of the unit's parameters."""
        return sum(math.prod(shape) for shape in self.shapes)

    @property
    def trained_parameters(self) -> int:
        """Elements of the unit's trained parameters."""
        return sum(math.prod(s) for s, t in zip(self.shapes, self.trained, strict=True) if t)

    def unsharded_numel(self, world_size: int, trained_only: bool = False) -> int:
        """Elements of the unit gathered on one rank: each parameter padded to ``ceil(d0 / N) * N``
        rows (FSDP2's all-gather output), all parameters or the trained ones."""
        return sum(
            _chunk_rows(shape, world_size) * world_size * _row_numel(shape)
            for shape, t in zip(self.shapes, self.trained, strict=True)
            if t or not trained_only
        )


def _dim0(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1  # a 0-dim parameter is one row


def _row_numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:])


def _chunk_rows(shape: tuple[int, ...], world_size: int) -> int:
    """Rows of FSDP2's padded chunk: ``ceil(d0 / N)`` (``torch.chunk``'s chunk size)."""
    return -(-_dim0(shape) // world_size)


def _local_rows(shape: tuple[int, ...], world_size: int, rank: int) -> int:
    """Rows of rank ``rank``'s chunk before padding: ``max(0, min(c, d0 - rank * c))``."""
    c = _chunk_rows(shape, world_size)
    return max(0, min(c, _dim0(shape) - rank * c))


def fsdp_units(model: torch.nn.Module, trained: set[int]) -> list[FsdpUnit]:
    """The FSDP2 units of ``model``, in the order ``shard_model`` wraps them: every decoder layer,
    the input embeddings unless tied to ``lm_head``, then the root (everything else).

    Args:
        model: a ``*ForCausalLM`` of a supported family (meta tensors are fine).
        trained: ``id()`` of the parameters that train.

    Returns:
        The units; every parameter (a tied one once) is in exactly one.
    """
    names = {id(m): n for n, m in model.named_modules()}
    taken: set[int] = set()
    units: list[FsdpUnit] = []

    def unit(module: torch.nn.Module, kind: Literal["layer", "embeddings"]) -> FsdpUnit:
        params = [p for p in module.parameters() if id(p) not in taken]
        taken.update(id(p) for p in params)
        name = names[id(module)]
        shapes = tuple(tuple(p.shape) for p in params)
        return FsdpUnit(name, kind, (name,), shapes, tuple(id(p) in trained for p in params))

    for layer in decoder_layers(model):
        units.append(unit(layer, "layer"))
    embed, head = input_embeddings(model), output_head(model)
    if embed.weight is not getattr(head, "weight", None):
        units.append(unit(embed, "embeddings"))
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in taken]
    owners = tuple(dict.fromkeys(n.rpartition(".")[0] or n for n, _ in rest))
    units.append(
        FsdpUnit(
            ROOT_UNIT,
            "root",
            owners,
            tuple(tuple(p.shape) for _, p in rest),
            tuple(id(p) in trained for _, p in rest),
        )
    )
    return units


@dataclass(frozen=True)
class FsdpRank:
    """What one rank holds under FSDP2, bytes (module docstring: several GPUs).

    Attributes:
        rank: 0..N-1.
        parameter_shards: every parameter's padded chunk in its stored dtype.
        root_unsharded: the root unit's unsharded weights in the gather dtype (resident from
            forward through backward).
        all_gather_buffers: two unsharded copies of the largest decoder layer, gather dtype
            (the current layer and the prefetched one).
        gradient_shards: the trained parameters' padded gradient chunks, gradient dtype.
        gradient_accumulation: ``grad_accum > 1``: the unsharded fp32 gradients of every
            trained parameter kept between micro-batches; else 0.
        reduce_scatter: what backward holds above ``max(gradient_shards,
            gradient_accumulation)`` at its peak: the unsharded gradients (gather dtype) of the
            unit whose backward is ending and the padded fp32 reduce-scatter input kept for the
            previous one (:func:`_backward_gradient_peak`).
        optimizer_states: the optimizer's states of this rank's local (unpadded) chunks.
        fp32_state_tensors: trained tensors whose local chunk keeps plain (not 8/4-bit) states
            under torchao (under 4096 elements or not a multiple of the block); 0 for ``adamw``.
    """

    rank: int
    parameter_shards: int
    root_unsharded: int
    all_gather_buffers: int
    gradient_shards: int
    gradient_accumulation: int
    reduce_scatter: int
    optimizer_states: int
    fp32_state_tensors: int

    @property
    def weights(self) -> int:
        """``parameter_shards + root_unsharded + all_gather_buffers``."""
        return self.parameter_shards + self.root_unsharded + self.all_gather_buffers

    @property
    def gradients(self) -> int:
        """``max(gradient_shards, gradient_accumulation) + reduce_scatter``: the last
        micro-batch's reduce-scatters replace the unsharded gradients by shards unit by unit."""
        return max(self.gradient_shards, self.gradient_accumulation) + self.reduce_scatter

    @property
    def total(self) -> int:
        """``weights + gradients + optimizer_states`` (activations and logits are the same on
        every rank)."""
        return self.weights + self.gradients + self.optimizer_states

    def to_dict(self) -> dict[str, int]:
        """JSON-ready view: every line and the three sums, bytes."""
        out = dataclasses.asdict(self)
        out.update(weights=self.weights, gradients=self.gradients, total=self.total)
        return out


@dataclass(frozen=True)
class FsdpPlan:
    """The FSDP2 arrangement of one estimate and every rank's lines.

    Attributes:
        world_size: ``N``.
        units: :func:`fsdp_units`.
        ranks: one :class:`FsdpRank` per rank.
        gather_bytes: bytes per gathered element (the compute dtype of the precision).
        grad_accum: micro-batches per step.
    """

    world_size: int
    units: tuple[FsdpUnit, ...]
    ranks: tuple[FsdpRank, ...]
    gather_bytes: int
    grad_accum: int

    @property
    def peak(self) -> FsdpRank:
        """The rank with the most ``weights + gradients + optimizer_states`` (the lowest such
        rank on a tie)."""
        return max(self.ranks, key=lambda r: (r.total, -r.rank))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view: ``world_size``, ``gather_bytes``, ``reduce_bytes``, ``grad_accum``,
        ``units`` (name, kind, modules, parameters, trained_parameters,
        reshard_after_forward, unsharded_bytes in the gather dtype), ``peak_rank`` and
        ``ranks`` (:meth:`FsdpRank.to_dict`)."""
        return {
            "world_size": self.world_size,
            "gather_bytes": self.gather_bytes,
            "reduce_bytes": REDUCE_BYTES,
            "grad_accum": self.grad_accum,
            "units": [
                {
                    "name": u.name,
                    "kind": u.kind,
                    "modules": list(u.modules),
                    "parameters": u.parameters,
                    "trained_parameters": u.trained_parameters,
                    "reshard_after_forward": u.reshard_after_forward,
                    "unsharded_bytes": u.unsharded_numel(self.world_size) * self.gather_bytes,
                }
                for u in self.units
            ],
            "peak_rank": self.peak.rank,
            "ranks": [r.to_dict() for r in self.ranks],
        }


def _backward_gradient_peak(
    units: list[FsdpUnit], world_size: int, a: int, g: int, accumulate: bool
) -> int:
    """The most gradient bytes one rank holds during a step's backward passes under FSDP2.

    Replays the last micro-batch's backward unit by unit (torch 2.13 ``FSDPParamGroup.
    post_backward`` and ``foreach_reduce``): the root's gradients come first, then the decoder
    layers from the top, then the embeddings. When a unit's backward ends, its post-backward hook
    (fired by the gradient of the unit's input) adds its gradients into the accumulated ones
    (``grad_accum > 1``), drops the reduce-scatter input kept for the previous unit, allocates its
    own (padded, fp32), copies the gradients in and frees them; the shard it receives stays. A
    unit whose input needs no gradient (the root, the embeddings, a first band layer above a
    no-grad prefix) reduces only in the root's final callback, so its gradients stay unsharded
    until then. A unit without trained parameters still drops the kept input.

    Args:
        units: :func:`fsdp_units`, the root last.
        world_size: ``N``.
        a: bytes of autograd's unsharded gradients (the gather dtype).
        g: bytes of a gradient shard (the trained weights' dtype).
        accumulate: ``grad_accum > 1``: every trained element also has an unsharded fp32
            gradient from the earlier micro-batches until its unit reduces. With ``a == 4`` (no
            mixed precision) autograd accumulates into it in place; otherwise each unit's new
            gradients are upcast into it after the unit's backward (an earlier micro-batch: a new
            fp32 copy beside the ``a``-byte one for a moment).

    Returns:
        The peak of gradient shards + unsharded (and accumulated) gradients + kept reduce-scatter
        inputs, bytes.
    """
    root = units[-1]
    forward = [u for u in units if u.kind == "embeddings"] + [u for u in units if u.kind == "layer"]
    first = next((i for i, u in enumerate(forward) if u.trained_parameters), len(forward))
    # The units that run a backward, in its order, each with whether its reduce waits for the
    # final callback: nothing below the first trained unit needs a gradient (a trained root holds
    # tied embeddings, whose output does).
    order = [(root, True)] + [
        (
            forward[i],
            forward[i].kind == "embeddings" or (i == first and not root.trained_parameters),
        )
        for i in reversed(range(first, len(forward)))
    ]
    separate = not (accumulate and a == REDUCE_BYTES)
    accumulated = {u.name: REDUCE_BYTES * u.trained_parameters if accumulate else 0 for u in units}
    current = dict.fromkeys(accumulated, 0)
    shards = kept = 0
    peak = 0
    if accumulate:
        # An earlier micro-batch: at its end every unit's fp32 gradient, the last one just upcast
        # from its a-byte copy.
        largest = max((u.trained_parameters for u in units), default=0)
        peak = sum(accumulated.values()) + (a * largest if separate else 0)

    def held() -> int:
        return shards + kept + sum(accumulated.values()) + sum(current.values())

    def reduce(u: FsdpUnit) -> None:
        nonlocal shards, kept, peak
        if accumulate:
            current[u.name] = 0  # added into the accumulated gradient in place
        kept = 0
        if not u.trained_parameters:
            return
        padded_input = REDUCE_BYTES * u.unsharded_numel(world_size, trained_only=True)
        peak = max(peak, held() + padded_input)  # the copy-in: gradients and input together
        kept, accumulated[u.name], current[u.name] = padded_input, 0, 0
        shards += g * sum(
            _chunk_rows(s, world_size) * _row_numel(s)
            for s, t in zip(u.shapes, u.trained, strict=True)
            if t
        )

    deferred = []
    for u, later in order:
        if u.trained_parameters and separate:
            current[u.name] = a * u.trained_parameters
        peak = max(peak, held())
        if later:
            deferred.append(u)
        else:
            reduce(u)
    for u in deferred:
        reduce(u)
    return max(peak, held())


def fsdp_plan(model: torch.nn.Module, trained: set[int], setup: TrainingSetup) -> FsdpPlan:
    """Every rank's memory under FSDP2 with ``setup.gpus`` ranks (module docstring: several GPUs).

    Args:
        model: a ``*ForCausalLM`` (meta tensors are fine); not modified.
        trained: ``id()`` of the parameters that train.
        setup: the precision, optimizer, GPU count and ``grad_accum``.

    Returns:
        The :class:`FsdpPlan`: units and one :class:`FsdpRank` per rank.
    """
    n = setup.gpus
    b = setup.dtype_bytes
    a = b.compute
    units = fsdp_units(model, trained)
    layers = [u for u in units if u.kind == "layer"]
    root = units[-1]
    all_gather = 2 * a * max((u.unsharded_numel(n) for u in layers), default=0)
    root_bytes = a * root.unsharded_numel(n)
    n_trained = sum(u.trained_parameters for u in units)
    accumulation = REDUCE_BYTES * n_trained if setup.grad_accum > 1 else 0
    params = [(s, t) for u in units for s, t in zip(u.shapes, u.trained, strict=True)]
    shards = sum(
        _chunk_rows(s, n) * _row_numel(s) * (b.trained if t else b.frozen) for s, t in params
    )
    grad_shards = sum(_chunk_rows(s, n) * _row_numel(s) * b.gradient for s, t in params if t)
    peak = _backward_gradient_peak(units, n, a, b.gradient, setup.grad_accum > 1)
    reduce_scatter = peak - max(grad_shards, accumulation)
    block = {"ao_adamw8bit": AO8_BLOCKSIZE, "ao_adamw4bit": AO4_BLOCKSIZE}.get(setup.optim)
    ranks = []
    for rank in range(n):
        local = [_local_rows(s, n, rank) * _row_numel(s) for s, t in params if t]
        plain = 0
        if block is not None:
            plain = sum(1 for k in local if k < AO_MIN_QUANT_SIZE or k % block)
        ranks.append(
            FsdpRank(
                rank=rank,
                parameter_shards=shards,
                root_unsharded=root_bytes,
                all_gather_buffers=all_gather,
                gradient_shards=grad_shards,
                gradient_accumulation=accumulation,
                reduce_scatter=reduce_scatter,
                optimizer_states=optimizer_state_bytes(local, setup.optim, b.trained),
                fp32_state_tensors=plain,
            )
        )
    return FsdpPlan(n, tuple(units), tuple(ranks), a, setup.grad_accum)


def lora_adapter_numels(model: torch.nn.Module, rank: int) -> list[int]:
    """Element counts of the LoRA ``A`` (``r x in``) and ``B`` (``out x r``) matrices for every
    linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) inside the decoder layers."""
    from transformers.pytorch_utils import Conv1D

    numels: list[int] = []
    for layer in model.get_submodule(family_of(model).layers):
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                d_in, d_out = module.in_features, module.out_features
            elif isinstance(module, Conv1D):
                d_in, d_out = module.weight.shape
            else:
                continue
            numels += [rank * d_in, d_out * rank]
    return numels


def _layer_params(model: torch.nn.Module, spec: FamilySpec) -> list[int]:
    return [
        sum(p.numel() for p in layer.parameters()) for layer in model.get_submodule(spec.layers)
    ]


def _sharded(nbytes: float, gpus: int) -> int:
    return math.ceil(nbytes / gpus)


def _weights_bytes(
    frozen: int, trained: int, max_layer: int, gpus: int, precision: str = "bf16-master"
) -> int:
    """Per-GPU weight bytes (module docstring: precision policy, FSDP2)."""
    b = precision_bytes(precision)
    if gpus == 1:
        return frozen * b.frozen + trained * (b.trained + b.autocast_copy)
    stored = _sharded(frozen * b.frozen + trained * b.trained, gpus)
    return stored + 2 * b.compute * max_layer


def _logits_bytes(shape: BlockShape, setup: TrainingSetup, method: Method = "mid_block") -> int:
    """Peak bytes of the loss of one micro-step (module docstring: logits). ``method`` sets the
    residual stream's dtype (fp32 for full fine-tuning under ``bf16-master``: fp32 embeddings)
    and the ``lm_head``'s (trained under full fine-tuning; frozen bf16 under LoRA)."""
    prec = "bf16-master" if method == "lora" else setup.precision
    if setup.supervised_fraction is None and not setup.fused_loss:
        return setup.tokens * shape.logits(prec)
    rows = setup.supervised_rows
    if not setup.fused_loss:
        return rows * shape.loss_row()
    b = precision_bytes(prec)
    full = method == "full"
    hidden_bytes = shape.checkpoint_input(full, prec) // shape.hidden_size
    head_bytes = b.trained if full else b.frozen
    return shape.fused_loss(rows, hidden_bytes, head_bytes, head_trains=full)


def _activation_bytes(
    per_layer: list[int], stored: list[bool], setup: TrainingSetup, ckpt_input: int, head: int
) -> int:
    """Activations of one micro-step: per-layer bytes per token for layers that store anything
    (``stored``); with checkpointing, their inputs plus the largest one recomputed."""
    kept = [b for b, s in zip(per_layer, stored, strict=True) if s]
    if setup.checkpointing and kept:
        per_token = len(kept) * ckpt_input + max(kept)
    else:
        per_token = sum(kept)
    return setup.tokens * (per_token + head)


# ---- the three estimates ---------------------------------------------------------------------


def estimate_mid_block(
    model: torch.nn.Module, plan: BandPlan, setup: TrainingSetup
) -> MemoryEstimate:
    """Memory of Mid-Block tuning: the band trains, everything else is frozen.

    Args:
        model: the ``*ForCausalLM`` (meta tensors are fine); its ``requires_grad`` flags are
            reset by :func:`fastmid.models.band.apply_band`.
        plan: the band; embeddings, final norm and ``lm_head`` stay frozen.
        setup: sequence length, batch, GPUs, optimizer, checkpointing, precision, and
            ``--optimizer-in-backward`` / ``--optimizer-offload``.

    Returns:
        The :class:`MemoryEstimate` (formulas in the module docstring): under in-backward the
        gradients are the largest band tensor's; under offload the optimizer states are the
        GPU-resident ones (tensors of < 4096 elements) and ``host_memory`` holds the rest; the
        logits follow ``setup.supervised_fraction`` and ``setup.fused_loss``. With
        ``setup.gpus > 1``, ``fsdp`` holds every rank's lines (:func:`fsdp_plan`) and weights,
        gradients and optimizer states are those of its peak rank.

    Raises:
        BandError: the plan's layer count differs from the model's.
    """
    spec = family_of(model)
    trainable = apply_band(model, plan)
    n_trained = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    shape = BlockShape.from_config(model.config)
    layer_params = _layer_params(model, spec)
    prec = setup.precision
    per_layer: list[int] = []
    for i in range(plan.num_hidden_layers):
        role = plan.role(i)
        if role == "band":
            per_layer.append(shape.band_layer(input_requires_grad=i != plan.first, precision=prec))
        else:
            per_layer.append(0 if role == "frozen-prefix" else shape.frozen_layer(prec))
    stored = [plan.role(i) != "frozen-prefix" for i in range(plan.num_hidden_layers)]
    fsdp = None
    if setup.gpus > 1:
        fsdp = fsdp_plan(model, {id(p) for p in trainable}, setup)
        weights, gradients = fsdp.peak.weights, fsdp.peak.gradients
        states, host = fsdp.peak.optimizer_states, 0
    else:
        weights = _weights_bytes(n_total - n_trained, n_trained, max(layer_params), 1, prec)
        gradients, states, host = _gradients_and_optimizer([p.numel() for p in trainable], setup)
    return MemoryEstimate(
        method="mid_block",
        trainable_parameters=n_trained,
        weights=weights,
        gradients=gradients,
        optimizer_states=states,
        activations=_activation_bytes(
            per_layer, stored, setup, shape.checkpoint_input(False, prec), shape.head(False, prec)
        ),
        logits=_logits_bytes(shape, setup),
        gpu_memory_gib=setup.gpu_memory_gib,
        host_memory=host,
        fsdp=fsdp,
    )


def estimate_full(model: torch.nn.Module, setup: TrainingSetup) -> MemoryEstimate:
    """Memory of full fine-tuning: every parameter trains, in ``setup.precision`` (fp32 master
    weights under ``bf16-master``, every weight and gradient bf16 under ``bf16``).

    Args:
        model: the ``*ForCausalLM`` (meta tensors are fine); not modified.
        setup: as :func:`estimate_mid_block`; the optimizer is ``setup.optim``, with the same
            in-backward and offload options (the largest tensor is usually the embedding).

    Returns:
        The :class:`MemoryEstimate`; the checkpointed input of a layer is the residual (``4h``
        bytes per token under ``bf16-master``, whose trained embeddings are fp32, and ``fp32``;
        ``2h`` under ``bf16``). With ``setup.gpus > 1``, the FSDP2 arrangement with every
        parameter trained (``fsdp``, as :func:`estimate_mid_block`).
    """
    spec = family_of(model)
    params = list(model.parameters())
    n_total = sum(p.numel() for p in params)
    shape = BlockShape.from_config(model.config)
    L = len(model.get_submodule(spec.layers))
    prec = setup.precision
    per_layer = [shape.full_layer(prec)] * L
    fsdp = None
    if setup.gpus > 1:
        fsdp = fsdp_plan(model, {id(p) for p in params}, setup)
        weights, gradients = fsdp.peak.weights, fsdp.peak.gradients
        states, host = fsdp.peak.optimizer_states, 0
    else:
        weights = _weights_bytes(0, n_total, max(_layer_params(model, spec)), 1, prec)
        gradients, states, host = _gradients_and_optimizer([p.numel() for p in params], setup)
    return MemoryEstimate(
        method="full",
        trainable_parameters=n_total,
        weights=weights,
        gradients=gradients,
        optimizer_states=states,
        activations=_activation_bytes(
            per_layer, [True] * L, setup, shape.checkpoint_input(True, prec), shape.head(True, prec)
        ),
        logits=_logits_bytes(shape, setup, "full"),
        gpu_memory_gib=setup.gpu_memory_gib,
        host_memory=host,
        fsdp=fsdp,
    )


def estimate_lora(model: torch.nn.Module, setup: TrainingSetup) -> MemoryEstimate:
    """Memory of LoRA (rank ``setup.lora_rank``) on every linear of every decoder layer.

    Base weights frozen in bf16; adapters fp32 with fp32 gradients and fp32 AdamW states, under
    bf16 autocast, whatever ``setup.optim`` and ``setup.precision`` say (peft's usual setup: the
    comparison column is the same for every precision), and an ordinary optimizer step whatever
    ``setup.optimizer_in_backward`` and ``setup.optimizer_offload`` say (``host_memory`` 0).

    Args:
        model: the ``*ForCausalLM`` (meta tensors are fine); not modified.
        setup: as :func:`estimate_mid_block`.

    Returns:
        The :class:`MemoryEstimate`.
    """
    spec = family_of(model)
    n_base = sum(p.numel() for p in model.parameters())
    adapters = lora_adapter_numels(model, setup.lora_rank)
    n_adapters = sum(adapters)
    shape = BlockShape.from_config(model.config)
    L = len(model.get_submodule(spec.layers))
    per_layer = [shape.lora_layer(setup.lora_rank, input_requires_grad=i > 0) for i in range(L)]
    max_layer = max(_layer_params(model, spec)) + n_adapters // L
    return MemoryEstimate(
        method="lora",
        trainable_parameters=n_adapters,
        weights=_weights_bytes(n_base, n_adapters, max_layer, setup.gpus),
        gradients=_sharded(n_adapters * FP32_BYTES, setup.gpus),
        optimizer_states=_sharded(optimizer_state_bytes(adapters, "adamw"), setup.gpus),
        activations=_activation_bytes(
            per_layer, [True] * L, setup, 2 * shape.hidden_size, shape.head()
        ),
        logits=_logits_bytes(shape, setup, "lora"),
        gpu_memory_gib=setup.gpu_memory_gib,
    )


def estimate_all(
    model: torch.nn.Module, plan: BandPlan, setup: TrainingSetup
) -> dict[str, MemoryEstimate]:
    """Mid-Block, full fine-tuning and LoRA side by side: ``{"mid_block", "full", "lora"}``.

    ``model``'s ``requires_grad`` flags end as the band sets them.

    Raises:
        BandError: the plan's layer count differs from the model's.
    """
    return {
        "full": estimate_full(model, setup),
        "lora": estimate_lora(model, setup),
        "mid_block": estimate_mid_block(model, plan, setup),
    }
