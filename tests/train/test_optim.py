"""Optimizer builders and the schedule, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from fastmid.train.optim import OptimizerError, build_optimizer, lr_factor, param_groups


def test_weight_decay_skips_norms_and_biases():
    named = [
        ("w", torch.nn.Parameter(torch.zeros(4, 4))),
        ("norm", torch.nn.Parameter(torch.zeros(4))),
        ("bias", torch.nn.Parameter(torch.zeros(4))),
    ]
    groups = param_groups(named, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 2]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_paged_optimizer_needs_cuda():
    with pytest.raises(OptimizerError, match="paged_adamw8bit needs CUDA.*--optim adamw8bit"):
        build_optimizer([("w", torch.nn.Parameter(torch.zeros(64, 64)))], "paged_adamw8bit", 1e-3)


def test_no_trainable_parameters_is_an_error():
    p = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    with pytest.raises(OptimizerError, match="no trainable parameters"):
        build_optimizer([("p", p)], "adamw", 1e-3)


def test_adamw8bit_matches_fp32_adamw_closely():
    """8-bit states (Dettmers et al. 2022) track fp32 AdamW: one step from the same grads."""
    torch.manual_seed(0)
    w0 = torch.randn(128, 64)
    grads = [torch.randn(128, 64) for _ in range(5)]
    out = {}
    for name in ("adamw", "adamw8bit"):
        p = torch.nn.Parameter(w0.clone())
        opt = build_optimizer([("p", p)], name, lr=1e-2)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out[name] = p.detach()
    moved = (out["adamw"] - w0).abs().mean()
    diff = (out["adamw8bit"] - out["adamw"]).abs().mean()
    assert diff < 0.05 * moved


def test_schedule_values():
    # warm-up: (s+1)/(w+1); cosine from 1 to min_ratio at the last step
    assert lr_factor(0, 10, 3, "cosine", 0.1) == pytest.approx(1 / 4)
    assert lr_factor(2, 10, 3, "cosine", 0.1) == pytest.approx(3 / 4)
    assert lr_factor(3, 10, 3, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(9, 10, 3, "cosine", 0.1) == pytest.approx(0.1)
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6))
    assert lr_factor(6, 10, 3, "cosine", 0.1) == pytest.approx(mid)
    assert lr_factor(7, 10, 3, "constant", 0.1) == 1.0
