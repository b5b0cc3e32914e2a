"""No foreign code runs unless asked: a model folder whose config.json maps the model classes to
its own Python file (``auto_map``) loads transformers' built-in classes by default, and runs the
folder's file only with ``trust_remote_code=True`` (``--trust-remote-code``)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from fastmid.models.loading import load_config, load_model_and_tokenizer

PAYLOAD = """
from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "llama"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


@pytest.fixture
def folder_with_code(tiny_llama_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "with-code"
    shutil.copytree(tiny_llama_dir, folder)
    marker = tmp_path / "payload-ran"
    (folder / "evil.py").write_text(PAYLOAD.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForCausalLM": "evil.EvilForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_auto_map_code_does_not_run_by_default(folder_with_code):
    folder, marker = folder_with_code
    model, _ = load_model_and_tokenizer(folder, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()
    assert not any("evil" in name for name in sys.modules)


def test_auto_map_code_runs_only_with_trust_remote_code(folder_with_code):
    folder, marker = folder_with_code
    config = load_config(folder, trust_remote_code=True)
    assert type(config).__name__ == "EvilConfig"
    assert marker.read_text() == "ran"
