"""The gradient-flow contract of the execution policy (design section 3)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_model
from transformers import LlamaForCausalLM

from fastmid.models.band import BandPlan, apply_band, install_execution_policy

LAYERS = 6


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return tiny_model(
        "llama",
        seed=0,
        num_hidden_layers=LAYERS,
        vocab_size=97,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    ).float()


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 11), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def run(model: torch.nn.Module) -> torch.Tensor:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch()).loss
    loss.backward()
    return loss.detach()


def band_param_names(model: torch.nn.Module, plan: BandPlan) -> set[str]:
    return {
        n
        for n, _ in model.named_parameters()
        if any(n.startswith(f"model.layers.{i}.") for i in plan.indices)
    }


PLANS = {
    "contiguous": lambda: BandPlan.from_fractions(LAYERS, 0.2, 0.8),  # layers 1..4
    "gap": lambda: BandPlan.from_indices(LAYERS, [1, 3]),  # layer 2 is a frozen gap
}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_gradient_flow_and_equivalence(base, plan_name: str, checkpointing: bool) -> None:
    plan = PLANS[plan_name]()
    model = copy.deepcopy(base)
    apply_band(model, plan)
    policy = install_execution_policy(model, plan, grad_checkpointing=checkpointing)
    loss = run(model)

    band = band_param_names(model, plan)
    assert band
    for name, p in model.named_parameters():
        if name in band:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name

    # Reference: the plain model, same requires_grad, no policy (no no_grad, no checkpointing).
    plain = copy.deepcopy(base)
    apply_band(plain, plan)
    ref_loss = run(plain)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    ref = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if name in band:
            torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-6, atol=1e-9)
    policy.remove()


def test_prefix_builds_no_graph_and_saves_nothing(base) -> None:
    plan = BandPlan.from_fractions(LAYERS, 0.4, 1.0)  # band 2..5, prefix 0..1
    assert plan.first == 2
    model = copy.deepcopy(base)
    apply_band(model, plan)
    install_execution_policy(model, plan)

    current: list[int | None] = [None]
    saved_in: dict[int, int] = {}
    outputs_grad_fn: dict[int, bool] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if current[0] is not None:
            saved_in[current[0]] = saved_in.get(current[0], 0) + 1
        return t

    handles = []
    for i, layer in enumerate(model.model.layers):

        def pre(mod, args, i=i):
            current[0] = i

        def post(mod, args, out, i=i):
            current[0] = None
            hidden = out[0] if isinstance(out, tuple) else out
            outputs_grad_fn[i] = hidden.grad_fn is not None

        handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch()).loss.backward()
    for h in handles:
        h.remove()

    assert outputs_grad_fn == {0: False, 1: False, 2: True, 3: True, 4: True, 5: True}
    assert saved_in.get(0, 0) == 0 and saved_in.get(1, 0) == 0
    assert all(saved_in.get(i, 0) > 0 for i in range(2, LAYERS))


def test_remove_restores_and_double_install_fails(base) -> None:
    plan = BandPlan.from_fractions(LAYERS, 0.2, 0.8)
    model = copy.deepcopy(base)
    apply_band(model, plan)
    policy = install_execution_policy(model, plan, grad_checkpointing=True)
    assert policy.roles[0] == "frozen-prefix" and policy.roles[1] == "band"
    assert "forward" in model.model.layers[0].__dict__
    with pytest.raises(RuntimeError, match="already installed"):
        install_execution_policy(model, plan)
    policy.remove()
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    install_execution_policy(model, plan).remove()  # installable again after remove
