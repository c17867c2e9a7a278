"""`python -m solo.train` (or a tests/dist script) as one process or as torchrun's ranks, started warm.

Every start of solo.train imports torch and megatron-core again (about 5 s of a core per process:
most of what a test of a bad config or a damaged checkpoint costs, and with 4 or 8 ranks on the
2-core test machine, 10-20 s of every distributed test). A helper process imports them once and
forks each run, which then executes solo.train's `__main__` as `python -m` does (runpy, a fresh
module), in its own session, with its own arguments, environment and output files; it exits as a
process does (threads joined, exit handlers run, streams flushed). The status is the process's:
the exit code, or minus the signal that killed it, as subprocess reports it.

With `nproc`, the helper forks the ranks torchrun would start, each in a session of its own with
the environment torchrun gives it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, TORCHELASTIC_RUN_ID, ...; rank 0 hosts the rendezvous store, as without an agent),
their output interleaved in one pair of files; when a rank fails the others are killed and the
status is the first failure's, as torchrun ends a job. What this does not give is torchrun's own
process (its signal forwarding, its exit codes): tests of those launch the real torchrun
(tests/test_reliability.py `launch`, tests/test_demo.py).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELPER = r"""
import atexit, json, os, runpy, signal, sys, threading, traceback, types
import solo.train  # what every run imports: torch, megatron-core, solo
del sys.modules["solo.train"]  # each run executes it afresh as __main__, as `python -m solo.train`


def run(job, rank_env):
    os.setsid()
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update({**job["env"], **rank_env})
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):  # truncated by the caller; ranks share them
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
    code = 0
    try:
        if job["script"] is not None:  # python SCRIPT ARGS
            sys.argv = [job["script"], *job["args"]]
            sys.path.insert(0, os.path.dirname(job["script"]))
            runpy.run_path(job["script"], run_name="__main__")
        elif job["code"] is None:
            sys.argv = ["solo.train", *job["args"]]
            runpy.run_module("solo.train", run_name="__main__", alter_sys=True)
        else:  # python -c CODE ARGS
            sys.argv = ["-c", *job["args"]]
            main = types.ModuleType("__main__")
            sys.modules["__main__"] = main
            exec(compile(job["code"], "<string>", "exec"), main.__dict__)
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank_envs(nproc, master_port):  # what torchrun's agent sets for each of nproc ranks on one node
    if nproc is None:
        return [{}]
    common = {"WORLD_SIZE": nproc, "LOCAL_WORLD_SIZE": nproc, "ROLE_WORLD_SIZE": nproc, "GROUP_RANK": 0,
              "GROUP_WORLD_SIZE": 1, "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": master_port,
              "TORCHELASTIC_RUN_ID": "warm", "TORCHELASTIC_RESTART_COUNT": 0, "TORCHELASTIC_MAX_RESTARTS": 0}
    return [{k: str(v) for k, v in {**common, "RANK": r, "LOCAL_RANK": r, "ROLE_RANK": r}.items()}
            for r in range(nproc)]


print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush()
    pids = []
    for rank_env in rank_envs(job["nproc"], job["master_port"]):
        pid = os.fork()
        if pid == 0:
            run(job, rank_env)
        pids.append(pid)
    print(json.dumps({"pids": pids}), flush=True)
    running, failure = set(pids), 0
    while running:
        pid, status = os.waitpid(-1, 0)
        if pid not in running:
            continue
        running.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and failure == 0:  # as torchrun ends a job: the first failure stops the rest
            failure = code
            for other in running:
                try:
                    os.killpg(other, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    print(json.dumps({"returncode": failure}), flush=True)
"""

# Read when torch and its OpenMP runtime load, before any run's own environment applies: one intra-op
# thread (several processes share the test machine's cores), no warnings (every test run sets both).
HELPER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
_helper: subprocess.Popen | None = None


def _start() -> subprocess.Popen:
    global _helper
    if _helper is None or _helper.poll() is not None:  # none yet, or killed by a test's cleanup
        log = tempfile.NamedTemporaryFile("w+", prefix="solo-warm-", suffix=".log", delete=False)
        _helper = subprocess.Popen([sys.executable, "-c", HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=log, text=True, env=HELPER_ENV)
        _helper.log = log
        atexit.register(_helper.kill)
        if _reply(_helper, time.monotonic() + 600) is None:  # its imports: ~14 s of CPU, minutes on a busy machine
            _helper.kill()
            raise AssertionError("the warm solo.train helper did not start within 600 s")
    return _helper


def _reply(helper: subprocess.Popen, deadline: float) -> dict | None:
    """The helper's next line, or None at the deadline."""
    while not select.select([helper.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
        if time.monotonic() >= deadline:
            return None
    line = helper.stdout.readline()
    if not line:
        helper.log.seek(0)
        raise AssertionError(f"the warm solo.train helper died:\n{helper.log.read()[-4000:]}")
    return json.loads(line)


def run_train(args: list[str], env: dict, out: Path, err: Path, timeout: float, cwd: str | Path = ".",
              code: str | None = None, script: str | Path | None = None,
              nproc: int | None = None) -> subprocess.CompletedProcess:
    """`python -m solo.train ARGS` (or `python -c CODE ARGS`, for code that imports solo.train, or
    `python SCRIPT ARGS`) with `env`, its stdout and stderr written to `out` and `err`; with
    `nproc`, as the ranks of `torchrun --nproc_per_node NPROC`.
    Its process groups are killed when it ends (checkpoint writer helpers included); past `timeout`
    it is killed and subprocess.TimeoutExpired raised, as subprocess.run does."""
    from solo.distributed import free_port

    for path in (out, err):  # here, so that a path the run cannot open fails in the test, not in the fork
        Path(path).write_text("")
    helper = _start()
    job = {"args": list(map(str, args)), "env": env, "cwd": str(Path(cwd).resolve()),
           "stdout": str(out), "stderr": str(err), "code": code, "script": None if script is None else str(script),
           "nproc": nproc, "master_port": free_port() if nproc else None}
    helper.stdin.write(json.dumps(job) + "\n")
    helper.stdin.flush()
    pids = _reply(helper, time.monotonic() + 60)["pids"]
    done = _reply(helper, time.monotonic() + timeout)
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    target = ["-m", "solo.train"] if code is None and script is None else [str(script)] if script else ["-c", code]
    cmd = [sys.executable, *target, *job["args"]]
    if done is None:
        _reply(helper, time.monotonic() + 60)  # the helper reaps the killed run
        raise subprocess.TimeoutExpired(cmd, timeout)
    return subprocess.CompletedProcess(cmd, done["returncode"], Path(out).read_text(), Path(err).read_text())
