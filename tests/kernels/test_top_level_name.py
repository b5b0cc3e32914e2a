"""The checkout's top-level ``kernels/`` folder must not shadow the PyPI package ``kernels``
(a dependency of transformers from 5.25): run from the repository root, where ``python -c``
puts the folder on ``sys.path``, ``import kernels`` gets the installed package, or fails as if the
folder were not there; ``fastmid.kernels`` is unaffected."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
try:
    import kernels
except ModuleNotFoundError as exc:
    print("absent", exc.name)
else:
    print("found", kernels.__file__)
import fastmid.kernels
print("fastmid.kernels", fastmid.kernels.rms_norm.__module__)
"""


def test_import_kernels_from_the_repo_root_is_never_this_folder():
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert first == "absent kernels"
    else:
        status, path = first.split(" ", 1)
        assert status == "found" and ROOT not in Path(path).resolve().parents
    assert second == "fastmid.kernels fastmid.kernels.rms_norm"
