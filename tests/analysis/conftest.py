"""Analysis tests run the Triton CKA kernel on CPU through the Triton interpreter."""

import os

# Must precede the first Triton kernel compilation (fastmid.kernels.cka_stats compiles lazily).
os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
from pathlib import Path

# The tiny-model helpers (analysis_tiny.py) sit next to the tests; tests/ is not a package.
sys.path.insert(0, str(Path(__file__).parent))
