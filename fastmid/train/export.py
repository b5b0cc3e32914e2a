"""Export a trained model as an ordinary Hugging Face folder that ``from_pretrained`` loads.

``final/`` holds ``config.json``, ``model.safetensors`` (sharded when large),
``generation_config.json`` and the tokenizer files with the chat template. A model that came from
a GGUF file carries transformers' GGUF quantizer tag, which makes ``save_pretrained`` refuse it;
the tag is removed first (the tensors are already plain floats). The band alone is also written as
``band_delta.safetensors`` beside ``final/``: the trained tensors, enough to rebuild the tuned
model from the base one.

Both are written atomically and durably with :mod:`fastmid.train.runfolder` (temp folder or file
beside the target, fsync, rename, fsync of the parent): a crash leaves the previous export or the
new one, and :func:`clean_partial_exports` removes the leftovers; a full disk is an
:class:`ExportError` naming the folder and the bytes needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fastmid.data.chat_template import end_of_turn_ids
from fastmid.errors import FastmidError
from fastmid.models.loading import strip_gguf_quantization
from fastmid.train.runfolder import atomic_file, atomic_folder, clean_partial


class ExportError(FastmidError, OSError):
    """The model export could not be written (a full disk: the folder and bytes needed named)."""


def _state_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct tensors in ``state_dict`` (tied weights are saved once)."""
    seen: dict[tuple, int] = {}
    for t in state_dict.values():
        key = (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        seen[key] = t.numel() * t.element_size()
    return sum(seen.values())


def export_hf_folder(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: Path,
    dtype: torch.dtype | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save ``model`` and ``tokenizer`` to ``out_dir`` atomically and durably.

    Args:
        model: a ``*ForCausalLM``; execution-policy wrappers do not change its state dict.
        tokenizer: its tokenizer (the chat template travels with it).
        out_dir: destination; replaced if it exists.
        dtype: cast a copy of the weights to this dtype for saving (default: keep each tensor's
            own dtype). On CUDA runs the band's fp32 master weights are saved in the config dtype.
        state_dict: the weights to save instead of ``model.state_dict()`` (a sharded model's
            gathered full state dict); ``model`` still gives the config and the tied names.

    Returns:
        ``out_dir``.

    Raises:
        ExportError: the disk or quota filled up (one line: the folder, the bytes needed and free);
            no partial folder is left and an existing ``out_dir`` stays as it was.
    """
    out_dir = Path(out_dir)
    strip_gguf_quantization(model)
    if state_dict is not None:
        state_dict = _share_tied(model, state_dict)
    if dtype is not None:
        source = state_dict if state_dict is not None else model.state_dict()
        state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in source.items()}
    needed = _state_bytes(state_dict if state_dict is not None else model.state_dict())
    kept = f"; the previous {out_dir.name} is intact" if out_dir.exists() else ""
    with atomic_folder(
        out_dir, what="model export", bytes_needed=needed, error=ExportError, keep_note=kept
    ) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        _fix_generation_eos(tmp, tokenizer)
    return out_dir


def _share_tied(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``state_dict`` with the names of one tied parameter (``lm_head.weight`` and
    ``model.embed_tokens.weight``) pointing at one tensor, as in ``model.state_dict()``: a
    gathered state dict holds a copy per name, which ``save_pretrained`` would write twice."""
    first: dict[int, str] = {}
    out = dict(state_dict)
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name and owner in out and name in out:
            out[name] = out[owner]
    return out


def clean_partial_exports(run_dir: Path) -> list[Path]:
    """Remove what a killed export left in ``run_dir`` (``final.tmp-*``, ``final.old-*``,
    ``band_delta.safetensors.tmp-*``); call it with :func:`clean_partial_checkpoints
    <fastmid.train.checkpoint.clean_partial_checkpoints>`, holding the run lock.

    Returns:
        The partial folders and files removed.
    """
    return clean_partial(Path(run_dir), r"final|band_delta\.safetensors")


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
    model: torch.nn.Module,
    trainable_names: list[str],
    path: Path,
    plan: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the trained tensors only (``safetensors``) with the plan in the file's metadata.

    Atomic and durable (temp file, fsync, rename, fsync of the folder). ``state_dict``: take the
    tensors from it (a sharded model's gathered full state dict) instead of ``model``.

    Raises:
        ExportError: the disk or quota filled up (the file and the bytes needed named).
    """
    params = state_dict if state_dict is not None else dict(model.named_parameters())
    tensors = {n: params[n].detach().contiguous().cpu() for n in trainable_names}
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_file(path, what="band delta", bytes_needed=needed, error=ExportError) as tmp:
        save_file(tensors, str(tmp), metadata={"fastmid_plan": json.dumps(plan)})
    return Path(path)
