"""solo.data.shards: the shard format written by ShardWriter and read back through megatron-core's
IndexedDataset, and the errors open_shard gives for damaged shards."""

import errno
import io
import json
import os
import shutil

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from solo.data.shards import (
    PATCH_ID,
    PackedSample,
    PatchesInFile,
    ShardError,
    ShardWriter,
    list_shards,
    open_shard,
    read_folder_manifest,
)
from solo.fileio import atomic_write_json

P = 4  # 3*4*4 = 48 values per patch keeps the files tiny
SEQ = 64


def image_doc(rng, rows, cols, text):
    """<s> <vision> rows of <vpatch> sep... </vision> text </s>, loss on the text and </s>."""
    ids = [1, 32000]
    for r in range(rows):
        ids += ([32002] if r else []) + [PATCH_ID] * cols
    ids += [32004] + text + [2]
    loss = [0] * (len(ids) - len(text) - 1) + [1] * (len(text) + 1)
    return ids, loss, [rng.integers(0, 256, (rows * cols, 3 * P * P), dtype=np.uint8)]


def text_doc(rng, n):
    ids = [1] + list(rng.integers(3, 32000, n - 1))
    return ids, [0] + [1] * (n - 1), []


def make_samples(seed=0, with_images=True):
    rng = np.random.default_rng(seed)
    groups = [[text_doc(rng, 20 + seed), text_doc(rng, 30)]]  # a sample without images
    if with_images:
        groups += [[image_doc(rng, 2, 3, [100, 200]), text_doc(rng, 9), image_doc(rng, 1, 1, [5])],
                   [image_doc(rng, 3, 2, [7, 8, 9])]]
    return [PackedSample(tokens=np.array([t for d in g for t in d[0]], np.int32),
                         loss_mask=np.array([x for d in g for x in d[1]], np.uint8),
                         document_lengths=[len(d[0]) for d in g],
                         patches=[p for d in g for p in d[2]]) for g in groups]


def write(folder, k=0, samples=None, **manifest):
    prefix = folder / f"shard-{k:05d}"
    writer = ShardWriter(prefix, P, SEQ)
    for s in samples if samples is not None else make_samples(k):
        writer.add_sample(s)
    writer.finish({"seq_length": SEQ, "patch_size": P, **manifest})
    return prefix


def test_roundtrip_through_megatron_indexed_dataset(tmp_path):
    samples = make_samples()
    prefix = write(tmp_path, samples=samples)
    shard = open_shard(prefix, verify_checksum=True)
    assert len(shard) == 3
    for i, expected in enumerate(samples):
        got = shard.sample(i)
        np.testing.assert_array_equal(got.tokens, expected.tokens)
        np.testing.assert_array_equal(got.loss_mask, expected.loss_mask)
        assert got.document_lengths == expected.document_lengths
        assert len(got.patches) == len(expected.patches)
        for a, b in zip(got.patches, expected.patches, strict=True):
            np.testing.assert_array_equal(a, b)
    # The raw megatron-core view: one sequence per document, document_indices group samples; an
    # image-free sample is an empty pixel group.
    tokens = IndexedDataset(f"{prefix}.tokens")
    assert list(tokens.document_indices) == [0, 2, 5, 6]
    assert list(tokens.sequence_lengths) == [d for s in samples for d in s.document_lengths]
    pixels = IndexedDataset(f"{prefix}.pixels")
    assert list(pixels.document_indices) == [0, 0, 2, 3]
    assert list(pixels.sequence_lengths) == [6 * 48, 1 * 48, 6 * 48]
    assert tokens.index.dtype == np.int32 and pixels.index.dtype == np.uint8
    counts = shard.manifest["counts"]
    assert counts["samples"] == 3 and counts["images"] == 3 and counts["vision_tokens"] == 13
    assert counts["tokens"] == sum(len(s.tokens) for s in samples)
    assert counts["padding_tokens"] == 3 * SEQ - counts["tokens"]
    assert counts["loss_tokens"] == sum(int(s.loss_mask.sum()) for s in samples)


def test_shard_without_images_has_an_empty_pixels_bin(tmp_path):
    prefix = write(tmp_path, samples=make_samples(with_images=False))
    assert (tmp_path / "shard-00000.pixels.bin").stat().st_size == 0
    shard = open_shard(prefix, verify_checksum=True)
    assert len(shard) == 1 and shard.sample(0).patches == []


def test_shard_whose_records_were_all_skipped_has_no_samples(tmp_path):
    prefix = write(tmp_path, samples=[])
    shard = open_shard(prefix, verify_checksum=True)
    assert len(shard) == 0 and shard.manifest["counts"]["fill"] == 0.0
    with pytest.raises(IndexError, match="out of range"):
        shard.sample(0)
    # Complete, but nothing to train on: listed only on request.
    assert list_shards(tmp_path) == [] and list_shards(tmp_path, include_empty=True) == [str(prefix)]


def test_files_are_renamed_into_place_manifest_last(tmp_path):
    prefix = tmp_path / "shard-00000"
    writer = ShardWriter(prefix, P, SEQ)
    writer.add_sample(make_samples()[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f".tmp-shard-00000.{part}.bin" for part in ("tokens", "loss", "pixels"))
    assert list_shards(tmp_path) == []
    writer.finish({"seq_length": SEQ, "patch_size": P})
    assert list_shards(tmp_path) == [str(prefix)]
    assert not list(tmp_path.glob(".tmp-*"))
    writer2 = ShardWriter(tmp_path / "shard-00001", P, SEQ)
    writer2.add_sample(make_samples()[0])
    writer2.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"shard-00000.{part}.{ext}" for part in ("tokens", "loss", "pixels") for ext in ("bin", "idx")]
        + ["shard-00000.json"])


def _patches_in_file(samples, path):
    """The samples with their patches moved into one file, as solo-preprocess's spill holds them."""
    f = open(path, "w+b")
    moved, offset = [], 0
    for s in samples:
        spans = []
        for p in s.patches:
            f.write(p.tobytes())
            spans.append(PatchesInFile(f.fileno(), offset, p.shape))
            offset += p.nbytes
        moved.append(PackedSample(s.tokens, s.loss_mask, s.document_lengths, spans))
    f.flush()
    return f, moved


class _NoFileno:
    """A data file with no fd, as megatron-core's MultiStorageClient (object store) files are."""

    def __init__(self, f):
        self._f = f

    def fileno(self):
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _fake_kernel_copy(monkeypatch, kernel_copy):
    """os.copy_file_range as the file systems and sandboxes that refuse or shorten it answer."""
    real, calls = os.copy_file_range, []

    def fake(src, dst, count, offset_src=None, *args):
        calls.append(count)
        if kernel_copy == "unsupported":  # across file systems on some kernels
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        if kernel_copy == "seccomp":  # a seccomp filter that does not know the call
            raise OSError(errno.EPERM, "Operation not permitted")
        if len(calls) == 2:  # overlayfs / FUSE: nothing copied, though the source goes on
            return 0
        return real(src, dst, min(count, 100), offset_src, *args)  # short copies

    monkeypatch.setattr(os, "copy_file_range", fake)
    return calls


@pytest.mark.parametrize("kernel_copy", ["copy_file_range", "unsupported", "seccomp", "short", "no_fileno"])
def test_patches_in_a_file_are_stored_exactly_like_arrays(tmp_path, monkeypatch, kernel_copy):
    calls = _fake_kernel_copy(monkeypatch, kernel_copy) if kernel_copy in ("unsupported", "seccomp", "short") else []
    if kernel_copy == "no_fileno":
        from megatron.core.datasets import indexed_dataset

        monkeypatch.setattr(indexed_dataset, "open", lambda path, mode="r", *a, **k:
                            _NoFileno(open(path, mode, *a, **k)) if "w" in mode else open(path, mode, *a, **k),
                            raising=False)
        monkeypatch.setattr(os, "copy_file_range", None)  # never called: there is no fd to copy into
    samples = make_samples()
    (tmp_path / "arrays").mkdir()
    (tmp_path / "file").mkdir()
    reference = write(tmp_path / "arrays", samples=samples)
    spill, moved = _patches_in_file(samples, tmp_path / "spill")
    with spill:
        copied = write(tmp_path / "file", samples=moved)
    for part in ("tokens", "loss", "pixels"):
        for ext in ("bin", "idx"):
            assert (tmp_path / "file" / f"shard-00000.{part}.{ext}").read_bytes() == \
                (tmp_path / "arrays" / f"shard-00000.{part}.{ext}").read_bytes()
    shard = open_shard(copied, verify_checksum=True)
    for i, expected in enumerate(samples):
        for got, want in zip(shard.sample(i).patches, expected.patches, strict=True):
            np.testing.assert_array_equal(got, want)
    assert shard.manifest["files"] == open_shard(reference).manifest["files"]
    if kernel_copy in ("unsupported", "seccomp"):  # refused once, then read and written to the end
        assert len(calls) == 3  # one per image
    elif kernel_copy == "short":  # images of 288, 48, 288 bytes, at most 100 per call, the 2nd answering 0
        assert len(calls) >= 5


def test_a_source_that_really_ends_early_is_a_shard_error(tmp_path):
    samples = make_samples()
    spill, moved = _patches_in_file(samples, tmp_path / "spill")
    p = moved[2].patches[0]
    moved[2].patches[0] = PatchesInFile(p.fd, p.offset + 48, p.shape)  # one patch past the end
    writer = ShardWriter(tmp_path / "shard-00000", P, SEQ)
    with spill, pytest.raises(ShardError, match="shard-00000: cannot write .*source file ended 48 bytes early"):
        for s in moved:
            writer.add_sample(s)
    writer.abort()


def test_a_full_disk_during_the_kernel_copy_is_a_shard_error_and_leaves_nothing(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "copy_file_range", full)
    spill, moved = _patches_in_file(make_samples(), tmp_path / "spill")
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardWriter(out / "shard-00000", P, SEQ)
    with spill, pytest.raises(ShardError, match="shard-00000: cannot write the shard .*No space left"):
        for s in moved:
            writer.add_sample(s)
    writer.abort()
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("change, message", [
    (lambda s: s.loss_mask.__setitem__(1, 1), "loss flag 1 on token 32000"),  # <vision>
    (lambda s: s.loss_mask.__setitem__(0, 1), "never on <s>"),
    (lambda s: s.patches.pop(), "<vpatch> tokens but"),
    (lambda s: s.document_lengths.__setitem__(0, 5), "do not cover"),
    (lambda s: s.patches.__setitem__(0, s.patches[0][:, :10]), "patches must be uint8"),
])
def test_writer_rejects_samples_that_break_the_format(tmp_path, change, message):
    sample = make_samples()[1]
    change(sample)
    writer = ShardWriter(tmp_path / "shard-00000", P, SEQ)
    with pytest.raises(ShardError, match=message) as e:
        writer.add_sample(sample)
    assert "shard-00000: sample 0" in str(e.value)
    writer.abort()


def test_writer_rejects_samples_longer_than_seq_length(tmp_path):
    writer = ShardWriter(tmp_path / "shard-00000", P, seq_length=10)
    with pytest.raises(ShardError, match="50 tokens > seq_length 10"):
        writer.add_sample(make_samples()[0])
    writer.abort()


def _rewrite_manifest(prefix, **files):
    path = prefix.with_name(prefix.name + ".json")
    manifest = json.loads(path.read_text())
    manifest["files"].update(files)
    path.write_text(json.dumps(manifest))


def test_open_shard_errors_name_the_shard_and_the_fault(tmp_path):
    a, b = write(tmp_path, 0), write(tmp_path, 1)

    # A truncated .bin: the size no longer matches the manifest.
    data = (tmp_path / "shard-00000.pixels.bin").read_bytes()
    (tmp_path / "shard-00000.pixels.bin").write_bytes(data[:-100])
    with pytest.raises(ShardError, match=r"shard-00000: shard-00000.pixels.bin has \d+ bytes, the manifest says"):
        open_shard(a)
    (tmp_path / "shard-00000.pixels.bin").write_bytes(data)
    open_shard(a)

    # Same size, one byte flipped: only the checksum sees it.
    flipped = bytearray(data)
    flipped[7] ^= 0xFF
    (tmp_path / "shard-00000.pixels.bin").write_bytes(bytes(flipped))
    open_shard(a)
    with pytest.raises(ShardError, match="shard-00000.pixels.bin does not match its xxh3_128 checksum"):
        open_shard(a, verify_checksum=True)
    (tmp_path / "shard-00000.pixels.bin").write_bytes(data)

    # An .idx from another shard whose sizes happen to be recorded: the index pair disagrees.
    shutil.copy(tmp_path / "shard-00001.loss.idx", tmp_path / "shard-00000.loss.idx")
    shutil.copy(tmp_path / "shard-00001.loss.bin", tmp_path / "shard-00000.loss.bin")
    b_files = json.loads((tmp_path / "shard-00001.json").read_text())["files"]
    _rewrite_manifest(a, **{f"shard-00000.loss.{e}": b_files[f"shard-00001.loss.{e}"] for e in ("bin", "idx")})
    with pytest.raises(ShardError, match="shard-00000: tokens and loss index files disagree"):
        open_shard(a)

    # An .idx that describes more data than its .bin holds.
    shutil.copy(tmp_path / "shard-00001.tokens.idx", tmp_path / "shard-00000.tokens.idx")
    _rewrite_manifest(a, **{"shard-00000.tokens.idx": b_files["shard-00001.tokens.idx"]})
    with pytest.raises(ShardError, match="shard-00000: tokens.idx describes"):
        open_shard(a)

    (tmp_path / "shard-00001.loss.idx").unlink()
    with pytest.raises(ShardError, match="shard-00001: file shard-00001.loss.idx is missing"):
        open_shard(b)
    (tmp_path / "shard-00001.json").unlink()
    with pytest.raises(ShardError, match="no manifest shard-00001.json"):
        open_shard(b)
    assert list_shards(tmp_path) == [str(a)]


def test_folder_helpers(tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        list_shards(tmp_path / "nope")
    with pytest.raises(ShardError, match="no manifest.json"):
        read_folder_manifest(tmp_path)
    atomic_write_json(tmp_path / "manifest.json", {"shards": []})
    assert read_folder_manifest(tmp_path) == {"shards": []}
    assert not list(tmp_path.glob(".tmp-*"))


# -- issue 17: corrupt shard content (ids out of range, loss flags not 0/1) is refused -----------

def _overwrite(path, offset, value, dtype):
    data = bytearray(path.read_bytes())
    data[offset:offset + np.dtype(dtype).itemsize] = np.array([value], dtype).tobytes()
    path.write_bytes(bytes(data))  # same size: only a checksum (off by default) would see it


def _drop_content_keys(prefix):
    path = prefix.with_name(prefix.name + ".json")
    manifest = json.loads(path.read_text())
    del manifest["token_id_range"], manifest["loss_flags"]
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("value", [-7, 2_000_000_000, 33031])
def test_writer_refuses_token_ids_outside_the_vocabulary(tmp_path, value):
    sample = make_samples()[0]
    sample.tokens[3] = value
    writer = ShardWriter(tmp_path / "shard-00000", P, SEQ)
    with pytest.raises(ShardError, match=rf"shard-00000: sample 0: token id {value} at position 3 is outside "
                                         r"\[0, 33031\)"):
        writer.add_sample(sample)
    writer.abort()


def test_manifest_records_the_token_id_range_and_loss_flags_and_open_checks_them(tmp_path):
    prefix = write(tmp_path)
    samples = make_samples()
    manifest = open_shard(prefix).manifest
    tokens = np.concatenate([s.tokens for s in samples])
    assert manifest["token_id_range"] == [int(tokens.min()), int(tokens.max())] and manifest["loss_flags"] == [0, 1]
    for key, value, message in [("token_id_range", [0, 2_000_000_000], r"token ids \[0, 2000000000\] outside"),
                                ("token_id_range", [-7, 40], r"token ids \[-7, 40\] outside"),
                                ("token_id_range", "all", "token_id_range must be"),
                                ("loss_flags", [0, 1, 200], r"loss flags \[0, 1, 200\]")]:
        _rewrite_manifest_keys(prefix, **{key: value})
        with pytest.raises(ShardError, match=rf"shard-00000: {message}"):
            open_shard(prefix)
        _rewrite_manifest_keys(prefix, **{key: manifest[key]})
    open_shard(prefix)


def _rewrite_manifest_keys(prefix, **keys):
    path = prefix.with_name(prefix.name + ".json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **keys}))


@pytest.mark.parametrize("part, value, message", [("tokens", -7, "token id -7"), ("tokens", 2_000_000_000,
                                                   "token id 2000000000"), ("loss", 200, "loss flag 200")])
def test_corrupt_content_is_refused_by_collate_naming_the_shard_and_sample(tmp_path, part, value, message):
    from solo.data.batch import collate

    prefix = write(tmp_path)
    dtype = np.int32 if part == "tokens" else np.uint8
    shard = open_shard(prefix)
    offset = int(shard.parts[part].document_indices[1])  # sample 1's first sequence
    start = int(shard.parts[part].index.sequence_pointers[offset]) + 5 * np.dtype(dtype).itemsize
    del shard
    _overwrite(tmp_path / f"shard-00000.{part}.bin", start, value, dtype)
    shard = open_shard(prefix)  # the manifest's range is fine: only the batch shows the damage
    collate([shard.sample(0)], SEQ)
    with pytest.raises(ShardError, match=rf"{prefix} sample 1: {message} at position 5"):
        collate([shard.sample(0), shard.sample(1)], SEQ)

    # A shard from before the manifest recorded the range: open_shard scans its files instead.
    _drop_content_keys(prefix)
    with pytest.raises(ShardError, match=rf"{prefix}: .*{message.split()[-1]}.* \(corrupt .bin\)"):
        open_shard(prefix)
