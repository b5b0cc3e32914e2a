"""Several processes (FSDP2 on gloo, CPU) against one process with the same global batch.

Each test launches real ``fastmid train`` processes: ``fastmid train --nproc 2`` (the launcher),
``torchrun`` as two "nodes" of one process each on localhost, and the one-process reference. The
references are one-process runs of the same code path that has always trained fastmid; the
two-process runs must give their losses and weights (README "Several GPUs": the same examples in
the same order, the loss over the global window divided by the global supervised-token count).

Tolerances: fp32 with torch AdamW, 1e-5 relative (only the order of float sums differs). torchao
8-bit: the same quantization blocks in both world sizes (each local shard is a whole number of
256-element blocks here), but a gradient summed in another order can round an 8-bit code the
other way, so weights are compared at 1e-4 relative in norm and losses at 1e-5.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.realmodel  # SmolLM2's tokenizer (the tiny model's vocabulary)

COMMON = (
    "--data builtin:arith --max-examples 48 --max-seq-len 256 --warmup-steps 1 --lr 1e-3 "
    "--eval-every 0 --eval-batches 1 --save-every 0 --no-eval-accuracy --seed 0 --kernels off"
).split()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    return env


def _fastmid(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastmid", "train", *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=timeout,
    )


def _args(model: Path, out: Path, extra: str) -> list[str]:
    """``fastmid train`` arguments: the tiny model, :data:`COMMON`, 3 steps, ``extra``."""
    return [
        "--model",
        str(model),
        *COMMON,
        "--max-steps",
        "3",
        *extra.split(),
        "--output",
        str(out),
    ]


def _ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_close_losses(a: Path, b: Path) -> None:
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == 3
    assert la == pytest.approx(lb, rel=1e-5)


def _assert_close_weights(a: Path, b: Path, rel: float, files: tuple[str, ...]) -> None:
    for name in files:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert sorted(ta) == sorted(tb), name
        for key in ta:
            diff = (ta[key].double() - tb[key].double()).norm()
            assert diff <= rel * ta[key].double().norm() + 1e-12, (name, key, float(diff))


@pytest.fixture(scope="module")
def one_process(dist_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, global batch 4 (micro-batch 2 x 2 accumulated), AdamW."""
    out = tmp_path_factory.mktemp("one") / "run"
    _ok(
        _fastmid(
            *_args(dist_model_dir, out, "--optim adamw --micro-batch 2 --grad-accum 2"),
        )
    )
    return out


def test_two_processes_equal_one(dist_model_dir: Path, one_process: Path, tmp_path: Path) -> None:
    """`fastmid train --nproc 2`, micro-batch 2 each: the losses of 3 steps, the exported model
    and the band delta equal one process with the same global batch."""
    out = tmp_path / "two"
    proc = _fastmid(*_args(dist_model_dir, out, "--optim adamw --micro-batch 2 --nproc 2"))
    _ok(proc)
    _assert_close_losses(one_process, out)
    _assert_close_weights(
        one_process, out, 1e-5, ("final/model.safetensors", "band_delta.safetensors")
    )
    # Rank 0 alone prints: one header, one summary.
    assert proc.stderr.count("fastmid train") - proc.stderr.count("fastmid train:") == 1
    assert proc.stderr.count("fastmid train: summary") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert summary["optimizer"] == "adamw"
    plan = json.loads((out / "plan.json").read_text())["distributed"]
    assert plan["fsdp_units"] == [f"model.layers.{i}" for i in range(5)] + ["<root>"]
    assert plan["global_batch_micro_batches"] == 2
    # The export is an ordinary folder: the tied head is stored once, as from one process.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_two_processes_with_accumulation_equal_one(
    dist_model_dir: Path, one_process: Path, tmp_path: Path
) -> None:
    """Micro-batch 1, 2 accumulated per rank, 2 ranks: the same 4 examples per step, one
    gradient reduction per step, the same losses and weights."""
    out = tmp_path / "accum"
    _ok(
        _fastmid(
            *_args(dist_model_dir, out, "--optim adamw --micro-batch 1 --grad-accum 2 --nproc 2")
        )
    )
    _assert_close_losses(one_process, out)
    _assert_close_weights(one_process, out, 1e-5, ("band_delta.safetensors",))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process(dist_model_dir: Path, one_process: Path, tmp_path: Path) -> None:
    """The README's multi-node command, as two "nodes" of one process each on localhost."""
    out = tmp_path / "nodes"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                *f"-m torch.distributed.run --nnodes 2 --node-rank {node} --nproc-per-node 1 "
                f"--rdzv-backend c10d --rdzv-endpoint localhost:{port} --rdzv-id fastmid-test "
                "-m fastmid train".split(),
                *_args(dist_model_dir, out, "--optim adamw --micro-batch 2"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for node in (0, 1)
    ]
    for p in procs:
        _stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr[-3000:]
    _assert_close_losses(one_process, out)
    _assert_close_weights(one_process, out, 1e-5, ("band_delta.safetensors",))


def test_torchao_8bit_two_processes_equal_one(dist_model_dir: Path, tmp_path: Path) -> None:
    """torchao AdamW8bit on the sharded band: the same losses (1e-5) and band weights (1e-4 in
    norm) as one process; every matrix of the band keeps 8-bit state on both world sizes."""
    runs = {}
    for name, extra in (("one", "--grad-accum 2"), ("two", "--nproc 2")):
        runs[name] = tmp_path / name
        _ok(
            _fastmid(
                *_args(dist_model_dir, runs[name], f"--optim ao_adamw8bit --micro-batch 2 {extra}")
            )
        )
    _assert_close_losses(runs["one"], runs["two"])
    _assert_close_weights(runs["one"], runs["two"], 1e-4, ("band_delta.safetensors",))
    fp32 = json.loads((runs["two"] / "plan.json").read_text())["distributed"][
        "fp32_optimizer_state_on_rank0"
    ]
    assert fp32 and all(name.endswith("layernorm.weight") for name in fp32)


def test_refusals_are_one_line(dist_model_dir: Path, tmp_path: Path) -> None:
    """What several processes cannot run stops before any process starts, in one line; an error
    of rank 0 (a run folder that holds a run) is printed once, naming the rank."""
    proc = _fastmid("--model", str(dist_model_dir), "--nproc", "2", "--optim", "adamw8bit")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--optim: adamw8bit cannot step FSDP2" in lines[0], proc.stderr
    proc = _fastmid("--model", str(dist_model_dir), "--nproc", "2", "--precision", "bf16")
    assert proc.returncode == 2 and "--precision bf16: torchao" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    out = tmp_path / "held"
    (out / "final").mkdir(parents=True)
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    proc = _fastmid(*_args(dist_model_dir, out, "--optim adamw --nproc 2"))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and errors[0].startswith("error: [rank 0] ")
        and "holds a run" in (errors[0])
    ), proc.stderr


def test_frozen_weights_are_never_reduced(tmp_path: Path) -> None:
    """In a step of 2 accumulated micro-batches on 2 ranks, FSDP2 reduce-scatters once, and only
    the band's units; frozen parameters get no gradient."""
    script = Path(__file__).with_name("dist_worker.py")
    out = tmp_path / "worker.json"
    proc = subprocess.run(
        [
            sys.executable,
            *"-m torch.distributed.run --standalone --nproc-per-node 2".split(),
            str(script),
            str(out),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # Band: layers 1..3 of 5 (the default 20%-80%); each band layer is one unit, reduced once.
    assert result["reduce_scatters_per_step"] == [3, 3]
    assert result["frozen_with_grad"] == []
    assert result["band_with_grad"] == result["band"]
    assert result["grad_types"] == ["DTensor"]


def test_plain_tensors_pass_through() -> None:
    """The helpers the recipe calls on every tensor leave a one-process tensor alone."""
    from fastmid.train.distributed import full_tensor, local_tensor

    t = torch.arange(3.0)
    assert local_tensor(t) is t and full_tensor(t) is t


class _Sharded:
    """A stand-in for an FSDP2 parameter: its whole ``numel`` and its local shard."""

    def __init__(self, full: tuple[int, ...], local: tuple[int, ...]) -> None:
        self.full, self.local = torch.zeros(full), torch.zeros(local)

    def numel(self) -> int:
        return self.full.numel()

    def detach(self) -> _Sharded:
        return self

    def to_local(self) -> torch.Tensor:
        return self.local


def test_state_precision_that_sharding_changes_is_named() -> None:
    """torchao quantizes a state only when the local shard has >= 4096 elements in whole blocks
    (256 for 8-bit, 128 for 4-bit): a 64 x 96 matrix qualifies whole (6144) but not in halves
    (3072); a 128 x 128 one qualifies both ways; a norm vector never."""
    from fastmid.train.distributed import fp32_state_parameters, sharding_changed_state

    named = [
        ("w_small", _Sharded((64, 96), (32, 96))),
        ("w_big", _Sharded((128, 128), (64, 128))),
        ("norm", _Sharded((128,), (64,))),
    ]
    assert sharding_changed_state(named, "ao_adamw8bit") == ["w_small"]
    assert fp32_state_parameters(named, "ao_adamw8bit") == ["w_small", "norm"]
    assert fp32_state_parameters(named, "adamw") == []
    assert sharding_changed_state(named, "adamw") == []
