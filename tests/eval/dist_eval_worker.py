"""One rank of ``test_eval_distributed.py``: shard each tiny model with FSDP2, run the accuracy eval.

Started by ``torch.distributed.run`` (``--nproc-per-node 2``, gloo on CPU); not a test module.
Usage: ``dist_eval_worker.py OUT_DIR MODEL_DIR...``. Every rank writes ``OUT_DIR/rank<r>.json``: per
model folder and problem count, the :class:`AccuracyResult` dict, the batch size of each
``generate`` call this rank made, how many forwards its model ran, and (rank 0) the progress text.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fastmid.eval.exact_match import evaluate_accuracy
from fastmid.models.loading import load_model_and_tokenizer
from fastmid.train.distributed import init_from_env, shard_model, shutdown

# Problem counts that are not multiples of batch_size x world_size = 4: 7 leaves rank 1 one
# problem of the last chunk, 5 leaves it none (a dummy batch).
COUNTS = (7, 5)
BATCH_SIZE = 2
MAX_NEW_TOKENS = 8


def run_one(folder: str, ctx: Any) -> list[dict[str, Any]]:
    model, tokenizer = load_model_and_tokenizer(folder, device="cpu")
    shard_model(model, ctx, "fp32")
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    batches: list[int] = []
    generate = model.generate

    def logged_generate(**kwargs: Any) -> torch.Tensor:
        assert kwargs.get("synced_gpus") is True, "several ranks must generate with synced_gpus"
        batches.append(int(kwargs["input_ids"].shape[0]))
        return generate(**kwargs)

    model.generate = logged_generate
    runs = []
    for n in COUNTS:
        forwards[0], batches[:] = 0, []
        text = io.StringIO()
        console = Console(file=text, width=200) if ctx.is_main else Console(quiet=True)
        result = evaluate_accuracy(
            model,
            tokenizer,
            "builtin:arith:test",
            n=n,
            max_new_tokens=MAX_NEW_TOKENS,
            batch_size=BATCH_SIZE,
            keep_samples=n,
            console=console,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        runs.append(
            {
                "folder": folder,
                "n": n,
                "result": result.to_dict(),
                "batches": list(batches),
                "forwards": forwards[0],
                "progress": text.getvalue(),
            }
        )
    return runs


def main() -> None:
    out, folders = Path(sys.argv[1]), sys.argv[2:]
    ctx = init_from_env(timeout_s=60)
    assert ctx is not None and ctx.backend == "gloo", "launch with torchrun, 2 processes, CPU"
    try:
        runs = [run for folder in folders for run in run_one(folder, ctx)]
        (out / f"rank{ctx.rank}.json").write_text(json.dumps(runs), encoding="utf-8")
    finally:
        shutdown()


if __name__ == "__main__":
    main()
