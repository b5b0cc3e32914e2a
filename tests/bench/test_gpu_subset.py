"""The CUDA test subset of the prepared GPU run (issue 24, case 1), device-agnostic.

Every Triton kernel against its float64 reference, forward and every gradient, in fp32 and bf16
at odd shapes (design section 5: relative error fp32 < 1e-5, bf16 < 2e-2); the streaming CKA
kernel against float64; and a tiny model trained by ``fastmid train`` with ``--precision
bf16-master`` (bf16 autocast, fp32 band weights).

The device is ``$FASTMID_TEST_DEVICE`` (``cuda`` or ``cpu``), else CUDA when it is available,
else the CPU, where the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py``). In the ordinary suite this file runs on the CPU at tiny sizes;
``bench/gpu/run_all.sh`` runs it on the GPU (``FASTMID_TEST_DEVICE=cuda TRITON_INTERPRET=0``,
through ``bench/gpu/case_tests.py``) and, with ``--smoke``, on the CPU. Inputs are drawn on the
CPU from seeded generators and moved to the device; references are float64 on the CPU, from the
same (dtype-rounded) inputs. The training test runs ``fastmid train`` through its command line in
this process (about 10 s on 2 CPU cores), so on the CPU it runs only when
``FASTMID_GPU_SUBSET_TRAIN=1`` (the smoke run).
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from fastmid.kernels import (
    cka_block_stats_reference,
    cka_block_stats_triton,
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    geglu,
    geglu_reference,
    linear_cross_entropy,
    rms_norm,
    rms_norm_reference,
    rope,
    rope_reference,
    swiglu,
    swiglu_reference,
)

from fastmid.analysis.cka import StreamingCKA

_ASKED = os.environ.get("FASTMID_TEST_DEVICE", "").strip()
DEVICE = torch.device(_ASKED or ("cuda" if torch.cuda.is_available() else "cpu"))
ON_GPU = DEVICE.type == "cuda"
if ON_GPU and not torch.cuda.is_available():
    pytest.skip("FASTMID_TEST_DEVICE=cuda but no CUDA device here", allow_module_level=True)
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU run of the kernels needs TRITON_INTERPRET=1", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]
# (rows, width): odd sizes; on the GPU also wide rows that span several column blocks.
SHAPES = [(37, 123), (5, 5003)] if ON_GPU else [(37, 123)]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64, on the CPU."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return diff if scale == 0 else diff / scale


def draw(*shape: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale + shift


def on_device(t: torch.Tensor, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    """``t`` rounded to ``dtype`` on the test device, as a leaf."""
    return t.to(dtype).to(DEVICE).detach().requires_grad_(grad)


def f64(t: torch.Tensor) -> torch.Tensor:
    """The same values in float64 on the CPU, as a leaf (grad if ``t`` has one)."""
    return t.detach().cpu().double().requires_grad_(t.requires_grad)


def test_the_kernels_run_on_the_intended_device():
    from fastmid.kernels import interpreter_enabled, triton_available

    assert triton_available()
    assert interpreter_enabled() is (not ON_GPU)
    if ON_GPU:  # what the run reports the subset ran on
        assert torch.cuda.get_device_name(DEVICE)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(shape, dtype, offset, residual):
    rows, h = shape
    x = on_device(draw(rows, h, seed=0), dtype)
    w = on_device(draw(h, seed=1, scale=0.1, shift=1.0), dtype)
    r = on_device(draw(rows, h, seed=2), dtype) if residual else None
    dy, dh = draw(rows, h, seed=3).to(DEVICE), draw(rows, h, seed=4).to(DEVICE)
    out = rms_norm(x, w, 1e-5, offset=offset, residual=r, backend="triton")
    xd, wd = f64(x), f64(w)
    rd = f64(r) if r is not None else None
    ref = rms_norm_reference(xd, wd, 1e-5, offset=offset, residual=rd)
    if residual:
        (y, hh), (y_ref, h_ref) = out, ref
        ((y.float() * dy).sum() + (hh.float() * dh).sum()).backward()
        ((y_ref * dy.cpu().double()).sum() + (h_ref * dh.cpu().double()).sum()).backward()
        assert rel_err(hh, h_ref) < TOL[dtype]
        assert rel_err(r.grad, rd.grad) < TOL[dtype]
    else:
        y, y_ref = out, ref
        (y.float() * dy).sum().backward()
        (y_ref * dy.cpu().double()).sum().backward()
    assert y.dtype == dtype and y.device.type == DEVICE.type
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(x.grad, xd.grad) < TOL[dtype]
    assert rel_err(w.grad, wd.grad) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("casting", "offset"), [("llama", 0.0), ("gemma", 1.0)])
def test_fused_add_rms_norm(dtype, casting, offset):
    rows, h = SHAPES[-1]
    x = on_device(draw(rows, h, seed=0), dtype)
    r = on_device(draw(rows, h, seed=1, scale=2.0), dtype)
    w = on_device(draw(h, seed=2, scale=0.3, shift=1.0), dtype)
    dy, dh = draw(rows, h, seed=3).to(DEVICE), draw(rows, h, seed=4).to(DEVICE)
    y, hh = fused_add_rms_norm(x, r, w, 1e-5, offset=offset, casting=casting, backend="triton")
    ((y.float() * dy).sum() + (hh.float() * dh).sum()).backward()
    xd, rd, wd = f64(x), f64(r), f64(w)
    y_ref, h_ref = fused_add_rms_norm_reference(xd, rd, wd, 1e-5, offset=offset, casting=casting)
    ((y_ref * dy.cpu().double()).sum() + (h_ref * dh.cpu().double()).sum()).backward()
    assert y.dtype == dtype and hh.dtype == dtype
    for got, want in ((y, y_ref), (hh, h_ref), (x.grad, xd.grad), (r.grad, rd.grad)):
        assert rel_err(got, want) < TOL[dtype]
    assert rel_err(w.grad, wd.grad) < TOL[dtype]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_gated_activation(shape, dtype, op):
    fn, ref_fn = (swiglu, swiglu_reference) if op == "swiglu" else (geglu, geglu_reference)
    rows, inter = shape
    gate = on_device(draw(rows, inter, seed=0, scale=3.0), dtype)
    up = on_device(draw(rows, inter, seed=1), dtype)
    dy = draw(rows, inter, seed=2).to(DEVICE)
    out = fn(gate, up, backend="triton")
    (out.float() * dy).sum().backward()
    gd, ud = f64(gate), f64(up)
    ref = ref_fn(gd, ud)
    (ref * dy.cpu().double()).sum().backward()
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(gate.grad, gd.grad) < TOL[dtype]
    assert rel_err(up.grad, ud.grad) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope(dtype):
    batch, q_heads, kv_heads, seq, head_dim = 2, 5, 3, 37 if ON_GPU else 7, 18
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 100, (batch, seq), generator=g).double()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).double() / head_dim))
    emb = torch.cat((pos[..., None] * inv_freq,) * 2, dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    # transformers' layout: (B, S, H, D) projections viewed as (B, H, S, D)
    q = on_device(draw(batch, seq, q_heads, head_dim, seed=1), dtype).transpose(1, 2)
    k = on_device(draw(batch, seq, kv_heads, head_dim, seed=2), dtype).transpose(1, 2)
    q.retain_grad()
    k.retain_grad()
    dq, dk = draw(*q.shape, seed=3).to(DEVICE), draw(*k.shape, seed=4).to(DEVICE)
    q_out, k_out = rope(q, k, cos.to(DEVICE), sin.to(DEVICE), backend="triton")
    ((q_out.float() * dq).sum() + (k_out.float() * dk).sum()).backward()
    qd, kd = f64(q), f64(k)
    q_ref, k_ref = rope_reference(qd, kd, cos.double(), sin.double())
    ((q_ref * dq.cpu().double()).sum() + (k_ref * dk.cpu().double()).sum()).backward()
    assert q_out.dtype == dtype and q_out.shape == q.shape
    for got, want in ((q_out, q_ref), (k_out, k_ref), (q.grad, qd.grad), (k.grad, kd.grad)):
        assert rel_err(got, want) < TOL[dtype]


def _loss_by_hand(h, w, labels, softcap):
    """Float64 ground truth: explicit log-sum-exp over the kept rows."""
    logits = h @ w.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    keep = labels != -100
    lse = torch.logsumexp(logits[keep], dim=-1)
    picked = logits[keep].gather(1, labels[keep, None]).squeeze(1)
    return (lse - picked).sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen_head", "trained_head"])
def test_linear_cross_entropy(dtype, softcap, weight_grad):
    tokens, hidden, vocab = (67, 123, 32003) if ON_GPU else (37, 123, 1031)
    h = on_device(draw(tokens, hidden, seed=0), dtype)
    w = on_device(draw(vocab, hidden, seed=1, scale=0.2), dtype, grad=weight_grad)
    labels = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(2))
    labels[::4] = -100
    loss, n = linear_cross_entropy(
        h, w, labels.to(DEVICE), softcap=softcap, chunk_size=8, backend="triton"
    )
    (3.0 * loss).backward()  # a non-unit upstream gradient scales both gradients
    hd, wd = f64(h), f64(w)
    loss_ref = _loss_by_hand(hd, wd, labels, softcap)
    (3.0 * loss_ref).backward()
    assert loss.dtype == torch.float32 and int(n) == int((labels != -100).sum())
    assert rel_err(loss, loss_ref) < TOL[dtype]
    assert rel_err(h.grad, hd.grad) < TOL[dtype]
    if weight_grad:
        assert rel_err(w.grad, wd.grad) < TOL[dtype]
    else:
        assert w.grad is None


@pytest.mark.parametrize(
    ("n", "d1", "d2", "dtype"),
    [(37, 48, 80, torch.float32), (5, 17, 3, torch.float32), (70, 33, 33, torch.bfloat16)],
)
def test_cka_statistics_kernel(n, d1, d2, dtype):
    x = draw(n, d1, seed=n, scale=3.0, shift=1.0).to(dtype)
    y = draw(n, d2, seed=n + 1).to(dtype)
    rx, ry = draw(d1, seed=n + 2), draw(d2, seed=n + 3)
    want = cka_block_stats_reference(x.double(), y.double(), rx.double(), ry.double())
    got = cka_block_stats_triton(x.to(DEVICE), y.to(DEVICE), rx.to(DEVICE), ry.to(DEVICE))
    assert got.xtx.dtype == torch.float32 and got.xtx.device.type == DEVICE.type
    for f in fields(got):
        assert rel_err(getattr(got, f.name), getattr(want, f.name)) < 1e-5, f.name


def test_streaming_cka_on_the_device_matches_float64_on_the_cpu():
    # The analysis's accumulator over unequal blocks, one of a single token: the device path
    # (Triton, fp32 IEEE products, float64 running sums) against float64 BLAS on the CPU.
    d1, d2 = (257, 130) if ON_GPU else (33, 17)
    x = draw(301, d1, seed=0, scale=3.0, shift=1.0)
    y = 0.5 * x[:, :d2] + draw(301, d2, seed=1)
    mask = torch.rand(301, generator=torch.Generator().manual_seed(2)) > 0.1
    dev, cpu = StreamingCKA("device", backend="triton"), StreamingCKA("cpu", backend="torch")
    for lo, hi in ((0, 160), (160, 161), (161, 301)):
        dev.update(x[lo:hi].to(DEVICE), y[lo:hi].to(DEVICE), mask[lo:hi].to(DEVICE))
        cpu.update(x[lo:hi].double(), y[lo:hi].double(), mask[lo:hi])
    a, b = dev.compute(), cpu.compute()
    assert dev.n_tokens == cpu.n_tokens == int(mask.sum())
    assert abs(a.debiased - b.debiased) < 1e-5 and abs(a.biased - b.biased) < 1e-5


# ---- a tiny model trained by `fastmid train` in bf16-master -------------------------------------

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_folder(folder: Path) -> Path:
    """A random 4-layer Llama with a byte-level BPE tokenizer trained here (no download)."""
    from tiny import save_tiny, tiny_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(["what is 12 + 30? the answer is #### 42"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )  # fmt: skip
    tokenizer.chat_template = CHATML
    model = tiny_model(
        "llama", seed=0, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return save_tiny(folder, model, tokenizer)


@pytest.mark.skipif(
    not ON_GPU and os.environ.get("FASTMID_GPU_SUBSET_TRAIN") != "1",
    reason="a real training process: runs on CUDA, or with FASTMID_GPU_SUBSET_TRAIN=1 "
    "(bench/gpu/run_all.sh --smoke)",
)
def test_tiny_model_trains_in_bf16_master(tmp_path: Path):
    import traceback

    from typer.testing import CliRunner

    from fastmid.cli import app

    model_dir = tiny_folder(tmp_path / "tiny")
    out = tmp_path / "run"
    args = [
        "train", "--model", str(model_dir), "--data", "builtin:arith", "--max-examples", "64",
        "--max-seq-len", "256", "--max-steps", "6", "--micro-batch", "8", "--lr", "3e-3",
        "--warmup-steps", "0", "--precision", "bf16-master", "--no-eval-accuracy",
        "--eval-every", "0", "--save-every", "0", "--output", str(out), "--overwrite",
    ]  # fmt: skip
    done = CliRunner().invoke(app, args)  # in this process: `fastmid train` as the CLI runs it
    if done.exception is not None and not isinstance(done.exception, SystemExit):
        detail = "".join(traceback.format_exception(done.exception))
    else:
        detail = ""
    assert done.exit_code == 0, (done.output + detail)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 6 and len(records) == 6
    losses = [r["loss"] for r in records]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses  # it learns (random init: loss ~ log(320) at first)
    config = (out / "config.yaml").read_text()
    assert "precision: bf16-master" in config
    assert summary["device"].startswith(DEVICE.type)
    kernels = summary.get("kernels") or {}
    if ON_GPU:  # --kernels auto: the Triton kernels and the fused loss on CUDA
        assert kernels.get("enabled") is True, kernels
    assert (out / "final" / "config.json").is_file()
