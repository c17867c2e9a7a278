"""Full disks for tests: a real one (a small tmpfs mounted on a test folder, needs root as in CI), or
ENOSPC injected into one module's writes."""

import contextlib
import errno
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


def full_disk_open(name: str):
    """An `open` to monkeypatch into a module: a file called `name` opened for writing takes a few
    bytes, then fails with ENOSPC naming no file, as a write to a full disk does. No root needed."""
    def opener(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if Path(path).name == name and "w" in mode:
            write = f.write

            def full(data):
                write(data[:7])
                raise OSError(errno.ENOSPC, "No space left on device")

            f.write = full
        return f

    return opener
