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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
    image: bytes | str | None = None  # encoded bytes or a file path
    text: str | None = None
    conversations: list | None = None
    error: tuple[str, str] | None = None  # (reason, detail) when unusable as read


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


def _zst_chunks(f) -> Iterator[bytes]:
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    obj, in_frame, consumed = dctx.decompressobj(), False, 0
    while data := f.read(1 << 20):
        consumed += len(data)
        while data:
            in_frame = True
            try:
                out = obj.decompress(data)
            except zstandard.ZstdError as e:
                raise _Damaged("corrupt_zst", f"{e} (within the first {consumed} bytes)") from e
            if out:
                yield out
            if obj.eof:  # a file may hold several frames back to back
                data, obj, in_frame = obj.unused_data, dctx.decompressobj(), False
            else:
                data = b""
    if in_frame:
        # zstandard's stream reader ends silently on a cut frame: the frame's end is checked here.
        raise _Damaged("truncated_zst", f"the last zstd frame is cut off at byte {consumed}")


def _lines(path: str) -> Iterator[bytes | _Damaged]:
    """Non-blank lines; a damaged `.zst` ends with the damage (the cut line is dropped)."""
    with open(path, "rb") as f:
        chunks = _zst_chunks(f) if path.endswith(".zst") else iter(lambda: f.read(1 << 20), b"")
        carry = b""
        try:
            for chunk in chunks:
                lines = (carry + chunk).split(b"\n")
                carry = lines.pop()
                yield from (line for line in lines if line.strip())
        except _Damaged as d:
            yield d
            return
        if carry.strip():
            yield carry


def _jsonl_records(kind: str, path: str, first: float, label: str) -> Iterator[Record]:
    folder = Path(path).parent
    for n, line in enumerate(_lines(path), 1):
        if isinstance(line, _Damaged):
            yield Record(f"{label}:@end", error=(line.reason, str(line)))
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
    except ValueError as e:  # also a UnicodeDecodeError
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
    if kind == "text":
        return Record(name, text=text)
    if isinstance(obj.get("image"), str):
        return Record(name, image=str(folder / obj["image"]), text=text)
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


def _parquet_image(value, folder: Path) -> bytes | str | None | _BadImage:
    if isinstance(value, dict):  # HF datasets' Image feature
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        return str(folder / value)
    if value is None or isinstance(value, bytes):
        return value
    # Anything else must not reach load_image: open() takes an int for a file descriptor, and
    # would read (and then close) one of this process's own files.
    return _BadImage(f"{type(value).__name__} {str(value)[:40]}")
