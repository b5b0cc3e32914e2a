"""``fastmid plan --gpus 2`` against two FSDP2 processes on CPU (issue 16, "Plan and measurement").

Two gloo processes (``python -m torch.distributed.run --standalone --nproc-per-node 2``, a free
port each time) run ``tests/models/fsdp_plan_worker.py``: each builds a random Llama from the
same ``config.json``, sets it up as the recipe does (band, execution policy with checkpointing,
``fastmid.train.distributed.shard_model``, ``build_optimizer``), runs one step and writes what it
held, measured with torch's storage accounting and FSDP2's own buffers (the worker's docstring).
Each rank's figures are checked against the same rank's lines of :func:`make_plan` for the same
config within 5%. The expected values come from the processes, never from the plan's code.

The model: hidden 64 (4 query heads and 2 key/value heads of 16), intermediate 255 and
vocabulary 511, six layers, band 1-3 (a no-grad prefix, a first band layer whose input needs no
gradient, a frozen suffix). The odd sizes split unevenly over two ranks: gate/up (255 x 64) give
rank 0 128 rows (8192 elements: torchao's 8-bit and 4-bit states) and rank 1 127 rows (8128: not
a multiple of the block, so fp32 states), down (64 x 255) gives 8160 elements on both (fp32
states), q/o (64 x 64) 2048 (under 4096: fp32 states); FSDP2 pads every chunk to the first one.
Precision ``fp32`` (what CPU runs: no mixed-precision cast), sequences of 32 tokens, micro-batch 2.
The cases: ``adamw``; ``ao_adamw8bit`` with ``--grad-accum 2`` (FSDP2 keeps unsharded gradients
between micro-batches); ``ao_adamw4bit``. torchao's update kernel runs eagerly
(``TORCHDYNAMO_DISABLE=1``: compiling it takes about 40 s on two cores; the states are allocated
by torchao's ``step()`` either way). About 15 s in all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from tiny import tiny_config

from fastmid.models.memory import ROOT_UNIT
from fastmid.models.plan_report import make_plan, print_plan

WORKER = Path(__file__).with_name("fsdp_plan_worker.py")
TOLERANCE = 0.05
LAYERS = "1-3"
SEQ, MICRO = 32, 2
CASES = [
    {"name": "adamw", "optim": "adamw", "grad_accum": 1},
    {"name": "ao8_accum", "optim": "ao_adamw8bit", "grad_accum": 2},
    {"name": "ao4", "optim": "ao_adamw4bit", "grad_accum": 1},
]
# Plan line -> what the worker measured for it.
LINES = {
    "parameter_shards": "parameter_shards",
    "root_unsharded": "root_unsharded",
    "all_gather_buffers": "all_gather_buffers",
    "gradient_shards": "gradient_shards",
    "gradient_accumulation": "gradient_accumulation",
    "gradients": "gradients",
    "optimizer_states": "optimizer_states",
}

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fsdp_plan") / "config.json"
    tiny_config(
        "llama",
        num_hidden_layers=6,
        hidden_size=64,
        intermediate_size=255,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=511,
        attn_implementation="sdpa",
    ).to_json_file(path)
    return path


@pytest.fixture(scope="module")
def measured(config_path: Path) -> dict[str, list[dict[str, Any]]]:
    """``{case name: [rank 0's figures, rank 1's]}`` from one two-process run."""
    out = config_path.parent
    cases = [
        {**c, "precision": "fp32", "layers": LAYERS, "seq_len": SEQ, "micro_batch": MICRO}
        for c in CASES
    ]
    (out / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a launcher around pytest must not leak into the two processes
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    worker_args = [str(WORKER), str(config_path), str(out), str(out / "cases.json")]
    proc = subprocess.run(
        [*launch, "2", *worker_args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return {
        c["name"]: [json.loads((out / f"{c['name']}.rank{r}.json").read_text()) for r in (0, 1)]
        for c in CASES
    }


def _plan(config_path: Path, case: dict[str, Any]) -> dict[str, Any]:
    return make_plan(
        config_path,
        layers=LAYERS,
        seq_len=SEQ,
        micro_batch=MICRO,
        gpus=2,
        precision="fp32",
        optim=case["optim"],
        grad_accum=case["grad_accum"],
        recommend=False,
    )


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_each_rank_holds_what_the_plan_says(
    config_path: Path, measured: dict[str, list[dict[str, Any]]], case: dict[str, Any]
) -> None:
    fsdp = _plan(config_path, case)["memory"]["mid_block"]["fsdp"]
    for rank, got in enumerate(measured[case["name"]]):
        assert got["rank"] == rank and got["world_size"] == 2
        expected = fsdp["ranks"][rank]
        for line, key in LINES.items():
            want, have = expected[line], got[key]
            if line == "gradient_accumulation" and case["grad_accum"] == 1:
                assert want == have == 0
                continue
            assert have > 0, (case["name"], rank, line)
            assert abs(want - have) <= TOLERANCE * have, (case["name"], rank, line, want, have)
        # The rule of fastmid.train.distributed.fp32_state_parameters, on this rank's shards.
        assert expected["fp32_state_tensors"] == len(got["fp32_state_parameters"])


def test_the_ranks_differ_where_the_shards_do(measured: dict[str, list[dict[str, Any]]]) -> None:
    """Rank 1's gate/up chunks (127 x 64) keep fp32 states where rank 0's (128 x 64) are 8-bit
    or 4-bit: what the plan's per-rank lines exist for."""
    for name in ("ao8_accum", "ao4"):
        zero, one = measured[name]
        assert one["optimizer_states"] > zero["optimizer_states"]
        assert len(one["fp32_state_parameters"]) == len(zero["fp32_state_parameters"]) + 6
        assert zero["parameter_shards"] == one["parameter_shards"]  # padded to the same rows
    zero, one = measured["adamw"]
    assert one["optimizer_states"] < zero["optimizer_states"]  # fewer rows, fewer fp32 states


def test_the_plan_names_the_units_each_rank_shards(
    config_path: Path, measured: dict[str, list[dict[str, Any]]]
) -> None:
    plan = _plan(config_path, CASES[0])
    assert json.loads(json.dumps(plan)) == plan
    assert plan["setup"]["gpus"] == 2 and plan["recommendation"] == {"status": "off"}
    fsdp = plan["memory"]["mid_block"]["fsdp"]
    names = [u["name"] for u in fsdp["units"]]
    # shard_model returns the units in wrapping order, the root as "<root>".
    assert measured["adamw"][0]["units"] == names
    assert names[-1] == ROOT_UNIT and fsdp["units"][-1]["modules"] == ["model.norm", "lm_head"]
    assert [u["reshard_after_forward"] for u in fsdp["units"]] == [True] * 7 + [False]

    from rich.console import Console

    console = Console(width=200, record=True)
    print_plan(plan, console)
    text = " ".join(console.export_text().split())
    assert "FSDP2 on 2 GPUs, 8 units: model.layers.0 .. model.layers.5" in text
    assert "<root> (model.norm, lm_head: 0.03 M, kept unsharded from forward through" in text
    for label in ("parameter shards", "root, unsharded", "all-gather (2 layers)", "reduce-scatter"):
        assert label in text
    assert "grad accumulation" not in text  # --grad-accum 1
