"""Every change solo-megatron makes to megatron-core behaviour lives in this package.

Each module is small, names the megatron-core version it was written against, and says why the
patch exists:

* `cpu`: megatron-core's CUDA-only calls (device arguments, CUDA RNG, ``Tensor.type()`` checks,
  ``synchronize``) redirected to the CPU, so its real TP/DP/distributed-optimizer code runs on gloo;
* `optimizer_state`: `DistributedOptimizer`'s checkpoint load path made to work with torch's Adam
  (megatron-core's fallback without Apex or TransformerEngine) and its per-parameter ``step``;
* `safe_load`: torch DCP's two unrestricted unpicklings (``.metadata``, stored objects) made safe;
* `local_files`: megatron-core's multi-storage-client I/O layer switched off (local POSIX files only);
* `writer_queue` (with the CPU backend): the checkpoint writer's results queue without a spawned
  Manager, which would re-import torch and megatron-core before a process's first save.

Nothing is applied on import. `apply(cpu=...)` applies them all, once per process;
`solo.distributed.init_distributed` calls it, so every training, conversion and test process that
builds megatron-core's groups runs with the same patches.
"""

from __future__ import annotations

from megatron_patches import cpu as cpu_backend
from megatron_patches import local_files, optimizer_state, safe_load, writer_queue


def apply(cpu: bool) -> None:
    """Apply every patch to this process (idempotent). `cpu`: also the CPU backend (no GPU is used).

    Process-wide and never undone: a later `apply(cpu=False)` leaves an applied CPU backend in place.
    """
    if cpu:
        cpu_backend.apply()
        writer_queue.apply()
    local_files.apply()
    optimizer_state.apply()
    safe_load.apply()
