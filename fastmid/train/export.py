"""Export a trained model as an ordinary Hugging Face folder that ``from_pretrained`` loads.

``final/`` holds ``config.json``, ``model.safetensors`` (sharded when large),
``generation_config.json`` and the tokenizer files with the chat template. A model that came from
a GGUF file carries transformers' GGUF quantizer tag, which makes ``save_pretrained`` refuse it;
the tag is removed first (the tensors are already plain floats). The band alone is also written as
``band_delta.safetensors`` beside ``final/``: the trained tensors, enough to rebuild the tuned
model from the base one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fastmid.data.chat_template import end_of_turn_ids
from fastmid.models.loading import strip_gguf_quantization


def make_readable(path: Path) -> None:
    """Give a written folder (or file) the usual permissions (dirs 755, files 644).

    ``tempfile.mkdtemp`` creates folders readable by the owner only and safetensors may write
    owner-only files; a model folder is meant to be shared, like the rest of the run folder.
    """
    path = Path(path)
    if path.is_file():
        path.chmod(0o644)
        return
    path.chmod(0o755)
    for child in path.rglob("*"):
        child.chmod(0o755 if child.is_dir() else 0o644)


def export_hf_folder(
    model: torch.nn.Module, tokenizer: Any, out_dir: Path, dtype: torch.dtype | None = None
) -> Path:
    """Save ``model`` and ``tokenizer`` to ``out_dir`` atomically (temp folder, then rename).

    Args:
        model: a ``*ForCausalLM``; execution-policy wrappers do not change its state dict.
        tokenizer: its tokenizer (the chat template travels with it).
        out_dir: destination; replaced if it exists.
        dtype: cast a copy of the weights to this dtype for saving (default: keep each tensor's
            own dtype). On CUDA runs the band's fp32 master weights are saved in the config dtype.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        strip_gguf_quantization(model)
        state_dict = None
        if dtype is not None:
            state_dict = {
                k: (v.to(dtype) if v.is_floating_point() else v)
                for k, v in model.state_dict().items()
            }
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        _fix_generation_eos(tmp, tokenizer)
        make_readable(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _fix_generation_eos(folder: Path, tokenizer: Any) -> None:
    """Make generation stop at the chat template's end-of-turn token as well as at EOS."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    eos = cfg.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    ids.update(end_of_turn_ids(tokenizer))
    if ids:
        cfg["eos_token_id"] = sorted(ids) if len(ids) > 1 else next(iter(ids))
        path.write_text(json.dumps(cfg, indent=2) + "\n")


def save_band_delta(
    model: torch.nn.Module, trainable_names: list[str], path: Path, plan: dict[str, Any]
) -> Path:
    """Write the trained tensors only (``safetensors``) with the plan in the file's metadata."""
    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().contiguous().cpu() for n in trainable_names}
    save_file(tensors, str(path), metadata={"fastmid_plan": json.dumps(plan)})
    make_readable(path)
    return path
