"""Run the per-layer statistics of one batch on several CPU cores, one layer per core.

The statistics of one layer are many small torch ops (masking, casts, a few (d, d) products,
batched eigensolvers on ~128 x 128 Gram matrices). Split across cores op by op (torch's intra-op
threads), most of them are too small to scale, and LAPACK's small eigensolvers run on one core
anyway. Layers are independent, so :class:`LayerParallel` instead gives each worker thread whole
layers and sets torch to one intra-op thread while they run: each core works through its own
layers without synchronizing per op. The main thread waits for all layers of the batch before
the next forward pass, and one layer's accumulators are only ever touched by one task per batch,
so the results do not depend on scheduling.

Only CPU tensors gain: on CUDA the work is queued asynchronously and one thread is enough, so
``workers=1`` (serial, in the calling thread) is used there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


class LayerParallel:
    """A pool of ``workers`` threads that each run whole per-layer tasks with one torch thread.

    Args:
        workers: worker threads; default :func:`torch.get_num_threads` (the cores torch would
            use). 1 runs every task serially in the calling thread, with torch's threads as they
            are.

    Use as a context manager (``with LayerParallel() as pool: pool.run(fn, layers)``) so the
    threads end with the block.
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, int(workers or torch.get_num_threads()))
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> LayerParallel:
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fastmid-layer")
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._pool is not None:
            # On an error (Ctrl-C included) queued tasks are dropped instead of run to the end.
            self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
            self._pool = None

    def run(self, fn: Callable[[T], None], items: Iterable[T]) -> None:
        """Call ``fn(item)`` for every item and wait for all of them.

        Raises:
            Exception: the first exception a task raised (after every task has finished), so a
                broken layer (e.g. NaN activations) stops the analysis with its own message.
        """
        items = list(items)
        if self._pool is None or len(items) < 2:
            for item in items:
                fn(item)
            return
        mine = torch.get_num_threads()
        try:
            futures = [self._pool.submit(_one_thread, fn, item) for item in items]
            errors = [f.exception() for f in futures]
        finally:
            torch.set_num_threads(mine)
        for err in errors:
            if err is not None:
                raise err


def _one_thread(fn: Callable[[T], None], item: T) -> None:
    torch.set_num_threads(1)
    fn(item)
