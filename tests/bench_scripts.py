"""Load a script under ``bench/`` as a module (the scripts are not a package), for the tests of
their pure parts. Imports as ``bench_scripts`` from every test folder (``pythonpath``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench_script(relative: str, name: str) -> ModuleType:
    """``bench/<relative>`` executed as module ``name`` (registered in ``sys.modules``, so its
    dataclasses and pickling resolve)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
