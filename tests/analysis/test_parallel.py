"""LayerParallel: every item runs once, errors reach the caller, the caller keeps its threads."""

from __future__ import annotations

import threading

import pytest
import torch

from fastmid.analysis.heap import keep_freed_memory
from fastmid.analysis.parallel import LayerParallel


def test_runs_every_item_once_on_worker_threads_with_one_torch_thread():
    seen: dict[int, tuple[str, int]] = {}
    main_threads = torch.get_num_threads()

    def task(i: int) -> None:
        seen[i] = (threading.current_thread().name, torch.get_num_threads())

    with LayerParallel(workers=2) as pool:
        pool.run(task, range(7))
        pool.run(task, [])  # nothing to do is fine
    assert sorted(seen) == list(range(7))
    assert all(name.startswith("fastmid-layer") and n == 1 for name, n in seen.values())
    assert torch.get_num_threads() == main_threads


def test_one_worker_runs_in_the_calling_thread():
    names = []
    with LayerParallel(workers=1) as pool:
        pool.run(lambda i: names.append(threading.current_thread().name), range(3))
    assert names == [threading.current_thread().name] * 3


def test_a_failing_task_raises_after_the_others_finish():
    done = []

    def task(i: int) -> None:
        if i == 2:
            raise ValueError("layer 2 is broken")
        done.append(i)

    with LayerParallel(workers=2) as pool, pytest.raises(ValueError, match="layer 2 is broken"):
        pool.run(task, range(6))
    assert sorted(done) == [0, 1, 3, 4, 5]


def test_keep_freed_memory_applies_on_linux_glibc():
    import platform

    applied = keep_freed_memory()
    is_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert applied is is_glibc
    assert keep_freed_memory() is applied  # once per process, same answer


def test_threads_created_later_keep_the_callers_thread_count():
    main_threads = torch.get_num_threads()
    with LayerParallel(workers=2) as pool:
        pool.run(lambda i: None, range(4))
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [main_threads]
