"""`python -m solo.train` as one process, started warm.

Every start of solo.train imports torch and megatron-core again (about 14 s of CPU, most of what a
test of a bad config or a damaged checkpoint costs). A helper process imports them once and forks
each run, which then executes solo.train's `__main__` as `python -m` does (runpy, a fresh module),
in its own session, with its own arguments, environment and output files; it exits as a process
does (threads joined, exit handlers run, streams flushed). The status is the process's: the exit
code, or minus the signal that killed it, as subprocess reports it.
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
import atexit, json, os, runpy, sys, threading, traceback, types
import solo.train  # what every run imports: torch, megatron-core, solo
del sys.modules["solo.train"]  # each run executes it afresh as __main__, as `python -m solo.train`


def run(job):
    os.setsid()
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    code = 0
    try:
        if job["code"] is None:
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


print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        run(job)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
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
              code: str | None = None) -> subprocess.CompletedProcess:
    """`python -m solo.train ARGS` (or `python -c CODE ARGS`, for code that imports solo.train) with
    `env`, its stdout and stderr written to `out` and `err`.
    Its process group is killed when it ends (checkpoint writer helpers included); past `timeout`
    it is killed and subprocess.TimeoutExpired raised, as subprocess.run does."""
    for path in (out, err):  # here, so that a path the run cannot open fails in the test, not in the fork
        Path(path).write_text("")
    helper = _start()
    job = {"args": list(map(str, args)), "env": env, "cwd": str(Path(cwd).resolve()),
           "stdout": str(out), "stderr": str(err), "code": code}
    helper.stdin.write(json.dumps(job) + "\n")
    helper.stdin.flush()
    pid = _reply(helper, time.monotonic() + 60)["pid"]
    done = _reply(helper, time.monotonic() + timeout)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    cmd = [sys.executable, *(["-m", "solo.train"] if code is None else ["-c", code]), *job["args"]]
    if done is None:
        _reply(helper, time.monotonic() + 60)  # the helper reaps the killed run
        raise subprocess.TimeoutExpired(cmd, timeout)
    return subprocess.CompletedProcess(cmd, done["returncode"], Path(out).read_text(), Path(err).read_text())
