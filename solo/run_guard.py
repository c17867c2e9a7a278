"""One run per save dir, and no rank outliving its launcher.

* `SAVE_DIR/.solo-train.lock` is locked (`fcntl.flock`, released by the kernel when the holder
  exits, however it dies) by global rank 0 for the whole run, and names its holder (pid, host,
  start time): a second job on the same save dir is refused before it writes anything, instead
  of both colliding at their first save. On NFS, Linux maps flock onto fcntl locks, which hold
  across clients.
  A run that finds the lock held by a pid of this host that no longer exists waits (up to
  `REMNANT_WAIT_S`) for what that run left behind to exit, then names the processes still holding
  it: a kernel releases the lock only when the last process sharing the open file is gone.
* Under torchrun every rank asks the kernel for SIGKILL when its parent (torchrun) dies
  (`prctl(PR_SET_PDEATHSIG)`): a SIGKILL of torchrun alone would otherwise leave ranks training
  and checkpointing on their own. torchrun starts each rank in a session of its own, so the
  processes a rank forks (megatron-core's checkpoint writers fork one per bucket) are out of reach
  of a signal to the job's process group, and a parent-death signal is not inherited: a fork
  hook asks it again in every child, tied to the forking thread (the main thread for the writers),
  or, for a fork from another thread, which may end before its child should, to the parent
  process through a polling thread. Without it a writer killed mid-save outlives its rank by the
  seconds its fsync takes, holding the inherited lock. Where prctl does not exist, a thread polls
  the parent pid.
"""

from __future__ import annotations

import ctypes
import datetime
import fcntl
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import torch.distributed as dist

LOCK_FILE = ".solo-train.lock"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
HOLDER_RECORD = re.compile(r"pid (?P<pid>\d+) on (?P<host>\S+), since \S+")  # as lock_save_dir writes it
REMNANT_WAIT_S = 30.0  # a SIGKILLed writer in the middle of an fsync exits when the fsync returns

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


def lock_save_dir(save_dir: str | Path, remnant_wait_s: float = REMNANT_WAIT_S) -> str | None:
    """Take the lock for this process's lifetime; returns why not, or None once held."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    if save_dir.resolve() in _held:  # a second stage run in the same process (flock is per open file)
        return None
    path = save_dir / LOCK_FILE
    lock = open(path, "a+")  # never truncated before the lock is ours: it names the holder
    deadline = time.monotonic() + remnant_wait_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown holder"
            if not _holder_exited(holder):
                lock.close()
                return (f"{save_dir} is in use by another run ({holder}; lock {path}). Wait for it to end, "
                        f"stop it, or give this run another save_dir")
            if time.monotonic() >= deadline:
                lock.close()
                remnants = ", ".join(f"pid {p.pid} ({' '.join(p.cmdline())[:80]})" for p in _processes_holding(path))
                return (f"{save_dir} is locked by processes left by an earlier run ({holder}, which has exited): "
                        f"{remnants or 'holders not visible to this user'}; lock {path}. Stop them, then run again")
            time.sleep(0.2)
    lock.seek(0)
    lock.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")  # read by HOLDER_RECORD
    lock.flush()
    _held[save_dir.resolve()] = lock
    return None


def _holder_exited(holder: str) -> bool:
    """Whether the lock's record names a process of this host that no longer exists."""
    record = HOLDER_RECORD.fullmatch(holder)
    return bool(record) and record["host"] == socket.gethostname() and not psutil.pid_exists(int(record["pid"]))


def _processes_holding(path: Path) -> list[psutil.Process]:
    target, found = str(path.resolve()), []
    for process in psutil.process_iter():
        try:
            if any(f.path == target for f in process.open_files()):
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


_fork_hook = threading.local()  # per thread: a fork's before-hook and its child's hook see the same one
_fork_hook_registered = False  # inherited by forked children, whose own forks the hook already covers


def die_with_parent() -> None:
    """SIGKILL this process when its parent exits (no save: the job around it is gone), and
    likewise every process it forks from now on."""
    global _fork_hook_registered
    parent = os.getppid()
    _ask_for_parent_death(parent, on_main_thread=threading.current_thread() is threading.main_thread())
    if not _fork_hook_registered:
        _fork_hook_registered = True
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _before_fork() -> None:
    _fork_hook.parent = os.getpid()
    _fork_hook.on_main_thread = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    parent = getattr(_fork_hook, "parent", None)
    if parent is not None:
        _ask_for_parent_death(parent, on_main_thread=_fork_hook.on_main_thread)


def _ask_for_parent_death(parent: int, on_main_thread: bool) -> None:
    """PR_SET_PDEATHSIG fires when the thread that forked this process ends: from the main thread
    that is the process; from another thread a poll of the parent pid is what follows the process.
    A DataLoader worker's read-ahead thread wants the thread tie (solo.data.loader asks it itself)."""
    if sys.platform.startswith("linux") and on_main_thread:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the request: nobody will send it
            os.kill(os.getpid(), signal.SIGKILL)
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="parent-watch").start()


def _watch_parent(parent: int, interval_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(interval_s)
    os.kill(os.getpid(), signal.SIGKILL)
