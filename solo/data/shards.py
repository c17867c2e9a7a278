"""The shard format: packed SOLO sequences stored as megatron-core IndexedDatasets.

megatron-core's `IndexedDatasetBuilder`/`IndexedDataset` write and memory-map the data. For an
output folder OUT and shard k, prefix = OUT/shard-{k:05d}:

* `{prefix}.tokens.bin/.idx`  int32. One *sequence* per document (or piece of a long text); the
  IndexedDataset *document_indices* group sequences into packed samples, so one packed sample of
  at most seq_length tokens is one IndexedDataset "document" (the reader pads the rest).
* `{prefix}.loss.bin/.idx`    uint8, same lengths and grouping; 1 = this token is a prediction
  target. Never 1 on an id >= 32000 nor on a document's first token.
* `{prefix}.pixels.bin/.idx`  uint8. One sequence per image: its patches as `solo.vision.patchify`
  gives them (row-major grid, (channel, row, column) inside a patch), flattened; grouped per packed
  sample in the order the images appear (a sample without images has an empty group).
* `{prefix}.json`             the shard manifest: counts, options, skipped records by reason, and
  the size and sha256 of every file above. It is renamed into place last, so a shard is complete
  exactly when its manifest exists.
* `OUT/manifest.json`         the folder manifest: totals and the list of complete shards.

Every file is written under a `.tmp-` name, fsynced and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

PARTS = {"tokens": np.int32, "loss": np.uint8, "pixels": np.uint8}
FORMAT_VERSION = 1


class ShardError(ValueError):
    """A shard or shard folder that cannot be used; the message names it."""


@dataclass
class PackedSample:
    tokens: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # uint8 [n]
    document_lengths: list[int]  # sums to n
    patches: list[np.ndarray] = field(default_factory=list)  # uint8 (n_patches, 3P²) per image


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2))
    _fsync_replace(tmp, path)


class ShardWriter:
    """Writes one shard. `add_sample` per packed sample, then `finish(manifest)` (or `abort`)."""

    def __init__(self, prefix: str | Path, patch_size: int):
        self.prefix = Path(prefix)
        self.patch_dim = 3 * patch_size**2
        self.tmp = {part: self.prefix.with_name(f".tmp-{self.prefix.name}.{part}") for part in PARTS}
        self.builders = {part: IndexedDatasetBuilder(f"{self.tmp[part]}.bin", dtype=dtype)
                         for part, dtype in PARTS.items()}
        self.samples = 0

    def add_sample(self, sample: PackedSample) -> None:
        lengths = list(sample.document_lengths)
        tokens = np.asarray(sample.tokens, dtype=np.int32)
        loss = np.asarray(sample.loss_mask, dtype=np.uint8)
        if sum(lengths) != len(tokens) or len(loss) != len(tokens):
            raise ShardError(f"{self.prefix}: sample {self.samples}: document lengths {lengths} do not "
                             f"cover {len(tokens)} tokens / {len(loss)} loss flags")
        import torch

        self.builders["tokens"].add_document(torch.from_numpy(tokens), lengths)
        self.builders["loss"].add_document(torch.from_numpy(loss), lengths)
        patches = [np.asarray(p, dtype=np.uint8).reshape(-1) for p in sample.patches]
        flat = np.concatenate(patches) if patches else np.zeros(0, dtype=np.uint8)
        self.builders["pixels"].add_document(torch.from_numpy(flat), [p.size for p in patches])
        self.samples += 1

    def finish(self, manifest: dict) -> dict:
        files = {}
        for part, builder in self.builders.items():
            builder.finalize(f"{self.tmp[part]}.idx")
            for ext in ("bin", "idx"):
                tmp = Path(f"{self.tmp[part]}.{ext}")
                final = Path(f"{self.prefix}.{part}.{ext}")
                files[final.name] = {"bytes": tmp.stat().st_size, "sha256": _sha256(tmp)}
                _fsync_replace(tmp, final)
        manifest = {**manifest, "format_version": FORMAT_VERSION, "samples": self.samples, "files": files}
        write_json_atomic(Path(f"{self.prefix}.json"), manifest)
        return manifest

    def abort(self) -> None:
        for part, builder in self.builders.items():
            builder.data_file.close()
            for ext in ("bin", "idx"):
                Path(f"{self.tmp[part]}.{ext}").unlink(missing_ok=True)


class Shard:
    """A complete shard, memory-mapped. `sample(i)` returns packed sample i."""

    def __init__(self, prefix: str | Path, manifest: dict, parts: dict[str, IndexedDataset]):
        self.prefix, self.manifest, self.parts = str(prefix), manifest, parts
        self._token_docs = parts["tokens"].document_indices
        self._pixel_docs = parts["pixels"].document_indices
        self.patch_dim = 3 * manifest["patch_size"] ** 2

    def __len__(self) -> int:
        return len(self._token_docs) - 1

    def sample(self, i: int) -> PackedSample:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.prefix}: sample {i} out of range (shard has {len(self)})")
        start, end = int(self._token_docs[i]), int(self._token_docs[i + 1])
        lengths = [int(n) for n in self.parts["tokens"].sequence_lengths[start:end]]
        tokens = np.concatenate([self.parts["tokens"][j] for j in range(start, end)]) if lengths else np.zeros(0, np.int32)
        loss = np.concatenate([self.parts["loss"][j] for j in range(start, end)]) if lengths else np.zeros(0, np.uint8)
        p0, p1 = int(self._pixel_docs[i]), int(self._pixel_docs[i + 1])
        patches = [np.asarray(self.parts["pixels"][j]).reshape(-1, self.patch_dim) for j in range(p0, p1)]
        return PackedSample(tokens=tokens, loss_mask=loss, document_lengths=lengths, patches=patches)


def open_shard(prefix: str | Path, verify_checksum: bool = False) -> Shard:
    """Open a complete shard; every inconsistency is a ShardError naming the shard."""
    prefix = Path(prefix)
    manifest_path = Path(f"{prefix}.json")
    if not manifest_path.is_file():
        raise ShardError(f"{prefix}: no manifest {manifest_path.name} (shard missing or incomplete)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{manifest_path}: unreadable manifest: {e}") from e
    for name, info in manifest.get("files", {}).items():
        path = prefix.parent / name
        if not path.is_file():
            raise ShardError(f"{prefix}: file {name} is missing")
        if path.stat().st_size != info["bytes"]:
            raise ShardError(f"{prefix}: {name} has {path.stat().st_size} bytes, the manifest says "
                             f"{info['bytes']} (truncated or replaced)")
        if verify_checksum and _sha256(path) != info["sha256"]:
            raise ShardError(f"{prefix}: {name} does not match its sha256 in the manifest (corrupted)")
    try:
        # An empty .bin (a text-only shard has no pixels) cannot be memory-mapped: read it plainly.
        parts = {part: IndexedDataset(f"{prefix}.{part}", mmap=Path(f"{prefix}.{part}.bin").stat().st_size > 0)
                 for part in PARTS}
    except Exception as e:  # megatron-core asserts on inconsistent .idx/.bin pairs
        raise ShardError(f"{prefix}: cannot open as megatron-core IndexedDataset: {e!r}") from e
    tokens, loss, pixels = parts["tokens"], parts["loss"], parts["pixels"]
    if not (np.array_equal(tokens.sequence_lengths, loss.sequence_lengths)
            and np.array_equal(tokens.document_indices, loss.document_indices)):
        raise ShardError(f"{prefix}: tokens and loss index files disagree (mismatched .idx)")
    samples = len(tokens.document_indices) - 1
    if len(pixels.document_indices) - 1 != samples or manifest.get("samples") != samples:
        raise ShardError(f"{prefix}: {samples} packed samples in tokens, {len(pixels.document_indices) - 1} "
                         f"in pixels, {manifest.get('samples')} in the manifest")
    return Shard(prefix, manifest, parts)


def list_shards(folder: str | Path) -> list[str]:
    """Prefixes of the complete shards in `folder`, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"shard folder {folder} does not exist")
    return sorted(str(p.with_suffix("")) for p in folder.glob("shard-*.json"))


def read_folder_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise ShardError(f"{folder}: no manifest.json (not a solo-preprocess output folder)")
    return json.loads(path.read_text())
