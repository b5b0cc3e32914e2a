"""Suite-wide test setup.

* ``TRITON_INTERPRET=1`` before anything imports triton, so every Triton kernel can be run on
  CPU tensors by the kernel tests (production dispatch still uses Triton only on CUDA).
* No network: the Hugging Face hub is offline for the whole run.
* ``--precision auto`` resolves to fp32 on CPU whatever the CPU (``FASTMID_AUTO_CPU_PRECISION``).
* ``@pytest.mark.slow`` tests (long end-to-end runs) are skipped unless ``FASTMID_FULL=1``;
  each has a short version that always runs.
* SmolLM2-135M-Instruct, loaded once per session: ``smol_tokenizer`` and
  ``smol_model_and_tokenizer`` (shared, so read-only: deep-copy the model before training it).
  A test that uses the model is marked ``realmodel`` here, so ``make test-fast``
  (``-m "not realmodel"``) leaves it out.
* The tokenization cache (``fastmid.data.cache``, under ``HF_DATASETS_CACHE``) is a temporary
  folder: one for the session (what session- and module-scoped fixtures build), and a fresh one
  for every test, so no test reads another's entries or touches the user's cache; so is the
  base-model evaluation cache (``FASTMID_EVAL_CACHE``, :mod:`fastmid.eval.base_cache`).
* Tiny random models come from one factory, ``tests/tiny.py`` (``from tiny import tiny_model``;
  pyproject puts tests/ on the import path); ``tiny_llama_dir`` is a tiny Llama saved once per
  session with SmolLM2's tokenizer.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `--precision auto` on a CPU follows the hardware (bf16-master with AMX, else fp32); the suite's
# exactness tests are written for fp32, so pin it (subprocesses inherit it). Tests of the
# detection itself unset it.
os.environ.setdefault("FASTMID_AUTO_CPU_PRECISION", "fp32")

from pathlib import Path
from typing import Any

import pytest

# Fixtures that load the real model: their tests get the ``realmodel`` marker.
REAL_MODEL_FIXTURES = frozenset({"smol_model_and_tokenizer"})


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if REAL_MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realmodel)
    if os.environ.get("FASTMID_FULL") == "1":
        return
    skip = pytest.mark.skip(reason="long run: set FASTMID_FULL=1 (CI runs the short version)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _session_datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``HF_DATASETS_CACHE`` in a temporary folder before any fixture builds examples."""
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets-cache")))
    patch.setenv("FASTMID_EVAL_CACHE", str(tmp_path_factory.mktemp("eval-cache")))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _test_datasets_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh tokenization cache per test (a test that wants a second build to hit the cache
    builds twice within itself)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets-cache")))
    monkeypatch.setenv("FASTMID_EVAL_CACHE", str(tmp_path_factory.mktemp("eval-cache")))


def _skip_unless_installed() -> None:
    from fastmid.models.loading import ModelSourceError, default_gguf_path

    try:
        default_gguf_path()
    except ModelSourceError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"SmolLM2 is not installed: {exc}")


@pytest.fixture(scope="session")
def smol_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer (ChatML template, pad = eos = 2), once per session.

    The same tokenizer ``load_model_and_tokenizer("default")`` returns; tests that change an
    attribute (``padding_side``...) put it back.
    """
    from fastmid.models.loading import load_tokenizer

    _skip_unless_installed()
    return load_tokenizer("default")


@pytest.fixture(scope="session")
def smol_model_and_tokenizer() -> tuple[Any, Any]:
    """``load_model_and_tokenizer("default", device="cpu")``, once per session (float32, eval
    mode; seconds once the GGUF conversion is cached).

    Shared by every test that asks for it: never train, patch or modify it in place;
    ``copy.deepcopy(model)`` first. Its tests are marked ``realmodel`` automatically.
    """
    from fastmid.models.loading import load_model_and_tokenizer

    _skip_unless_installed()
    return load_model_and_tokenizer("default", device="cpu")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer: Any) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, saved once per session as a Hugging Face
    folder: 5 layers, hidden 32, SmolLM2's 49,152-token vocabulary, tied embeddings, seed 1234.
    Read-only: load it (``load_model_and_tokenizer``) and train the copy."""
    from tiny import save_tiny, tiny_model

    model = tiny_model(
        "llama",
        seed=1234,
        vocab_size=len(smol_tokenizer),
        intermediate_size=64,
        num_hidden_layers=5,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=smol_tokenizer.bos_token_id,
        eos_token_id=smol_tokenizer.eos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id,
    )
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), model, smol_tokenizer)
