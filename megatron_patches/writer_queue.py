"""dist_checkpointing's writer results queue from a forked Manager, not a spawned one (CPU backend).

Written against megatron-core 0.16.1. Before a process's first checkpoint save,
`strategies.filesystem_async._get_write_results_queue` starts a ``multiprocessing.Manager`` with the
``spawn`` context. A spawned child re-imports the parent's main module, and under
``python -m solo.train`` that is torch and megatron-core again: 10-13 s on a 2-core machine, in every
training process (every rank) that saves, which is most of a short CPU run's save and a third of a
demo stage's wall time.

The Manager's server only relays the writers' results. megatron-core already forks the writer
processes themselves (``write_preloaded_data_multiproc``, ``fork`` context), so a forked Manager adds
no new kind of process. Applied only with the CPU backend, where no CUDA context exists; on a GPU
megatron-core's ``spawn`` is left as it is (it costs seconds once per run there).
"""

from __future__ import annotations

import multiprocessing as mp

_applied = False


def _forked_results_queue():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()
    return filesystem_async._results_queue


def apply() -> None:
    global _applied
    if _applied:
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # Module-level name, looked up at call time by `FileSystemWriterAsync.prepare_write_data`.
    filesystem_async._get_write_results_queue = _forked_results_queue
    _applied = True
