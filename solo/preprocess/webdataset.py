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
A `.tar.gz` shard is decompressed (gzip) into an anonymous temporary file first: the scan seeks.

Which members make a record's image and text (`_tar_record`): a field map when one is given
(--fields, or an energon dataset's `.nv-meta/dataset.yaml`), else the common layouts:

    KEY.jpg + KEY.txt                      img2dataset, webdataset TarWriter captions
    KEY.jpg + KEY.json {"caption": ...}    img2dataset's metadata json, energon captioning
    KEY.jpg + KEY.json [turns]             Megatron-LM convert_llava_pretrain_to_wds.py (LLaVA
                                           conversations): captions take the one assistant turn,
                                           sft the whole conversation
    KEY.jpg + KEY.cls + KEY.json           timm's ImageNet shards: the json's class_name
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from solo.preprocess.formats import IMAGE_EXTS, FieldMap, Record, bad_text

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


class _GzipDamage(Exception):
    pass


@contextmanager
def _open_tar(path: str):
    if not path.endswith((".tar.gz", ".tgz")):
        with open(path, "rb") as f:
            yield f
        return
    with tempfile.TemporaryFile() as tmp:
        try:
            with gzip.open(path, "rb") as gz:
                shutil.copyfileobj(gz, tmp, 1 << 20)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise _GzipDamage(str(e)) from e
        yield tmp


def tar_records(kind: str, path: str, first: float, label: str, fields: FieldMap | None = None) -> Iterator[Record]:
    """Every record of a webdataset tar; payloads are read from record `first` on (inf: never)."""
    try:
        with _open_tar(path) as f:
            yield from _records(kind, f, first, label, fields)
    except _GzipDamage as e:  # the records before the damage are lost with it: no index says where they end
        yield Record(f"{label}:@0", error=("corrupt_gzip", f"not a readable gzip file ({e})"))


def _records(kind: str, f, first: float, label: str, fields: FieldMap | None) -> Iterator[Record]:
    size = f.seek(0, os.SEEK_END)
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
                yield _finish(kind, label, group, first, fields)
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
        yield _finish(kind, label, group, first, fields)
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


def _finish(kind: str, label: str, group: _Group, first: float, fields: FieldMap | None) -> Record:
    name = f"{label}:{group.key}"
    if group.damage:
        return Record(name, error=(CORRUPT_MEMBER, group.damage))
    if group.index < first:
        return Record(name)
    return _tar_record(kind, name, group.key, group.members, fields)


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.error = (reason, detail)


def _tar_record(kind: str, name: str, key: str, members: dict[str, bytes], fields: FieldMap | None = None) -> Record:
    if _unsafe(key):
        return Record(name, error=("unsafe_path", f"member path {key!r} is absolute or leaves the archive"))
    try:
        record = (_mapped_record(kind, name, key, members, fields) if fields is not None
                  else _detected_record(kind, name, key, members))
    except _Bad as bad:
        return Record(name, error=bad.error)
    if error := bad_text(text=record.text, conversations=record.conversations):  # e.g. "\ud800" in a .json
        return Record(name, error=error)
    return record


def _image_member(members: dict[str, bytes]) -> bytes:
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    if image_ext is None:
        raise _Bad("missing_image", f"no image member ({', '.join(sorted(members)) or 'none'})")
    return members[image_ext]


def _detected_record(kind: str, name: str, key: str, members: dict[str, bytes]) -> Record:
    if kind == "sft":
        if "json" not in members:
            raise _Bad("missing_conversation", f"no .json member ({', '.join(sorted(members))}); name it with --fields")
        return Record(name, image=_image_member(members), conversations=_conversation(_json(members, key)))
    image = _image_member(members)
    if kind == "html" or "txt" in members:
        text_ext = {"captions": "txt", "html": "html"}[kind]
        if text_ext not in members:
            raise _Bad("missing_text", f"no .{text_ext} member")
        return Record(name, image=image, text=_utf8(members, text_ext, key))
    if "json" not in members:
        raise _Bad("missing_text", f"no .txt or .json member ({', '.join(sorted(members))}); "
                                   "name the text with --fields text=EXT[:JSON_KEY]")
    return Record(name, image=image, text=_caption(_json(members, key), sorted(members)))


def _caption(meta, members: list[str]) -> str | None:
    """The caption a .json member holds: `caption` (img2dataset, energon), the one assistant turn
    of a LLaVA conversation (Megatron-LM's converter), timm's `class_name`."""
    if isinstance(meta, dict) and "caption" in meta:
        return meta["caption"]
    if isinstance(meta, list) or (isinstance(meta, dict) and isinstance(meta.get("conversations"), list)):
        return caption_of_conversation(meta if isinstance(meta, list) else meta["conversations"])
    if isinstance(meta, dict) and isinstance(meta.get("class_name"), str):
        return meta["class_name"]
    keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
    raise _Bad("missing_text", f"the .json member holds no caption, conversation or class_name ({keys}; members "
                               f"{', '.join(members)}); name the text with --fields text=EXT[:JSON_KEY]")


ASSISTANT = ("gpt", "assistant")


def caption_of_conversation(turns: list) -> str:
    """LLaVA-Pretrain's records as captions: the assistant turn is the caption; the instruction and
    its <image> marker, written by the converter, not by the image's author, are dropped."""
    answers = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") in ASSISTANT]
    if len(answers) != 1 or not isinstance(answers[0], str):
        raise _Bad("bad_conversation", f"{len(answers)} assistant turns: a caption record has exactly one "
                                       "(multi-turn conversations go through `sft`)")
    return answers[0]


def conversation_caption(turns: list) -> str | tuple[str, str]:
    """`caption_of_conversation`, its failure as an (reason, detail) error."""
    try:
        return caption_of_conversation(turns)
    except _Bad as bad:
        return bad.error


def _conversation(meta) -> list:
    turns = meta.get("conversations") if isinstance(meta, dict) else meta
    if not isinstance(turns, list):
        raise _Bad("bad_conversation", "the .json member is not a list of turns nor has a 'conversations' list")
    return turns


def _json(members: dict[str, bytes], key: str, ext: str = "json"):
    try:
        return json.loads(members[ext])
    except (ValueError, RecursionError) as e:
        raise _Bad("bad_json", f"{key}.{ext}: {e}") from None


def _utf8(members: dict[str, bytes], ext: str, key: str) -> str:
    try:
        return members[ext].decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad("non_utf8_text", f"{key}.{ext}: {e}") from None


def _field(members: dict[str, bytes], key: str, role: str, alternatives: list[tuple[str, str | None]]):
    """The value of the first alternative present: the member's bytes (image), its text, or a
    JSON member's key."""
    for ext, json_key in alternatives:
        if ext not in members:
            continue
        if json_key is not None:
            meta = _json(members, key, ext)
            if not isinstance(meta, dict) or json_key not in meta:
                raise _Bad(f"missing_{role}", f"{key}.{ext} has no key {json_key!r}")
            return meta[json_key]
        return members[ext] if role == "image" else _utf8(members, ext, key)
    wanted = "|".join(e + (f":{k}" if k else "") for e, k in alternatives)
    raise _Bad(f"missing_{role}", f"no {wanted} member for {role} ({', '.join(sorted(members))})")


def _mapped_record(kind: str, name: str, key: str, members: dict[str, bytes], fields: FieldMap) -> Record:
    values = {role: _field(members, key, role, alts) for role, alts in fields.items() if role != "image"}
    image = _field(members, key, "image", fields["image"]) if "image" in fields else None
    if kind != "sft":
        return Record(name, image=image, text=values.get("text"))
    if "conversation" in values:
        return Record(name, image=image, conversations=_conversation(values["conversation"]))
    # energon's VQASample: a question (context) and its answers (the first one is learned).
    answers = values.get("answers")
    answer = answers[0] if isinstance(answers, list) and answers else answers
    if not isinstance(values.get("context"), str) or not isinstance(answer, str):
        raise _Bad("bad_conversation", "a question (context) and an answer (answers) as text are needed")
    return Record(name, image=image, conversations=[{"from": "human", "value": values["context"]},
                                                    {"from": "gpt", "value": answer}])
