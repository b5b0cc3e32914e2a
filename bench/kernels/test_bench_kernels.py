"""pytest-benchmark microbenchmarks of the kernels at 8B sizes (CUDA only; skipped elsewhere).

Run: ``pytest bench/kernels --benchmark-columns=median,iqr --benchmark-sort=name``. Each case
records achieved GB/s, the share of the measured copy bandwidth, and peak extra memory in
``extra_info``. ``run_gpu.py`` runs the same cases (plus the end-to-end step) in one go.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark")

TOKENS = {"rms_norm": 16384, "swiglu": 16384, "rope": 16384, "linear_cross_entropy": 16384}


@pytest.fixture(scope="module")
def copy_gbs() -> float:
    return cases.copy_bandwidth_gbs("cuda")


@pytest.mark.parametrize("impl", cases.IMPLS)
@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("op", sorted(cases.OPS))
def test_op(benchmark, copy_gbs, op, mode, impl):
    case = cases.OPS[op](impl, mode, TOKENS[op], "cuda", torch.bfloat16)

    def run() -> None:
        case.run()
        torch.cuda.synchronize()

    for _ in range(3):  # warm up (and compile)
        run()
    benchmark.pedantic(run, rounds=10, iterations=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["peak_extra_mib"] = cases.peak_extra_bytes(case.run, "cuda") / 2**20
    if case.bytes_moved:
        gbs = case.bytes_moved / seconds / 1e9
        benchmark.extra_info["gb_per_s"] = gbs
        benchmark.extra_info["copy_bw_share"] = gbs / copy_gbs
