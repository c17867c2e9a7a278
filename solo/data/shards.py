"""The shard format: packed SOLO sequences stored as megatron-core IndexedDatasets.

megatron-core's `IndexedDatasetBuilder`/`IndexedDataset` write and memory-map the data. For an
output folder OUT and shard k, prefix = OUT/shard-{k:05d}:

* `{prefix}.tokens.bin/.idx`  int32. One *sequence* per document (or piece of a long text); the
  IndexedDataset *document_indices* group sequences into packed samples, so one packed sample of
  at most seq_length tokens is one IndexedDataset "document" (the reader pads the rest).
* `{prefix}.loss.bin/.idx`    uint8, same sequence lengths and grouping; loss[i] = 1 means token i
  is a prediction target (predicted from the tokens before it in its sequence). Never 1 on an id
  >= 32000 (but the template's stop id, chatml's `<|im_end|>`) nor on `<s>` (every document
  starts with it); solo-preprocess also leaves it 0 on the first token of every sequence, which
  has nothing before it to be predicted from.
* `{prefix}.pixels.bin/.idx`  uint8. One sequence per image, grouped per packed sample in the order
  the images' `<vision>` spans appear; what a sequence holds is the manifest's `pixels.kind`:
  `raw` (the default; also a manifest without `pixels`): the image's patches as
  `solo.vision.patchify` gives them (row-major grid, (channel, row, column) inside a patch),
  flattened: n_patches * 3 * P * P values. `jpeg` / `png`: the resized image (sides multiples of P)
  as one JPEG / PNG file (`solo.vision.encode_stored_image`; the manifest also records the JPEG
  `quality` and chroma `subsampling`), decoded back into the same patches on read. Its grid is not
  stored again: the image's token span `<vision>` (cols x `<vpatch>`, `<vrow_sep>`)... `</vision>`
  says rows and cols, and a file whose header says another size is refused before decoding.
  A sample without images has an empty group (megatron-core accepts it: two equal
  document_indices). A shard without any image has an empty pixels.bin, which numpy cannot
  memory-map: it is opened with megatron-core's file reader instead.
* `{prefix}.json`             the shard manifest: source and options, `counts` (documents,
  sequences, samples, tokens, text/loss/vision tokens, images, padding, fill), `skipped` records by
  reason, `token_id_range` ([min, max] of its token ids; null without samples) and `loss_flags`
  (the flag values present), and the byte size and xxh3-128 checksum (xxhash) of every file above.
  It is renamed into place last, so a shard is complete exactly when its manifest exists.

Content checks, cheap at every open (checksums, off by default, are what a full read costs): the
writer refuses ids outside [0, VOCAB_SIZE) and flags other than 0/1; `open_shard` refuses a
manifest whose `token_id_range` or `loss_flags` leave those bounds; `solo.data.batch.collate` checks
every batch's ids and flags (one vectorized comparison) and names the shard and sample of a bad
one, which catches bytes changed after writing. A shard written before the manifest recorded the
range has its tokens.bin and loss.bin scanned by numpy at open instead (~GB/s; memory-mapped).
* `OUT/manifest.json`         the folder manifest: totals and the list of complete shards.

Every file is written under a `.tmp-` name (`OUT/.tmp-shard-00003.tokens.bin`, ...), fsynced and
renamed, and the directory fsynced (solo.fileio).

Reading: `list_shards(folder)` -> the complete, non-empty shard prefixes, sorted;
`open_shard(prefix, verify_checksum=False)` -> `Shard` (a ShardError names the shard and the fault:
missing or resized files, checksum mismatch, tokens/loss index disagreement, ...); `len(shard)`
packed samples; `shard.sample(i)` -> `PackedSample` (tokens, loss_mask, document_lengths, patches);
`shard.manifest`; `read_shard_manifest(prefix)` (checked, without opening the data);
`read_folder_manifest(folder)`. Writing: `ShardWriter` (used by solo-preprocess),
which takes patches as arrays or as `PatchesInFile` (a byte range of a file, copied by the kernel
for raw storage), and `pixels="raw" | "jpeg" | "png"` with `jpeg_quality`, `jpeg_subsampling`.
Every kind reads back as the same `PackedSample` (uint8 patches in training order); PIL encodes
and decodes (solo.vision).

megatron-core is imported inside the functions that need it: importing it costs seconds (it pulls
in torch and the whole core package), and the preprocessing CLI must answer argument errors and
`stats` at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_patches import local_files
from solo.fileio import (
    CHECKSUM,
    atomic_write_json,
    checksum_file,
    copy_range,
    discard,
    fileno_or_none,
    read_range,
    replace_durably,
    temp_path,
)
from solo.tokenizer import SP_VOCAB_SIZE, TOKEN_IDS, VOCAB_SIZE
from solo.vision import JPEG_SUBSAMPLINGS, PIXEL_KINDS, decode_stored_image, encode_stored_image

# Shards are local files written by kernel copy under temp names: megatron-core's I/O must not go
# through multi-storage-client (megatron_patches/local_files.py). Applied on import, since
# solo-preprocess writes shards without ever calling init_distributed.
local_files.apply()

PARTS = {"tokens": np.int32, "loss": np.uint8, "pixels": np.uint8}
FORMAT_VERSION = 1
BOS_ID = TOKEN_IDS.bos_id
PATCH_ID = TOKEN_IDS.patch_id
VISION_START_ID, VISION_END_ID, ROW_SEP_ID = TOKEN_IDS.vision_start_id, TOKEN_IDS.vision_end_id, TOKEN_IDS.row_sep_id
LOSS_FLAGS = (0, 1)


class ShardError(ValueError):
    """A shard or shard folder that cannot be used; the message names it. `errno`: that of the OS
    error behind it (ENOSPC: a full disk), kept when pickled (a pool worker raises it)."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno

    def __reduce__(self):
        return type(self), (str(self), self.errno)


@dataclass
class PackedSample:
    tokens: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # uint8 [n]
    document_lengths: list[int]  # sums to n
    patches: list[np.ndarray | PatchesInFile] = field(default_factory=list)  # uint8 (n_patches, 3P²) per image
    origin: str = ""  # "<shard prefix> sample <i>" when read from a shard, for errors downstream

    @classmethod
    def of_documents(cls, documents) -> PackedSample:
        """Whole documents `(tokens, loss_mask, patches)` laid end to end in one sample, in order;
        a document's `patches` is a list of its images' uint8 patch arrays, one array, or None."""
        tokens, loss, lengths, patches = [], [], [], []
        for doc_tokens, doc_loss, doc_patches in documents:
            tokens.append(np.asarray(doc_tokens, dtype=np.int32))
            loss.append(np.asarray(doc_loss, dtype=np.uint8))
            lengths.append(len(doc_tokens))
            if doc_patches is not None:
                patches += [doc_patches] if isinstance(doc_patches, np.ndarray) else list(doc_patches)
        empty = [np.zeros(0, np.int32)], [np.zeros(0, np.uint8)]
        return cls(np.concatenate(tokens or empty[0]), np.concatenate(loss or empty[1]), lengths, patches)


@dataclass(frozen=True)
class PatchesInFile:
    """uint8 patches of `shape` stored at byte `offset` of the open file `fd`, for
    `ShardWriter.add_sample`: it copies them file to file inside the kernel (os.copy_file_range)
    instead of through this process's memory, which saves ~10% of image preprocessing. Where the
    kernel cannot (see `solo.fileio.NO_KERNEL_COPY`), or the shard's file has no fd, the bytes are
    read and written instead: same shard, byte for byte."""

    fd: int
    offset: int
    shape: tuple[int, int]
    dtype = np.dtype(np.uint8)
    ndim = 2

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1]


def _read_patches(p: PatchesInFile) -> np.ndarray:
    """The patches `p` points at, read into memory (for a data file that has no fd)."""
    return np.frombuffer(read_range(p.fd, p.offset, p.nbytes), np.uint8)


@dataclass(frozen=True)
class PixelStorage:
    """How a shard stores its images (the module docstring); `entry()` is the manifest's `pixels`."""

    kind: str = "raw"
    jpeg_quality: int = 95
    jpeg_subsampling: str = "4:4:4"

    def __post_init__(self):
        if self.kind not in PIXEL_KINDS:
            raise ValueError(f"pixel storage {self.kind!r}: one of {', '.join(PIXEL_KINDS)}")
        if type(self.jpeg_quality) is not int or not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg quality {self.jpeg_quality!r}: an int in [1, 100]")
        if self.jpeg_subsampling not in JPEG_SUBSAMPLINGS:
            raise ValueError(f"jpeg subsampling {self.jpeg_subsampling!r}: one of {', '.join(JPEG_SUBSAMPLINGS)}")

    def entry(self) -> dict:
        if self.kind == "jpeg":
            return {"kind": "jpeg", "quality": self.jpeg_quality, "subsampling": self.jpeg_subsampling}
        return {"kind": self.kind}

    @classmethod
    def of_manifest(cls, manifest: dict, where: str) -> PixelStorage:
        """The storage a shard manifest records (none recorded: raw, as before the option existed)."""
        entry = manifest.get("pixels", {"kind": "raw"})
        try:
            if not isinstance(entry, dict) or set(entry) - {"kind", "quality", "subsampling"}:
                raise ValueError("an object {kind, quality, subsampling}")
            storage = cls(entry.get("kind"), entry.get("quality", 95), entry.get("subsampling", "4:4:4"))
            if storage.entry() != entry:
                raise ValueError("quality and subsampling belong to jpeg, and jpeg records both")
        except ValueError as e:
            raise ShardError(f"{where}: bad 'pixels' {entry!r} in the manifest: {e}") from None
        return storage


def image_grids(tokens: np.ndarray) -> list[tuple[int, int]]:
    """(rows, cols) of every image in `tokens`, in order, from its span `<vision>` row
    (`<vrow_sep>` row)... `</vision>`, a row being cols x `<vpatch>` (solo.vision.image_token_ids).
    ValueError names the first span that is not such a grid."""
    starts = np.flatnonzero(tokens == VISION_START_ID)
    ends = np.flatnonzero(tokens == VISION_END_ID)
    if len(starts) != len(ends) or np.any(ends < starts) or np.any(starts[1:] < ends[:-1]):
        raise ValueError(f"<vision> at {starts.tolist()[:8]} and </vision> at {ends.tolist()[:8]} do not pair up")
    grids = []
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        span = tokens[start + 1:end]
        rows = int(np.count_nonzero(span == ROW_SEP_ID)) + 1
        cols = (len(span) + 1) // rows - 1  # each row is cols <vpatch> and one separator, but the last
        expected = np.full(max(rows * (cols + 1) - 1, 0), PATCH_ID, np.int32)
        expected[cols::cols + 1] = ROW_SEP_ID
        if cols < 1 or not np.array_equal(span, expected):
            raise ValueError(f"the image at token {start} is not a grid of <vpatch> rows")
        grids.append((rows, cols))
    return grids


@contextmanager
def _writing(prefix: Path) -> Iterator[None]:
    """A full disk (ENOSPC) or another OS error while writing becomes a ShardError naming the shard."""
    try:
        yield
    except OSError as e:
        raise ShardError(f"{prefix}: cannot write the shard ({e})", e.errno) from e


class ShardWriter:
    """Writes one shard: `add_sample` per packed sample, then `finish(manifest)` (or `abort()`).

    Every sample is checked against the format's rules (a ShardError names the sample), and the
    writer counts what it sees; `finish` puts those counts, the file sizes and checksums into the
    manifest and renames the manifest into place last. `pixels`: how images are stored (raw patches,
    or the image as one JPEG (`jpeg_quality`, `jpeg_subsampling`) / PNG file; module docstring).
    """

    def __init__(self, prefix: str | Path, patch_size: int, seq_length: int | None = None,
                 stop_id: int | None = None, pixels: str = "raw", jpeg_quality: int = 95,
                 jpeg_subsampling: str = "4:4:4"):
        import torch  # megatron-core's add_item takes a tensor (zero-copy from numpy)
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self._torch = torch
        self.prefix = Path(prefix)
        self.patch_dim = 3 * patch_size**2
        self.storage = PixelStorage(pixels, jpeg_quality, jpeg_subsampling)
        self.seq_length = seq_length
        self.stop_id = stop_id  # the template's turn-closing id: may carry loss (solo.templates)
        self.tmp = {part: temp_path(f"{self.prefix}.{part}") for part in PARTS}
        self.builders = {part: IndexedDatasetBuilder(f"{self.tmp[part]}.bin", dtype=dtype)
                         for part, dtype in PARTS.items()}
        self.counts = dict.fromkeys(("samples", "sequences", "tokens", "text_tokens", "loss_tokens",
                                     "vision_tokens", "images"), 0)
        self.token_id_range: list[int] | None = None
        self.loss_flags: set[int] = set()

    @property
    def samples(self) -> int:
        return self.counts["samples"]

    def _check(self, tokens: np.ndarray, loss: np.ndarray, lengths: list[int], patches: list[np.ndarray]) -> None:
        where = f"{self.prefix}: sample {self.samples}"
        if sum(lengths) != len(tokens) or len(loss) != len(tokens) or min(lengths, default=1) < 1:
            raise ShardError(f"{where}: document lengths {lengths} do not cover {len(tokens)} tokens / "
                             f"{len(loss)} loss flags")
        if self.seq_length is not None and len(tokens) > self.seq_length:
            raise ShardError(f"{where}: {len(tokens)} tokens > seq_length {self.seq_length}")
        outside = np.flatnonzero((tokens < 0) | (tokens >= VOCAB_SIZE))
        if outside.size:
            raise ShardError(f"{where}: token id {tokens[outside[0]]} at position {outside[0]} is outside "
                             f"[0, {VOCAB_SIZE})")
        no_loss = ((tokens >= SP_VOCAB_SIZE) & (tokens != self.stop_id)) | (tokens == BOS_ID)
        bad = np.flatnonzero((loss > 1) | ((loss == 1) & no_loss))
        if bad.size:
            raise ShardError(f"{where}: loss flag {loss[bad[0]]} on token {tokens[bad[0]]} at position "
                             f"{bad[0]} (loss only on natural-language ids and the template's stop id, never on <s>)")
        for p in patches:
            if p.ndim != 2 or p.shape[1] != self.patch_dim or p.dtype != np.uint8:
                raise ShardError(f"{where}: patches must be uint8 (n, {self.patch_dim}), got {p.dtype} {p.shape}")
        n_vpatch = int(np.count_nonzero(tokens == PATCH_ID))
        if n_vpatch != sum(p.shape[0] for p in patches):
            raise ShardError(f"{where}: {n_vpatch} <vpatch> tokens but {sum(p.shape[0] for p in patches)} patches")

    def _grids(self, tokens: np.ndarray, patches: list) -> list[tuple[int, int]]:
        """The images' grids, which an encoded image is stored in (checked against the patches)."""
        where = f"{self.prefix}: sample {self.samples}"
        try:
            grids = image_grids(tokens)
        except ValueError as e:
            raise ShardError(f"{where}: {self.storage.kind} storage needs each image's grid: {e}") from None
        if [r * c for r, c in grids] != [p.shape[0] for p in patches]:
            raise ShardError(f"{where}: {self.storage.kind} storage needs each image's grid: the tokens hold "
                             f"grids {grids}, the images {[p.shape[0] for p in patches]} patches")
        return grids

    def add_sample(self, sample: PackedSample) -> None:
        lengths = [int(n) for n in sample.document_lengths]
        tokens = np.asarray(sample.tokens, dtype=np.int32)
        loss = np.asarray(sample.loss_mask, dtype=np.uint8)
        patches = [p if isinstance(p, PatchesInFile) else np.asarray(p) for p in sample.patches]
        self._check(tokens, loss, lengths, patches)
        grids = self._grids(tokens, patches) if self.storage.kind != "raw" else None
        with _writing(self.prefix):
            # IndexedDatasetBuilder.add_document takes any array-like (it calls numpy.array on it).
            self.builders["tokens"].add_document(tokens, lengths)
            self.builders["loss"].add_document(loss, lengths)
            # Pixels image by image: concatenating a sample's images first would allocate ~100 MB
            # per sample, and fresh pages cost more than the copies themselves.
            pixels = self.builders["pixels"]
            fd = fileno_or_none(pixels.data_file)
            for k, p in enumerate(patches):
                if grids is not None:
                    array = _read_patches(p).reshape(p.shape) if isinstance(p, PatchesInFile) else p
                    encoded = encode_stored_image(array, *grids[k], self.storage.kind,
                                                  jpeg_quality=self.storage.jpeg_quality,
                                                  jpeg_subsampling=self.storage.jpeg_subsampling)
                    pixels.add_item(self._torch.frombuffer(bytearray(encoded), dtype=self._torch.uint8))
                elif isinstance(p, PatchesInFile) and fd is not None:
                    # What add_item does, minus its two copies in memory: bytes, then the length.
                    pixels.data_file.flush()
                    copy_range(p.fd, fd, p.offset, p.nbytes)
                    pixels.data_file.seek(0, os.SEEK_END)  # the buffered file object learns the new end
                    pixels.sequence_lengths.append(p.nbytes)
                else:
                    array = _read_patches(p) if isinstance(p, PatchesInFile) else np.ascontiguousarray(p).reshape(-1)
                    pixels.add_item(self._torch.from_numpy(array))
            pixels.end_document()
        c = self.counts
        c["samples"] += 1
        c["sequences"] += len(lengths)
        c["tokens"] += len(tokens)
        c["text_tokens"] += int(np.count_nonzero(tokens < SP_VOCAB_SIZE))
        c["loss_tokens"] += int(np.count_nonzero(loss))
        c["vision_tokens"] += int(np.count_nonzero(tokens == PATCH_ID))
        c["images"] += len(patches)
        if len(tokens):
            low, high = int(tokens.min()), int(tokens.max())
            self.token_id_range = [min(low, self.token_id_range[0]), max(high, self.token_id_range[1])] \
                if self.token_id_range else [low, high]
            self.loss_flags.update(int(v) for v in np.unique(loss))

    def finish(self, manifest: dict) -> dict:
        """Finalize the .idx files, rename everything into place, the manifest last."""
        with _writing(self.prefix):
            files = {}
            for part, builder in self.builders.items():
                builder.finalize(f"{self.tmp[part]}.idx")
                for ext in ("bin", "idx"):
                    tmp = Path(f"{self.tmp[part]}.{ext}")
                    files[f"{self.prefix.name}.{part}.{ext}"] = {"bytes": tmp.stat().st_size,
                                                             CHECKSUM: checksum_file(tmp)}
            for part in PARTS:
                for ext in ("bin", "idx"):
                    replace_durably(f"{self.tmp[part]}.{ext}", f"{self.prefix}.{part}.{ext}")
            seq_length = self.seq_length or manifest.get("seq_length")
            counts = {**self.counts, **manifest.get("counts", {})}
            if seq_length:
                capacity = self.samples * seq_length
                counts["padding_tokens"] = capacity - counts["tokens"]
                counts["fill"] = round(counts["tokens"] / capacity, 6) if capacity else 0.0
            manifest = {**manifest, "format_version": FORMAT_VERSION, "samples": self.samples,
                        "counts": counts, "pixels": self.storage.entry(), "token_id_range": self.token_id_range,
                        "loss_flags": sorted(self.loss_flags), "files": files}
            atomic_write_json(f"{self.prefix}.json", manifest)
        return manifest

    def abort(self) -> None:
        """Remove what this writer wrote, also after a failed `finish`; a full disk cannot stop it."""
        for part, builder in self.builders.items():
            discard(f"{self.tmp[part]}.bin", builder.data_file)
            discard(f"{self.tmp[part]}.idx")
        if not Path(f"{self.prefix}.json").exists():  # parts renamed before the manifest failed
            for part in PARTS:
                for ext in ("bin", "idx"):
                    Path(f"{self.prefix}.{part}.{ext}").unlink(missing_ok=True)


class Shard:
    """A complete shard, memory-mapped. `sample(i)` returns packed sample i."""

    def __init__(self, prefix: str | Path, manifest: dict, parts: dict):
        self.prefix, self.manifest, self.parts = str(prefix), manifest, parts
        self._token_docs = parts["tokens"].document_indices
        self._pixel_docs = parts["pixels"].document_indices
        self.patch_size = manifest["patch_size"]
        self.patch_dim = 3 * self.patch_size ** 2
        self.storage = PixelStorage.of_manifest(manifest, self.prefix)

    def __len__(self) -> int:
        return len(self._token_docs) - 1

    def sample(self, i: int, with_patches: bool = True) -> PackedSample:
        """Packed sample i; `with_patches=False` leaves its image bytes unread (`patches` empty): for
        pipeline stages past the first, which never see them."""
        if not 0 <= i < len(self):
            raise IndexError(f"{self.prefix}: sample {i} out of range (shard has {len(self)})")
        start, end = int(self._token_docs[i]), int(self._token_docs[i + 1])
        lengths = [int(n) for n in self.parts["tokens"].sequence_lengths[start:end]]
        # A contiguous slice is one read from the memory map; concatenating copies it out.
        tokens = np.concatenate(self.parts["tokens"][start:end]) if lengths else np.zeros(0, np.int32)
        loss = np.concatenate(self.parts["loss"][start:end]) if lengths else np.zeros(0, np.uint8)
        p0, p1 = int(self._pixel_docs[i]), int(self._pixel_docs[i + 1])
        patches = self._patches(i, tokens, p0, p1) if p1 > p0 and with_patches else []
        return PackedSample(tokens=tokens, loss_mask=loss, document_lengths=lengths, patches=patches,
                            origin=f"{self.prefix} sample {i}")

    def _patches(self, i: int, tokens: np.ndarray, p0: int, p1: int) -> list[np.ndarray]:
        stored = self.parts["pixels"][p0:p1]
        if self.storage.kind == "raw":
            # Copied out: megatron-core closes its memory map when the IndexedDataset is collected,
            # and a view that outlived it would crash the process on access.
            return [np.array(p).reshape(-1, self.patch_dim) for p in stored]
        where = f"{self.prefix}: sample {i}"
        try:
            grids = image_grids(tokens)
        except ValueError as e:
            raise ShardError(f"{where}: {e}") from None
        if len(grids) != len(stored):
            raise ShardError(f"{where}: {len(grids)} images in the tokens, {len(stored)} stored")
        patches = []
        for k, (data, (rows, cols)) in enumerate(zip(stored, grids, strict=True)):
            try:
                patches.append(decode_stored_image(data.data, self.storage.kind, rows, cols, self.patch_size))
            except ValueError as e:
                raise ShardError(f"{where}: image {k}: {e}") from None
        return patches


def read_shard_manifest(prefix: str | Path) -> dict:
    """The manifest of shard `prefix`, checked to be one (an object with a 'files' table, of this
    format version); anything else (`[]`, a number, unreadable JSON) is a ShardError naming the file."""
    path = Path(f"{prefix}.json")
    if not path.is_file():
        raise ShardError(f"{prefix}: no manifest {path.name} (shard missing or incomplete)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable manifest: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ShardError(f"{path}: not a shard manifest (no 'files' table)")
    if bad := [k for k in ("counts", "skipped") if not isinstance(manifest.get(k, {}), dict)]:
        raise ShardError(f"{path}: not a shard manifest ({', '.join(bad)} must be an object)")
    if manifest.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ShardError(f"{path}: shard format version {manifest.get('format_version')}, this reader "
                         f"reads version {FORMAT_VERSION}")
    PixelStorage.of_manifest(manifest, str(path))
    return manifest


def open_shard(prefix: str | Path, verify_checksum: bool = False) -> Shard:
    """Open a complete shard; every inconsistency is a ShardError naming the shard."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = Path(prefix)
    manifest = read_shard_manifest(prefix)
    expected = {f"{prefix.name}.{part}.{ext}" for part in PARTS for ext in ("bin", "idx")}
    if missing := sorted(expected - set(manifest["files"])):
        raise ShardError(f"{prefix}: the manifest lists no {', '.join(missing)}")
    for name, info in sorted(manifest["files"].items()):
        path = prefix.parent / name
        if not path.is_file():
            raise ShardError(f"{prefix}: file {name} is missing")
        if path.stat().st_size != info["bytes"]:
            raise ShardError(f"{prefix}: {name} has {path.stat().st_size} bytes, the manifest says "
                             f"{info['bytes']} (truncated or replaced)")
        if verify_checksum and checksum_file(path) != info.get(CHECKSUM):
            raise ShardError(f"{prefix}: {name} does not match its {CHECKSUM} checksum in the manifest (corrupted)")
    parts = {}
    for part, dtype in PARTS.items():
        try:
            # An empty .bin (a shard without images has no pixels) cannot be memory-mapped.
            parts[part] = IndexedDataset(f"{prefix}.{part}", mmap=Path(f"{prefix}.{part}.bin").stat().st_size > 0)
        except Exception as e:  # megatron-core asserts on inconsistent .idx/.bin pairs
            raise ShardError(f"{prefix}: {part}.idx/.bin cannot be opened by megatron-core IndexedDataset: "
                             f"{e!r}") from e
        ds = parts[part]
        if ds.index.dtype != dtype:
            raise ShardError(f"{prefix}: {part}.idx holds {ds.index.dtype.__name__}, expected {dtype.__name__}")
        bin_bytes = Path(f"{prefix}.{part}.bin").stat().st_size
        if int(ds.sequence_lengths.sum(dtype=np.int64)) * np.dtype(dtype).itemsize != bin_bytes:
            raise ShardError(f"{prefix}: {part}.idx describes {int(ds.sequence_lengths.sum())} values, "
                             f"{part}.bin holds {bin_bytes} bytes (mismatched .idx)")
        # The offsets megatron-core reads at must follow from the lengths, and samples must cover the
        # sequences in order: otherwise a flipped byte in an .idx reads wrong data mid-run.
        offsets = np.zeros(len(ds.sequence_lengths), np.int64)
        np.cumsum(ds.sequence_lengths[:-1], dtype=np.int64, out=offsets[1:])
        docs = ds.document_indices
        if not np.array_equal(ds.index.sequence_pointers, offsets * np.dtype(dtype).itemsize) or not (
                len(docs) and docs[0] == 0 and docs[-1] == len(offsets) and np.all(np.diff(docs) >= 0)):
            raise ShardError(f"{prefix}: {part}.idx offsets or sample boundaries do not follow its sequence "
                             f"lengths (corrupted .idx)")
    tokens, loss, pixels = parts["tokens"], parts["loss"], parts["pixels"]
    if not (np.array_equal(tokens.sequence_lengths, loss.sequence_lengths)
            and np.array_equal(tokens.document_indices, loss.document_indices)):
        raise ShardError(f"{prefix}: tokens and loss index files disagree (mismatched .idx)")
    samples = len(tokens.document_indices) - 1
    if len(pixels.document_indices) - 1 != samples or manifest.get("samples") != samples:
        raise ShardError(f"{prefix}: {samples} packed samples in tokens, {len(pixels.document_indices) - 1} "
                         f"in pixels, {manifest.get('samples')} in the manifest")
    _check_content(prefix, manifest)
    return Shard(prefix, manifest, parts)


def _check_content(prefix: Path, manifest: dict) -> None:
    """Token ids in [0, VOCAB_SIZE), loss flags 0/1: from the manifest, or (a shard written before it
    recorded them) from a scan of tokens.bin and loss.bin."""
    if "token_id_range" not in manifest:
        ids, flags = (np.memmap(f"{prefix}.{part}.bin", PARTS[part], mode="r")
                      if os.path.getsize(f"{prefix}.{part}.bin") else np.zeros(0, PARTS[part])
                      for part in ("tokens", "loss"))
        id_range = [int(ids.min()), int(ids.max())] if len(ids) else None
        if id_range is not None and not (0 <= id_range[0] and id_range[1] < VOCAB_SIZE):
            raise ShardError(f"{prefix}: token ids {id_range} outside [0, {VOCAB_SIZE}) in tokens.bin (corrupt .bin)")
        if len(flags) and int(flags.max()) > 1:
            raise ShardError(f"{prefix}: loss flag {int(flags.max())} in loss.bin, flags are 0 or 1 (corrupt .bin)")
        return
    id_range, flags = manifest["token_id_range"], manifest.get("loss_flags", [])
    if id_range is not None and not (isinstance(id_range, list) and len(id_range) == 2
                                     and all(type(v) is int for v in id_range)):
        raise ShardError(f"{prefix}: token_id_range must be [min, max] or null, got {id_range!r}")
    if id_range is not None and not (0 <= id_range[0] <= id_range[1] < VOCAB_SIZE):
        raise ShardError(f"{prefix}: token ids {id_range} outside [0, {VOCAB_SIZE}) (per its manifest)")
    if not isinstance(flags, list) or not set(flags) <= set(LOSS_FLAGS):
        raise ShardError(f"{prefix}: loss flags {flags!r} in its manifest, flags are 0 or 1")


def list_shards(folder: str | Path, include_empty: bool = False) -> list[str]:
    """Prefixes of the complete shards in `folder` (those whose manifest exists), sorted.

    A shard whose records were all skipped is complete but holds no sample (an empty tokens.bin);
    it is left out unless `include_empty` (its manifest still counts the skipped records).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"shard folder {folder} does not exist")
    prefixes = sorted(str(p.with_suffix("")) for p in folder.glob("shard-*.json"))
    if include_empty:
        return prefixes
    return [p for p in prefixes if not (os.path.isfile(f"{p}.tokens.bin") and os.path.getsize(f"{p}.tokens.bin") == 0)]


def read_folder_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise ShardError(f"{folder}: no manifest.json (not a solo-preprocess output folder)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable folder manifest: {e}") from e
