"""Launch a tests/dist worker script under torchrun on gloo ranks and fail with its output."""

import os
import subprocess
import sys
from pathlib import Path

from solo.distributed import free_port

DIST_DIR = Path(__file__).parent / "dist"


def torchrun(script: str, nproc: int, *args: str, timeout: int = 600) -> str:
    """`script`: a file in tests/dist, or `-m package.module`."""
    target = script.split() if script.startswith("-m ") else [str(DIST_DIR / script)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        *target, *map(str, args),
    ]
    # One intra-op thread per rank: several ranks share 2 cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout
