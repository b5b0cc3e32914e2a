"""Fused frozen layers (packed q/k/v and gate/up, residual add in RMSNorm) against the unfused path.

Tiny random Llama, Mistral, Qwen2 (q/k/v biases) and Qwen3 (q/k norms) with 5 layers and a
non-contiguous band {1, 3}, so every role is there: layer 0 frozen prefix, 2 a frozen gap, 4 the
frozen suffix. SmolLM2-135M-Instruct with the default band checks a real model. Exactness is fp32,
1e-5 relative (the issue's bar); the GEMMs' summation order is all that may differ.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from fastmid.kernels import use_backend
from safetensors import safe_open
from tiny import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from fastmid import kernels
from fastmid.models.band import BandPlan, apply_band, install_execution_policy
from fastmid.models.families import decoder_layers
from fastmid.models.fused_frozen import (
    FuseReport,
    fuse_frozen_layers,
    fused_layer_indices,
    unfuse_frozen_layers,
)
from fastmid.models.loss import causal_lm_loss_sum
from fastmid.models.patching import patch_model, unpatch_model
from fastmid.train.checkpoint import TrainerState, capture_rng, load_checkpoint, save_checkpoint
from fastmid.train.export import export_hf_folder
from fastmid.train.optim import build_optimizer, build_scheduler
from fastmid.train.recipe import train_step

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
LAYERS, BAND = 5, (1, 3)
VOCAB, SEQ, BATCH = 97, 13, 2
RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff if scale == 0 else diff / scale


def _tiny(family: str) -> torch.nn.Module:
    model = tiny_model(
        family,
        seed=0,
        num_hidden_layers=LAYERS,
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        attn_implementation="sdpa",
    )
    with torch.no_grad():  # norms start at 1 and biases at 0: make both matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model.train()


@pytest.fixture(scope="module")
def bases():
    """Each tiny model built once; tests work on deep copies."""
    return {family: _tiny(family) for family in FAMILIES}


@pytest.fixture(autouse=True)
def _restore_rope():
    yield
    unpatch_model(torch.nn.Module())  # patch_model's RoPE swap is global to a modeling module


def _batch(vocab: int = VOCAB, seq: int = SEQ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (BATCH, seq), generator=g)
    attention_mask = torch.ones(BATCH, seq, dtype=torch.long)
    attention_mask[1, -4:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :5] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _setup(base, fuse: bool, *, order: str = "after", checkpointing: bool = False, plan=None):
    """A copy of ``base`` with the band applied, the execution policy installed and, when
    ``fuse``, the frozen layers fused (``order``: after or before the policy)."""
    model = copy.deepcopy(base)
    plan = plan or BandPlan.from_indices(LAYERS, list(BAND))
    apply_band(model, plan)
    report = None
    if fuse and order == "before":
        report = fuse_frozen_layers(model, plan)
    install_execution_policy(model, plan, grad_checkpointing=checkpointing)
    if fuse and order == "after":
        report = fuse_frozen_layers(model, plan)
    return model, plan, report


def _loss_and_grads(model, batch):
    loss_sum, n = causal_lm_loss_sum(
        model, batch["input_ids"], batch["attention_mask"], batch["labels"]
    )
    (loss_sum / n).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return loss_sum.detach(), grads


class _CountGemms(TorchDispatchMode):
    """Counts the matrix products of the linears (``mm``/``addmm``; attention uses others)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_loss_and_band_gradients_equal_the_unfused_path(bases, family, monkeypatch):
    plain, _, _ = _setup(bases[family], fuse=False)
    fused, _, report = _setup(bases[family], fuse=True)
    assert report.layers == [0, 2, 4] and report.model_type == family and report.skipped == []
    assert report.roles == {"frozen-prefix": [0], "frozen-gap": [2], "frozen-suffix": [4]}
    batch = _batch()

    calls = []
    real = kernels.fused_add_rms_norm
    monkeypatch.setattr(
        kernels, "fused_add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    with torch.no_grad():
        counts = {}
        for name, model in (("plain", plain), ("fused", fused)):
            with _CountGemms() as gemms:
                logits = model(input_ids=batch["input_ids"]).logits
            counts[name] = (gemms.count, logits)
    # Per layer 7 linears unfused; a fused layer runs [q;k;v], o, [gate;up], down; + lm_head.
    assert counts["plain"][0] == 7 * LAYERS + 1
    assert counts["fused"][0] == 7 * len(BAND) + 4 * 3 + 1
    assert len(calls) == 3  # one fused add + norm per fused layer
    assert _rel(counts["fused"][1], counts["plain"][1]) < RTOL

    loss_plain, grads_plain = _loss_and_grads(plain, batch)
    loss_fused, grads_fused = _loss_and_grads(fused, batch)
    assert _rel(loss_fused, loss_plain) < RTOL
    assert grads_plain.keys() == grads_fused.keys() and len(grads_plain) > 0
    for name, g in grads_plain.items():
        assert _rel(grads_fused[name], g) < RTOL, name
    # Frozen parameters (the packed views included) get no gradient.
    assert all(p.grad is None for p in fused.parameters() if not p.requires_grad)


@pytest.mark.parametrize(
    ("order", "checkpointing"), [("before", False), ("after", True)], ids=["fused-first", "ckpt"]
)
def test_any_order_with_the_policy_and_checkpointing(bases, order, checkpointing):
    plain, _, _ = _setup(bases["qwen3"], fuse=False, checkpointing=checkpointing)
    fused, _, report = _setup(bases["qwen3"], fuse=True, order=order, checkpointing=checkpointing)
    assert report.layers == [0, 2, 4]
    batch = _batch()
    loss_plain, grads_plain = _loss_and_grads(plain, batch)
    loss_fused, grads_fused = _loss_and_grads(fused, batch)
    assert _rel(loss_fused, loss_plain) < RTOL
    for name, g in grads_plain.items():
        assert _rel(grads_fused[name], g) < RTOL, name


def test_state_dict_unchanged_memory_not_doubled_and_undo(bases):
    base = bases["qwen2"]
    model, plan, _ = _setup(base, fuse=True)
    attn = decoder_layers(model)[0].self_attn
    packed_at = attn.q_proj.weight.data_ptr()
    again = fuse_frozen_layers(model, plan)  # idempotent: reported, not packed twice
    assert again.layers == [0, 2, 4] and again.skipped == []
    assert attn.q_proj.weight.data_ptr() == packed_at
    before = base.state_dict()
    after = model.state_dict()
    assert list(after) == list(before)
    for name, t in after.items():
        assert t.shape == before[name].shape and t.dtype == before[name].dtype, name
        assert torch.equal(t, before[name]), name  # nothing trained yet: all bit-equal
    # The packed tensor owns the storage: q/k/v (and their biases) view one storage.
    storages = {p.untyped_storage().data_ptr() for p in (attn.q_proj.weight, attn.k_proj.weight)}
    assert len(storages | {attn.v_proj.weight.untyped_storage().data_ptr()}) == 1
    assert (
        attn.q_proj.bias.untyped_storage().data_ptr()
        == attn.v_proj.bias.untyped_storage().data_ptr()
    )

    def distinct_bytes(m):
        seen = {
            p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in m.parameters()
        }
        return sum(seen.values())

    assert distinct_bytes(model) == distinct_bytes(base)
    # Undo: separate storages again, same values, same forward.
    batch = _batch()
    with torch.no_grad():
        fused_logits = model(input_ids=batch["input_ids"]).logits
    assert unfuse_frozen_layers(model) == 3 and fused_layer_indices(model) == []
    assert (
        attn.q_proj.weight.untyped_storage().data_ptr()
        != attn.k_proj.weight.untyped_storage().data_ptr()
    )
    assert distinct_bytes(model) == distinct_bytes(base)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    with torch.no_grad():
        assert _rel(model(input_ids=batch["input_ids"]).logits, fused_logits) < RTOL


def _optimizer(named, kind: str, lr: float = 0.05) -> torch.optim.Optimizer:
    """``sgd`` (momentum) for exactness checks across the two paths: AdamW divides each entry's
    gradient by its own running RMS, so float32 noise in entries far below Adam's eps (1e-8 here,
    e.g. 4e-9 +- 6e-10 in a tiny model) becomes an O(lr) difference in that weight, fused or not.
    ``adamw``: the recipe's optimizer, for comparisons of one path with itself (resume)."""
    if kind == "sgd":
        return torch.optim.SGD([p for _, p in named], lr=lr, momentum=0.9)
    return build_optimizer(named, "adamw", 1e-3, weight_decay=0.01)


def _train(model, plan, steps: int, start: tuple | None = None, kind: str = "sgd"):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = _optimizer(named, kind)
    scheduler = build_scheduler(optimizer, 3, 1, "cosine")
    params = [p for _, p in named]
    batches = [_batch(seq=SEQ + k) for k in range(3)]
    first = 0
    if start is not None:  # resume from a checkpoint folder
        first = load_checkpoint(start[0], model, start[1], optimizer, scheduler).step
    for step in range(first, first + steps):
        train_step(model, [batches[step]], optimizer, scheduler, params, grad_clip=1.0)
    return optimizer, scheduler


@pytest.mark.parametrize("family", FAMILIES)
def test_three_training_steps_give_the_same_band(bases, family):
    plain, plan, _ = _setup(bases[family], fuse=False)
    fused, _, _ = _setup(bases[family], fuse=True)
    _train(plain, plan, 3)
    _train(fused, plan, 3)
    trained = 0
    base_state = bases[family].state_dict()
    for (name, p), (_, q) in zip(plain.named_parameters(), fused.named_parameters(), strict=True):
        if p.requires_grad:
            trained += 1
            assert _rel(q, p) < RTOL, name
        else:  # frozen: bit-equal to the base model, fused or not
            assert torch.equal(q, base_state[name]) and torch.equal(p, base_state[name]), name
    assert trained > 0 and fused_layer_indices(fused) == [0, 2, 4]


def test_resume_and_export(bases, smol_tokenizer, tmp_path):
    base = bases["llama"]
    straight, plan, _ = _setup(base, fuse=True)
    _train(straight, plan, 3, kind="adamw")

    # 1 step, checkpoint, a new fused model resumes for the other 2 steps: the same band.
    first, _, _ = _setup(base, fuse=True)
    names = [n for n, p in first.named_parameters() if p.requires_grad]
    optimizer, scheduler = _train(first, plan, 1, kind="adamw")
    folder = save_checkpoint(
        tmp_path / "ckpt",
        first,
        names,
        optimizer,
        scheduler,
        TrainerState(1, 1, 0, 0, 0.0, capture_rng(), {}, {}),
        keep_last=1,
    )
    resumed, _, _ = _setup(base, fuse=True)
    _train(resumed, plan, 2, start=(folder, names), kind="adamw")
    for (name, p), (_, q) in zip(
        straight.named_parameters(), resumed.named_parameters(), strict=True
    ):
        assert _rel(q, p) < RTOL, name

    # Export while fused: the names, shapes and dtypes of a never-fused model's export, the band
    # as trained, every frozen tensor bit-equal to the base model; from_pretrained loads it.
    plain, _, _ = _setup(base, fuse=False)
    out_plain = export_hf_folder(plain, smol_tokenizer, tmp_path / "plain")
    out_fused = export_hf_folder(resumed, smol_tokenizer, tmp_path / "fused")
    tensors = {}
    for key, folder_ in (("plain", out_plain), ("fused", out_fused)):
        with safe_open(str(Path(folder_) / "model.safetensors"), "pt") as f:
            tensors[key] = {k: f.get_tensor(k) for k in f.keys()}
    assert tensors["fused"].keys() == tensors["plain"].keys()
    base_state = base.state_dict()
    trained = dict(resumed.named_parameters())
    for name, t in tensors["fused"].items():
        ref = tensors["plain"][name]
        assert t.shape == ref.shape and t.dtype == ref.dtype, name
        want = trained[name] if name in names else base_state[name]
        assert torch.equal(t, want), name
    loaded = AutoModelForCausalLM.from_pretrained(out_fused).eval()
    batch = _batch()
    with torch.no_grad():
        want = resumed.eval()(input_ids=batch["input_ids"]).logits
        assert _rel(loaded(input_ids=batch["input_ids"]).logits, want) < RTOL
    # The fused model runs on after the export, still fused.
    assert fused_layer_indices(resumed) == [0, 2, 4]
    # After unfuse_frozen_layers (flat export memory) the export is the same, byte for byte.
    unfuse_frozen_layers(resumed)
    out_unfused = export_hf_folder(resumed, smol_tokenizer, tmp_path / "unfused")
    with safe_open(str(Path(out_unfused) / "model.safetensors"), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), t) for k, t in tensors["fused"].items())


def test_bf16_weights_pack_in_bf16():
    # --precision bf16 / bf16-master: frozen weights are bf16 and pack in bf16 (no upcast, the
    # state dict keeps its dtypes); the result stays within bf16 rounding of the unfused path.
    base = _tiny("qwen2").to(torch.bfloat16)
    plain, _, _ = _setup(base, fuse=False)
    fused, _, _ = _setup(base, fuse=True)
    attn = decoder_layers(fused)[4].self_attn
    assert attn.q_proj.weight.dtype == torch.bfloat16
    assert {t.dtype for t in fused.state_dict().values()} == {torch.bfloat16}
    ids = _batch()["input_ids"]
    with torch.no_grad():
        got, want = fused(input_ids=ids).logits, plain(input_ids=ids).logits
    assert got.dtype == torch.bfloat16 and _rel(got, want) < 2e-2


def test_a_deep_copy_of_a_fused_model_computes_with_its_own_weights(bases):
    # copy.deepcopy gives parameters their own storage: the copy's packed groups see it and run
    # plainly, and its layers' forwards belong to the copy (not to the original's layers).
    fused, _, _ = _setup(bases["llama"], fuse=True)
    twin = copy.deepcopy(fused)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    ids = _batch()["input_ids"]
    plain, _, _ = _setup(bases["llama"], fuse=False)
    with torch.no_grad():
        for p in plain.parameters():
            p.mul_(1.5)
        assert _rel(twin(input_ids=ids).logits, plain(input_ids=ids).logits) < RTOL
    assert fused_layer_indices(fused) == [0, 2, 4] and fused_layer_indices(twin) == []


def test_generation_with_a_cache_is_unchanged(bases):
    plain, _, _ = _setup(bases["qwen2"], fuse=False)
    fused, _, _ = _setup(bases["qwen2"], fuse=True)
    prompt = _batch()["input_ids"][:1, :6]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = plain.eval().generate(prompt, **kwargs)
        got = fused.eval().generate(prompt, **kwargs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_with_kernels_patched_and_triton_interpreted(bases, family):
    # The Triton path on CPU: fused add + norm kernel, SwiGLU on the halves of the packed
    # gate/up, RoPE on the strided q/k slices of the packed q/k/v; forward and backward.
    plain, _, _ = _setup(bases[family], fuse=False)
    fused, _, _ = _setup(bases[family], fuse=True)
    patch_model(fused, enabled=True)
    batch = _batch()
    loss_plain, grads_plain = _loss_and_grads(plain, batch)
    with use_backend("triton"):
        loss_fused, grads_fused = _loss_and_grads(fused, batch)
    assert _rel(loss_fused, loss_plain) < RTOL
    for name, g in grads_plain.items():
        assert _rel(grads_fused[name], g) < RTOL, name


def test_unsupported_family_and_off_are_one_line_each():
    gemma = tiny_model("gemma2", num_hidden_layers=3)
    plan = BandPlan.from_indices(3, [1])
    apply_band(gemma, plan)
    keys = {n: p.data_ptr() for n, p in gemma.named_parameters()}
    report = fuse_frozen_layers(gemma, plan)
    assert report.layers == [] and len(report.skipped) == 1
    assert report.skipped[0].startswith("gemma2: ") and "unfused" in report.skipped[0]
    assert {n: p.data_ptr() for n, p in gemma.named_parameters()} == keys
    assert "unfused" in report.describe()

    llama = tiny_model("llama", num_hidden_layers=3)
    apply_band(llama, plan)
    off = fuse_frozen_layers(llama, plan, enabled=False, off_reason="several processes (FSDP2)")
    assert off.to_dict()["skipped"] == ["several processes (FSDP2)"] and off.layers == []
    assert isinstance(off, FuseReport) and "forward" not in decoder_layers(llama)[0].__dict__


def test_layers_that_train_are_never_fused_and_a_late_unfreeze_falls_back(bases):
    model = copy.deepcopy(bases["mistral"])
    plan = BandPlan.from_indices(LAYERS, list(BAND))
    apply_band(model, plan)
    decoder_layers(model)[4].requires_grad_(True)  # a suffix layer that trains after all
    report = fuse_frozen_layers(model, plan)
    assert report.layers == [0, 2]
    assert report.skipped == ["layer 4 (frozen-suffix): some of its parameters train; runs unfused"]
    # Unfreezing a fused layer later: its linears see it and run plainly, so it trains.
    q = decoder_layers(model)[0].self_attn.q_proj.weight
    q.requires_grad_(True)
    _loss_and_grads(model, _batch())
    assert q.grad is not None and torch.count_nonzero(q.grad) > 0
    assert fused_layer_indices(model) == [2]


def _l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative difference ``||a - b|| / ||b||`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item() if b.norm() > 0 else (a - b).norm().item()


@pytest.mark.realmodel
def test_smollm2_default_band(smol_model_and_tokenizer):
    # SmolLM2-135M (Llama, 30 layers, tied embeddings), band 6..23: prefix 0..5 and suffix
    # 24..29 fused. Three steps of the recipe's train_step on each path; the first step's loss
    # and band gradients are compared on the way. Gradients: norm-wise within 1e-5 of the
    # unfused path, and element-wise within 1e-5 or, where above, within a quarter of the
    # unfused path's own float32 error (against the same model in float64). Measured on 2
    # cores: element-wise at most 1.3e-5 (an input_layernorm weight's gradient, a sum over all
    # tokens), where unfused-vs-float64 is 1.5e-4; every other band gradient under 7e-6;
    # norm-wise at most 7.4e-6.
    base, _tok = smol_model_and_tokenizer
    L = base.config.num_hidden_layers
    plan = BandPlan.from_fractions(L, 0.2, 0.8)
    batch = _batch(vocab=base.config.vocab_size, seq=20)
    reference = copy.deepcopy(base).double().train()
    apply_band(reference, plan)
    install_execution_policy(reference, plan)
    _, grads64 = _loss_and_grads(reference, batch)
    del reference

    models, grads, losses, logits = {}, {}, {}, {}
    for kind in ("plain", "fused"):
        model = copy.deepcopy(base).train()
        apply_band(model, plan)
        install_execution_policy(model, plan)
        if kind == "fused":
            report = fuse_frozen_layers(model, plan)
            assert report.layers == [*range(plan.first), *range(plan.last + 1, L)]
        with torch.no_grad():
            logits[kind] = model(input_ids=batch["input_ids"]).logits
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # A small step: on random tokens a large one makes the run chaotic, and then any
        # float32 difference grows (lr 0.05 gives 2e-5 after 3 steps; lr 1e-3 and 1e-2, 1e-7).
        optimizer = _optimizer(trainable, "sgd", lr=1e-3)
        scheduler = build_scheduler(optimizer, 3, 0, "constant")
        params = [p for _, p in trainable]
        losses[kind] = train_step(model, [batch], optimizer, scheduler, params, 1.0).loss
        grads[kind] = {n: p.grad.clone() for n, p in trainable}
        for _ in range(2):
            train_step(model, [batch], optimizer, scheduler, params, 1.0)
        models[kind] = model

    assert _rel(logits["fused"], logits["plain"]) < RTOL
    assert abs(losses["fused"] - losses["plain"]) < RTOL * abs(losses["plain"])
    for name, g in grads["plain"].items():
        assert _l2(grads["fused"][name], g) < RTOL, name
        floor = _rel(g, grads64[name])  # the unfused path's own float32 error
        assert _rel(grads["fused"][name], g) < max(RTOL, 0.25 * floor), name
    base_state = base.state_dict()
    moved = 0
    for (name, p), (_, q) in zip(
        models["plain"].named_parameters(), models["fused"].named_parameters(), strict=True
    ):
        if p.requires_grad:
            moved += not torch.equal(p, base_state[name])
            assert _rel(q, p) < RTOL, name
        else:
            assert torch.equal(q, base_state[name]), name
    assert moved > 0
