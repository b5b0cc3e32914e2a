"""Atomic, durable checkpoints that load without pickle, and exact resume.

A checkpoint ``<output>/checkpoints/step-<N>/`` (format 2) holds:

* ``band.safetensors``: the trainable tensors only, by state-dict name (the band; frozen weights
  come from the base model, which is why a checkpoint of a 32B model with an 18-layer band is a
  fraction of its size). Each keeps its training dtype (fp32 master weights on CUDA).
* ``optimizer.safetensors``: every tensor of ``optimizer.state_dict()``, flattened to a dotted
  key: ``state.<param_index>.<key>`` (``state.0.exp_avg``, ``state.0.step`` for torch AdamW;
  ``state.3.__bnb_optimizer_quant_state__.state1`` for bitsandbytes, whose ``state1/state2`` are
  uint8 codes of the parameter's shape, ``absmax1/absmax2`` float32 ``[ceil(numel / 256)]`` block
  scales and ``qmap1/qmap2`` float32 ``[256]`` code books; tensors under 4096 elements keep float32
  ``state1/state2`` of the parameter's shape and no absmax/qmap). A tensor stored twice in the state (bitsandbytes shares one ``qmap`` across
  parameters) is written once and shared again on load.
* ``optimizer.json``: the rest of the state dict as JSON (``param_groups`` with ``lr``, ``betas``,
  ``weight_decay`` ..., non-tensor scalars such as bitsandbytes' int ``step``), each tensor
  replaced by ``{"__fastmid_tensor__": "<key in optimizer.safetensors>"}``, tuples by
  ``{"__fastmid_tuple__": [...]}``, dicts with non-string keys (``state`` is keyed by int) by
  ``{"__fastmid_dict__": [[key, value], ...]}``; plus the format number and the optimizer class.
  Python floats round-trip exactly through JSON (``repr``), so resume stays bit-exact.
* ``scheduler.json``: ``scheduler.state_dict()`` the same way (``scheduler.safetensors`` only if
  a scheduler state ever holds tensors; ``LambdaLR``'s does not, its lambdas are stored as null).
* ``trainer_state.json``: step, data position, tokens seen, RNG states as JSON lists (python,
  torch CPU, CUDA), the band plan and the resolved config.

Loading reads safetensors and JSON only, so a checkpoint from someone else cannot run code. A
format-1 checkpoint (``optimizer.pt``/``scheduler.pt``, written by fastmid before format 2) is read
with ``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which builds only tensors,
containers and scalars and refuses any other global; a file it refuses (e.g. a pickle whose
``__reduce__`` would call ``os.system``) is a :class:`CheckpointError`, and nothing in it runs.

Tensor subclasses (torchao's ``AdamW8bit``/``AdamW4bit`` states) are stored through their own
``__tensor_flatten__()``, which names the subclass's plain inner tensors and returns a small
context; each inner tensor is written to ``optimizer.safetensors`` under ``<key>.<inner name>``
and the JSON holds, in place of the tensor::

    {"__fastmid_subclass__": "torchao.optim.subclass_8bit.OptimState8bit",
     "inner": {"codes": {"__fastmid_tensor__": "state.0.exp_avg.codes"},
               "scale": {"__fastmid_tensor__": "state.0.exp_avg.scale"},
               "qmap": {"__fastmid_tensor__": "state.0.exp_avg.qmap"}},
     "ctx": [true, {"__fastmid_dtype__": "float32"}], "shape": [64, 128], "stride": [128, 1]}

torchao 0.18's layouts: ``OptimState8bit`` ``codes`` uint8 of the parameter's shape, ``scale``
float32 ``[numel / 256]``, ``qmap`` float32 ``[256]``, ctx ``[signed, dtype]``; ``OptimState4bit``
``codes`` uint8 ``[numel / 2]`` (two codes a byte), ``scale`` float32 ``[numel / 128]``, ``qmap``
float32 ``[16]``, ctx ``[signed, shape, dtype]``; ``OptimStateFp8`` ``codes`` float8_e4m3fn,
``scale``, ctx ``[dtype]``. The context goes through the same JSON encoding as the rest (tuples,
non-string-keyed dicts; ``torch.Size`` as ``{"__fastmid_size__": [...]}``, a dtype as
``{"__fastmid_dtype__": "<name>"}``); an inner tensor shared by several states is written once and
shared again on load, like bitsandbytes' ``qmap``. Loading rebuilds each one with
``cls.__tensor_unflatten__(inner, ctx, shape, stride)``, ``cls`` looked up by the stored name in
this module's fixed allow-list (:data:`_SUBCLASSES`, imported lazily, torchao only when a file holds
its states); no class is ever imported by a name read from a file, and a name not on the list is a
:class:`CheckpointError` naming the file and the class. Saving any other subclass (``DTensor``
under FSDP2 among them, for now) raises :class:`CheckpointError`. torchao keeps ``lr`` (and
``LambdaLR``'s ``initial_lr``, ``base_lrs``, ``_last_lr``) as 0-d float32 tensors and ``step`` as a
0-d float tensor: they are stored as tensors and come back as tensors (torchao refuses a float
``lr``; ``LambdaLR`` fills the loaded tensor in place).

Writes go through :func:`fastmid.train.runfolder.atomic_folder`: ``step-<N>.tmp-*``, fsync of every
file and the folder, rename, fsync of ``checkpoints/``, so a crash never leaves a folder that looks
valid; :func:`clean_partial_checkpoints` removes what a ``kill -9`` left. Only the last
``keep_last`` complete checkpoints are kept (the one just written always is).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import random
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastmid.errors import FastmidError, first_line
from fastmid.train.runfolder import atomic_folder, clean_partial, pause_point, remove_folder

FORMAT = 2
_STEP_RE = re.compile(r"^step-(\d+)$")
_TENSOR, _TUPLE, _DICT = "__fastmid_tensor__", "__fastmid_tuple__", "__fastmid_dict__"
_SIZE, _DTYPE, _SUBCLASS = "__fastmid_size__", "__fastmid_dtype__", "__fastmid_subclass__"
_RESERVED = "__fastmid_"
_SUBCLASS_KEYS = {_SUBCLASS, "inner", "ctx", "shape", "stride"}
# The tensor subclasses a checkpoint may hold: qualified name -> (module, class), imported only
# when a file holds one. A class is never imported by a name read from a file.
_SUBCLASSES: dict[str, tuple[str, str]] = {
    "torchao.optim.subclass_8bit.OptimState8bit": ("torchao.optim.subclass_8bit", "OptimState8bit"),
    "torchao.optim.subclass_4bit.OptimState4bit": ("torchao.optim.subclass_4bit", "OptimState4bit"),
    "torchao.optim.subclass_fp8.OptimStateFp8": ("torchao.optim.subclass_fp8", "OptimStateFp8"),
}
# Format 1 (before 2): the optimizer and scheduler state as torch.save pickles.
_FORMAT1_STATE_FILES = ("optimizer.pt", "scheduler.pt")
# A safetensors header above this is not one fastmid wrote (the format itself caps it at 100 MB).
_MAX_HEADER = 100_000_000
# The counters of trainer_state.json stay below this: a larger one is not from a real run, and
# the data order's generator seed (seed * 1_000_003 + epoch) must stay within 64 bits.
MAX_COUNTER = 2**62


class CheckpointError(FastmidError, ValueError):
    """A checkpoint that cannot be found, written, or loaded, or does not match the run (path and
    reason named, and which checkpoint to use instead when one exists)."""


@dataclass
class TrainerState:
    """Loop position and bookkeeping saved with each checkpoint.

    Attributes:
        step: optimizer steps completed.
        micro_batches: micro-batches consumed since the start (data position).
        tokens: non-padding tokens seen; supervised_tokens: tokens with a label.
        elapsed_s: training wall time so far, in seconds.
        rng: :func:`capture_rng`'s JSON-ready RNG states.
        plan: the band plan (``BandPlan.to_dict()``); config: the resolved config.
    """

    step: int
    micro_batches: int
    tokens: int
    supervised_tokens: int
    elapsed_s: float
    rng: dict[str, Any]
    plan: dict[str, Any]
    config: dict[str, Any]


# ---- RNG ------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """RNG states as JSON-ready lists (no pickle): ``python`` ``[version, [625 ints], gauss]``,
    ``torch`` the CPU generator's uint8 state as ints, ``cuda`` one such list per device."""
    state: dict[str, Any] = {
        "python": _jsonable(random.getstate()),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_jsonable(o) for o in obj]
    return obj


def _rng_problem(rng: Any) -> str | None:
    """Why ``rng`` cannot be restored by :func:`restore_rng`, or None (checked without applying)."""
    if not isinstance(rng, dict) or "python" not in rng or "torch" not in rng:
        return "'rng' must hold 'python' and 'torch' states"
    py = rng["python"]
    try:
        random.Random().setstate((py[0], tuple(py[1]), py[2]))
        torch_state = torch.tensor(rng["torch"], dtype=torch.uint8)
    except (TypeError, ValueError, IndexError, OverflowError, RuntimeError) as exc:
        return f"'rng' is not a valid RNG state ({first_line(exc)})"
    if torch_state.shape != torch.get_rng_state().shape:
        return f"'rng.torch' has {torch_state.numel()} bytes, torch's state has {torch.get_rng_state().numel()}"
    return None


# ---- the state codec: nested state dicts <-> (JSON tree, flat tensors) ----------------------


class _Encoder:
    """Turns a state dict into a JSON-ready tree plus ``{dotted key: CPU tensor}``."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.tensors: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, str] = {}  # the same tensor stored twice is written once
        self._storages: set[int] = set()

    def encode(self, obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            if type(obj) in (torch.Tensor, torch.nn.Parameter):
                return {_TENSOR: self._add(obj, key)}
            return self._subclass(obj, key)
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, torch.dtype):  # in the context of torchao's state subclasses
            return {_DTYPE: _dtype_name(obj)}
        if isinstance(obj, torch.Size):  # OptimState4bit's context holds the outer shape
            return {_SIZE: list(obj)}
        if isinstance(obj, tuple):  # betas are a tuple
            return {_TUPLE: [self.encode(v, f"{key}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{key}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith(_RESERVED) for k in obj):
                return {k: self.encode(v, _join(key, k)) for k, v in obj.items()}
            for k in obj:
                if k is not None and not isinstance(k, (bool, int, float, str)):
                    raise CheckpointError(
                        f"cannot store the {self.what} state: key {k!r} at '{key}' is a "
                        f"{type(k).__name__}, not a JSON scalar"
                    )
            return {_DICT: [[k, self.encode(v, _join(key, str(k)))] for k, v in obj.items()]}
        raise CheckpointError(
            f"cannot store the {self.what} state without pickle: '{key}' is a "
            f"{type(obj).__module__}.{type(obj).__qualname__}"
        )

    def _subclass(self, t: torch.Tensor, key: str) -> dict[str, Any]:
        """A tensor subclass on the allow-list, as its inner tensors (see the module docstring)."""
        name = f"{type(t).__module__}.{type(t).__qualname__}"
        if name not in _SUBCLASSES:
            raise CheckpointError(
                f"cannot store the {self.what} state: '{key}' is a tensor subclass ({name}) with "
                f"no checkpoint mapping (fastmid stores {_subclass_names()}; see "
                "fastmid.train.checkpoint's docstring)"
            )
        attrs, ctx = t.__tensor_flatten__()
        inner = {}
        for attr in attrs:
            value = getattr(t, attr)
            if type(value) not in (torch.Tensor, torch.nn.Parameter):
                raise CheckpointError(
                    f"cannot store the {self.what} state: '{key}' ({name}) holds '{attr}', a "
                    f"{type(value).__module__}.{type(value).__qualname__}, not a plain tensor"
                )
            inner[attr] = {_TENSOR: self._add(value, f"{key}.{attr}")}
        return {
            _SUBCLASS: name,
            "inner": inner,
            "ctx": self.encode(ctx, f"{key}.ctx"),
            "shape": list(t.shape),
            "stride": list(t.stride()),
        }

    def _add(self, t: torch.Tensor, key: str) -> str:
        t = t.detach()
        view = (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset(),
                tuple(t.shape), t.stride(), t.dtype)  # fmt: skip
        if view in self._views:
            return self._views[view]
        cpu = t.to("cpu").contiguous()
        ptr = cpu.untyped_storage().data_ptr()
        if ptr and ptr in self._storages:  # another view of a stored tensor: safetensors refuses
            cpu = cpu.clone()
        self._storages.add(cpu.untyped_storage().data_ptr())
        name, n = key, 1
        while name in self.tensors:  # keys that contain dots could collide
            name, n = f"{key}#{n}", n + 1
        self.tensors[name] = cpu
        self._views[view] = name
        return name


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def _dtypes() -> dict[str, torch.dtype]:
    """Every dtype torch names, by :func:`_dtype_name` (the only dtypes a file can name)."""
    return {_dtype_name(v): v for v in vars(torch).values() if isinstance(v, torch.dtype)}


def _subclass_names() -> str:
    return ", ".join(name.rsplit(".", 1)[1] for name in _SUBCLASSES)


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (one line: repr escapes newlines)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _subclass_problem(entry: dict[str, Any]) -> str | None:
    """Why a ``__fastmid_subclass__`` entry of a JSON tree cannot be loaded, or None."""
    name = entry[_SUBCLASS]
    if not isinstance(name, str) or name not in _SUBCLASSES:
        return (
            f"is a tensor subclass {_shown(name)} that fastmid does not load (it loads "
            f"{_subclass_names()}; no class is imported by a name read from a checkpoint)"
        )
    if set(entry) != _SUBCLASS_KEYS:
        return f"holds keys {sorted(entry)}, not {sorted(_SUBCLASS_KEYS)}"
    inner = entry["inner"]
    if not isinstance(inner, dict) or not all(
        isinstance(v, dict) and set(v) == {_TENSOR} for v in inner.values()
    ):
        return "'inner' is not an object of tensor references"
    for field in ("shape", "stride"):
        value = entry[field]
        if not isinstance(value, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value
        ):
            return f"'{field}' is not a list of non-negative integers"
    if len(entry["shape"]) != len(entry["stride"]):
        return "'shape' and 'stride' differ in length"
    return None


def _subclass_class(name: str, file: Path, where: str) -> type:
    """The allow-listed class ``name`` (already checked by :func:`_subclass_problem`), imported
    now; torchao through :func:`fastmid.train.optim.import_torchao_optim`, which silences it."""
    module, attr = _SUBCLASSES[name]
    if module.startswith("torchao."):
        from fastmid.train.optim import OptimizerError, import_torchao_optim

        try:
            import_torchao_optim()
        except OptimizerError as exc:
            raise CheckpointError(
                f"{file}: '{where}' is torchao optimizer state ({name.rsplit('.', 1)[1]}): {exc}"
            ) from None
    return getattr(importlib.import_module(module), attr)


def _decode_subclass(
    obj: dict[str, Any], tensors: dict[str, torch.Tensor], file: Path, where: str
) -> torch.Tensor:
    problem = _subclass_problem(obj)
    if problem:
        raise _Damaged(file, f"'{where}' {problem}")
    name = obj[_SUBCLASS]
    cls = _subclass_class(name, file, where)
    inner = {k: _decode(v, tensors, file, _join(where, k)) for k, v in obj["inner"].items()}
    ctx = _decode(obj["ctx"], tensors, file, f"{where}.ctx")
    shape, stride = torch.Size(obj["shape"]), tuple(obj["stride"])
    try:
        value = cls.__tensor_unflatten__(inner, ctx, shape, stride)
    except Exception as exc:  # the subclass's own checks (asserts, TypeErrors): a damaged entry
        raise _Damaged(file, f"'{where}' does not rebuild a {name} ({first_line(exc)})") from None
    if type(value) is not cls or value.shape != shape:
        raise _Damaged(
            file, f"'{where}' rebuilds a {type(value).__qualname__} of shape {tuple(value.shape)}"
        )
    return value


def _decode(obj: Any, tensors: dict[str, torch.Tensor], file: Path, where: str = "") -> Any:
    """Inverse of :meth:`_Encoder.encode`; raises CheckpointError naming ``file`` and the key."""
    if isinstance(obj, list):
        return [_decode(v, tensors, file, f"{where}.{i}") for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((k, v),) = obj.items()
        if k == _TENSOR:
            if not isinstance(v, str) or v not in tensors:
                raise _Damaged(file, f"'{where}' refers to tensor {_shown(v)}, which is not stored")
            return tensors[v]
        if k == _TUPLE:
            if not isinstance(v, list):
                raise _Damaged(file, f"'{where}' is not a list")
            return tuple(_decode(x, tensors, file, f"{where}.{i}") for i, x in enumerate(v))
        if k == _SIZE:
            if not isinstance(v, list) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v
            ):
                raise _Damaged(file, f"'{where}' is not a list of non-negative integers")
            return torch.Size(v)
        if k == _DTYPE:
            if not isinstance(v, str) or v not in _dtypes():
                raise _Damaged(file, f"'{where}' names dtype {_shown(v)}, which torch lacks")
            return _dtypes()[v]
        if k == _DICT:
            if not isinstance(v, list) or not all(
                isinstance(p, list) and len(p) == 2 and not isinstance(p[0], (list, dict))
                for p in v
            ):
                raise _Damaged(file, f"'{where}' is not a list of [key, value] pairs")
            return {p[0]: _decode(p[1], tensors, file, _join(where, str(p[0]))) for p in v}
    if _SUBCLASS in obj:
        return _decode_subclass(obj, tensors, file, where)
    if any(k.startswith(_RESERVED) for k in obj):
        raise _Damaged(file, f"'{where}' holds an unknown marker {sorted(obj)[:3]}")
    return {k: _decode(v, tensors, file, _join(where, k)) for k, v in obj.items()}


class _Damaged(FastmidError):
    """Internal: ``file`` is unreadable for ``reason``; becomes a CheckpointError with advice."""

    def __init__(self, file: Path, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# ---- writing --------------------------------------------------------------------------------


def _save_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write one safetensors file (the one place a checkpoint writes tensors; tests wrap it)."""
    save_file(tensors, str(path), metadata=metadata)


def _save_json(obj: Any, path: Path) -> None:
    """Write one JSON file (the one place a checkpoint writes JSON; tests wrap it)."""
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")


def save_state_json(obj: Any, folder: Path, stem: str) -> None:
    """Write ``obj.state_dict()`` (a scheduler, an optimizer) as ``<stem>.json`` (and
    ``<stem>.safetensors`` when it holds tensors), in this module's format."""
    enc = _Encoder(stem)
    data = {
        "format": FORMAT,
        "class": _class_name(obj),
        "state_dict": enc.encode(obj.state_dict(), ""),
    }
    if enc.tensors:
        _save_safetensors(
            enc.tensors, folder / f"{stem}.safetensors", {"fastmid_checkpoint_format": str(FORMAT)}
        )
    _save_json(data, folder / f"{stem}.json")


def load_state_json(folder: Path, stem: str, live: Any) -> dict[str, Any]:
    """The state dict :func:`save_state_json` wrote for ``live``'s class.

    Raises:
        CheckpointError: a damaged file or a state of another class (the file named).
    """
    try:
        return _load_state_format2(Path(folder), stem, live)
    except _Damaged as damaged:
        raise _damaged_error(Path(folder), damaged) from None


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_checkpoint(
    checkpoints_dir: Path,
    model: torch.nn.Module,
    trainable_names: list[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    keep_last: int,
) -> Path:
    """Write ``step-<N>`` atomically and durably; prune older checkpoints beyond ``keep_last``.

    Args:
        checkpoints_dir: ``<output>/checkpoints`` (created if missing).
        model: the model; only ``trainable_names`` tensors are written.
        trainable_names: state-dict names of the trainable tensors.
        optimizer: a torch optimizer (torch AdamW, bitsandbytes AdamW8bit ...) over those tensors.
        scheduler: an ``LRScheduler`` (anything with a JSON-able ``state_dict()``).
        state: the loop position (``state.step`` names the folder).
        keep_last: complete checkpoints to keep (>= 1); the one just written is always kept.

    Returns:
        The checkpoint folder ``checkpoints_dir / f"step-{state.step}"``.

    Raises:
        CheckpointError: the disk or quota filled up (one line: the folder, the bytes needed and
            free; the previous checkpoints are untouched and no partial folder is left); a state
            that cannot be stored without pickle (names the key and type).
    """
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / f"step-{state.step}"
    params = dict(model.named_parameters())
    band = {n: params[n].detach().contiguous().cpu() for n in trainable_names}
    opt_enc, sched_enc = _Encoder("optimizer"), _Encoder("scheduler")
    opt_json = {
        "format": FORMAT,
        "class": _class_name(optimizer),
        "state_dict": opt_enc.encode(optimizer.state_dict(), ""),
    }
    sched_json = {
        "format": FORMAT,
        "class": _class_name(scheduler),
        "state_dict": sched_enc.encode(scheduler.state_dict(), ""),
    }
    texts = {
        "optimizer.json": opt_json,
        "scheduler.json": sched_json,
        "trainer_state.json": dataclasses.asdict(state),
    }
    needed = _nbytes(band) + _nbytes(opt_enc.tensors) + _nbytes(sched_enc.tensors)
    needed += sum(len(json.dumps(v, indent=1)) for v in texts.values())
    previous = [p for p in list_checkpoints(checkpoints_dir) if p != final]
    kept = f"; {previous[-1].name} is intact" if previous else ""
    meta = {"fastmid_checkpoint_format": str(FORMAT)}
    with atomic_folder(
        final, what="checkpoint", bytes_needed=needed, error=CheckpointError, keep_note=kept
    ) as tmp:
        _save_safetensors(band, tmp / "band.safetensors", meta)
        pause_point("band.safetensors")
        _save_safetensors(opt_enc.tensors, tmp / "optimizer.safetensors", meta)
        pause_point("optimizer.safetensors")
        if sched_enc.tensors:
            _save_safetensors(sched_enc.tensors, tmp / "scheduler.safetensors", meta)
            pause_point("scheduler.safetensors")
        for name, obj in texts.items():  # trainer_state.json last: it marks a checkpoint
            _save_json(obj, tmp / name)
            pause_point(name)
    others = [p for p in list_checkpoints(checkpoints_dir) if p != final]
    for old in others[: max(0, len(others) - (keep_last - 1))]:
        remove_folder(old)
    return final


def clean_partial_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Remove what a killed save left in ``checkpoints_dir`` (``step-<N>.tmp-*`` and the like).

    Call it at the start of a run or a resume, while holding the run lock (another live run's
    temp folder looks the same), and print what it returns.

    Returns:
        The partial folders removed (an ``step-<N>.old-*`` folder renamed back to a missing
        ``step-<N>`` counts as removed too: see :func:`fastmid.train.runfolder.clean_partial`).
    """
    return clean_partial(Path(checkpoints_dir), r"step-\d+")


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Checkpoints in ``checkpoints_dir`` (folders ``step-<N>`` holding ``trainer_state.json``),
    oldest first; temporary and partial folders are ignored. Their files are not checked here:
    :func:`verify_checkpoint` does that."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for child in checkpoints_dir.iterdir():
        match = _STEP_RE.match(child.name)
        if match and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


# ---- checking -------------------------------------------------------------------------------


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise _Damaged(file, "missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _Damaged(file, f"not valid JSON ({first_line(exc)})") from None


def _check_safetensors(file: Path) -> set[str]:
    """Check a safetensors file's header and length without reading its tensors; return the
    tensor names.

    Layout: 8-byte little-endian header length ``n``, ``n`` bytes of JSON mapping each name to
    ``{"dtype", "shape", "data_offsets": [begin, end]}``, then the data; a truncated file is
    shorter than ``8 + n + max(end)``.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _Damaged(file, f"truncated ({size} bytes, not even a header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise _Damaged(file, f"not a safetensors file or truncated (header of {n} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise _Damaged(file, "missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _Damaged(file, f"not a safetensors file ({first_line(exc)})") from None
    try:
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise _Damaged(file, "its header is not a safetensors header") from None
    if size != 8 + n + end:
        raise _Damaged(
            file, f"truncated or extended: {size:,} bytes, its header says {8 + n + end:,}"
        )
    return {k for k in header if k != "__metadata__"}


def _tensor_refs(tree: Any, file: Path, where: str = "") -> Iterator[tuple[str, Any]]:
    """``(where, referenced key)`` of every tensor reference in an encoded JSON tree, those inside
    tensor-subclass entries included; ``where`` is the key path as :func:`_decode` names it.

    Raises:
        _Damaged: a subclass entry that is malformed or names a class not on the allow-list.
    """
    if isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _tensor_refs(v, file, f"{where}.{i}")
    elif isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            yield where, tree[_TENSOR]
        elif _SUBCLASS in tree:
            problem = _subclass_problem(tree)
            if problem:
                raise _Damaged(file, f"'{where}' {problem}")
            for k, v in tree["inner"].items():
                yield _join(where, k), v[_TENSOR]
            yield from _tensor_refs(tree["ctx"], file, f"{where}.ctx")
        elif set(tree) == {_TUPLE}:
            yield from _tensor_refs(tree[_TUPLE], file, where)
        elif set(tree) == {_DICT} and isinstance(tree[_DICT], list):
            for i, pair in enumerate(tree[_DICT]):
                if isinstance(pair, list) and len(pair) == 2:
                    yield from _tensor_refs(pair[1], file, _join(where, str(pair[0])))
                else:  # found by _decode, which names it
                    yield from _tensor_refs(pair, file, f"{where}.{i}")
        else:
            for k, v in tree.items():
                yield from _tensor_refs(v, file, _join(where, str(k)))


def _check_trainer_state(data: Any, file: Path) -> None:
    if not isinstance(data, dict):
        raise _Damaged(file, "not a JSON object")
    fields = dataclasses.fields(TrainerState)
    required = {f.name for f in fields if f.default is dataclasses.MISSING}
    required -= {f.name for f in fields if f.default_factory is not dataclasses.MISSING}
    missing = sorted(required - set(data))
    unknown = sorted(set(data) - {f.name for f in fields})
    if missing:
        raise _Damaged(file, f"missing keys {missing}")
    if unknown:
        raise _Damaged(file, f"unknown keys {unknown} (written by a newer fastmid?)")
    for key in ("step", "micro_batches", "tokens", "supervised_tokens"):
        value = data[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_COUNTER:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise _Damaged(file, f"'{key}' must be a non-negative integer below 2**62, not {shown}")
    elapsed = data["elapsed_s"]
    if (
        not isinstance(elapsed, (int, float))
        or isinstance(elapsed, bool)
        or not math.isfinite(elapsed)
        or elapsed < 0
    ):
        raise _Damaged(
            file, f"'elapsed_s' must be a non-negative number of seconds, not {elapsed!r}"
        )
    for key in ("plan", "config"):
        if not isinstance(data[key], dict):
            raise _Damaged(file, f"'{key}' must be a JSON object")
    problem = _rng_problem(data["rng"])
    if problem:
        raise _Damaged(file, problem)


def _check_state_json(data: Any, file: Path) -> None:
    if not isinstance(data, dict) or not {"format", "class", "state_dict"} <= set(data):
        raise _Damaged(file, "missing keys (needs 'format', 'class', 'state_dict')")
    if data["format"] != FORMAT:
        raise _Damaged(file, f"checkpoint format {data['format']!r}; this fastmid reads {FORMAT}")


def _find_problem(path: Path) -> _Damaged | None:
    """The first thing wrong with checkpoint ``path`` (cheap: headers and JSON, not tensor data)."""
    try:
        if not path.is_dir():
            raise _Damaged(path, "not a folder")
        _check_trainer_state(_read_json(path / "trainer_state.json"), path / "trainer_state.json")
        if (path / "sharded.json").exists():  # fastmid.train.sharded_checkpoint's format
            _read_json(path / "sharded.json")
            _check_state_json(_read_json(path / "scheduler.json"), path / "scheduler.json")
            if not (path / "dcp" / ".metadata").is_file():
                raise _Damaged(path / "dcp" / ".metadata", "missing")
            return None
        _check_safetensors(path / "band.safetensors")
        if not (path / "optimizer.json").exists() and (path / "optimizer.pt").exists():
            for name in _FORMAT1_STATE_FILES:  # their contents are checked when loading
                if not (path / name).is_file():
                    raise _Damaged(path / name, "missing")
            return None
        for stem in ("optimizer", "scheduler"):
            file, tensor_file = path / f"{stem}.json", path / f"{stem}.safetensors"
            data = _read_json(file)
            _check_state_json(data, file)
            stored = set()
            if stem == "optimizer" or tensor_file.exists():
                stored = _check_safetensors(tensor_file)
            for where, key in _tensor_refs(data["state_dict"], file):
                if not isinstance(key, str) or key not in stored:
                    raise _Damaged(
                        file, f"'{where}' refers to tensor {_shown(key)}, which is not stored"
                    )
    except _Damaged as damaged:
        return damaged
    return None


def _step_of(path: Path) -> int | None:
    match = _STEP_RE.match(path.name)
    return int(match.group(1)) if match else None


def _older_complete(path: Path) -> Path | None:
    """The newest checkpoint beside ``path`` with a smaller step that passes the checks."""
    step = _step_of(path)
    if step is None:
        return None
    for other in reversed(list_checkpoints(path.parent)):
        other_step = _step_of(other)
        if other_step is not None and other_step < step and _find_problem(other) is None:
            return other
    return None


def _damaged_error(path: Path, damaged: _Damaged) -> CheckpointError:
    """One line: the file and what is wrong, then which checkpoint to resume from instead."""
    older = _older_complete(path)
    advice = (
        f"resume from the previous complete checkpoint with `--resume {older}`"
        if older is not None
        else f"no older complete checkpoint in {path.parent}; start again without --resume"
    )
    return CheckpointError(f"{damaged}; checkpoint {path} is damaged; {advice}")


def verify_checkpoint(path: Path) -> None:
    """Check that ``path`` is a complete, readable checkpoint, without loading its tensors.

    Checks each file exists; the JSON files parse and hold their keys (``trainer_state.json``:
    every :class:`TrainerState` field with the right types and a restorable RNG state); each
    safetensors file's header parses and its length matches the header (catches truncation).

    Raises:
        CheckpointError: naming the file and the problem, and ``--resume <older checkpoint>`` when
            an older complete one exists beside it.
    """
    damaged = _find_problem(Path(path))
    if damaged is not None:
        raise _damaged_error(Path(path), damaged)


def resolve_resume(resume: str, output_dir: Path) -> Path:
    """Turn ``--resume`` (a checkpoint folder, or ``latest``) into a verified checkpoint folder.

    ``latest`` is the highest ``step-<N>`` under ``<output>/checkpoints``; a damaged one is not
    skipped silently but named, with the older complete checkpoint to pass instead.

    Raises:
        CheckpointError: no checkpoint under ``<output>/checkpoints`` for ``latest``; a path that is
            not a checkpoint; a damaged checkpoint (see :func:`verify_checkpoint`).
    """
    if resume == "latest":
        found = list_checkpoints(Path(output_dir) / "checkpoints")
        if not found:
            raise CheckpointError(
                f"--resume latest: no checkpoint in {Path(output_dir) / 'checkpoints'}; "
                "start without --resume"
            )
        path = found[-1]
    else:
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise CheckpointError(
                f"--resume {path}: not a fastmid checkpoint (no trainer_state.json); pass a "
                "checkpoints/step-<N> folder or 'latest'"
            )
    verify_checkpoint(path)
    return path


# ---- loading --------------------------------------------------------------------------------


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise _Damaged(file, "missing") from None
    except Exception as exc:  # safetensors' Rust errors share no base class worth naming
        raise _Damaged(file, f"unreadable ({first_line(exc)})") from None


# Optimizer classes with one state layout and update: a checkpoint of one resumes in the other.
_SAME_STATE_CLASSES: tuple[frozenset[str], ...] = (
    frozenset({"bitsandbytes.optim.adamw.AdamW8bit", "fastmid.train.adamw8bit_cpu.AdamW8bitCPU"}),
)


def _same_state_class(saved: str, live: str) -> bool:
    return saved == live or any({saved, live} <= group for group in _SAME_STATE_CLASSES)


def _load_state_format2(path: Path, stem: str, live: Any) -> dict[str, Any]:
    file = path / f"{stem}.json"
    data = _read_json(file)
    _check_state_json(data, file)
    if not _same_state_class(data["class"], _class_name(live)):
        raise CheckpointError(
            f"{file}: saved by {data['class']}, this run uses {_class_name(live)}; resume with "
            "the run's own --optim (or start without --resume)"
        )
    tensor_file = path / f"{stem}.safetensors"
    tensors = _load_safetensors(tensor_file) if tensor_file.exists() else {}
    state = _decode(data["state_dict"], tensors, file)
    if not isinstance(state, dict):
        raise _Damaged(file, "'state_dict' is not an object")
    return state


def _load_state_format1(file: Path) -> dict[str, Any]:
    """A format-1 ``.pt`` pickle, through PyTorch's restricted (allow-list) unpickler only."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise _Damaged(file, "missing") from None
    except Exception as exc:  # UnpicklingError for a refused global; anything else: damaged
        raise CheckpointError(
            f"{file}: refused: not a plain tensor/number pickle ({first_line(exc)}); fastmid "
            "loads no code from a checkpoint; use a checkpoint fastmid wrote, or start without "
            "--resume"
        ) from None
    if not isinstance(state, dict):
        raise _Damaged(file, f"holds a {type(state).__name__}, not a state dict")
    return state


def _state_shape_problem(state: Any, optimizer: Any) -> str | None:
    """A per-parameter state tensor with the parameter's number of elements but another shape
    (an edited file: it would pass ``load_state_dict`` and fail inside the first step), or None.

    Walks torch-style state dicts (``{"state": {index: {key: tensor}}, "param_groups"}``, indices
    in the order of the live optimizer's ``param_groups``) and
    :class:`~fastmid.train.optim.OptimizerInBackward`'s ``{"optimizers": [...]}``; other layouts
    are left to ``load_state_dict``.
    """
    if not isinstance(state, dict):
        return None
    inner = getattr(optimizer, "optimizers", None)
    if isinstance(state.get("optimizers"), list) and inner is not None:
        for k, (sub, opt) in enumerate(zip(state["optimizers"], inner, strict=False)):
            problem = _state_shape_problem(sub, opt)
            if problem is not None:
                return f"optimizers[{k}]: {problem}"
        return None
    per_param = state.get("state")
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(per_param, dict) or not groups:
        return None
    live = [p for g in groups for p in g["params"]]
    for index, entry in per_param.items():
        if not isinstance(index, int) or not 0 <= index < len(live) or not isinstance(entry, dict):
            continue
        shape = tuple(live[index].shape)
        items = list(entry.items())
        for key, value in list(items):
            if isinstance(value, dict):  # bitsandbytes nests its quantized state one level down
                items += [(f"{key}.{k}", v) for k, v in value.items()]
        for key, value in items:
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            if value.numel() == live[index].numel() and tuple(value.shape) != shape:
                return (
                    f"state {index} '{key}' has shape {tuple(value.shape)}, its parameter's is "
                    f"{shape}"
                )
    return None


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    trainable_names: list[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> TrainerState:
    """Load band weights, optimizer and scheduler state into the live objects; return the state.

    Every file is read and checked before anything live changes; a state whose layout does not
    fit the live optimizer or scheduler is found when it is applied (the run then stops anyway).
    No file is unpickled (format-1 ``.pt`` files only through ``torch.load(weights_only=True)``).

    Args:
        path: a ``step-<N>`` folder.
        model: the run's model; ``trainable_names`` tensors are overwritten in place (cast to each
            parameter's device and dtype).
        optimizer, scheduler: built exactly as for the saved run (same class, same param groups).

    Returns:
        The saved :class:`TrainerState` (call :func:`restore_rng` on its ``rng``).

    Raises:
        CheckpointError: a damaged checkpoint (missing or truncated file, invalid JSON, missing
            keys: names the file and the older checkpoint to resume from); tensors that do not
            match the run's band; an optimizer or scheduler of another class or layout; a format-1
            pickle that holds anything but tensors, containers and numbers.
    """
    path = Path(path)
    verify_checkpoint(path)
    try:
        data = _read_json(path / "trainer_state.json")
        tensors = _load_safetensors(path / "band.safetensors")
        if (path / "optimizer.json").exists() or not (path / "optimizer.pt").exists():
            opt_state = _load_state_format2(path, "optimizer", optimizer)
            sched_state = _load_state_format2(path, "scheduler", scheduler)
        else:
            opt_state = _load_state_format1(path / "optimizer.pt")
            sched_state = _load_state_format1(path / "scheduler.pt")
    except _Damaged as damaged:
        raise _damaged_error(path, damaged) from None
    _check_band_names(path, tensors, trainable_names)
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        if params[name].shape != value.shape:
            raise _damaged_error(
                path,
                _Damaged(
                    path / "band.safetensors",
                    f"tensor {name} has shape {tuple(value.shape)}, the model's is "
                    f"{tuple(params[name].shape)}",
                ),
            )
    opt_file = path / ("optimizer.json" if (path / "optimizer.json").exists() else "optimizer.pt")
    problem = _state_shape_problem(opt_state, optimizer)
    if problem is not None:
        raise _damaged_error(path, _Damaged(opt_file, problem))
    try:
        optimizer.load_state_dict(opt_state)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise CheckpointError(
            f"{opt_file}: the optimizer state does not fit this run's optimizer "
            f"({first_line(exc)}); resume with the run's own --optim, --model and band"
        ) from None
    try:
        scheduler.load_state_dict(sched_state)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{opt_file.with_name('scheduler' + opt_file.suffix)}: the scheduler state does not "
            f"fit ({first_line(exc)})"
        ) from None
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    return TrainerState(**data)


def _check_band_names(path: Path, tensors: dict[str, Any], trainable_names: list[str]) -> None:
    if sorted(tensors) != sorted(trainable_names):
        missing = sorted(set(trainable_names) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(trainable_names))[:3]
        raise CheckpointError(
            f"{path}: its trained tensors do not match this run's band (missing {missing}, "
            f"unexpected {extra}); resume with the same --model and --band/--layers"
        )


def load_checkpoint_parts(
    path: Path, trainable_names: list[str], optimizer: torch.optim.Optimizer
) -> tuple[TrainerState, dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read a one-process checkpoint without applying it: the state, the band's full tensors
    by name, and the optimizer's state dict (None when the checkpoint's optimizer class is not
    ``optimizer``'s: the caller starts that state fresh). For resuming it in several processes
    (:mod:`fastmid.train.sharded_checkpoint`).

    Raises:
        CheckpointError: a damaged checkpoint, or band tensors that do not match
            ``trainable_names``.
    """
    path = Path(path)
    verify_checkpoint(path)
    try:
        data = _read_json(path / "trainer_state.json")
        tensors = _load_safetensors(path / "band.safetensors")
        opt_state = None
        saved = _read_json(path / "optimizer.json") if (path / "optimizer.json").exists() else {}
        if _same_state_class(str(saved.get("class")), _class_name(optimizer)):
            opt_state = _load_state_format2(path, "optimizer", optimizer)
    except _Damaged as damaged:
        raise _damaged_error(path, damaged) from None
    _check_band_names(path, tensors, trainable_names)
    return TrainerState(**data), tensors, opt_state
