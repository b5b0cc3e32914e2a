"""Analysis tests: the tiny-model helpers (analysis_tiny.py) sit next to the tests.

The Triton CKA kernel runs on CPU through Triton's interpreter: ``TRITON_INTERPRET=1`` is set in
the root ``tests/conftest.py``.
"""

import sys
from pathlib import Path

# tests/ is not a package; make analysis_tiny importable.
sys.path.insert(0, str(Path(__file__).parent))
