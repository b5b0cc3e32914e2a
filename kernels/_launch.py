"""Launch geometry shared by the row-wise kernels: how many rows one Triton program handles and
how many persistent programs a cross-row reduction uses.

On CUDA a program handles tiles of about 4096 elements (one row of an 8B model's hidden size);
under the CPU interpreter, which pays a large fixed cost per program, tiles are larger so that
small test shapes run as a handful of programs.
"""

from __future__ import annotations

import torch

from ._triton import next_power_of_2


def rows_per_program(block_cols: int, tensor: torch.Tensor, n_rows: int) -> int:
    """Power-of-two number of rows per program for a (rows, block_cols) tile on ``tensor``'s
    device, never more than ``n_rows`` rounded up to a power of two."""
    budget, cap = (4096, 32) if tensor.is_cuda else (32768, 256)
    rows = max(1, min(cap, budget // max(block_cols, 1), next_power_of_2(max(n_rows, 1))))
    return next_power_of_2(rows)


def num_warps_for(tile_elements: int) -> int:
    """Warps per program for a tile of ``tile_elements`` elements (ignored by the interpreter)."""
    if tile_elements <= 2048:
        return 4
    if tile_elements <= 8192:
        return 8
    return 16


def persistent_programs(tensor: torch.Tensor, cap_on_cpu: int = 2) -> int:
    """Programs for a persistent cross-row reduction: the CUDA multiprocessor count, or a small
    number on CPU (the interpreter runs programs one after another)."""
    if tensor.is_cuda:
        return torch.cuda.get_device_properties(tensor.device).multi_processor_count
    return cap_on_cpu
