"""One run per save dir, and no rank outliving its launcher.

* `SAVE_DIR/.solo-train.lock` is locked (`fcntl.flock`, released by the kernel when the holder
  exits, however it dies) by global rank 0 for the whole run, and names its holder (pid, host,
  start time): a second job on the same save dir is refused before it writes anything, instead
  of both colliding at their first save. On NFS, Linux maps flock onto fcntl locks, which hold
  across clients.
* Under torchrun every rank asks the kernel for SIGKILL when its parent (torchrun) dies
  (`prctl(PR_SET_PDEATHSIG)`): a SIGKILL of torchrun alone would otherwise leave ranks training
  and checkpointing on their own. Where prctl does not exist, a thread polls the parent pid.
"""

from __future__ import annotations

import ctypes
import datetime
import fcntl
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

LOCK_FILE = ".solo-train.lock"
PR_SET_PDEATHSIG = 1  # linux/prctl.h

_held: dict[Path, object] = {}  # save dir -> its open lock file (closing it would release the lock)


class SaveDirBusy(ValueError):
    pass


def guard_run(save_dir: str | Path) -> None:
    """Collective, once per run after the process group exists: die with the launcher, then lock
    `save_dir` (every rank raises SaveDirBusy if another run holds it)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun; a plain process keeps nohup semantics
        die_with_parent()
    problem = lock_save_dir(save_dir) if dist.get_rank() == 0 else None
    verdict = [problem]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise SaveDirBusy(verdict[0])


def lock_save_dir(save_dir: str | Path) -> str | None:
    """Take the lock for this process's lifetime; returns why not, or None once held."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    if save_dir.resolve() in _held:  # a second stage run in the same process (flock is per open file)
        return None
    path = save_dir / LOCK_FILE
    lock = open(path, "a+")  # never truncated before the lock is ours: it names the holder
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown holder"
        lock.close()
        return (f"{save_dir} is in use by another run ({holder}; lock {path}). Wait for it to end, stop it, "
                f"or give this run another save_dir")
    lock.seek(0)
    lock.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
    lock.flush()
    _held[save_dir.resolve()] = lock
    return None


def die_with_parent() -> None:
    """SIGKILL this process when its parent exits (no save: the job around it is gone)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True, name="parent-watch").start()


def _watch_parent(parent: int, interval_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(interval_s)
    os.kill(os.getpid(), signal.SIGKILL)
