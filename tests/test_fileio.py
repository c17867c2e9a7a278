"""solo.fileio: the one atomic write (old file intact and no temporary on any failure, file and
folder fsynced around the rename), durable renames, the checksum, and the kernel copy with each of
its fallbacks giving the same bytes."""

import errno
import io
import os
import re
from pathlib import Path

import pytest
import xxhash

from solo import fileio
from tests.tmpfs import full_disk_open, mount_tmpfs, unmount

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def synced(monkeypatch):
    """Every fsync, rename and replace, in order: ("fsync", path) / ("replace", src, dst)."""
    events, fsync, replace = [], os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events


def test_atomic_write_replaces_the_file_and_syncs_it_then_the_folder(tmp_path, synced):
    target = tmp_path / "latest"
    target.write_text("old\n")
    fileio.atomic_write_text(target, "iter_0000004\n")
    assert target.read_text() == "iter_0000004\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    tmp = str(tmp_path / ".tmp-latest")
    # The data reaches the disk before the rename makes it visible, the rename before we return.
    assert synced == [("fsync", tmp), ("replace", tmp, str(target)), ("fsync", str(tmp_path))]


def test_text_and_json_are_thin_wrappers(tmp_path):
    fileio.atomic_write_json(tmp_path / "m.json", {"shards": [1, 2]})
    assert (tmp_path / "m.json").read_text() == '{\n "shards": [\n  1,\n  2\n ]\n}\n'
    fileio.atomic_write_json(tmp_path / "r.json", {"a": 1}, indent=2)
    assert (tmp_path / "r.json").read_text() == '{\n  "a": 1\n}\n'
    fileio.atomic_write(tmp_path / "b", bytes(range(256)))
    assert (tmp_path / "b").read_bytes() == bytes(range(256))


@pytest.mark.parametrize("old", [b"the previous manifest\n", None])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, old):
    target = tmp_path / "manifest.json"
    if old is not None:
        target.write_bytes(old)
    monkeypatch.setattr(fileio, "open", full_disk_open(".tmp-manifest.json"), raising=False)
    with pytest.raises(OSError, match="No space left") as failed:
        fileio.atomic_write_json(target, {"shards": list(range(1000))})
    # A failed write names no file; the error must say which one (and so which disk).
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(tmp_path / ".tmp-manifest.json")
    assert [p.name for p in tmp_path.iterdir()] == ([] if old is None else ["manifest.json"])
    if old is not None:
        assert target.read_bytes() == old


def test_a_failed_fsync_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    target.write_text("{}")

    def full(fd):  # NFS and delayed allocation report a full disk at fsync
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left") as failed:
        fileio.atomic_write_text(target, "new")
    assert failed.value.filename == str(tmp_path / ".tmp-result.json")
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"] and target.read_text() == "{}"


def test_an_interrupt_mid_write_leaves_no_temporary(tmp_path, monkeypatch):
    def interrupted(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        f.write = lambda data: (_ for _ in ()).throw(KeyboardInterrupt())
        return f

    monkeypatch.setattr(fileio, "open", interrupted, raising=False)
    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write(tmp_path / "x", b"data")
    assert list(tmp_path.iterdir()) == []


def test_a_real_full_disk_leaves_the_old_file_and_no_temporary(tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "64k")
    try:
        target = disk / "manifest.json"
        fileio.atomic_write_text(target, "old")
        with pytest.raises(OSError) as failed:
            fileio.atomic_write(target, os.urandom(1 << 20))
        assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(disk / ".tmp-manifest.json")
        assert [p.name for p in disk.iterdir()] == ["manifest.json"] and target.read_text() == "old"
    finally:
        unmount(disk)


def test_replace_durably_moves_a_folder_and_syncs_it_and_its_parent(tmp_path, synced):
    staged = tmp_path / ".tmp-iter_0000002"
    staged.mkdir()
    (staged / "common.pt").write_bytes(b"x")
    fileio.replace_durably(staged, tmp_path / "iter_0000002")
    assert (tmp_path / "iter_0000002" / "common.pt").read_bytes() == b"x" and not staged.exists()
    assert synced == [("fsync", str(staged)), ("replace", str(staged), str(tmp_path / "iter_0000002")),
                      ("fsync", str(tmp_path))]


def test_naming_fills_in_only_a_missing_file_name(tmp_path):
    with pytest.raises(OSError) as unnamed, fileio.naming(tmp_path / "spill"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert unnamed.value.filename == str(tmp_path / "spill")
    with pytest.raises(OSError) as named, fileio.naming(tmp_path / "spill"):
        raise OSError(errno.ENOENT, "No such file", "/in/put.tar")
    assert named.value.filename == "/in/put.tar"


def test_discard_removes_a_temporary_whose_close_fails(tmp_path):
    class FullOnClose:
        closed = False

        def close(self):
            self.closed = True
            raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / ".tmp-x").write_bytes(b"half")
    f = FullOnClose()
    fileio.discard(tmp_path / ".tmp-x", f)
    fileio.discard(tmp_path / ".tmp-never-written")
    assert f.closed and list(tmp_path.iterdir()) == []


def test_checksum_is_xxh3_128_of_the_whole_file(tmp_path):
    data = os.urandom((1 << 22) + 12345)  # more than one read block
    (tmp_path / "f").write_bytes(data)
    assert fileio.CHECKSUM == "xxh3_128"
    assert fileio.checksum_file(tmp_path / "f") == xxhash.xxh3_128(data).hexdigest()
    (tmp_path / "f").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert fileio.checksum_file(tmp_path / "f") != xxhash.xxh3_128(data).hexdigest()


# -- kernel copies -----------------------------------------------------------------------------

def _kernel(monkeypatch, how):
    """os.copy_file_range as the kernels, file systems and sandboxes that refuse or shorten it answer."""
    real, calls = os.copy_file_range, []

    def fake(src, dst, count, offset_src=None, *args):
        calls.append(count)
        if how in ("EXDEV", "EPERM", "ENOSYS"):
            raise OSError(getattr(errno, how), os.strerror(getattr(errno, how)))
        if how == "zero" and len(calls) % 2 == 0:  # overlayfs / FUSE: nothing copied, the source goes on
            return 0
        return real(src, dst, min(count, 1000), offset_src, *args)  # short copies

    if how == "missing":  # macOS, Windows
        monkeypatch.delattr(os, "copy_file_range")
    elif how != "kernel":
        monkeypatch.setattr(os, "copy_file_range", fake)
    return calls


@pytest.mark.parametrize("how", ["kernel", "EXDEV", "EPERM", "ENOSYS", "short", "zero", "missing"])
def test_copy_range_gives_the_same_bytes_on_every_path(tmp_path, monkeypatch, how):
    monkeypatch.setattr(fileio, "_CHUNK", 4096)  # several pread rounds per fallback copy
    data = os.urandom(50_000)
    (tmp_path / "src").write_bytes(data)
    calls = _kernel(monkeypatch, how)
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "wb") as dst:
        dst.write(b"head")
        dst.flush()
        fileio.copy_range(src.fileno(), dst.fileno(), 1234, 20_000)
        fileio.copy_range(src.fileno(), dst.fileno(), 0, 10)
    assert (tmp_path / "dst").read_bytes() == b"head" + data[1234:21234] + data[:10]
    if how in ("EXDEV", "EPERM", "ENOSYS"):  # refused once per copy, then read and written to its end
        assert calls == [20_000, 10]
    elif how == "short":  # at most 1000 bytes a call
        assert len(calls) == 21
    elif how == "zero":  # every other call copies nothing: pread takes over for that round
        assert len(calls) >= 4


def test_read_range_reads_exactly_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "_CHUNK", 1000)
    data = os.urandom(10_000)
    (tmp_path / "src").write_bytes(data)
    with open(tmp_path / "src", "rb") as src:
        got = fileio.read_range(src.fileno(), 777, 8000)
        assert bytes(got) == data[777:8777]
        with pytest.raises(OSError, match="source file ended 1 bytes early") as short:
            fileio.read_range(src.fileno(), 9000, 1001)
    assert short.value.errno == errno.EIO


@pytest.mark.parametrize("how", ["kernel", "EXDEV"])
def test_a_source_that_ends_early_is_eio_on_both_paths(tmp_path, monkeypatch, how):
    (tmp_path / "src").write_bytes(b"x" * 100)
    _kernel(monkeypatch, how)
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "wb") as dst:
        with pytest.raises(OSError, match="ended 50 bytes early") as short:
            fileio.copy_range(src.fileno(), dst.fileno(), 50, 100)
    assert short.value.errno == errno.EIO


def test_a_full_disk_in_the_kernel_copy_is_raised_not_retried(tmp_path, monkeypatch):
    calls = []

    def full(*args):
        calls.append(args)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    (tmp_path / "src").write_bytes(b"x" * 100)
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "wb") as dst:
        with pytest.raises(OSError, match="No space left"):
            fileio.copy_range(src.fileno(), dst.fileno(), 0, 100)
    assert len(calls) == 1


def test_fileno_or_none(tmp_path):
    with open(tmp_path / "f", "wb") as f:
        assert fileio.fileno_or_none(f) == f.fileno()
    assert fileio.fileno_or_none(io.BytesIO()) is None and fileio.fileno_or_none(object()) is None


def test_the_library_renames_and_syncs_only_through_fileio():
    """One place for file safety: no other module of solo/ or megatron_patches/ renames or fsyncs."""
    pattern = re.compile(r"\bos\.(replace|rename|renames|fsync|fdatasync)\(|\.rename\(")
    offenders = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                 for folder in ("solo", "megatron_patches") for path in sorted((ROOT / folder).rglob("*.py"))
                 if path != ROOT / "solo" / "fileio.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
