"""Kernel patching of tiny random Llama and Gemma 2 models, and the family-agnostic loss.

The Triton kernels run on CPU through Triton's interpreter (``TRITON_INTERPRET=1`` is set in the
root ``tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from fastmid.kernels import use_backend
from tiny import tiny_model
from transformers import Gemma2ForCausalLM, LlamaForCausalLM

from fastmid.errors import FastmidError
from fastmid.models.families import decoder_layers, final_norm
from fastmid.models.loss import causal_lm_loss_sum
from fastmid.models.patching import (
    KernelGeGLUMLP,
    KernelRMSNorm,
    KernelsUnavailableError,
    KernelSwiGLUMLP,
    patch_model,
    resolve_kernels_flag,
    unpatch_model,
)

VOCAB, HIDDEN, SEQ, BATCH = 257, 64, 13, 2


# The factory's 2-layer, 4-head, 2-kv-head shape, wider (hidden 64, intermediate 96).
SHAPE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, max_position_embeddings=64)


def _tiny_llama() -> LlamaForCausalLM:
    return tiny_model(
        "llama",
        seed=0,
        **SHAPE,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,  # like SmolLM2: lm_head is the (frozen) embedding
        attn_implementation="eager",
    ).eval()


def _tiny_gemma2() -> Gemma2ForCausalLM:
    model = tiny_model(
        "gemma2",
        seed=0,
        **SHAPE,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        final_logit_softcapping=3.0,
        attn_implementation="eager",
    ).eval()
    with torch.no_grad():  # Gemma norms start at w = 0 (scale 1 + w); make the offset matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


BUILDERS = {"llama": _tiny_llama, "gemma2": _tiny_gemma2}


@pytest.fixture(scope="module")
def models():
    """Each tiny model built once; tests work on deep copies."""
    return {name: build() for name, build in BUILDERS.items()}


@pytest.fixture(autouse=True)
def _restore_rope():
    yield
    unpatch_model(torch.nn.Module())  # restores every modeling module's apply_rotary_pos_emb


def _batch():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, -4:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :5] = -100  # prompt
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def _set_band(model, band=(1,)):
    """Mid-Block style: only the listed decoder layers train; embeddings/head/norm frozen."""
    model.requires_grad_(False)
    for i in band:
        decoder_layers(model)[i].requires_grad_(True)


def test_patch_report_and_module_swaps(models):
    llama = copy.deepcopy(models["llama"])
    keys = list(llama.state_dict())
    params = {n: p for n, p in llama.named_parameters()}
    report = patch_model(llama, enabled=True)
    assert report.norms == 2 * 2 + 1 and report.mlps == 2
    assert report.rope == "transformers.models.llama.modeling_llama"
    assert report.loss == "fused_linear_cross_entropy" and report.skipped == []
    assert report.to_dict()["attention"] == "eager"
    assert isinstance(final_norm(llama), KernelRMSNorm)
    assert isinstance(decoder_layers(llama)[0].mlp, KernelSwiGLUMLP)
    # Same parameters, same names: optimizer state and checkpoints are unaffected.
    assert list(llama.state_dict()) == keys
    assert all(p is params[n] for n, p in llama.named_parameters())

    gemma = copy.deepcopy(models["gemma2"])
    report = patch_model(gemma, enabled=True)
    # Gemma's tanh-GELU MLPs get the GeGLU kernel.
    assert report.norms == 2 * 4 + 1 and report.mlps == 2 and report.skipped == []
    assert isinstance(decoder_layers(gemma)[0].mlp, KernelGeGLUMLP)
    gemma = copy.deepcopy(models["gemma2"])
    report = patch_model(gemma, enabled=True, geglu=False)
    assert report.mlps == 0 and type(decoder_layers(gemma)[0].mlp).__name__ == "Gemma2MLP"

    unpatch_model(llama)
    assert type(final_norm(llama)).__name__ == "LlamaRMSNorm"
    assert type(decoder_layers(llama)[0].mlp).__name__ == "LlamaMLP"


def test_disabled_patch_changes_nothing(models):
    llama = copy.deepcopy(models["llama"])
    report = patch_model(llama, enabled=False)
    assert report.norms == report.mlps == 0 and report.rope is None and report.loss == "eager"
    assert type(final_norm(llama)).__name__ == "LlamaRMSNorm"


def test_family_without_kernel_targets_is_reported():
    gpt2 = tiny_model("gpt2", seed=None, vocab_size=VOCAB, n_layer=1, n_head=2, n_positions=32)
    report = patch_model(gpt2, enabled=True)
    assert report.norms == 0 and "gpt2" in report.skipped[0]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_patched_modules_match_transformers_modules(models, family):
    model = copy.deepcopy(models[family])
    layer = decoder_layers(model)[0]
    originals = {"norm": layer.input_layernorm, "mlp": layer.mlp}
    patch_model(model, enabled=True)
    x = torch.randn(BATCH, SEQ, HIDDEN)
    with use_backend("triton"):
        torch.testing.assert_close(
            layer.input_layernorm(x), originals["norm"](x), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(layer.mlp(x), originals["mlp"](x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_loss_sum_matches_transformers_loss(models, family):
    # Independent reference: transformers' own shifted mean loss (with Gemma 2's softcap).
    model = copy.deepcopy(models[family])
    input_ids, attention_mask, labels = _batch()
    with torch.no_grad():
        hf_mean = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        eager_sum, n = causal_lm_loss_sum(model, input_ids, attention_mask, labels, fused=False)
        patch_model(model, enabled=True)
        with use_backend("triton"):
            fused_sum, n_fused = causal_lm_loss_sum(model, input_ids, attention_mask, labels)
    n_expected = int((labels[:, 1:] != -100).sum())
    assert int(n) == int(n_fused) == n_expected
    torch.testing.assert_close(eager_sum / n, hf_mean, rtol=1e-5, atol=0)
    torch.testing.assert_close(fused_sum / n_fused, hf_mean, rtol=1e-5, atol=0)


def _train(model, kernels: bool, steps: int = 5):
    """SGD on the band (layer 1) for ``steps`` steps; returns (losses, band state)."""
    _set_band(model)
    if kernels:
        patch_model(model, enabled=True)
    band = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(band, lr=0.5)
    input_ids, attention_mask, labels = _batch()
    losses = []
    ctx = use_backend("triton") if kernels else contextlib.nullcontext()
    with ctx:
        for _ in range(steps):
            loss_sum, n = causal_lm_loss_sum(
                model, input_ids, attention_mask, labels, fused=kernels
            )
            loss = loss_sum / n
            loss.backward()
            for name, p in model.named_parameters():
                # Frozen parameters (incl. the tied lm_head) never get a gradient.
                assert (p.grad is not None) == p.requires_grad, name
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    state = {k: v.clone() for k, v in decoder_layers(model)[1].state_dict().items()}
    unpatch_model(model)
    return losses, state


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_five_steps_with_kernels_on_and_off_agree(models, family):
    losses_off, band_off = _train(copy.deepcopy(models[family]), kernels=False)
    losses_on, band_on = _train(copy.deepcopy(models[family]), kernels=True)
    assert losses_off[-1] < losses_off[0]  # it trained
    torch.testing.assert_close(torch.tensor(losses_on), torch.tensor(losses_off), rtol=1e-5, atol=0)
    before = decoder_layers(models[family])[1].state_dict()
    for name, value in band_off.items():
        assert not torch.equal(value, before[name]) or "norm" in name  # band weights moved
        torch.testing.assert_close(band_on[name], value, rtol=1e-5, atol=1e-6)


def test_batch_without_supervised_tokens_gives_zero_loss_and_zero_grads(models):
    model = copy.deepcopy(models["llama"])
    _set_band(model)
    patch_model(model, enabled=True)
    input_ids, attention_mask, labels = _batch()
    labels[:] = -100
    with use_backend("triton"):
        loss_sum, n = causal_lm_loss_sum(model, input_ids, attention_mask, labels)
        loss_sum.backward()
    assert loss_sum.item() == 0.0 and int(n) == 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


def test_labels_shape_is_checked(models):
    input_ids, attention_mask, labels = _batch()
    with pytest.raises(ValueError, match="shape of input_ids"):
        causal_lm_loss_sum(models["llama"], input_ids, attention_mask, labels[:, 1:])


def test_kernels_flag():
    assert resolve_kernels_flag("off", "cpu") is False
    assert resolve_kernels_flag("auto", "cpu") is False
    with pytest.raises(ValueError, match="--kernels on needs a CUDA device"):
        resolve_kernels_flag("on", "cpu")
    with pytest.raises(ValueError, match="auto, on or off"):
        resolve_kernels_flag("yes", "cpu")  # type: ignore[arg-type]


def test_kernels_flag_errors_are_fastmid_errors():
    """The CLI prints a FastmidError as one line (exit 2); any other exception is a traceback."""
    for flag in ("on", "yes"):
        with pytest.raises(KernelsUnavailableError) as info:
            resolve_kernels_flag(flag, "cpu")  # type: ignore[arg-type]
        assert isinstance(info.value, FastmidError) and info.value.exit_code == 2
        assert str(info.value).startswith("--kernels")
