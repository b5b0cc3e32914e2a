"""Tiny random llama models (from tests/tiny.py) and hand-made batches for the analysis tests."""

from __future__ import annotations

import copy

import torch
from tiny import tiny_model
from transformers import LlamaForCausalLM

VOCAB = 64


def tiny_llama(num_layers: int = 5, seed: int = 0) -> LlamaForCausalLM:
    """The factory's tiny Llama (tests/tiny.py), tied, in eval mode."""
    return tiny_model(
        "llama",
        seed=seed,
        vocab_size=VOCAB,
        num_hidden_layers=num_layers,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ).eval()


def perturbed_from(model: LlamaForCausalLM, first_layer: int, scale: float = 0.3, seed: int = 1):
    """A copy whose decoder layers >= first_layer get Gaussian weight noise."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, layer in enumerate(tuned.model.layers):
            if i >= first_layer:
                for p in layer.parameters():
                    p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return tuned


def examples(n: int, seed: int = 0, min_len: int = 5, max_len: int = 19) -> list[dict]:
    """Token-id examples of varied lengths; labels supervise the second half."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(batch: list[dict], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right padding, as fastmid.data.collate_batch does."""
    width = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attn[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def batches(exs: list[dict], batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [collate(exs[i : i + batch_size]) for i in range(0, len(exs), batch_size)]


def shim_build_sft_examples(
    data, tokenizer, split="train", max_seq_len=512, max_examples=None, **_
):
    """Stand-in for fastmid.data.build_sft_examples while the data module is being written."""
    rows = []
    for k in range(max_examples or 50):
        a, b = 3 + k, 7 + 2 * k
        msgs = [
            {"role": "user", "content": f"Ann has {a} pens and buys {b} more. How many now?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}. #### {a + b}"},
        ]
        prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_seq_len]
        labels = ([-100] * len(p_ids) + ids[len(p_ids) :])[: len(ids)]
        rows.append({"input_ids": ids, "labels": labels})
    return rows, {"examples": len(rows)}


def shim_collate_batch(examples, pad_token_id):
    return collate(examples, pad_token_id)
