"""Webdataset tars -> records: members grouped by key (`KEY.jpg` + `KEY.txt`/`.json`/`.html`).

Python's tarfile stops silently at the first unreadable header, which would drop every record
after a single damaged block. This reader scans header by header instead (tarfile's own
`TarInfo.fromtarfile` parses each one) and, past a damaged header, reads on from the next valid
one, 512-byte block by block, as GNU tar's --ignore-zeros does:

* the record whose header was damaged is yielded as `corrupt_tar_member`. Its key is read from
  the damaged block's name field when that still decodes; when it does not, the records on both
  sides of the damage go with it (either may have lost a member), so at most one intact record
  is dropped per damage, and never a damaged one kept;
* a file that ends without the end-of-archive marker (zero blocks), or inside a member, is
  `truncated_tar`: the record being read at the end goes with it (it may be incomplete);
* a file with no readable header at all is one `corrupt_tar` record.

Zero blocks in the middle (tars concatenated with `cat`) are read through, as tar -i does.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from solo.preprocess.formats import IMAGE_EXTS, Record, bad_text

BLOCK = tarfile.BLOCKSIZE
CORRUPT_MEMBER = "corrupt_tar_member"


def _split_key(name: str) -> tuple[str, str]:
    # webdataset: the key is the path up to the first dot of the file name.
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _unsafe(name: str) -> bool:
    return name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/")


def _damaged_key(block: bytes) -> str | None:
    """The key named by a damaged header block, if its name field still reads as a file name.
    Only regular-file headers count: a damaged pax or GNU long-name header names no record."""
    if block[156:157] not in (b"0", b"\0"):
        return None
    try:
        name = block[:100].split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return _split_key(name)[0] if name and name.isprintable() else None


@dataclass
class _Event:
    kind: str  # "member" | "bad" (an unreadable header block) | "end"
    offset: int
    member: tarfile.TarInfo | None = None
    block: bytes = b""
    clean_end: bool = False  # "end": the archive ended with its end-of-archive zero blocks


def _scan(tar: tarfile.TarFile) -> Iterator[_Event]:
    f, offset, zeros = tar.fileobj, 0, False
    while True:
        f.seek(offset)
        tar.offset = offset
        try:
            member = tarfile.TarInfo.fromtarfile(tar)
        except tarfile.EOFHeaderError:  # a zero block: the end marker, or between concatenated tars
            zeros, offset = True, offset + BLOCK
            continue
        except tarfile.EmptyHeaderError:  # the end of the file, on a block boundary
            yield _Event("end", offset, clean_end=zeros)
            return
        except tarfile.TruncatedHeaderError:  # a last, partial block
            f.seek(offset)
            yield _Event("end", offset, clean_end=zeros and not f.read().strip(b"\0"))
            return
        except tarfile.HeaderError:  # bad checksum, bad number field, bad pax or long-name header
            f.seek(offset)
            yield _Event("bad", offset, block=f.read(BLOCK))
            zeros, offset = False, offset + BLOCK
            continue
        zeros = False
        yield _Event("member", member.offset, member=member)
        offset = tar.offset  # past the member's data blocks


@dataclass
class _Group:
    key: str
    index: int  # the record's index in the file
    members: dict[str, bytes] = field(default_factory=dict)
    damage: str | None = None


def tar_records(kind: str, path: str, first: float, label: str) -> Iterator[Record]:
    """Every record of a webdataset tar; payloads are read from record `first` on (inf: never)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        try:
            # Opened at the end of the file, the TarFile reads no member here: it is only the
            # context (encoding, pax headers) `_scan` hands to TarInfo.fromtarfile.
            tar = tarfile.TarFile(fileobj=f, mode="r")
        except tarfile.ReadError as e:  # an empty file
            yield Record(f"{label}:@0", error=("corrupt_tar", f"not a readable tar ({e})"))
            return
        group: _Group | None = None
        count = 0  # records yielded so far
        bad: _Event | None = None  # the first unreadable header since the last member
        for event in _scan(tar):
            if event.kind == "bad":
                bad = bad or event
                continue
            if event.kind == "end":
                break
            m = event.member
            if not m.isfile():
                continue
            key, ext = _split_key(m.name)
            lost = None
            if bad is not None:
                detail = (f"unreadable tar header at byte {bad.offset}; read on from the next one, "
                          f"at byte {m.offset}")
                lost, new_damage = _blame(bad, group, key, detail)
                bad = None
            else:
                new_damage = None
            if group is None or key != group.key:
                if group is not None:
                    yield _finish(kind, label, group, first)
                    count += 1
                if lost is not None:
                    yield Record(f"{label}:{lost}", error=(CORRUPT_MEMBER, detail))
                    count += 1
                group = _Group(key, count)
            group.damage = group.damage or new_damage
            if m.offset_data + m.size > size:
                yield Record(f"{label}:{key}", error=(
                    "truncated_tar", f"member {m.name!r} needs {m.offset_data + m.size} bytes, file has {size}"))
                return
            if group.index >= first and not group.damage and not _unsafe(m.name):  # never read an unsafe path
                f.seek(m.offset_data)
                group.members[ext] = f.read(m.size)
        if group is None and bad is not None:
            yield Record(f"{label}:@0", error=("corrupt_tar", "not a readable tar (no valid header)"))
            return
        if not event.clean_end:
            # The record being read when the file ended may be incomplete: it goes with the damage.
            where = group.key if group is not None else f"@{event.offset}"
            yield Record(f"{label}:{where}", error=(
                "truncated_tar", f"no end-of-archive marker at byte {event.offset} of {size} "
                "(truncated, or a damaged header at the end)"))
            return
        lost = None
        if bad is not None:  # a damaged header after the last member, before the end marker
            detail = f"unreadable tar header at byte {bad.offset}, after the last readable member"
            lost, _ = _blame(bad, group, None, detail)
        if group is not None:
            yield _finish(kind, label, group, first)
        if lost is not None:
            yield Record(f"{label}:{lost}", error=(CORRUPT_MEMBER, detail))


def _blame(bad: _Event, group: _Group | None, next_key: str | None, detail: str) -> tuple[str | None, str | None]:
    """Which records a damaged header belonged to: marks the current group, and returns (the key
    of a record lost whole, or None; the damage of the record `next_key` starts, or None)."""
    current = group.key if group is not None else None
    named = _damaged_key(bad.block)
    if next_key is not None and next_key == current:
        # A record's members are contiguous: the damaged header was one of its own, whatever
        # (bit-flipped) name it reads as.
        group.damage = detail
        return None, detail
    if named is None:
        suspects = {current, next_key}
    else:
        suspects = {named}
    if group is not None and current in suspects:
        group.damage = detail
    lost = named if named is not None and named not in (current, next_key) else None
    return lost, (detail if next_key is not None and next_key in suspects else None)


def _finish(kind: str, label: str, group: _Group, first: float) -> Record:
    name = f"{label}:{group.key}"
    if group.damage:
        return Record(name, error=(CORRUPT_MEMBER, group.damage))
    if group.index < first:
        return Record(name)
    return _tar_record(kind, name, group.key, group.members)


def _tar_record(kind: str, name: str, key: str, members: dict[str, bytes]) -> Record:
    if _unsafe(key):
        return Record(name, error=("unsafe_path", f"member path {key!r} is absolute or leaves the archive"))
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    if image_ext is None:
        return Record(name, error=("missing_image", f"no image member ({', '.join(sorted(members)) or 'none'})"))
    if kind == "captions" and "txt" not in members and "json" in members:
        try:
            meta = json.loads(members["json"])
        except (ValueError, RecursionError) as e:
            return Record(name, error=("bad_json", f"{key}.json: {e}"))
        caption = meta.get("caption") if isinstance(meta, dict) else None
        if error := bad_text(caption=caption):
            return Record(name, error=error)
        return Record(name, image=members[image_ext], text=caption)
    text_ext = {"captions": "txt", "html": "html"}[kind]
    if text_ext not in members:
        return Record(name, error=("missing_text", f"no .{text_ext} member"))
    try:
        text = members[text_ext].decode("utf-8")
    except UnicodeDecodeError as e:
        return Record(name, error=("non_utf8_text", f"{key}.{text_ext}: {e}"))
    return Record(name, image=members[image_ext], text=text)
