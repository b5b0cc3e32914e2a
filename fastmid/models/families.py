"""Where each supported architecture keeps its parts: a table, not guesswork.

For every supported ``model_type`` the table names, as dotted attribute paths from the
``*ForCausalLM`` module: the decoder layer list, the final norm, the input embeddings (plus any
extra embedding tables such as GPT-2's learned positions), and the output head (``lm_head``), and
it gives the norm flavour (``rms``: ``x * rstd * w``; ``rms_gemma``: ``x * rstd * (1 + w)`` computed
in float32; ``layernorm``) and the names of the attention and MLP submodules inside one decoder
layer (used to classify parameters as attention / MLP / norm and by kernel patching).

The same entry says which of the family's transformers classes the kernels replace
(:mod:`fastmid.models.patching`): the modeling module, its RMSNorm class with its epsilon attribute
and output dtype rule, and its MLP class; and how its frozen decoder layers run fused
(:class:`FrozenFusion`, used by :mod:`fastmid.models.fused_frozen`: which linears pack into one
GEMM, which norm takes the residual add, which layer-forward template runs them). Adding a family
touches one entry here.

Tests build every family from a tiny random config and check each path against the real module
tree (``tests/models/test_families.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from fastmid.errors import FastmidError

NormKind = Literal["rms", "rms_gemma", "layernorm"]
ModuleKind = Literal["attention", "mlp", "norm", "other"]


class UnsupportedModelError(FastmidError, ValueError):
    """The model's ``model_type`` is not in :data:`FAMILIES`; the message lists supported ones."""


FrozenForward = Literal["pre_norm"]


@dataclass(frozen=True)
class FrozenFusion:
    """How a frozen decoder layer of one family runs fused (:mod:`fastmid.models.fused_frozen`).

    Attributes:
        layer_class: the decoder layer's class name in transformers (``LlamaDecoderLayer``); a
            layer of any other class (remote code, a changed transformers) is left unfused.
        forward: the layer-forward template. ``pre_norm``: ``h = x + attn(attn_norm(x))``,
            ``out = h + mlp(mlp_norm(h))``, with the add before ``mlp_norm`` fused into it (the
            Llama/Mistral/Qwen2/Qwen3 block; OLMo-2's post-norm and Gemma 2/3's four norms would
            be templates of their own).
        attn_norm: the norm before attention (a layer attribute).
        mlp_norm: the norm before the MLP, which takes the residual add.
        qkv: the attention module's q, k, v linears, packed into one ``[q; k; v]`` GEMM (their
            biases too, as Qwen2's).
        gate_up: the MLP module's gate and up linears, packed into one ``[gate; up]`` GEMM.
    """

    layer_class: str
    forward: FrozenForward = "pre_norm"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    qkv: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")
    gate_up: tuple[str, str] = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class FamilySpec:
    """Layout of one architecture family.

    Attributes:
        model_type: ``config.model_type`` value.
        layers: dotted path of the ``nn.ModuleList`` of decoder layers.
        final_norm: dotted path of the norm after the last decoder layer.
        embed_tokens: dotted path of the token embedding (``nn.Embedding``).
        lm_head: dotted path of the output projection (``nn.Linear``, vocab x hidden).
        norm_kind: ``rms``, ``rms_gemma`` or ``layernorm``.
        attention: name of the attention submodule in a decoder layer.
        mlp: name of the MLP submodule in a decoder layer.
        extra_embeddings: dotted paths of other embedding tables (e.g. GPT-2 ``wpe``).
        gated_mlp: the MLP is ``down(act(gate(x)) * up(x))`` (SwiGLU/GeGLU) with separate
            ``gate_proj``/``up_proj``/``down_proj`` linears.
        final_logit_softcapping_attr: config attribute holding the logit softcap, if any.
        modeling_module: import path of the family's transformers ``modeling_*.py`` (where
            ``apply_rotary_pos_emb`` lives), or None when no kernel replaces its modules.
        norm_class: the RMSNorm class name in ``modeling_module`` (kernel target), or None.
        norm_eps_attr: the attribute holding eps on ``norm_class``.
        norm_out_dtype: ``promote`` (Llama: ``w * x_hat.to(input dtype)`` promotes to the
            weight's dtype) or ``input`` (OLMo-2 and Gemma cast the result to the input dtype).
        mlp_class: the MLP class name in ``modeling_module`` (kernel target when its activation
            is SiLU or tanh-GELU), or None.
        frozen_fusion: how frozen decoder layers run fused, or None (they run unfused).
    """

    model_type: str
    layers: str
    final_norm: str
    embed_tokens: str
    lm_head: str
    norm_kind: NormKind
    attention: str
    mlp: str
    extra_embeddings: tuple[str, ...] = ()
    gated_mlp: bool = True
    final_logit_softcapping_attr: str | None = None
    modeling_module: str | None = None
    norm_class: str | None = None
    norm_eps_attr: str = "variance_epsilon"
    norm_out_dtype: Literal["promote", "input"] = "promote"
    mlp_class: str | None = None
    frozen_fusion: FrozenFusion | None = None


def _kernel_targets(module: str, prefix: str) -> dict[str, str]:
    """The kernel targets of a family whose transformers classes are ``<prefix>RMSNorm`` and
    ``<prefix>MLP`` in ``transformers.models.<module>.modeling_<module>``."""
    return {
        "modeling_module": f"transformers.models.{module}.modeling_{module}",
        "norm_class": f"{prefix}RMSNorm",
        "mlp_class": f"{prefix}MLP",
    }


def _llama_like(model_type: str, norm_kind: NormKind = "rms", **kw: Any) -> FamilySpec:
    return FamilySpec(
        model_type=model_type,
        layers="model.layers",
        final_norm="model.norm",
        embed_tokens="model.embed_tokens",
        lm_head="lm_head",
        norm_kind=norm_kind,
        attention="self_attn",
        mlp="mlp",
        **kw,
    )


FAMILIES: dict[str, FamilySpec] = {
    spec.model_type: spec
    for spec in (
        _llama_like(
            "llama",
            frozen_fusion=FrozenFusion("LlamaDecoderLayer"),
            **_kernel_targets("llama", "Llama"),
        ),
        _llama_like(
            "mistral",
            frozen_fusion=FrozenFusion("MistralDecoderLayer"),
            **_kernel_targets("mistral", "Mistral"),
        ),
        # Qwen2's q/k/v carry biases: they pack with the weights.
        _llama_like(
            "qwen2",
            frozen_fusion=FrozenFusion("Qwen2DecoderLayer"),
            **_kernel_targets("qwen2", "Qwen2"),
        ),
        # Qwen3's q_norm/k_norm run inside its own attention code, after the packed projection.
        _llama_like(
            "qwen3",
            frozen_fusion=FrozenFusion("Qwen3DecoderLayer"),
            **_kernel_targets("qwen3", "Qwen3"),
        ),
        _llama_like("olmo2", norm_out_dtype="input", **_kernel_targets("olmo2", "Olmo2")),
        # phi3 fuses gate and up into one `gate_up_proj` linear; no kernel targets.
        _llama_like("phi3", gated_mlp=False),
        _llama_like(
            "gemma",
            norm_kind="rms_gemma",
            norm_eps_attr="eps",
            norm_out_dtype="input",
            **_kernel_targets("gemma", "Gemma"),
        ),
        _llama_like(
            "gemma2",
            norm_kind="rms_gemma",
            final_logit_softcapping_attr="final_logit_softcapping",
            norm_eps_attr="eps",
            norm_out_dtype="input",
            **_kernel_targets("gemma2", "Gemma2"),
        ),
        _llama_like(
            "gemma3_text",
            norm_kind="rms_gemma",
            final_logit_softcapping_attr="final_logit_softcapping",
            norm_eps_attr="eps",
            norm_out_dtype="input",
            **_kernel_targets("gemma3", "Gemma3"),
        ),
        FamilySpec(
            model_type="gpt_neox",
            layers="gpt_neox.layers",
            final_norm="gpt_neox.final_layer_norm",
            embed_tokens="gpt_neox.embed_in",
            # transformers 5 renamed GPT-NeoX's head from `embed_out` to `lm_head`.
            lm_head="lm_head",
            norm_kind="layernorm",
            attention="attention",
            mlp="mlp",
            gated_mlp=False,
        ),
        FamilySpec(
            model_type="gpt2",
            layers="transformer.h",
            final_norm="transformer.ln_f",
            embed_tokens="transformer.wte",
            lm_head="lm_head",
            norm_kind="layernorm",
            attention="attn",
            mlp="mlp",
            extra_embeddings=("transformer.wpe",),
            gated_mlp=False,
        ),
    )
}

# GGUF `general.architecture` values whose conversion yields one of the families above.
GGUF_ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3",
    "gpt2",
)


def supported_model_types() -> list[str]:
    """Sorted list of supported ``model_type`` values."""
    return sorted(FAMILIES)


def family_for_model_type(model_type: str) -> FamilySpec:
    """The :class:`FamilySpec` of ``model_type``.

    Raises:
        UnsupportedModelError: unknown ``model_type``; the message lists the supported ones.
    """
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type '{model_type}' is not supported "
            f"(supported: {', '.join(supported_model_types())})"
        ) from None


def family_for_config(config: Any) -> FamilySpec:
    """The :class:`FamilySpec` for a transformers config (reads ``config.model_type``).

    Raises:
        UnsupportedModelError: as :func:`family_for_model_type`.
    """
    return family_for_model_type(getattr(config, "model_type", "<missing>"))


def family_of(model: torch.nn.Module) -> FamilySpec:
    """The :class:`FamilySpec` of a loaded ``*ForCausalLM`` model.

    Raises:
        UnsupportedModelError: as :func:`family_for_model_type`.
    """
    return family_for_config(model.config)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder layers, in order (length ``config.num_hidden_layers``)."""
    return model.get_submodule(family_of(model).layers)  # type: ignore[return-value]


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the head: the parent of the layer list (``model.model`` for
    llama-like families, ``transformer`` for GPT-2). Its output is the final-norm hidden states."""
    return model.get_submodule(family_of(model).layers.rsplit(".", 1)[0])


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm applied after the last decoder layer."""
    return model.get_submodule(family_of(model).final_norm)


def input_embeddings(model: torch.nn.Module) -> torch.nn.Embedding:
    """The token embedding table (vocab x hidden)."""
    return model.get_submodule(family_of(model).embed_tokens)  # type: ignore[return-value]


def output_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The output projection ``lm_head`` (vocab x hidden)."""
    return model.get_submodule(family_of(model).lm_head)  # type: ignore[return-value]


def embeddings_tied(model: torch.nn.Module) -> bool:
    """True when ``lm_head.weight`` and the token embedding share one tensor."""
    return output_head(model).weight is input_embeddings(model).weight


def layer_index_of(param_name: str, spec: FamilySpec) -> int | None:
    """Decoder-layer index of a parameter name like ``model.layers.7.mlp.up_proj.weight``."""
    prefix = spec.layers + "."
    if not param_name.startswith(prefix):
        return None
    head = param_name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def module_kind(param_name: str, spec: FamilySpec) -> ModuleKind:
    """Classify a decoder-layer parameter as ``attention``, ``mlp``, ``norm`` or ``other``.

    The name is relative to the model (``model.layers.3.self_attn.q_proj.weight``) or to the
    layer (``self_attn.q_proj.weight``).
    """
    prefix = spec.layers + "."
    rel = (
        param_name[len(prefix) :].split(".", 1)[1] if param_name.startswith(prefix) else param_name
    )
    head = rel.split(".", 1)[0]
    if head == spec.attention:
        # q_norm/k_norm (qwen3, olmo2, gemma3) live inside attention but are norms.
        return "norm" if "norm" in rel.split(".")[-2] else "attention"
    if head == spec.mlp:
        return "mlp"
    if "norm" in head or head.startswith("ln"):
        return "norm"
    return "other"
