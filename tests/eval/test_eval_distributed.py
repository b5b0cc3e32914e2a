"""The accuracy eval on an FSDP2-sharded model in 2 processes equals a 1-process run.

``dist_eval_worker.py`` runs under ``torch.distributed.run`` (2 gloo processes on the CPU), shards
each tiny model with :func:`fastmid.train.distributed.shard_model` and calls
:func:`fastmid.eval.exact_match.evaluate_accuracy` with its rank. The reference is computed here,
in this process, by a 1-process run on the same model unsharded. Problem counts 7 and 5 with
batch size 2 are not multiples of ``batch_size x world_size``: with 5, rank 1 has no problem in
the last chunk and must generate a dummy batch, or rank 0's forwards would wait on it forever.

Two models: a tied one (embeddings inside FSDP2's root unit) and an untied one (embeddings a unit of
their own) whose ``<|im_end|>`` row of ``lm_head`` is made to outscore a token that some greedy
completions reach, so that some stop early. Then one rank finishes a ``generate`` call steps
before the other, the case that needs ``synced_gpus=True``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from fastmid.data import load_eval_problems
from fastmid.data.chat_template import end_of_turn_ids
from fastmid.eval.exact_match import EvalError, check_ranks, evaluate_accuracy
from fastmid.models.loading import load_model_and_tokenizer

WORKER = Path(__file__).with_name("dist_eval_worker.py")
WORLD = 2
COUNTS = (7, 5)  # as the worker's
BATCH_SIZE = 2
MAX_NEW_TOKENS = 8
DATA = "builtin:arith:test"


def greedy_lengths(model: Any, tokenizer: Any, n: int) -> list[int]:
    """Generated tokens (the end-of-turn token included) of each of the first ``n`` problems,
    one prompt at a time (no padding)."""
    eos = end_of_turn_ids(tokenizer)
    lengths = []
    for prompt, _ in load_eval_problems(DATA, n):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        lengths.append(out.shape[1] - ids.shape[1])
    return lengths


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer: Any) -> dict[str, Path]:
    from tiny import save_tiny, tiny_model

    tok = smol_tokenizer
    ids = dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    root = tmp_path_factory.mktemp("dist-eval")
    tied = tiny_model("llama", seed=0, tie_word_embeddings=True, **ids).eval()
    untied = tiny_model("llama", seed=0, tie_word_embeddings=False, **ids).eval()
    # The token problem 1's greedy completion reaches 4th: <|im_end|> gets its lm_head row, 1%
    # larger, so it wins where that token would have (with a positive logit) and the completion
    # ends there, in the completions that reach that token only (a larger factor would also win
    # where the token comes second, and end every completion at the same step).
    prompt = load_eval_problems(DATA, 2)[1][0]
    text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    x = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        y = untied.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False
        )
        head = untied.get_output_embeddings().weight
        head[tok.eos_token_id] = 1.01 * head[int(y[0, x.shape[1] + 3])]
    return {
        "tied": save_tiny(root / "tied", tied, tok),
        "untied": save_tiny(root / "untied", untied, tok),
    }


@pytest.fixture(scope="module")
def ranks(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[list[dict]]:
    """Each rank's runs, in the worker's order: per folder (tied, untied), per count."""
    out = tmp_path_factory.mktemp("dist-eval-out")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(WORLD),
        str(WORKER),
        str(out),
        str(folders["tied"]),
        str(folders["untied"]),
    ]
    # the working directory out of the repository: its top-level kernels/ folder would shadow the
    # installed fastmid.kernels for transformers' `import kernels` probe
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def reference(folder: Path, n: int) -> dict[str, Any]:
    model, tok = load_model_and_tokenizer(folder, device="cpu")
    return evaluate_accuracy(
        model,
        tok,
        DATA,
        n=n,
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=BATCH_SIZE,
        keep_samples=n,
        console=Console(quiet=True),
    ).to_dict()


def runs_of(ranks: list[list[dict]], folder: Path, n: int) -> list[dict]:
    return [next(r for r in runs if r["folder"] == str(folder) and r["n"] == n) for runs in ranks]


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_two_ranks_return_the_one_process_result(ranks, folders, name: str) -> None:
    for n in COUNTS:
        expected = reference(folders[name], n)
        for rank, run in enumerate(runs_of(ranks, folders[name], n)):
            got = run["result"]
            where = f"{name}, n={n}, rank {rank}"
            assert (got["n"], got["correct"], got["ci95"]) == (
                expected["n"],
                expected["correct"],
                expected["ci95"],
            ), where
            # every completion, in problem order (keep_samples=n keeps them all)
            assert got["samples"] == expected["samples"], where
            assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6), where


def test_ranks_split_each_chunk_and_run_the_same_forwards(ranks, folders) -> None:
    """Chunks of 4 dealt round-robin: 7 = [0 2 | 1 3] + [4 6 | 5]; 5 = [0 2 | 1 3] + [4 | dummy]."""
    expected = {7: ([2, 2], [2, 1]), 5: ([2, 1], [2, 1])}
    for folder in folders.values():
        for n in COUNTS:
            zero, one = runs_of(ranks, folder, n)
            assert (zero["batches"], one["batches"]) == expected[n], (folder, n)
            assert zero["forwards"] == one["forwards"] > 0, (folder, n)
            assert zero["result"] == one["result"], (folder, n)  # generation_s included


def test_a_rank_finishes_generating_before_the_other(folders) -> None:
    """The precondition that makes the untied model test ``synced_gpus``: in some chunk, one
    rank's batch ends (every prompt at its end-of-turn token) steps before the other's."""
    model, tok = load_model_and_tokenizer(folders["untied"], device="cpu")
    lengths = greedy_lengths(model, tok, max(COUNTS))
    step = BATCH_SIZE * WORLD
    uneven = [
        {max(lengths[c : c + step][r::WORLD]) for r in range(WORLD)}
        for c in range(0, len(lengths), step)
    ]
    assert any(len(ends) > 1 for ends in uneven), lengths


def test_progress_counts_the_problems_of_every_rank(ranks, folders) -> None:
    for n in COUNTS:
        zero, one = runs_of(ranks, folders["untied"], n)
        assert f"{n}/{n}" in zero["progress"], zero["progress"]
        assert one["progress"] == ""


def test_rank_arguments_must_match_the_process_group() -> None:
    with pytest.raises(EvalError, match="rank"):
        check_ranks(2, 2)
    with pytest.raises(EvalError, match="world_size"):
        check_ranks(0, 0)
    check_ranks(0, 1)  # one process: no group needed
    if not torch.distributed.is_initialized():
        with pytest.raises(EvalError, match="initialized"):
            evaluate_accuracy(None, None, DATA, n=3, rank=1, world_size=2)
