"""Launch `solo.train` or a tests/dist worker script as torchrun's ranks on gloo, and fail with its output.

The ranks are forked warm by tests/warm.py (torch and megatron-core imported once for the whole
suite) with the environment torchrun gives them; SOLO_TESTS_REAL_TORCHRUN=1 launches the real
`torchrun` instead, for every call. Tests of what torchrun itself does with signals and exit codes
launch it directly (tests/test_reliability.py `launch`).
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from solo.distributed import free_port
from tests.warm import run_train

DIST_DIR = Path(__file__).parent / "dist"
# One intra-op thread per rank: several ranks share 2 cores.
ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(script: str, nproc: int, *args: str, timeout: int = 600, fresh: bool = False) -> str:
    """`script`: a file in tests/dist, or `-m package.module`. Returns the ranks' stdout.
    `fresh`: real torchrun, for a check of what a process holds before solo is imported (the warm
    helper has imported solo.train, and with it solo.checkpoint's safe-load patch)."""
    module = script.split()[1] if script.startswith("-m ") else None
    env = {**os.environ, **ENV}
    if fresh or os.environ.get("SOLO_TESTS_REAL_TORCHRUN") == "1" or module not in (None, "solo.train"):
        target = ["-m", module] if module else [str(DIST_DIR / script)]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *target, *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    else:
        with tempfile.TemporaryDirectory(prefix="solo-ranks-") as logs:
            proc = run_train(list(args), env, Path(logs) / "stdout", Path(logs) / "stderr", timeout,
                             script=None if module else DIST_DIR / script, nproc=nproc)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout
