"""A run's console starts with fastmid's own line: the import notices of torchao, torch and
bitsandbytes go to Python logging (held for train.log), never to the console before it."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastmid.models.loading import quiet_bitsandbytes, quiet_torchao, replay_library_notices

ROOT = Path(__file__).resolve().parents[1]
# What the libraries print when nothing holds it back: torchao's missing CUDA extensions, torch's
# enum notice in glog format ("W1203 20:09:49.589000 21036 .../_pytree.py:630] ..."),
# bitsandbytes' missing `kernels` hub package, transformers' progress bars.
NOISE = re.compile(
    r"Failed to load|register_constant|kernels-community|Writing model shards|"
    r"^[IWEF]\d{4} \d\d:\d\d:\d\d"
)
OPTIMIZERS = ("adamw8bit", "ao_adamw8bit")  # the default (bitsandbytes); torchao's, imported


def _compiler_missing() -> str | None:
    """Why torchao's optimizer cannot compile its step here (no C++ compiler), else None."""
    import torch

    from fastmid.train.optim import OptimizerError, check_compile_toolchain

    try:
        check_compile_toolchain("ao_adamw8bit", torch.cuda.is_available())
    except OptimizerError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def runs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``python -m fastmid train`` on the tiny model, once per optimizer, both at once (about
    12 s each on 2 cores, most of it imports; torchao's compiles its step); their merged
    stdout+stderr, or why the run cannot happen here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env["PYTHONUNBUFFERED"] = "1"  # stdout and stderr interleave as written
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    procs, outputs = {}, {}
    for optim in OPTIMIZERS:
        missing = _compiler_missing() if optim.startswith("ao_") else None
        if missing:
            outputs[optim] = f"skip: {missing}"
            continue
        folder = tmp_path_factory.mktemp(f"quiet-{optim}")
        command = [
            *(sys.executable, "-m", "fastmid", "train"),
            *("--model", str(tiny_llama_dir), "--data", "builtin:arith"),
            *("--max-steps", "1", "--warmup-steps", "0", "--max-examples", "16"),
            *("--save-every", "0", "--eval-every", "0", "--no-eval-accuracy"),
            *("--optim", optim, "--output", str(folder / "run")),
        ]
        procs[optim] = subprocess.Popen(
            command,
            cwd=folder,  # a user's folder, not the repository
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        for optim, proc in procs.items():
            outputs[optim] = proc.communicate(timeout=300)[0]
            assert proc.returncode == 0, outputs[optim]
    finally:  # a failed or timed-out run leaves no process behind
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_a_default_run_starts_with_fastmids_own_line(runs, optim):
    if runs[optim].startswith("skip: "):
        pytest.skip(runs[optim][6:])
    lines = [line for line in runs[optim].splitlines() if line.strip()]
    assert lines[0].startswith("fastmid train "), runs[optim]
    assert f"optimizer {optim}" in lines[0]
    assert not [line for line in lines if NOISE.search(line)], runs[optim]


def test_library_notices_stay_off_the_console_and_replay_into_a_run_log(capfd):
    import torch  # noqa: F401  (torch's own stderr handler on the "torch" logger)

    quiet_torchao()
    quiet_torchao()  # idempotent: one handler, one filter
    quiet_bitsandbytes()
    assert len(logging.getLogger("torchao").handlers) == 1
    assert len(logging.getLogger("torch.utils._pytree").filters) == 1
    replay_library_notices(logging.NullHandler())  # forget what real imports logged so far
    capfd.readouterr()

    logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("no kernels-community kernel")
    logging.getLogger("kernels._internals.hf_hub").warning(
        "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
        "because Hugging Face Hub is in offline mode."
    )
    logging.getLogger("torch.utils._pytree").warning(
        "<enum 'X'> is an Enum subclass ... Calling register_constant() on Enum subclasses is "
        "deprecated"
    )
    logging.getLogger("torch.utils._pytree").debug("held back by its level")
    out, err = capfd.readouterr()
    assert out == "" and err == ""

    held: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = held.append  # type: ignore[method-assign]
    assert replay_library_notices(handler) == 4
    assert [(r.name, r.levelno) for r in held] == [
        ("torchao", logging.WARNING),
        ("bitsandbytes.backends.cpu.ops", logging.WARNING),
        ("kernels._internals.hf_hub", logging.WARNING),
        ("torch.utils._pytree", logging.WARNING),
    ]
    assert "register_constant()" in held[3].getMessage()
    assert replay_library_notices(handler) == 0  # replayed once


def test_held_notices_reach_train_log(tiny_llama_dir, tmp_path):
    """Import notices logged before train.log opens are written to it when it opens."""
    from io import StringIO

    from rich.console import Console

    from fastmid.config import build_config
    from fastmid.train import recipe

    quiet_torchao()
    quiet_bitsandbytes()
    logging.getLogger("torchao").warning("Failed to load _C_test.so")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("no kernels-community kernel")
    cfg = build_config(
        None,
        dict(
            model=str(tiny_llama_dir),
            max_examples=8,
            max_seq_len=128,
            max_steps=1,
            warmup_steps=0,
            eval_every=0,
            save_every=0,
            eval_accuracy=False,
            output=str(tmp_path / "run"),
        ),
    )
    console = StringIO()
    recipe.run_train(cfg, Console(file=console))
    log = (tmp_path / "run" / "train.log").read_text()
    assert "WARNING torchao: Failed to load _C_test.so" in log
    assert "WARNING bitsandbytes.backends.cpu.ops: no kernels-community kernel" in log
    assert "Failed to load" not in console.getvalue()
