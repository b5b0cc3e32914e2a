"""Case 1 of the prepared GPU run: the CUDA test subset, each test's outcome merged as it ends.

    python bench/gpu/case_tests.py --json RESULTS.json [--smoke] [--workers 4]

Runs ``tests/bench/test_gpu_subset.py`` with pytest in this process: on the GPU with
``FASTMID_TEST_DEVICE=cuda TRITON_INTERPRET=0`` (the Triton kernels compiled for the GPU, the
tiny ``fastmid train`` in bf16-master on CUDA), with ``--smoke`` on the CPU under the Triton
interpreter (``FASTMID_GPU_SUBSET_TRAIN=1`` so the training test runs too). With ``--workers N``
and pytest-xdist installed the tests spread over N processes (Triton compiles each kernel once
per process, so compilation runs in parallel). Every test's outcome, duration and first lines of
failure go into the results file as it ends; the exit status is pytest's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import gpu_results  # noqa: E402

TEST_FILE = "tests/bench/test_gpu_subset.py"


class Collector:
    """pytest plugin: one record per test (its call phase, or the phase that failed or skipped)."""

    def __init__(self, json_path: str, case: str, device: str) -> None:
        self.json_path, self.case, self.device = json_path, case, device
        self.tests: list[dict] = []
        self.t0 = time.perf_counter()

    def pytest_runtest_logreport(self, report) -> None:
        if report.when != "call" and not (report.failed or report.skipped):
            return
        message = ""
        if report.failed:
            message = (report.longreprtext or "").strip().splitlines()
            message = " | ".join(line.strip() for line in message[-6:])[:600]
        elif report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])[:300]
        outcome = "error" if report.failed and report.when != "call" else report.outcome
        self.tests.append({
            "nodeid": report.nodeid.split("::", 1)[-1], "outcome": outcome,
            "duration_s": round(report.duration, 3), "message": message,
        })  # fmt: skip
        self.publish()

    def pytest_collectreport(self, report) -> None:
        if report.failed:  # an import error in the test module: say it, not just "exit 2"
            text = " | ".join((report.longreprtext or "").strip().splitlines()[-6:])[:600]
            self.tests.append({"nodeid": report.nodeid or "collection", "outcome": "error",
                               "duration_s": 0.0, "message": text})  # fmt: skip
            self.publish()

    def publish(self) -> None:
        counts = {k: sum(t["outcome"] == k for t in self.tests) for k in
                  ("passed", "failed", "error", "skipped")}  # fmt: skip
        gpu_results.merge_case(self.json_path, self.case, {
            "device": self.device, "file": TEST_FILE, **counts,
            "failed": counts["failed"] + counts["error"], "tests": self.tests,
            "wall_s": round(time.perf_counter() - self.t0, 1),
        })  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--case", default="kernel_tests")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--workers", type=int, default=0, help="pytest-xdist processes (0: none)")
    a = p.parse_args()
    if a.smoke:
        os.environ.update(FASTMID_TEST_DEVICE="cpu", TRITON_INTERPRET="1")
        os.environ["FASTMID_GPU_SUBSET_TRAIN"] = "1"
    else:
        os.environ.update(FASTMID_TEST_DEVICE="cuda", TRITON_INTERPRET="0")
    import pytest

    args = [TEST_FILE, "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rfE"]
    if a.workers > 0:
        try:
            import xdist  # noqa: F401

            args += ["-n", str(a.workers)]
        except ImportError:
            print("pytest-xdist not installed: tests run in one process", flush=True)
    collector = Collector(a.json, a.case, os.environ["FASTMID_TEST_DEVICE"])
    os.chdir(REPO)  # pyproject's pytest settings (tests/ on the import path for `tiny`)
    code = int(pytest.main(args, plugins=[collector]))
    collector.publish()
    print(f"pytest exit status {code}; {len(collector.tests)} tests recorded", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
