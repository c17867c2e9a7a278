"""solo.run_guard: the save_dir lock and processes that die with their launcher, with real
processes (a stand-in launcher, a rank in a session of its own as torchrun starts it, and a
multiprocessing fork as megatron-core's checkpoint writers are made)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from solo import run_guard

RANK = textwrap.dedent("""
    import json, multiprocessing, sys, time
    from solo.run_guard import die_with_parent, lock_save_dir
    die_with_parent()
    assert lock_save_dir(sys.argv[1]) is None
    writer = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
    writer.start()
    with open(sys.argv[2] + ".tmp", "w") as f:
        json.dump({"rank": multiprocessing.current_process().pid, "writer": writer.pid}, f)
    import os; os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    time.sleep(120)
""")

LAUNCHER = textwrap.dedent("""
    import subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], start_new_session=True)
    time.sleep(120)
""")


def _wait_for(path: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)
    return json.loads(path.read_text())


@pytest.fixture
def release():
    """Locks this test process took are released after it."""
    yield
    for path in list(run_guard._held):
        run_guard._held.pop(path).close()


def test_a_process_a_rank_forked_dies_with_it_when_the_launcher_is_killed(tmp_path, release):
    """torchrun puts each rank in a session of its own: a kill of the job's process group reaches
    the launcher alone, the rank dies of its parent-death signal, and a checkpoint writer it forked
    must die too, or it keeps the inherited save_dir lock and the restart is refused."""
    pids = tmp_path / "pids.json"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK, str(tmp_path / "run"), str(pids)],
                                start_new_session=True)
    try:
        started = _wait_for(pids)
        processes = [psutil.Process(started["rank"]), psutil.Process(started["writer"])]
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        _, alive = psutil.wait_procs(processes, timeout=10)
        assert not alive, f"{[p.pid for p in alive]} outlived the launcher (rank {started['rank']})"
        assert run_guard.lock_save_dir(tmp_path / "run", remnant_wait_s=0) is None
    finally:
        launcher.kill()
        for pid in json.loads(pids.read_text()).values() if pids.exists() else ():
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)


HOLDER = textwrap.dedent("""
    import os, sys, time
    from solo.run_guard import lock_save_dir
    assert lock_save_dir(sys.argv[1]) is None
    child = os.fork()
    if child == 0:  # shares the open lock file, and outlives its parent
        time.sleep(float(sys.argv[2]))
        os._exit(0)
    print(os.getpid(), child, flush=True)
    if float(sys.argv[3]) == 0:
        os._exit(0)
    time.sleep(float(sys.argv[3]))
""")


def _hold(save_dir: Path, child_s: float, parent_s: float) -> tuple[subprocess.Popen, int, int]:
    """A run that took the lock and forked a child: (its Popen, its pid, the child's pid)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(save_dir), str(child_s), str(parent_s)],
                              stdout=subprocess.PIPE, text=True)
    pid, child = map(int, holder.stdout.readline().split())
    return holder, pid, child


def test_a_lock_left_by_an_exited_run_is_waited_for_then_its_holders_are_named(tmp_path, release):
    save_dir = tmp_path / "run"
    holder, pid, child = _hold(save_dir, child_s=4, parent_s=0)
    holder.wait()
    problem = run_guard.lock_save_dir(save_dir, remnant_wait_s=0.5)
    assert problem and f"pid {pid} on {os.uname().nodename}" in problem and "which has exited" in problem, problem
    assert f"pid {child} (" in problem, problem
    started = time.monotonic()
    assert run_guard.lock_save_dir(save_dir, remnant_wait_s=30) is None  # the remnant exits at 4 s
    assert time.monotonic() - started < 10


def test_a_lock_held_by_a_live_run_is_refused_at_once(tmp_path, release):
    save_dir = tmp_path / "run"
    holder, pid, _ = _hold(save_dir, child_s=0, parent_s=60)
    try:
        started = time.monotonic()
        problem = run_guard.lock_save_dir(save_dir, remnant_wait_s=30)
        assert problem and f"is in use by another run (pid {pid} on {os.uname().nodename}" in problem, problem
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
