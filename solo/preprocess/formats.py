"""Streamed input files -> records: webdataset tars and `.tar.gz` (`webdataset.py`), JSONL and
`.jsonl.zst` (zstandard), Parquet (pyarrow), JSON lists of LLaVA-Pretrain records (captions).

Each reader yields one `Record` per input record, in file order, including the records that are
unusable as read (they carry `error = (reason, detail)` and are counted as skipped). A truncated or
corrupt `.zst` yields the good records before the damage and then one record carrying the damage;
a tar reads on past a damaged member header (see `webdataset.py`). `count_records` runs the same
iteration without reading payloads, so a record's index in a file is the same in the planning pass
and in the shard that reads it. Record keys are `label:record`, the label being the file's path
relative to the run's inputs (SlimPajama has a `example_train_0.jsonl.zst` in every chunk folder).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from solo.vision import ImagePath

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# Field names tried in order for each kind's text (img2dataset writes `txt`/`caption`, Websight
# calls its HTML `text`, SlimPajama `text`).
TEXT_FIELDS = {"captions": ("caption", "txt", "text"), "html": ("html", "text"), "text": ("text",)}
# Parquet image columns: HF datasets' Image feature (`image`: {bytes, path}), img2dataset (`jpg`).
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "image_bytes")
STREAM_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".jsonl", ".jsonl.zst", ".parquet", ".json")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Webdataset members by role: role -> alternatives (member extension, JSON key or None), tried in
# order. Set by --fields or by an energon dataset's .nv-meta/dataset.yaml field_map.
FieldMap = dict[str, list[tuple[str, str | None]]]
ROLES_BY_KIND = {"captions": ("image", "text"), "html": ("image", "text"), "text": ("text",),
                 "sft": ("image", "conversation", "context", "answers")}


class InputError(ValueError):
    """An input file that cannot be used at all (wrong format or schema); the message names it."""


@dataclass
class Record:
    key: str  # "file:record" for logs (file: the path relative to the run's inputs)
    image: bytes | str | ImagePath | None = None  # encoded bytes, a listed file, or a path a record names
    text: str | None = None
    conversations: list | None = None
    error: tuple[str, str] | None = None  # (reason, detail) when unusable as read
    subset: str | None = None  # SlimPajama's meta.redpajama_set_name (text JSONL), else None


# JSON may escape a lone UTF-16 surrogate ("\ud800"; json.loads also lets CESU-8 bytes through):
# Python keeps it in the str, but no UTF-8 text can hold it, and sentencepiece, the shard writer and
# every log line would fail on it. Such a record is skipped as `bad_text`.
_SURROGATE = re.compile("[\ud800-\udfff]")


def bad_text(**fields) -> tuple[str, str] | None:
    """(`bad_text`, detail) when a field that will be used (a str, or a list of dicts of str, such
    as LLaVA turns) holds a lone surrogate; None when all are encodable."""
    for name, value in fields.items():
        strings = [value] if isinstance(value, str) else [
            v for item in value if isinstance(item, dict) for v in item.values() if isinstance(v, str)
        ] if isinstance(value, list) else []
        for text in strings:
            if found := _SURROGATE.search(text):
                return "bad_text", f"{name} holds a lone surrogate {ascii(found.group())[1:-1]} (not UTF-8 text)"
    return None


def stream_format(path: str) -> str | None:
    return next((s for s in STREAM_SUFFIXES if path.endswith(s)), None)


def parse_fields(kind: str, spec: str, what: str = "--fields") -> FieldMap:
    """`image=jpg,text=json:caption` (alternatives with '|': `image=jpg|png`) -> FieldMap."""
    fields: FieldMap = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        role, eq, value = item.partition("=")
        if not eq or role not in ROLES_BY_KIND[kind] or not value:
            raise InputError(f"{what} {spec!r}: expected ROLE=EXT[:JSON_KEY][|EXT...] with ROLE one of "
                             f"{', '.join(ROLES_BY_KIND[kind])}, got {item!r}")
        fields[role] = [(ext.lower(), key or None) for ext, _, key in (alt.partition(":") for alt in value.split("|"))]
    return fields


def count_records(kind: str, path: str) -> int:
    fmt = stream_format(path)
    if fmt == ".parquet":
        return _parquet_count(kind, path)
    return sum(1 for _ in _stream(kind, path, None, path))


def read_records(kind: str, path: str, start: int, stop: int | None, label: str | None = None,
                 fields: FieldMap | None = None) -> Iterator[Record]:
    """Records start..stop-1 of `path` (stop None: to the end), keyed `label:record` (label: `path`);
    `fields` maps a webdataset's members to roles (None: the common layouts are recognized)."""
    label = path if label is None else label
    if stream_format(path) == ".parquet":
        yield from _parquet_records(kind, path, start, stop, label)
        return
    records = _stream(kind, path, start, label, fields)
    for i, record in enumerate(records):
        if stop is not None and i >= stop:
            break
        if i >= start:
            yield record


def _stream(kind: str, path: str, first: int | None, label: str, fields: FieldMap | None = None) -> Iterator[Record]:
    """Every record of a tar or JSONL file; payloads are read from record `first` on (None: never)."""
    from solo.preprocess.webdataset import tar_records  # here: webdataset.py imports Record from this module

    first_payload = float("inf") if first is None else first
    if stream_format(path) in TAR_SUFFIXES:
        return tar_records(kind, path, first_payload, label, fields)
    if stream_format(path) == ".json":
        return _json_list_records(kind, path, first_payload, label)
    return _jsonl_records(kind, path, first_payload, label)


# -- JSONL / .jsonl.zst ------------------------------------------------------------------------

class _Damaged(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# A JSONL line (one record) longer than this is skipped as `document_too_large` while it streams
# by, never held: a 6 KB .jsonl.zst can hold a 200 MiB line, which json and sentencepiece would
# blow up to ~11 GB. SlimPajama's longest documents (books) are a few MB.
MAX_RECORD_BYTES = 16 << 20


class _TooLarge:
    def __init__(self, size: int):
        self.size = size


def _zst_chunks(f) -> Iterator[bytes]:
    """The decompressed stream in pieces of at most 1 MiB, across frames (zstandard's stream
    reader: a tiny frame may expand to gigabytes, never held at once)."""
    import zstandard

    cut = _cut_zst_frame(f)
    f.seek(0)
    reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True, closefd=False)
    try:
        while chunk := reader.read(1 << 20):
            yield chunk
    except zstandard.ZstdError as e:
        raise _Damaged("corrupt_zst", f"{e} (within the first {f.tell()} bytes)") from e
    if cut is not None:
        # zstandard's stream reader ends silently on a cut frame: the frames' ends are checked apart.
        raise _Damaged("truncated_zst", f"the last zstd frame is cut off at byte {cut}")


def _cut_zst_frame(f) -> int | None:
    """The file's size if its last zstd frame is cut off, else None. Reads headers only (RFC 8878:
    a frame header, 3-byte block headers up to the one marked last, an optional 4-byte checksum;
    skippable frames give their size); what is not a frame at all is left to the decoder."""
    import zstandard

    size, pos = os.fstat(f.fileno()).st_size, 0
    while pos < size:
        f.seek(pos)
        head = f.read(18)  # the longest frame header
        if len(head) >= 8 and 0x184D2A50 <= int.from_bytes(head[:4], "little") <= 0x184D2A5F:
            pos += 8 + int.from_bytes(head[4:8], "little")
            continue
        try:
            header = zstandard.frame_header_size(head)
            checksum = zstandard.get_frame_parameters(head).has_checksum
        except zstandard.ZstdError:
            return size if len(head) < 18 and head[:4] == b"\x28\xb5\x2f\xfd" else None
        pos += header
        last = False
        while not last and pos < size:
            f.seek(pos)
            block = int.from_bytes(f.read(3).ljust(3, b"\0"), "little")
            last, kind, length = block & 1, (block >> 1) & 3, block >> 3
            pos += 3 + (1 if kind == 1 else length)  # an RLE block stores one byte
        if not last:
            return size
        pos += 4 * checksum
    return size if pos > size else None


def _lines(path: str) -> Iterator[bytes | _TooLarge | _Damaged]:
    """Non-blank lines, each at most MAX_RECORD_BYTES (a longer one is a _TooLarge, its bytes
    dropped as they come); a damaged `.zst` ends with the damage (the cut line is dropped)."""
    with open(path, "rb") as f:
        chunks = _zst_chunks(f) if path.endswith(".zst") else iter(lambda: f.read(1 << 20), b"")
        parts, held, dropped = [], 0, 0  # the current line so far; bytes of it dropped (too long)
        try:
            for chunk in chunks:
                start = 0
                while (end := chunk.find(b"\n", start)) >= 0:
                    yield from _line(parts, chunk[start:end], dropped)
                    parts, held, dropped, start = [], 0, 0, end + 1
                rest = chunk[start:]
                if dropped or held + len(rest) > MAX_RECORD_BYTES:
                    parts, held, dropped = [], 0, dropped + held + len(rest)
                else:
                    parts.append(rest)
                    held += len(rest)
        except _Damaged as d:
            yield d
            return
        yield from _line(parts, b"", dropped)


def _line(parts: list[bytes], last: bytes, dropped: int) -> Iterator[bytes | _TooLarge]:
    size = dropped + sum(map(len, parts)) + len(last)
    if dropped or size > MAX_RECORD_BYTES:
        yield _TooLarge(size)
        return
    line = b"".join(parts) + last if parts else last
    if line.strip():
        yield line


def _jsonl_records(kind: str, path: str, first: float, label: str) -> Iterator[Record]:
    folder = Path(path).parent
    for n, line in enumerate(_lines(path), 1):
        if isinstance(line, _Damaged):
            yield Record(f"{label}:@end", error=(line.reason, str(line)))
        elif isinstance(line, _TooLarge):
            yield Record(f"{label}:{n}", error=("document_too_large",
                                                f"a line of {line.size} bytes > limit {MAX_RECORD_BYTES}"))
        elif n - 1 < first:
            yield Record(f"{label}:{n}")
        else:
            yield _json_record(kind, f"{label}:{n}", line, folder)


def _json_list_records(kind: str, path: str, first: float, label: str) -> Iterator[Record]:
    """A JSON list of records (LLaVA-Pretrain's blip_laion_cc_sbu_558k.json), image paths relative
    to the file's folder."""
    try:
        records = json.loads(Path(path).read_bytes())
    except ValueError as e:
        yield Record(f"{label}:@0", error=("bad_json", f"not a JSON file ({e})"))
        return
    if not isinstance(records, list):
        yield Record(f"{label}:@0", error=("bad_json", f"a JSON {type(records).__name__}, expected a list of records"))
        return
    folder = Path(path).parent
    for n, obj in enumerate(records):
        name = f"{label}:{obj.get('id', n) if isinstance(obj, dict) else n}"
        yield Record(name) if n < first else _json_object_record(kind, name, obj, folder)


def _json_record(kind: str, name: str, line: bytes, folder: Path) -> Record:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:  # also a UnicodeDecodeError; RecursionError: "[[[[..."
        return Record(name, error=("bad_json", f"line is not JSON ({e})"))
    return _json_object_record(kind, name, obj, folder)


def _json_object_record(kind: str, name: str, obj, folder: Path) -> Record:
    if not isinstance(obj, dict):
        return Record(name, error=("bad_json", f"line is a JSON {type(obj).__name__}, expected an object"))
    text = next((obj[f] for f in TEXT_FIELDS[kind] if f in obj), None)
    if text is None and kind == "captions" and isinstance(obj.get("conversations"), list):
        from solo.preprocess.webdataset import conversation_caption  # here: webdataset.py imports this module

        text = conversation_caption(obj["conversations"])
        if isinstance(text, tuple):
            return Record(name, error=text)
    if error := bad_text(text=text, image=obj.get("image")):
        return Record(name, error=error)
    if kind == "text":
        meta = obj.get("meta")
        subset = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
        return Record(name, text=text, subset=subset if isinstance(subset, str) else None)
    if isinstance(obj.get("image"), str):  # a path below the JSONL's folder, nowhere else
        return Record(name, image=ImagePath(str(folder / obj["image"]), str(folder)), text=text)
    if isinstance(obj.get("image_base64"), str):
        try:
            return Record(name, image=base64.b64decode(obj["image_base64"], validate=True), text=text)
        except binascii.Error as e:
            return Record(name, error=("bad_json", f"image_base64 is not base64 ({e})"))
    return Record(name, error=("missing_image", "no 'image' (path) or 'image_base64' field"))


# -- Parquet -----------------------------------------------------------------------------------

def _parquet_columns(kind: str, path: str, names: list[str]) -> tuple[str | None, str]:
    text = next((c for c in TEXT_FIELDS[kind] if c in names), None)
    image = next((c for c in IMAGE_COLUMNS if c in names), None)
    if text is None or (kind != "text" and image is None):
        want = f"a text column ({'/'.join(TEXT_FIELDS[kind])})"
        if kind != "text":
            want += f" and an image column ({'/'.join(IMAGE_COLUMNS)})"
        raise InputError(f"{path}: Parquet columns {names} lack {want}")
    return image, text


def _parquet_count(kind: str, path: str) -> int:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception:  # noqa: BLE001 - read as one damaged record, reported by the shard reading it
        return 1
    _parquet_columns(kind, path, pf.schema_arrow.names)
    return pf.metadata.num_rows


def _parquet_records(kind: str, path: str, start: int, stop: int | None, label: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for damaged files
        if start == 0:
            yield Record(f"{label}:@0", error=("corrupt_parquet", f"cannot open ({e})"))
        return
    image_col, text_col = _parquet_columns(kind, path, pf.schema_arrow.names)
    columns = [c for c in (image_col, text_col) if c]
    stop = pf.metadata.num_rows if stop is None else stop
    first = 0
    for g in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        lo, hi = max(start, first), min(stop, first + rows)
        if lo < hi:
            try:
                table = pf.read_row_group(g, columns=columns).slice(lo - first, hi - lo).to_pydict()
            except Exception as e:  # noqa: BLE001
                for i in range(lo, hi):
                    yield Record(f"{label}:{i}", error=("corrupt_parquet", f"row group {g} unreadable ({e})"))
            else:
                for j in range(hi - lo):
                    name = f"{label}:{lo + j}"
                    image = _parquet_image(table[image_col][j], Path(path).parent) if image_col else None
                    if isinstance(image, _BadImage):
                        yield Record(name, error=("bad_image_value", f"column {image_col!r} holds {image.what}, "
                                                  "expected encoded bytes or a path"))
                    else:
                        yield Record(name, image=image, text=table[text_col][j])
        first += rows
        if first >= stop:
            break


@dataclass
class _BadImage:
    what: str


def _parquet_image(value, folder: Path) -> bytes | ImagePath | None | _BadImage:
    if isinstance(value, dict):  # HF datasets' Image feature
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):  # a path below the Parquet file's folder, nowhere else
        return ImagePath(str(folder / value), str(folder))
    if value is None or isinstance(value, bytes):
        return value
    # Anything else must not reach load_image: open() takes an int for a file descriptor, and
    # would read (and then close) one of this process's own files.
    return _BadImage(f"{type(value).__name__} {str(value)[:40]}")
