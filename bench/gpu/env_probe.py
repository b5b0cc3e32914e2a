"""The prepared GPU run's first case: what the machine is, and its measured ceilings (issue 24).

    python bench/gpu/env_probe.py --json RESULTS.json [--smoke]

Writes into the results file (``bench/gpu/gpu_results.py``):

* ``environment``: GPU name, memory, compute capability and multiprocessors, driver (from
  ``nvidia-smi``), CUDA of the torch build, the versions of Python, torch, triton, transformers,
  torchao, bitsandbytes, datasets, pyarrow, fsspec, huggingface_hub, safetensors, peft, numpy,
  whether each of fastmid's optional runtime packages imports (one line of error if not), where
  fastmid was imported from;
* ``machine``: the bf16 matmul rate measured on an 8192^3 product (mean of 10 after 3 warm-ups,
  random data: what MFU is reported against beside the datasheet's 989.5 TFLOP/s), the
  device-to-device copy bandwidth (2 GiB copied, read + write bytes over time: what the kernels'
  GB/s are compared with), and the datasheet's dense bf16 rate for H100/H200.

``--smoke``: the same on CPU with a 256^3 float32 product and 1 MiB copied (numbers meaningless).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_results

PACKAGES = (
    "torch", "triton", "transformers", "torchao", "bitsandbytes", "datasets", "pyarrow", "fsspec",
    "huggingface_hub", "safetensors", "peft", "numpy", "dill", "multiprocess", "xxhash",
)  # fmt: skip


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def try_import(name: str) -> str:
    try:
        importlib.import_module(name)
    except Exception as exc:  # report, never stop: the cases that need it will fail on their own
        return f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return "ok"


def nvidia_smi() -> dict[str, str]:
    query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": repr(exc)}
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[:300]}
    first = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    return dict(zip(query.split(","), (v.strip() for v in first.split(",")), strict=False))


def matmul_tflops(torch, device: str, n: int, dtype, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / reps
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        seconds = (time.perf_counter() - t0) / reps
    return 2 * n**3 / seconds / 1e12


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    t0 = time.perf_counter()
    import torch

    import fastmid

    env: dict = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "fastmid_path": str(Path(fastmid.__file__).parent),
        "install": {
            "method": os.environ.get("FASTMID_INSTALL_METHOD", "already importable"),
            "wheels": os.environ.get("FASTMID_WHEELS", "none"),
        },
        "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "PYTHONPATH",
                                                "PYTORCH_CUDA_ALLOC_CONF", "FASTMID_KERNELS")},
    }  # fmt: skip
    env.update({name: version(name.replace("_", "-")) or version(name) for name in PACKAGES})
    try:
        from fastmid.kernels import triton_available

        env["fastmid_kernels_triton"] = triton_available()
    except Exception as exc:
        env["fastmid_kernels_triton"] = repr(exc)
    imports = {"datasets": try_import("datasets"), "torchao.optim": try_import("torchao.optim")}
    if torch.cuda.is_available() and not a.smoke:
        imports["bitsandbytes"] = try_import("bitsandbytes")
        imports["flash_attn"] = try_import("flash_attn")
        props = torch.cuda.get_device_properties(0)
        smi = nvidia_smi()
        env.update(
            gpu_name=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(props.total_memory / 2**30, 2),
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            driver=smi.get("driver_version"),
            nvidia_smi=smi,
        )
    env["imports"] = imports
    gpu_results.merge_top(a.json, "environment", env)

    machine: dict = {}
    if torch.cuda.is_available() and not a.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
        import cases

        machine["bf16_matmul_tflops"] = round(matmul_tflops(torch, "cuda", 8192, torch.bfloat16), 1)
        machine["bf16_matmul_shape"] = "8192 x 8192 x 8192, random normal, mean of 10"
        machine["copy_gbs"] = round(cases.copy_bandwidth_gbs("cuda", n_bytes=2 << 30), 1)
        name = env.get("gpu_name", "")
        machine["spec_bf16_tflops"] = (
            gpu_results.H200_BF16_DENSE_TFLOPS if ("H200" in name or "H100" in name) else None
        )
    else:
        machine["cpu_fp32_matmul_tflops"] = round(
            matmul_tflops(torch, "cpu", 256, torch.float32), 4
        )
        machine["note"] = "CPU smoke run: no GPU ceilings measured"
    gpu_results.merge_top(a.json, "machine", machine)
    gpu_results.merge_case(a.json, "env", {"wall_s": round(time.perf_counter() - t0, 1),
                                           **machine, "imports": imports})  # fmt: skip
    print(f"environment: {env.get('gpu_name', 'cpu')}, torch {env['torch']}, machine {machine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
