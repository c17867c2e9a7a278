"""A step's micro batches read, decoded and collated in worker processes (torch DataLoader).

`StepPrefetcher` (solo.data.prefetch) reads one step ahead on a thread; with `data.loader_workers`
> 0 that thread only gathers what DataLoader workers produce: each worker reads a micro batch's
samples from the shards (decoding compressed pixels inside `Shard.sample`) and collates them, and
the tensors come back through shared memory (torch.multiprocessing's reductions), not a pipe.

What makes it safe to leave on:
* Order: item (step, k) is micro batch k of `step`, a pure function of the step (`StageData`); a
  DataLoader hands items back in order. A step asked for out of turn restarts the workers there.
* Bounded memory: DataLoader keeps 2 items per worker in flight (its `prefetch_factor`), and the
  read-ahead thread holds one step: at most one step plus 2 x workers micro batches ahead.
* Errors: a worker catches what reading or collating raises and returns it as text naming the
  shard; `WorkerLoader.step` raises it as a ShardError from `get` of that step. A worker that dies
  (SIGBUS on a shard truncated under its memory map, the OOM killer) is reported with the shards
  of the step.
* Processes: workers are forked (they inherit the open memory maps and the blend index: nothing
  is pickled or reopened) by the read-ahead thread, and ask the kernel for SIGKILL when it ends
  (`prctl(PR_SET_PDEATHSIG)` is per thread): a SIGKILL of the rank, or a thread left running to
  interpreter exit, takes them along. `close` stops them on that thread. They ignore SIGINT,
  SIGTERM and SIGUSR1: a signal to the job's process group is the rank's to act on (save and
  exit), and a worker dying of it would fail the step being read instead.
  The DataLoader is created off the main thread on purpose too: there, torch installs no SIGCHLD
  handler, which would raise a worker's death inside whatever the main thread runs (a training
  step), not at `get`.
"""

from __future__ import annotations

import itertools
import os
import signal
from dataclasses import dataclass

from torch.utils.data import DataLoader, Dataset

from solo.data.batch import PackedBatch, collate
from solo.data.dataset import StageData
from solo.data.shards import ShardError
from solo.run_guard import die_with_parent

MAX_DEFAULT_WORKERS = 8  # the target: a rank's step of data in under 1/4 of a 7B step with <= 8


def default_workers(configured: int | None) -> int:
    """`data.loader_workers`, with null resolved: the cores this rank may use (its CPU affinity
    shared by the node's ranks, torchrun's LOCAL_WORLD_SIZE) less one for the rank itself, at most
    8. 0 means the read-ahead thread reads itself, as on the CPU test machine (2 cores, many ranks)."""
    if configured is not None:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(MAX_DEFAULT_WORKERS, cores // max(local_ranks, 1) - 1))


@dataclass(frozen=True)
class _Failed:
    """What reading a micro batch raised, as text: any exception pickles as that."""

    message: str


class StepMicroBatches(Dataset):
    """Item (step, k): micro batch k of `step` of one data-parallel rank, collated (or `_Failed`)."""

    def __init__(self, data: StageData, dp_rank: int, dp_size: int, micro_batch_size: int, pad_id: int,
                 with_patches: bool = True):
        self.data, self.dp_rank, self.dp_size = data, dp_rank, dp_size
        self.micro_batch_size, self.pad_id, self.with_patches = micro_batch_size, pad_id, with_patches
        self.per_step = data.global_batch_size // (dp_size * micro_batch_size)

    def indices(self, step: int, k: int) -> range:
        return self.data.rank_indices(step, self.dp_rank, self.dp_size)[k * self.micro_batch_size:][
            :self.micro_batch_size]

    def shards(self, indices) -> str:
        return ", ".join(sorted({self.data.shard_of(i) for i in indices}))

    def __getitem__(self, item: tuple[int, int]) -> PackedBatch | _Failed:
        indices = self.indices(*item)
        try:
            samples = [self.data.read(i, self.with_patches) for i in indices]
            return collate(samples, self.data.seq_length, self.pad_id, self.data.stop_id)
        except ShardError as e:  # names the shard (and sample) itself
            return _Failed(str(e))
        except Exception as e:
            return _Failed(f"{self.shards(indices)}: reading step {item[0]} failed: {type(e).__name__}: {e}")


def _start_worker(worker_id: int) -> None:
    die_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _as_is(item):
    return item


class WorkerLoader:
    """`step(s)` -> the micro batches of step s, from `workers` processes; steps asked for in order
    are read ahead continuously. Not thread-safe: one thread (StepPrefetcher's) calls it."""

    def __init__(self, micro_batches: StepMicroBatches, workers: int):
        self.micro_batches, self.workers = micro_batches, workers
        self._iterator, self._next_step = None, None

    def step(self, step: int) -> list[PackedBatch]:
        if self._next_step != step:
            self._restart(step)
        try:
            batches = [next(self._iterator) for _ in range(self.micro_batches.per_step)]
        except RuntimeError as e:  # DataLoader: "worker (pid(s) ...) exited unexpectedly"
            self.close()
            indices = self.micro_batches.data.rank_indices(step, self.micro_batches.dp_rank,
                                                           self.micro_batches.dp_size)
            raise ShardError(f"a data loader worker died reading step {step} from {self.micro_batches.shards(indices)} "
                             f"({e}): a shard file truncated or replaced while the run reads it (bus error), or "
                             "the host out of memory") from None
        self._next_step = step + 1
        if failed := next((b for b in batches if isinstance(b, _Failed)), None):
            raise ShardError(failed.message)
        return batches

    def _restart(self, step: int) -> None:
        self.close()
        steps = range(step, self.micro_batches.data.train_steps)
        loader = DataLoader(self.micro_batches, sampler=itertools.product(steps, range(self.micro_batches.per_step)),
                            batch_size=None, collate_fn=_as_is, num_workers=self.workers,
                            multiprocessing_context="fork", worker_init_fn=_start_worker, prefetch_factor=2)
        self._iterator = iter(loader)

    def close(self) -> None:
        """Stop the workers now (at garbage collection otherwise, which a traceback can delay)."""
        if self._iterator is not None:
            self._iterator._shutdown_workers()  # torch 2.x DataLoader: what its __del__ calls
        self._iterator, self._next_step = None, None

    def pids(self) -> list[int]:
        return [w.pid for w in self._iterator._workers] if self._iterator is not None else []
