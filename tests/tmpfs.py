"""A real full disk for tests: a small tmpfs mounted on a test folder (needs root, as in CI)."""

import contextlib
import subprocess
from pathlib import Path

import pytest


def mount_tmpfs(folder: Path, size: str) -> None:
    """Mount a tmpfs of `size` (e.g. "1m") on `folder`, or skip the test where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"needs permission to mount a small tmpfs for a real full disk ({e})")


def resize_tmpfs(folder: Path, size: str) -> None:
    """The operator frees space."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True, timeout=30)


def unmount(folder: Path) -> None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)
