"""Export: an ordinary HF folder whose logits equal the trained model's, tied weights stay tied,
every non-band tensor bitwise equal to the base model's."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastmid.train.loop import Trainer


def test_final_folder_loads_with_from_pretrained(make_config, tiny_llama_dir):
    trainer = Trainer(make_config("export", max_steps=2))
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
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastmid.models.loading import gguf_to_hf_folder, strip_gguf_quantization  # noqa: F401
    from fastmid.train.export import export_hf_folder

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
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
