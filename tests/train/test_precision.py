"""``--precision`` (fp32, bf16-master, bf16) and torchao's optimizers: train, resume exactly,
export; and the invariant that makes ``bf16`` usable at all (stochastic rounding keeps small
updates that round-to-nearest loses).

torchao compiles its optimizer step (``torch.compile``, one graph per parameter shape, dtype and
hyper-parameter constant), several seconds per graph on 2 cores. The cross product runs on a tiny
Llama whose every matrix is 64 x 64, so one run compiles two graphs (a matrix, a norm vector);
SmolLM2 runs one bf16 run per optimizer family. Graphs are cached per process and on disk.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from fastmid.config import STOCHASTIC_ROUNDING_OPTIMIZERS, build_config
from fastmid.models.precision import POLICIES
from fastmid.train.checkpoint import CheckpointError
from fastmid.train.optim import (
    STOCHASTIC_ROUNDING,
    OptimizerError,
    build_optimizer,
    import_torchao_optim,
)
from fastmid.train.recipe import MidBlockRecipe


def test_config_and_optimizer_agree_on_stochastic_rounding():
    assert STOCHASTIC_ROUNDING_OPTIMIZERS == STOCHASTIC_ROUNDING
    p = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.bfloat16))
    for name in STOCHASTIC_ROUNDING:
        assert build_optimizer([("w", p)], name, 1e-3).bf16_stochastic_round is True


def _projection(delta: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of ``reference`` that ``delta`` carries: <delta, ref> / <ref, ref> (float64)."""
    d, r = delta.double().flatten(), reference.double().flatten()
    return float(d @ r / (r @ r))


def test_stochastic_rounding_keeps_small_updates_round_to_nearest_loses_them():
    """1.77M bf16 N(0,1) weights, 20 AdamW8bit steps at lr 1e-5: each update (~1e-5) is far
    below half a bf16 step of a unit weight (2^-9 = 2e-3). The fp32-master run (same optimizer,
    fp32 weights, same gradients) gives the reference change. With stochastic rounding the bf16
    weights carry it in expectation; rounding to nearest drops almost all of it."""
    ao = import_torchao_optim()
    gen = torch.Generator().manual_seed(0)
    shapes = [(1536, 576), (1536, 576)]  # SmolLM2's MLP shape: graphs shared with the runs below
    start = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(20)]
    # (copies below: .to() of a tensor already in the dtype would share storage with start)

    def run(dtype: torch.dtype, stochastic: bool) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(w.to(dtype, copy=True)) for w in start]
        opt = ao.AdamW8bit(params, lr=1e-5, weight_decay=0.0, bf16_stochastic_round=stochastic)
        torch.manual_seed(1)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.to(dtype)
            opt.step()
        return [(p.detach().float() - w.float()) for p, w in zip(params, start, strict=True)]

    reference = torch.cat([d.flatten() for d in run(torch.float32, False)])
    rounded_sr = torch.cat([d.flatten() for d in run(torch.bfloat16, True)])
    rounded_rtn = torch.cat([d.flatten() for d in run(torch.bfloat16, False)])
    assert reference.numel() >= 1_000_000
    assert _projection(rounded_sr, reference) >= 0.9
    assert _projection(rounded_rtn, reference) < 0.1


# ---- runs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def square_llama_dir(tmp_path_factory, smol_tokenizer):
    """A tiny Llama in which every matrix of a layer is 64 x 64 (4096 elements: quantized states
    in both torchao optimizers) and every vector 64: two compiled optimizer graphs per run."""
    from tiny import save_tiny, tiny_model

    model = tiny_model(
        "llama",
        seed=7,
        hidden_size=64,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=3,
        vocab_size=len(smol_tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=smol_tokenizer.bos_token_id,
        eos_token_id=smol_tokenizer.eos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id,
    )
    return save_tiny(tmp_path_factory.mktemp("square-llama"), model, smol_tokenizer)


def _config(model: str, output, **overrides):
    values = dict(
        model=model,
        data="builtin:arith",
        max_examples=24,
        max_seq_len=128,
        micro_batch=2,
        max_steps=2,
        warmup_steps=0,
        lr=1e-3,
        schedule="constant",
        eval_every=0,
        save_every=1,
        keep_last=5,
        eval_accuracy=False,
        layers="1",
        output=str(output),
    )
    values.update(overrides)
    return build_config(None, values)


def _band(recipe: MidBlockRecipe) -> dict[str, torch.Tensor]:
    params = dict(recipe.model.named_parameters())
    return {n: params[n].detach().clone() for n in recipe.trainable_names}


def _losses(out) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _train_resume_export(
    model: str, tmp_path, precision: str, optim: str, **extra
) -> MidBlockRecipe:
    """2 steps in one go; then a second run resumes from step 1 and must end bit-identical;
    then export and load ``final/`` with ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    policy = POLICIES[precision]
    out = tmp_path / f"{precision}-{optim}"
    straight = MidBlockRecipe(_config(model, out, precision=precision, optim=optim, **extra))
    straight.setup()
    for name, p in straight.model.named_parameters():
        expected = policy.trained_dtype if p.requires_grad else policy.weight_dtype
        assert p.dtype == expected, (name, p.dtype)
    straight.train()
    losses = _losses(out)
    assert all(map(torch.isfinite, torch.tensor(losses))) and len(losses) == 2

    resumed = MidBlockRecipe(
        _config(
            model,
            out,
            precision=precision,
            optim=optim,
            resume=str(out / "checkpoints/step-1"),
            **extra,
        )
    )
    resumed.setup()
    resumed.train()
    assert _losses(out) == losses
    for name, value in _band(straight).items():
        assert torch.equal(value, _band(resumed)[name]), name

    final = resumed.export()
    loaded = AutoModelForCausalLM.from_pretrained(final, dtype="auto")
    weights = dict(loaded.named_parameters())
    for name, value in _band(resumed).items():
        assert weights[name].dtype == policy.export_dtype, name
        assert torch.equal(weights[name], value.to(policy.export_dtype)), name
    return resumed


TINY_MATRIX = [
    ("fp32", "ao_adamw8bit"),
    ("fp32", "ao_adamw4bit"),
    ("bf16-master", "adamw8bit"),
    ("bf16-master", "adamw"),
    ("bf16", "ao_adamw8bit"),
    ("bf16", "ao_adamw4bit"),
]


@pytest.mark.parametrize(("precision", "optim"), TINY_MATRIX)
def test_each_precision_and_optimizer_trains_resumes_exactly_and_exports(
    square_llama_dir, tmp_path, precision, optim
):
    recipe = _train_resume_export(str(square_llama_dir), tmp_path, precision, optim)
    written = (recipe.out / "config.yaml").read_text()
    assert f"precision: {precision}\n" in written and f"optim: {optim}\n" in written


def test_bf16_without_optim_picks_torchao_8bit_and_records_it(square_llama_dir, tmp_path):
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    cfg = _config(str(square_llama_dir), tmp_path / "auto", precision="bf16", max_steps=1)
    recipe = MidBlockRecipe(cfg, console)
    assert recipe.cfg.optim == "ao_adamw8bit"
    recipe.setup()
    assert type(recipe.optimizer).__name__ == "AdamW8bit"
    assert recipe.optimizer.bf16_stochastic_round is True
    assert "optim: ao_adamw8bit\n" in (recipe.out / "config.yaml").read_text()
    recipe.train()  # the first step compiles torchao's step: the console says so first
    assert "compiling the optimizer step (ao_adamw8bit" in console.file.getvalue()


def test_resume_with_another_precision_or_optimizer_is_refused(square_llama_dir, tmp_path):
    out = tmp_path / "run"
    first = MidBlockRecipe(_config(str(square_llama_dir), out, precision="bf16", max_steps=1))
    first.setup()
    first.train()
    other = _config(str(square_llama_dir), out, precision="fp32", max_steps=2, resume="latest")
    with pytest.raises(CheckpointError) as info:
        MidBlockRecipe(other).setup()
    message = str(info.value)
    assert "precision: 'bf16' -> 'fp32'" in message
    assert "optim: 'ao_adamw8bit' -> 'adamw8bit'" in message


@pytest.mark.realmodel
@pytest.mark.parametrize(
    ("precision", "optim"),
    [("fp32", "adamw8bit"), ("bf16-master", "adamw8bit"), ("bf16", "ao_adamw8bit")],
)
def test_smollm2_trains_resumes_and_exports_under_each_precision(tmp_path, precision, optim):
    _train_resume_export("default", tmp_path, precision, optim)


@pytest.mark.realmodel
def test_smollm2_bf16_with_the_step_in_backward_trains_resumes_and_exports(tmp_path):
    recipe = _train_resume_export(
        "default", tmp_path, "bf16", "ao_adamw8bit", optimizer_in_backward=True, grad_clip=0.0
    )
    assert type(recipe.optimizer).__name__ == "OptimizerInBackward"


def test_a_missing_cpp_compiler_is_one_line_before_training(monkeypatch):
    """torchao's step compiles C++ on CPU: no compiler is refused when the optimizer is built."""
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/g++"))
    p = torch.nn.Parameter(torch.zeros(64, 64))
    with pytest.raises(OptimizerError) as info:
        build_optimizer([("w", p)], "ao_adamw8bit", 1e-3)
    assert "C++ compiler" in str(info.value) and "\n" not in str(info.value)


def test_a_compile_failure_during_a_step_is_one_line(square_llama_dir, tmp_path, monkeypatch):
    from fastmid.train import recipe as recipe_module

    failure = type("InductorError", (RuntimeError,), {"__module__": "torch._inductor.exc"})

    def broken(*args, **kwargs):
        raise failure("CppCompileError: C++ compile error\n" + "line\n" * 400)

    recipe = MidBlockRecipe(_config(str(square_llama_dir), tmp_path / "run", optim="adamw"))
    recipe.setup()
    monkeypatch.setattr(recipe_module, "train_step", broken)
    with pytest.raises(OptimizerError) as info:
        recipe.train()
    message = str(info.value)
    assert "torch.compile failed" in message and "CppCompileError" in message
    assert "step 1" in message and "\n" not in message


def test_bf16_master_masters_start_at_the_files_values_not_the_bf16_load(
    square_llama_dir, tmp_path
):
    """Under bf16-master the model loads in bf16; the fp32 masters must still hold the stored
    fp32 values: a master on the bf16 grid hides every update below half a bf16 step from the
    forward pass (the autocast copy rounds it back), which slowed early training (see
    fastmid.models.precision)."""
    from safetensors.torch import load_file

    stored = load_file(str(square_llama_dir / "model.safetensors"))
    recipe = MidBlockRecipe(_config(str(square_llama_dir), tmp_path / "o", precision="bf16-master"))
    recipe.setup()
    params = dict(recipe.model.named_parameters())
    off_grid = 0
    for name in recipe.trainable_names:
        value = stored[name]
        assert value.dtype == torch.float32
        assert params[name].dtype == torch.float32
        assert torch.equal(params[name].detach(), value), name
        off_grid += int(not torch.equal(value, value.bfloat16().float()))
    assert off_grid > 0  # the check above could not tell the two loads apart otherwise
    frozen = [n for n, p in params.items() if not p.requires_grad]
    assert frozen and all(params[n].dtype == torch.bfloat16 for n in frozen)


def test_restore_stored_values_reads_sharded_files_and_skips_what_it_cannot_improve(tmp_path):
    from safetensors.torch import save_file

    from fastmid.models.precision import restore_stored_values

    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3, 5, generator=gen) for _ in range(3))
    save_file({"a": a, "c": c.bfloat16()}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(
        {"b": b, "wrong_shape": torch.ones(2)}, str(tmp_path / "model-00002-of-00002.safetensors")
    )
    weight_map = {
        "a": "model-00001-of-00002.safetensors",
        "c": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
        "wrong_shape": "model-00002-of-00002.safetensors",
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    params = {
        name: torch.nn.Parameter(t.bfloat16().float())
        for name, t in (("a", a), ("b", b), ("c", c), ("wrong_shape", torch.zeros(3)))
    }
    params["adapter"] = torch.nn.Parameter(torch.full((2,), 7.0))
    assert restore_stored_values(params, tmp_path) == 2
    assert torch.equal(params["a"].detach(), a) and torch.equal(params["b"].detach(), b)
    assert torch.equal(params["c"].detach(), c.bfloat16().float())  # stored bf16: as loaded
    assert torch.equal(params["wrong_shape"].detach(), torch.zeros(3))
    assert torch.equal(params["adapter"].detach(), torch.full((2,), 7.0))
