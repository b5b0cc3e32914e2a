"""Bad inputs to the real ``fastmid`` command line, as a new user would type them.

Every case must end the same way: exit code 2, exactly one non-empty line on stderr
(``error: ...``) that names the flag, YAML key, file or row at fault, nothing on stdout, and no
traceback. The cases cover flags (usage errors and out-of-range values), YAML keys and values,
data rows and files, model paths, checkpoints (``--resume``), bands, ``plan``, ``analyze`` and
``eval`` options. The expected fragments are what the user typed or would look for (the flag,
the file name, the 1-based line), never text copied from fastmid's messages.

They run in-process with typer's CliRunner (one process, the tiny model folder of the session
fixture ``tiny_llama_dir``); a handful also run as real processes (``fastmid`` console script and
``python -m fastmid.cli``) to check what a shell sees. Each case fails before any training step.
The checkpoint cases resume damaged copies of one 3-step run of the tiny model (fixture ``runs``,
trained only when such a case is selected).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fastmid.cli import app

runner = CliRunner()

# ---- the files the cases name -----------------------------------------------------------------

MESSAGES_ROW = (
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
)

# name -> content (bytes: written as is, so that a file can be latin-1 on purpose).
BAD_FILES: dict[str, bytes] = {
    # data
    "bad-json.jsonl": (MESSAGES_ROW + "\n{not json\n").encode(),
    "latin1.jsonl": (
        '{"messages": [{"role": "user", "content": "café"}, '
        '{"role": "assistant", "content": "x"}]}\n'
    ).encode("latin-1"),
    "latin1.csv": "prompt,completion\ncafé,oui\n".encode("latin-1"),
    "empty.jsonl": b"",
    "unknown-columns.jsonl": b'{"foo": 1}\n',
    "messages-not-a-list.jsonl": b'{"messages": "hi"}\n',
    "unknown-role.jsonl": (
        b'{"messages": [{"role": "wizard", "content": "hi"}, '
        b'{"role": "assistant", "content": "x"}]}\n'
    ),
    "short-row.csv": b"instruction,output\nhello\n",
    "numbers.json": b"[1, 2, 3]\n",
    "not-parquet.parquet": b"this is not parquet\n",
    "empty-answer.jsonl": (
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}\n'
    ),
    # eval (GSM8K style: question + answer ending in "#### <number>")
    "questions-only.jsonl": b'{"question": "What is 1 + 1?"}\n',
    "answer-without-number.jsonl": b'{"question": "What is 1 + 1?", "answer": "two"}\n',
    # YAML configs
    "unknown-key.yaml": b"learning_rate: 0.001\n",
    "bad-value.yaml": b"lr: abc\n",
    "duplicate-key.yaml": b"lr: 0.001\nseed: 1\nlr: 0.002\n",
    "a-list.yaml": b"- lr\n- seed\n",
    "broken.yaml": b"lr: [0.001\n",
    "python-tag.yaml": b"model: !!python/object/apply:os.system ['echo hacked']\n",
    "negative-seed.yaml": b"seed: -1\n",
    "reversed-band.yaml": b"band: 0.9:0.1\n",
    "yes-for-micro-batch.yaml": b"micro_batch: yes\n",
    "min-lr-ratio-2.yaml": b"min_lr_ratio: 2\n",
    "tab.yaml": b"lr:\t0.001\n",
    "huge-seed.yaml": b"seed: 1180591620717411303424\n",
    "utf16.yaml": "lr: 0.001\n".encode("utf-16"),  # starts with the byte-order mark ff fe
    "latin1.yaml": "model: café\n".encode("latin-1"),  # é is byte 10
    "bf16-adamw.yaml": b"precision: bf16\noptim: adamw\n",
    # model paths
    "a-text-file.txt": b"hello\n",
    "fake.gguf": b"not a gguf file\n",
    "unknown-type.json": b'{"model_type": "no-such-architecture"}\n',
    "broken-config.json": b"{\n",
    "config-a-list.json": b"[1, 2]\n",
    "layers-many.json": b'{"model_type": "llama", "num_hidden_layers": "many"}\n',
    "layers-negative.json": b'{"model_type": "llama", "num_hidden_layers": -4}\n',
    # 10**12 layers: building that model (even on the meta device) would take minutes
    "layers-absurd.json": b'{"model_type": "llama", "num_hidden_layers": 1000000000000}\n',
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A folder of bad files and folders, written once for the module."""
    root = tmp_path_factory.mktemp("bad-inputs")
    for name, content in BAD_FILES.items():
        (root / name).write_bytes(content)
    (root / "empty-folder").mkdir()
    (root / "no-config").mkdir()
    (root / "no-weights").mkdir()
    shutil.copy(tiny_llama_dir / "config.json", root / "no-weights" / "config.json")
    (root / "broken-config-folder").mkdir()
    (root / "broken-config-folder" / "config.json").write_text("{\n")
    (root / "bert-folder").mkdir()
    (root / "bert-folder" / "config.json").write_text('{"model_type": "bert"}\n')
    # the tiny model with its weights file cut to 100 kB (an interrupted copy or download)
    shutil.copytree(tiny_llama_dir, root / "truncated-weights")
    with open(root / "truncated-weights" / "model.safetensors", "r+b") as weights:
        weights.truncate(100_000)
    # config and weights, but no tokenizer file
    (root / "no-tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, root / "no-tokenizer" / name)
    # config.json is a folder
    (root / "config-is-a-folder" / "config.json").mkdir(parents=True)
    shutil.copy(tiny_llama_dir / "model.safetensors", root / "config-is-a-folder")
    (root / "earlier-analysis").mkdir()
    (root / "earlier-analysis" / "analysis.json").write_text("{}\n")
    # --overwrite allowed, but a folder sits where the report's CSV goes: the write fails.
    (root / "report-blocked").mkdir()
    (root / "report-blocked" / "analysis.csv").mkdir()
    return root


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """The tiny model with one token added to its tokenizer: another tokenizer, the same depth."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("other-tokenizer") / "model"
    shutil.copytree(tiny_llama_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.add_tokens(["<fastmid-test-extra-token>"])
    tokenizer.save_pretrained(str(folder))
    return folder


# One short run with a checkpoint at every step; each case resumes a copy damaged in one way.
RUN = (
    "train --model {tiny} --output {run} --max-examples 16 --micro-batch 2 --max-steps 3 "
    "--save-every 1 --keep-last 3 --warmup-steps 0 --eval-every 0 --no-eval-accuracy"
)


def _damage_trainer_state(checkpoint: Path) -> None:
    """A counter far beyond any real run (it overflowed the data-order seed on resume)."""
    file = checkpoint / "trainer_state.json"
    state = json.loads(file.read_text())
    state["micro_batches"] = 10**30
    file.write_text(json.dumps(state))


def _damage_band_shape(checkpoint: Path) -> None:
    """A readable band.safetensors whose first tensor has another shape than the model's."""
    import torch
    from safetensors.torch import load_file, save_file

    file = checkpoint / "band.safetensors"
    tensors = load_file(str(file))
    tensors[sorted(tensors)[0]] = torch.zeros(3, 3)
    save_file(tensors, str(file))


RUN_DAMAGE = {"huge-micro-batches": _damage_trainer_state, "band-shape": _damage_band_shape}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """``{runs}/<damage>``: copies of a 3-step run of the tiny model (checkpoints step-1..3)
    whose ``step-2`` is damaged as :data:`RUN_DAMAGE` says; step-1 stays intact."""
    root = tmp_path_factory.mktemp("runs")
    good = root / "good"
    args = RUN.format(tiny=tiny_llama_dir, run=good).split()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    for name, damage in RUN_DAMAGE.items():
        shutil.copytree(good, root / name)
        damage(root / name / "checkpoints" / "step-2")
    return root


# ---- the cases --------------------------------------------------------------------------------

Needle = str | re.Pattern[str]

# `train` on the tiny model that must stop before training; if a case were accepted, it stays
# small (8 examples, 1 step, no accuracy eval) instead of running the default model.
SMALL = "--output {out}/run --max-examples 8 --max-steps 1 --no-eval-accuracy"
TRAIN = "train --model {tiny} " + SMALL


def case(
    case_id: str,
    args: str,
    *needles: Needle,
    env: dict[str, str] | None = None,
    marks: Any = (),
) -> Any:
    """One bad input: ``args`` (split on spaces; ``{tiny}``, ``{other}``, ``{files}``, ``{out}``,
    ``{runs}`` are filled in, in ``env``'s values too) and the fragments its error line must hold
    (a regex where given as one); ``marks`` as ``pytest.param`` takes them."""
    return pytest.param(args, needles, env or {}, id=case_id, marks=marks)


def _kernels_can_run() -> bool:
    """Whether ``--kernels on`` is valid here (CUDA and triton), which makes it no bad input."""
    import torch

    from fastmid import kernels

    return torch.cuda.is_available() and kernels.triton_available()


def line(n: int) -> re.Pattern[str]:
    """A 1-based line or row number as the message may word it (``line 2`` or ``row 2``)."""
    return re.compile(rf"\b(line|row) {n}\b")


CASES = [
    # -- usage errors: click parses these before fastmid sees them ------------------------------
    case("usage-optim-not-a-choice", "train --optim sgd --print-config", "--optim", "sgd"),
    case("usage-format-not-a-choice", "train --format csvx --print-config", "--format", "csvx"),
    case("usage-lr-not-a-number", "train --lr abc --print-config", "--lr"),
    case("usage-max-steps-not-an-integer", "train --max-steps 1.5 --print-config", "--max-steps"),
    case("usage-unknown-flag-alias", "train --learning-rate 1e-4", "--learning-rate", "--lr"),
    case("usage-unknown-flag-typo", "train --lrr 1e-4", "--lrr", "--lr"),
    case("usage-flag-without-value", "train --micro-batch", "--micro-batch"),
    case("usage-extra-argument", "train a.yaml b.yaml", "b.yaml"),
    case("usage-unknown-command", "trian", "trian"),
    case("usage-unknown-data-command", "data inspekt", "inspekt"),
    case("usage-analyze-without-base", "analyze", "--base"),
    case("usage-plan-optim-not-a-choice", "plan --model {tiny} --optim sgd", "--optim", "sgd"),
    case(
        "bf16-with-round-to-nearest-optimizer",
        "train --precision bf16 --optim adamw8bit --print-config",
        "--optim",
        "--precision bf16",
        "ao_adamw8bit",
    ),
    case(
        "yaml-bf16-with-round-to-nearest-optimizer",
        "train {files}/bf16-adamw.yaml --print-config",
        "optim",
        "ao_adamw4bit",
    ),
    case("usage-precision-not-a-choice", "train --precision fp16", "--precision", "fp16"),
    case("report-to-unknown", "train --report-to mlflow --print-config", "--report-to", "mlflow"),
    # -- flag values: bounds and finiteness -----------------------------------------------------
    case("lr-inf", "train --lr inf --print-config", "--lr"),
    case("lr-nan", "train --lr nan --print-config", "--lr"),
    case("lr-zero", "train --lr 0 --print-config", "--lr"),
    case("seed-negative", "train --seed -1 --print-config", "--seed"),
    # 2**70: torch's manual_seed overflowed on it ("Overflow when unpacking long long")
    case("seed-huge", "train --seed 1180591620717411303424 --print-config", "--seed"),
    case(
        "shuffle-seed-2-to-the-32",
        "train --shuffle-seed 4294967296 --print-config",
        "--shuffle-seed",
    ),
    case("eval-fraction-above-1", "train --eval-fraction 1.5 --print-config", "--eval-fraction"),
    case("eval-fraction-nan", "train --eval-fraction nan --print-config", "--eval-fraction"),
    case("max-seq-len-4", "train --max-seq-len 4 --print-config", "--max-seq-len"),
    case("micro-batch-0", "train --micro-batch 0 --print-config", "--micro-batch"),
    case("epochs-inf", "train --epochs inf --print-config", "--epochs"),
    case("grad-clip-negative", "train --grad-clip -1 --print-config", "--grad-clip"),
    case("max-steps-0", "train --max-steps 0 --print-config", "--max-steps"),
    case("warmup-steps-negative", "train --warmup-steps -1 --print-config", "--warmup-steps"),
    case("output-is-a-file", TRAIN.replace("{out}/run", "{files}/a-text-file.txt"), "--output"),
    # -- YAML keys and values -------------------------------------------------------------------
    case(
        "yaml-unknown-key",
        "train {files}/unknown-key.yaml --print-config",
        "unknown-key.yaml",
        "learning_rate",
    ),
    case("yaml-bad-value", "train {files}/bad-value.yaml --print-config", "lr", "abc"),
    case(
        "yaml-duplicate-key",
        "train {files}/duplicate-key.yaml --print-config",
        "duplicate-key.yaml",
        "lr",
    ),
    case("yaml-not-a-mapping", "train {files}/a-list.yaml --print-config", "a-list.yaml"),
    case("yaml-syntax-error", "train {files}/broken.yaml --print-config", "broken.yaml"),
    case("yaml-python-tag", "train {files}/python-tag.yaml --print-config", "python-tag.yaml"),
    case("yaml-tab-indent", "train {files}/tab.yaml --print-config", "tab.yaml"),
    case(
        "yaml-missing-file",
        "train {files}/no-such-config.yaml --print-config",
        "no-such-config.yaml",
    ),
    case("yaml-a-folder", "train {files}/empty-folder --print-config", "empty-folder"),
    case("yaml-seed-negative", "train {files}/negative-seed.yaml --print-config", "seed"),
    case("yaml-seed-huge", "train {files}/huge-seed.yaml --print-config", "seed"),
    case("yaml-utf16", "train {files}/utf16.yaml --print-config", "utf16.yaml"),
    # the file and where its first non-UTF-8 byte is (é at byte offset 10 of line 1)
    case(
        "yaml-latin1",
        "train {files}/latin1.yaml --print-config",
        "latin1.yaml",
        re.compile(r"\b10\b"),
    ),
    case("yaml-band-reversed", "train {files}/reversed-band.yaml --print-config", "band"),
    case(
        "yaml-bool-for-an-integer",
        "train {files}/yes-for-micro-batch.yaml --print-config",
        re.compile(r"micro[-_]batch"),
    ),
    case(
        "yaml-min-lr-ratio-above-1",
        "train {files}/min-lr-ratio-2.yaml --print-config",
        re.compile(r"min[-_]lr[-_]ratio"),
    ),
    # -- bands ----------------------------------------------------------------------------------
    case("band-reversed", "train --band 0.9:0.1 --print-config", "--band", "0.9:0.1"),
    case("band-empty", "train --band 0:0 --print-config", "--band", "0:0"),
    case("band-not-fractions", "train --band abc --print-config", "--band", "abc"),
    case("band-beyond-depth", "train --band 0.5:1.5 --print-config", "--band"),
    case(
        "band-and-layers", "train --band 0.2:0.8 --layers 1-2 --print-config", "--band", "--layers"
    ),
    case("layers-not-integers", "train --layers x --print-config", "--layers"),
    case("layers-reversed", "train --layers 3-1 --print-config", "--layers", "3-1"),
    case("layers-beyond-depth", TRAIN + " --layers 99", "--layers", "99"),
    # -- kernels ----------------------------------------------------------------------------------
    case(
        "kernels-on-without-cuda",
        TRAIN + " --kernels on",
        "--kernels",
        marks=pytest.mark.skipif(
            _kernels_can_run(), reason="CUDA and triton: --kernels on is valid"
        ),
    ),
    # -- plan -----------------------------------------------------------------------------------
    case("plan-band-reversed", "plan --model {tiny} --band 0.9:0.1", "--band", "0.9:0.1"),
    case("plan-band-empty", "plan --model {tiny} --band 0:0", "--band"),
    case("plan-layers-beyond-depth", "plan --model {tiny} --layers 99", "--layers", "99"),
    case(
        "plan-band-and-layers",
        "plan --model {tiny} --band 0.2:0.8 --layers 1",
        "--band",
        "--layers",
    ),
    case("plan-gpus-0", "plan --model {tiny} --gpus 0", "--gpus"),
    case("plan-gpu-memory-nan", "plan --model {tiny} --gpu-memory nan", "--gpu-memory"),
    case("plan-gpu-memory-inf", "plan --model {tiny} --gpu-memory inf", "--gpu-memory"),
    case("plan-seq-len-negative", "plan --model {tiny} --seq-len -5", "--seq-len"),
    case("plan-micro-batch-0", "plan --model {tiny} --micro-batch 0", "--micro-batch"),
    case("plan-unknown-model-type", "plan --model {files}/unknown-type.json", "unknown-type.json"),
    case(
        "plan-broken-config-json", "plan --model {files}/broken-config.json", "broken-config.json"
    ),
    case("plan-config-a-list", "plan --model {files}/config-a-list.json", "config-a-list.json"),
    case(
        "plan-layers-not-a-number",
        "plan --model {files}/layers-many.json",
        "layers-many.json",
        "num_hidden_layers",
    ),
    case(
        "plan-layers-negative",
        "plan --model {files}/layers-negative.json",
        "layers-negative.json",
        "num_hidden_layers",
    ),
    case(
        "plan-layers-absurd",
        "plan --model {files}/layers-absurd.json",
        "layers-absurd.json",
        "num_hidden_layers",
    ),
    # -- model paths ----------------------------------------------------------------------------
    case("model-missing-path", "train --model {files}/no-such-model " + SMALL, "no-such-model"),
    case("model-folder-without-config", "train --model {files}/no-config " + SMALL, "no-config"),
    case("model-folder-without-weights", "train --model {files}/no-weights " + SMALL, "no-weights"),
    case(
        "model-broken-config-in-folder",
        "train --model {files}/broken-config-folder " + SMALL,
        "broken-config-folder",
    ),
    case("model-unsupported-type", "train --model {files}/bert-folder " + SMALL, "bert"),
    case(
        "model-truncated-weights",
        "train --model {files}/truncated-weights " + SMALL,
        "truncated-weights",
        "model.safetensors",
    ),
    case("model-without-tokenizer", "train --model {files}/no-tokenizer " + SMALL, "no-tokenizer"),
    case(
        "model-config-json-is-a-folder",
        "train --model {files}/config-is-a-folder " + SMALL,
        "config-is-a-folder",
        "config.json",
    ),
    case("model-fake-gguf", "train --model {files}/fake.gguf " + SMALL, "fake.gguf"),
    case("model-a-text-file", "eval --model {files}/a-text-file.txt", "a-text-file.txt"),
    case(
        "model-gguf-cache-not-writable",
        "plan --model default",
        "a-text-file.txt",
        env={"FASTMID_CACHE": "{files}/a-text-file.txt"},
    ),
    case(
        "model-repo-not-cached",
        "eval --model no-such-org/no-such-model",
        "no-such-org/no-such-model",
    ),
    # -- checkpoints ----------------------------------------------------------------------------
    case("resume-missing-folder", TRAIN + " --resume {files}/no-such-checkpoint", "--resume"),
    case("resume-not-a-checkpoint", TRAIN + " --resume {files}/empty-folder", "--resume"),
    case("resume-a-file", TRAIN + " --resume {files}/a-text-file.txt", "--resume"),
    case("resume-latest-without-checkpoints", TRAIN + " --resume latest", "--resume"),
    # trainer_state.json of step-2 says micro_batches: 10**30 (it overflowed after "resumed")
    case(
        "resume-trainer-state-counter-huge",
        RUN.replace("{run}", "{runs}/huge-micro-batches")
        + " --resume {runs}/huge-micro-batches/checkpoints/step-2",
        "trainer_state.json",
        "micro_batches",
        re.compile(r"--resume \S*step-1\b"),  # the older, intact checkpoint to use
    ),
    case(
        "resume-band-tensor-wrong-shape",
        RUN.replace("{run}", "{runs}/band-shape")
        + " --resume {runs}/band-shape/checkpoints/step-2",
        "band.safetensors",
        re.compile(r"--resume \S*step-1\b"),
    ),
    # -- data rows and files --------------------------------------------------------------------
    case("data-missing-file", TRAIN + " --data {files}/no-such.jsonl", "no-such.jsonl"),
    case(
        "data-invalid-json-line",
        TRAIN + " --data {files}/bad-json.jsonl",
        "bad-json.jsonl",
        line(2),
    ),
    case("data-latin1-jsonl", TRAIN + " --data {files}/latin1.jsonl", "latin1.jsonl", line(1)),
    case("data-latin1-csv", TRAIN + " --data {files}/latin1.csv", "latin1.csv"),
    case("data-empty-file", TRAIN + " --data {files}/empty.jsonl", "empty.jsonl"),
    case(
        "data-unknown-columns",
        TRAIN + " --data {files}/unknown-columns.jsonl",
        "unknown-columns.jsonl",
    ),
    case(
        "data-messages-not-a-list",
        TRAIN + " --data {files}/messages-not-a-list.jsonl",
        "messages-not-a-list.jsonl",
        line(1),
    ),
    case(
        "data-unknown-role",
        TRAIN + " --data {files}/unknown-role.jsonl",
        "unknown-role.jsonl",
        line(1),
    ),
    case(
        "data-csv-row-missing-a-cell",
        TRAIN + " --data {files}/short-row.csv",
        "short-row.csv",
        re.compile(r"\b(line 2|row 1)\b"),  # the first data row: line 2 under the header
    ),
    case(
        "data-json-array-of-numbers",
        TRAIN + " --data {files}/numbers.json",
        "numbers.json",
        line(1),
    ),
    case(
        "data-corrupt-parquet", TRAIN + " --data {files}/not-parquet.parquet", "not-parquet.parquet"
    ),
    case("data-folder-without-data", TRAIN + " --data {files}/empty-folder", "empty-folder"),
    case(
        "data-only-empty-answers",
        TRAIN + " --data {files}/empty-answer.jsonl",
        "empty-answer.jsonl",
    ),
    case("data-unknown-builtin", TRAIN + " --data builtin:nosuch", "builtin:nosuch"),
    case("data-unknown-split", TRAIN + " --split nosuch", "nosuch"),
    case("data-format-mismatch", TRAIN + " --format alpaca", "alpaca"),
    case(
        "eval-data-missing-file",
        TRAIN + " --eval-data {files}/no-such-eval.jsonl",
        "no-such-eval.jsonl",
        "--eval-data",
    ),
    case(
        "data-inspect-invalid-json-line",
        "data inspect --model {tiny} --data {files}/bad-json.jsonl",
        "bad-json.jsonl",
        line(2),
    ),
    case("data-inspect-n-negative", "data inspect --model {tiny} --n -1", "--n"),
    case(
        "data-inspect-max-seq-len-4", "data inspect --model {tiny} --max-seq-len 4", "--max-seq-len"
    ),
    # -- analyze --------------------------------------------------------------------------------
    case("analyze-max-tokens-0", "analyze --base {tiny} --max-tokens 0", "--max-tokens"),
    case("analyze-batch-size-0", "analyze --base {tiny} --batch-size 0", "--batch-size"),
    case(
        "analyze-entropy-tokens-1", "analyze --base {tiny} --entropy-tokens 1", "--entropy-tokens"
    ),
    case("analyze-max-seq-len-4", "analyze --base {tiny} --max-seq-len 4", "--max-seq-len"),
    case(
        "analyze-tuned-other-tokenizer",
        "analyze --base {tiny} --tuned {other} --output {out}/analysis",
        "--tuned",
    ),
    case(
        "analyze-tuned-missing",
        "analyze --base {tiny} --tuned {files}/no-such-tuned",
        "no-such-tuned",
    ),
    case(
        "analyze-output-holds-earlier-analysis",
        "analyze --base {tiny} --output {files}/earlier-analysis",
        "earlier-analysis",
        "--overwrite",
    ),
    case(
        "analyze-output-is-a-file",
        "analyze --base {tiny} --output {files}/a-text-file.txt",
        "a-text-file.txt",
    ),
    case(
        "analyze-output-under-a-file",
        "analyze --base {tiny} --output {files}/a-text-file.txt/report",
        "a-text-file.txt",
    ),
    case(
        "analyze-report-file-blocked",
        "analyze --base {tiny} --max-tokens 32 --max-seq-len 64 --overwrite "
        "--output {files}/report-blocked",
        "analysis.csv",
    ),
    case(
        "analyze-data-missing",
        "analyze --base {tiny} --data {files}/no-such.jsonl",
        "no-such.jsonl",
    ),
    # -- eval -----------------------------------------------------------------------------------
    case("eval-n-0", "eval --model {tiny} --n 0", "--n"),
    case("eval-batch-size-0", "eval --model {tiny} --batch-size 0", "--batch-size"),
    case("eval-max-new-tokens-0", "eval --model {tiny} --max-new-tokens 0", "--max-new-tokens"),
    case(
        "eval-gsm8k-without-answers",
        "eval --model {tiny} --n 1 --data {files}/questions-only.jsonl",
        "questions-only.jsonl",
    ),
    case(
        "eval-answer-without-number",
        "eval --model {tiny} --n 1 --data {files}/answer-without-number.jsonl",
        "answer-without-number.jsonl",
        line(1),
    ),
    case("eval-data-missing", "eval --model {tiny} --data {files}/no-such.jsonl", "no-such.jsonl"),
    # suggests --skip-bad-rows, which eval must then accept (see test_eval_skip_bad_rows)
    case(
        "eval-latin1-csv",
        "eval --model {tiny} --n 1 --data {files}/latin1.csv",
        "latin1.csv",
        line(2),
    ),
    case("eval-unknown-split", "eval --model {tiny} --n 1 --data builtin:arith:nosplit", "nosplit"),
]


def _fill(args: str, paths: dict[str, Path]) -> list[str]:
    return [part.format(**paths) for part in args.split()]


def assert_one_error_line(exit_code: int, stdout: str, stderr: str, needles: tuple[Needle, ...]):
    """Exit 2; stderr is one ``error: ...`` line holding every needle; no traceback; no stdout."""
    shown = f"exit {exit_code}\nstdout: {stdout!r}\nstderr: {stderr!r}"
    assert exit_code == 2, shown
    assert "Traceback" not in stdout + stderr, shown
    lines = [text for text in stderr.splitlines() if text.strip()]
    assert len(lines) == 1, shown
    assert lines[0].startswith("error: "), shown
    assert stdout.strip() == "", shown
    for needle in needles:
        if isinstance(needle, re.Pattern):
            assert needle.search(lines[0]), (needle.pattern, shown)
        else:
            assert needle in lines[0], (needle, shown)


@pytest.mark.parametrize(("args", "needles", "env"), CASES)
def test_bad_input_is_one_line_exit_2(
    args: str,
    needles: tuple[Needle, ...],
    env: dict[str, str],
    files: Path,
    tiny_llama_dir: Path,
    other_tokenizer_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    # Relative defaults (train's runs/default, analyze's analysis/) land in an empty folder, so
    # no case depends on what the working directory holds.
    monkeypatch.chdir(tmp_path)
    paths = {"tiny": tiny_llama_dir, "other": other_tokenizer_dir, "files": files, "out": tmp_path}
    if "{runs}" in args:  # train the checkpointed run only for the cases that resume it
        paths["runs"] = request.getfixturevalue("runs")
    filled_env = {name: value.format(**paths) for name, value in env.items()}
    result = runner.invoke(app, _fill(args, paths), env=filled_env)
    if not isinstance(result.exception, SystemExit) and result.exception is not None:
        raise result.exception  # a bug: show its traceback
    assert_one_error_line(result.exit_code, result.stdout, result.stderr, needles)


def test_there_are_at_least_60_cases() -> None:
    assert len(CASES) >= 60


def test_eval_has_the_flags_its_data_errors_suggest(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-UTF-8 line in ``eval --data`` is refused with advice that names flags: ``eval``
    accepts each of them, and with them scores the problems it can read."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "latin1-gsm8k.csv"
    data.write_bytes(
        "question,answer\ncafé: 1 + 1?,#### 2\nWhat is 2 + 2?,#### 4\n".encode("latin-1")
    )
    args = ["eval", "--model", str(tiny_llama_dir), "--data", str(data), "--n", "1"]
    args += ["--max-new-tokens", "2", "--json"]
    refused = runner.invoke(app, args)
    assert_one_error_line(refused.exit_code, refused.stdout, refused.stderr, ("latin1-gsm8k.csv",))
    suggested = re.findall(r"(?<![\w-])--[a-z][\w-]*", refused.stderr)
    assert suggested, refused.stderr
    done = runner.invoke(app, [*args, *suggested])
    assert done.exit_code == 0, (suggested, done.stderr, done.exception)
    assert json.loads(done.stdout)["n"] == 1  # the readable problem, line 3


# ---- real processes -----------------------------------------------------------------------------


def _console_script() -> list[str]:
    """The installed ``fastmid`` script beside this Python (not a shell shim)."""
    script = Path(sys.executable).with_name("fastmid")
    found = str(script) if script.is_file() else shutil.which("fastmid")
    if found is None:
        pytest.skip("the fastmid console script is not installed (pip install -e .)")
    return [found]


MODULE = [sys.executable, "-m", "fastmid.cli"]

PROCESS_CASES = [
    pytest.param("script", "train --optim sgd", ("--optim", "sgd"), id="script-usage-error"),
    pytest.param(
        "script",
        "train {files}/unknown-key.yaml --print-config",
        ("unknown-key.yaml", "learning_rate"),
        id="script-yaml-unknown-key",
    ),
    pytest.param("module", "train --lr inf --print-config", ("--lr",), id="module-lr-inf"),
    pytest.param(
        "module",
        "plan --model {files}/unknown-type.json",
        ("unknown-type.json",),
        id="module-plan-unknown-model-type",
    ),
    pytest.param(
        "module",
        "analyze --base {tiny} --output {files}/earlier-analysis",
        ("earlier-analysis", "--overwrite"),
        id="module-analyze-earlier-analysis",
    ),
]


@pytest.mark.parametrize(("how", "args", "needles"), PROCESS_CASES)
def test_bad_input_in_a_real_process(
    how: str, args: str, needles: tuple[str, ...], files: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    command = _console_script() if how == "script" else MODULE
    paths = {"tiny": tiny_llama_dir, "files": files}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "80"}
    done = subprocess.run(
        [*command, *_fill(args, paths)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert_one_error_line(done.returncode, done.stdout, done.stderr, needles)


def test_help_and_version_still_exit_0_in_a_real_process() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [*MODULE, "--version"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0 and done.stdout.startswith("fastmid "), done


def test_console_script_is_main() -> None:
    """The script goes through ``fastmid.cli:main`` (one-line usage errors), not bare ``app``."""
    (script,) = [
        e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "fastmid"
    ]
    assert script.value == "fastmid.cli:main"
