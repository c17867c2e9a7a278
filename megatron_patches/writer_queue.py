"""dist_checkpointing's writer results queue without a spawned Manager process (CPU backend).

Written against megatron-core 0.16.1. Before a process's first checkpoint save,
`strategies.filesystem_async._get_write_results_queue` starts a ``multiprocessing.Manager`` with the
``spawn`` context. A spawned child re-imports the parent's main module, and under
``python -m solo.train`` that is torch and megatron-core again: 10-13 s on a 2-core machine, in every
training process (every rank) that saves, which was most of a short CPU run's save and a third of a
demo stage's wall time.

`solo.checkpoint` saves synchronously: the queue is filled and read in the training process itself
(megatron-core's writer processes report through their own ``fork``-context queue), so a plain
``queue.Queue`` carries the results, with no process of its own. Two alternatives fail: a forked
Manager outlives a SIGKILLed trainer and keeps the inherited `solo.run_guard` lock, refusing the
restart; a ``multiprocessing.Queue`` delivers through a feeder thread, and megatron-core reads the
result with ``get_nowait`` right after the put ("results_queue should not be empty"). An
asynchronous save, whose worker process would fill a copy of this queue, fails loudly with that
same error; solo-megatron makes none. Applied only with the CPU backend; on a GPU megatron-core's
Manager is left as it is (seconds, once per run).
"""

from __future__ import annotations

import queue

_applied = False


def _in_process_results_queue():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    return filesystem_async._results_queue


def apply() -> None:
    global _applied
    if _applied:
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # Module-level name, looked up at call time by `FileSystemWriterAsync.prepare_write_data`.
    filesystem_async._get_write_results_queue = _in_process_results_queue
    _applied = True
