"""Export: an ordinary HF folder whose logits equal the trained model's, tied weights stay tied,
every non-band tensor bitwise equal to the base model's; atomic writes (a full disk keeps the
previous export, partial leftovers are cleaned)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastmid.train.recipe import MidBlockRecipe


def test_final_folder_loads_with_from_pretrained(make_config, tiny_llama_dir):
    trainer = MidBlockRecipe(make_config("export", max_steps=2))
    trainer.setup()
    trainer.train()
    final = trainer.export()
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (final / name).is_file(), name
    assert "quantization_config" not in json.loads((final / "config.json").read_text())

    reloaded = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template == trainer.tokenizer.chat_template
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight

    ids = torch.randint(0, 1000, (2, 11))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits, rtol=0, atol=0
        )

    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    tuned = load_file(str(final / "model.safetensors"))
    assert set(base) == set(tuned)
    band = set(trainer.trainable_names)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and changed <= band
    delta = load_file(str(trainer.out / "band_delta.safetensors"))
    assert set(delta) == band


def test_gguf_model_exports_cleanly(tmp_path):
    """transformers refuses save_pretrained on a GGUF-tagged model; the export must not."""
    from tiny import tiny_model

    from fastmid.models.loading import gguf_to_hf_folder, strip_gguf_quantization  # noqa: F401
    from fastmid.train.export import export_hf_folder

    model = tiny_model(
        "llama",
        seed=None,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
    )

    class FakeQuantizer:  # what transformers attaches to a GGUF-loaded model
        pass

    model.hf_quantizer = FakeQuantizer()
    model.config.quantization_config = {"quant_method": "gguf"}

    class Tok:
        eos_token_id = 1

        def save_pretrained(self, path):
            (path / "tokenizer_config.json").write_text("{}")

        def get_vocab(self):
            return {}

    out = export_hf_folder(model, Tok(), tmp_path / "final")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(out)


class _Tok:
    """The least a tokenizer must do for export_hf_folder."""

    eos_token_id = 1

    def __init__(self, fail: OSError | None = None) -> None:
        self.fail = fail

    def save_pretrained(self, path):
        (path / "tokenizer_config.json").write_text("{}")
        if self.fail is not None:  # after a partial write, as a filling disk does
            raise self.fail

    def get_vocab(self):
        return {}


def test_export_on_a_full_disk_keeps_the_previous_export(tmp_path):
    import errno
    import os

    from tiny import tiny_model

    from fastmid.train.export import ExportError, export_hf_folder

    model = tiny_model("llama")
    first = export_hf_folder(model, _Tok(), tmp_path / "final")
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(ExportError) as info:
        export_hf_folder(model, _Tok(fail=full), tmp_path / "final")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path}: disk full while writing the model export final")
    n_bytes = sum(p.numel() * 4 for p in model.parameters())  # tied embedding counted once
    assert f"({n_bytes:,} bytes)" in message and "the previous final is intact" in message
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no partial folder
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_re_export_replaces_and_band_delta_is_atomic(tmp_path, monkeypatch):
    import errno

    from tiny import tiny_model

    from fastmid.train import export as export_module
    from fastmid.train.export import ExportError, clean_partial_exports, save_band_delta

    model = tiny_model("llama")
    export_module.export_hf_folder(model, _Tok(), tmp_path / "final")
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    export_module.export_hf_folder(model, _Tok(), tmp_path / "final")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)

    names = ["model.layers.0.mlp.up_proj.weight"]
    path = save_band_delta(model, names, tmp_path / "band_delta.safetensors", {"first": 0})
    before = path.read_bytes()

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "save_file", full)
    with pytest.raises(ExportError, match=r"disk full while writing the band delta"):
        save_band_delta(model, names, path, {"first": 0})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["band_delta.safetensors", "final"]

    # what a kill -9 during an export leaves, removed at the next start
    (tmp_path / "final.tmp-1a2b3c4d").mkdir()
    (tmp_path / "band_delta.safetensors.tmp-0f0f0f0f").write_bytes(b"x")
    removed = clean_partial_exports(tmp_path)
    assert sorted(p.name for p in removed) == [
        "band_delta.safetensors.tmp-0f0f0f0f",
        "final.tmp-1a2b3c4d",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["band_delta.safetensors", "final"]
