"""A step's micro batches, read and collated on a background thread while the previous step computes.

Reading a step from the memory-mapped shards and collating it costs the main thread seconds per
step of the paper's recipe (32 micro batches of 32,768 tokens per data-parallel rank; ~150 ms each
on this project's CPU test machine), time in which the GPUs would wait. A sample is a pure function
of its index in the blend (`solo.data.dataset`), so reading one step ahead changes nothing about the
data order, the losses or resumption. One thread is enough: the work is numpy copies out of memory
maps, which release the GIL. concurrent.futures does the threading.

With `workers` > 0 (`data.loader_workers`) the thread gathers the micro batches that worker
processes read, decode and collate (`solo.data.loader`): compressed pixels cost CPU time that one
thread cannot hide behind a step. Same batches, same order.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from solo.data.batch import PackedBatch, collate
from solo.data.dataset import StageData
from solo.data.loader import StepMicroBatches, WorkerLoader


class StepPrefetcher:
    """`get(step)` -> the rank's collated micro batches of that step, on the CPU; meanwhile the next
    step is prepared. Errors (a damaged shard) surface from `get` of the step they belong to.

    A context manager: leaving the `with` block, after the last step or by an exception, cancels
    a read ahead that has not started, stops the worker processes and lets the thread end (Python
    joins an executor's threads at exit, so a step that raises would otherwise still wait for the
    next step's read)."""

    def __init__(self, data: StageData, dp_rank: int, dp_size: int, micro_batch_size: int, pad_id: int,
                 reads: bool = True, with_patches: bool = True, workers: int = 0):
        """`reads=False`: this rank receives its batches from another (`solo.data.batch.broadcast_batch`)
        and `get` gives one None per micro batch; `with_patches=False`: see `Shard.sample`; `workers`:
        processes that read and collate (0: the thread does)."""
        self.data, self.dp_rank, self.dp_size = data, dp_rank, dp_size
        self.micro_batch_size, self.pad_id = micro_batch_size, pad_id
        self.reads, self.with_patches = reads, with_patches
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="solo-prefetch")
        self._next: tuple[int, Future] | None = None
        self._workers = WorkerLoader(StepMicroBatches(data, dp_rank, dp_size, micro_batch_size, pad_id, with_patches),
                                     workers) if workers > 0 and reads else None
        self._closed = False

    def _load(self, step: int) -> list[PackedBatch | None]:
        m = self.micro_batch_size
        if not self.reads:
            return [None] * (self.data.global_batch_size // (self.dp_size * m))
        if self._workers is not None:
            return self._workers.step(step)
        samples = self.data.rank_batch(step, self.dp_rank, self.dp_size, with_patches=self.with_patches)
        return [collate(samples[i:i + m], self.data.seq_length, self.pad_id, self.data.stop_id)
                for i in range(0, len(samples), m)]

    def get(self, step: int) -> list[PackedBatch]:
        ahead = self._next
        if ahead is not None and ahead[0] == step:
            result = ahead[1].result()
        elif self._workers is not None:  # the workers belong to the thread: it alone talks to them
            result = self._pool.submit(self._load, step).result()
        else:
            result = self._load(step)
        self._next = (step + 1, self._pool.submit(self._load, step + 1)) if step + 1 < self.data.train_steps else None
        return result

    def close(self) -> None:
        if self._workers is not None and not self._closed:
            if self._next is not None:
                self._next[1].cancel()
            # On the thread that started the workers, after the read it may be doing: their
            # parent-death signal is tied to that thread, and no read may race the shutdown.
            self._pool.submit(self._workers.close).result()
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> StepPrefetcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
