"""The checkout's top-level ``kernels/`` folder must not shadow the PyPI package ``kernels``
(a dependency of transformers from 5.25): run from the repository root, where ``python -c``
puts the folder on ``sys.path``, ``import kernels`` gets the installed package; without one it
stays this folder (transformers < 5.25 imports it while probing and must not fail);
``fastmid.kernels`` is unaffected either way."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import kernels
print(kernels.__file__)
import transformers.activations  # probes (5.24) or imports (5.25+) the package `kernels`
import fastmid.kernels
print("fastmid.kernels", fastmid.kernels.rms_norm.__module__)
"""


def test_import_kernels_from_the_repo_root_is_never_this_folder():
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    ours = ROOT / "kernels"
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert Path(first).resolve().parent == ours
    else:
        assert ours not in Path(first).resolve().parents
    assert second == "fastmid.kernels fastmid.kernels.rms_norm"
