"""A packed row computes what its examples compute alone (fastmid.models.loss with position_ids).

References: each example run alone through the model's own forward (``model(input_ids=...)``),
with no packing code involved.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_model

from fastmid.data import collate_packed
from fastmid.models.band import BandPlan, apply_band
from fastmid.models.loss import causal_lm_loss_sum, decoder_hidden_states, packed_attention_path


def _examples(seed: int, lengths: tuple[int, ...] = (5, 9, 7)) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 64, (n,), generator=gen).tolist()
        labels = [-100] * 2 + ids[2:]  # a prompt of 2 tokens
        out.append({"input_ids": ids, "labels": labels})
    return out


def _token_losses_alone(model, example) -> torch.Tensor:
    ids = torch.tensor([example["input_ids"]])
    logits = model(input_ids=ids).logits[0, :-1].float()
    target = torch.tensor(example["labels"][1:])
    losses = torch.nn.functional.cross_entropy(logits, target, reduction="none", ignore_index=-100)
    return losses[target != -100]


def _token_losses_packed(model, batch) -> torch.Tensor:
    hidden = decoder_hidden_states(
        model, batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    )
    logits = model.lm_head(hidden)[0, :-1].float()
    target = batch["labels"][0, 1:]
    losses = torch.nn.functional.cross_entropy(logits, target, reduction="none", ignore_index=-100)
    return losses[target != -100]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt2"])
def test_packed_row_equals_examples_alone(family: str) -> None:
    """Per-example token losses and every band gradient of one packed row of three examples
    equal the three examples alone (fp32, 1e-5 relative). gemma2 runs eager attention (its
    additive mask), the others SDPA (a boolean mask)."""
    model = tiny_model(family, seed=0, **({"num_hidden_layers": 3} if family != "gpt2" else {}))
    model.eval()  # no dropout (GPT-2 has some); gradients flow all the same
    apply_band(
        model,
        BandPlan.parse(
            len(model.model.layers) if hasattr(model, "model") else 2, None, "1", None, 0
        ),
    )
    examples = _examples(1)
    ref = copy.deepcopy(model)
    alone = torch.cat([_token_losses_alone(ref, e) for e in examples])
    alone.sum().backward()
    packed_batch = collate_packed([examples], pad_token_id=0)
    packed = _token_losses_packed(model, packed_batch)
    assert packed.shape == alone.shape
    torch.testing.assert_close(packed, alone.detach(), rtol=1e-5, atol=1e-6)
    loss_sum, n = causal_lm_loss_sum(
        model,
        packed_batch["input_ids"],
        packed_batch["attention_mask"],
        packed_batch["labels"],
        position_ids=packed_batch["position_ids"],
    )
    assert int(n) == alone.numel()
    loss_sum.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    ref_grads = {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
    assert grads and grads.keys() == ref_grads.keys()
    for k in grads:  # 1e-5 relative in norm: single entries near zero differ in the last bits
        diff = (grads[k].double() - ref_grads[k].double()).norm()
        assert diff <= 1e-5 * ref_grads[k].double().norm(), (k, float(diff))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_other_examples_bitwise_unchanged(family: str) -> None:
    """Changing one token of the middle example leaves the other examples' logits bitwise equal
    (padding rows too: a second, shorter row in the batch)."""
    model = tiny_model(family, seed=0, num_hidden_layers=2).eval()
    examples = _examples(2)
    changed = copy.deepcopy(examples)
    changed[1]["input_ids"][3] = (changed[1]["input_ids"][3] + 1) % 64
    short = [_examples(3, (4,))]

    def logits(exs):
        batch = collate_packed([exs, *short], pad_token_id=0)
        with torch.no_grad():
            hidden = decoder_hidden_states(
                model, batch["input_ids"], batch["attention_mask"], batch["position_ids"]
            )
            return model.lm_head(hidden)[0]

    a, b = logits(examples), logits(changed)
    first, second = len(examples[0]["input_ids"]), len(examples[1]["input_ids"])
    assert torch.equal(a[:first], b[:first])
    assert torch.equal(a[first + second :], b[first + second :])
    assert not torch.equal(a[first : first + second], b[first : first + second])


def test_attention_paths_are_named() -> None:
    assert packed_attention_path(tiny_model("llama", seed=0)).startswith("sdpa")
    assert packed_attention_path(tiny_model("gemma2", seed=0)).startswith("eager")
