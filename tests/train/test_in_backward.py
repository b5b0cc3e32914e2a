"""``--optimizer-in-backward``: each band parameter steps in its post-accumulate-grad hook.

What is checked comes from outside the code under test: the ordinary step (``train_step`` with
one optimizer over the band) as the reference for the weights; parameter sizes for the
gradient bytes; a NaN planted in one gradient for the non-finite path.
"""

from __future__ import annotations

import json

import pytest
import torch

from fastmid.config import ConfigError, build_config
from fastmid.train.optim import OptimizerError, OptimizerInBackward
from fastmid.train.recipe import MidBlockRecipe, NonFiniteLossError


def _band(recipe: MidBlockRecipe) -> dict[str, torch.Tensor]:
    params = dict(recipe.model.named_parameters())
    return {n: params[n].detach().clone() for n in recipe.trainable_names}


def _records(recipe: MidBlockRecipe) -> list[dict]:
    lines = (recipe.out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _trained(make_config, name: str, **overrides) -> MidBlockRecipe:
    recipe = MidBlockRecipe(make_config(name, **overrides))
    recipe.setup()
    recipe.train()
    return recipe


BASE = dict(max_steps=3, grad_clip=0.0, eval_every=0, save_every=0, schedule="cosine")


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_step_in_backward_gives_the_ordinary_steps_weights_with_one_gradient_at_a_time(
    make_config, optim
):
    ordinary = _trained(make_config, "ordinary", optim=optim, **BASE)
    hooked = _trained(make_config, "hooked", optim=optim, optimizer_in_backward=True, **BASE)
    assert isinstance(hooked.optimizer, OptimizerInBackward)
    for name, value in _band(ordinary).items():
        torch.testing.assert_close(_band(hooked)[name], value, rtol=1e-6, atol=1e-8)
    for a, b in zip(_records(ordinary), _records(hooked), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["lr"] == b["lr"]  # the schedule drives the per-parameter optimizers
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # gathered in hooks
    # Gradient bytes held at once (storages of .grad, sampled): the whole band after an
    # ordinary backward; at most the largest single parameter with the step in backward.
    sizes = [p.numel() * p.element_size() for p in hooked.trainable]
    assert [r["grad_bytes"] for r in _records(ordinary)] == [sum(sizes)] * 3
    assert all(0 < r["grad_bytes"] <= max(sizes) for r in _records(hooked))
    assert all(p.grad is None for p in hooked.trainable)  # nothing left after the step


def test_resume_with_the_step_in_backward_is_exact(make_config):
    common = dict(BASE, optim="adamw8bit", optimizer_in_backward=True, max_steps=4)
    straight = _trained(make_config, "run", **dict(common, save_every=2))
    resumed = MidBlockRecipe(
        make_config("run", **dict(common, resume=str(straight.out / "checkpoints/step-2")))
    )
    resumed.setup()
    resumed.train()
    for name, value in _band(straight).items():
        assert torch.equal(value, _band(resumed)[name]), name


def test_a_non_finite_gradient_stops_the_run_and_keeps_the_last_checkpoint(make_config):
    recipe = MidBlockRecipe(
        make_config("nan", **dict(BASE, optimizer_in_backward=True, save_every=1, max_steps=4))
    )
    recipe.setup()
    target = recipe.trainable[len(recipe.trainable) // 2]
    calls = {"n": 0}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 2 else grad

    target.register_hook(poison)  # the loss stays finite; one gradient of step 2 turns NaN
    with pytest.raises(NonFiniteLossError) as info:
        recipe.train()
    message = str(info.value)
    assert "non-finite gradient" in message and "step 2" in message and "micro-batch" in message
    assert "the optimizer stepped" in message
    checkpoints = sorted(p.name for p in (recipe.out / "checkpoints").iterdir())
    assert checkpoints == ["step-1"]


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (dict(optimizer_in_backward=True), ("--optimizer-in-backward", "--grad-clip 0")),
        (
            dict(optimizer_in_backward=True, grad_clip=0, grad_accum=2),
            ("--optimizer-in-backward", "--grad-accum 1"),
        ),
        (dict(optimizer_offload=True), ("--optimizer-offload", "--grad-clip 0")),
        (
            dict(optimizer_offload=True, optimizer_in_backward=True, grad_clip=0),
            ("--optimizer-offload", "--optimizer-in-backward"),
        ),
    ],
)
def test_combinations_that_cannot_stay_exact_are_refused(overrides, needles):
    with pytest.raises(ConfigError) as info:
        build_config(None, overrides)
    assert all(n in str(info.value) for n in needles), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for runs without CUDA")
def test_offload_without_cuda_is_refused_before_loading(make_config):
    with pytest.raises(OptimizerError, match="--optimizer-offload needs CUDA"):
        MidBlockRecipe(make_config("offload", optimizer_offload=True, grad_clip=0))
