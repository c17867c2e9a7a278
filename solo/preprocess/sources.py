"""What a run reads, and which records go into which shard.

Records are enumerated deterministically (sorted files, members and lines in file order) and cut
into shards of `shard_size` records, so shard k is a function of (inputs, k, seed, options):

* ImageNet folders and LLaVA JSON are lists of independent records: the whole list is shuffled
  with the seed first (ImageNet folders are sorted by class; a shard must mix classes).
* Streamed files (webdataset tars, JSONL, `.jsonl.zst`, Parquet) are read in order: shard k holds
  records [k*S, (k+1)*S) of the concatenated files, so every shard reads its files sequentially
  once. These corpora come shuffled (img2dataset, SlimPajama); the order of documents inside a
  shard is shuffled with the seed before packing anyway. Planning counts the records of every
  file (in the worker pool), reading only headers/lines.

The readers per stream format live in `formats.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from solo.preprocess.formats import IMAGE_EXTS, InputError, Record, bad_text, count_records, read_records
from solo.vision import ImagePath

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class ShardTask:
    index: int
    items: list  # what the source's `read` needs: segments or records
    records: int
    description: dict  # which inputs, for the shard manifest


class ListSource:
    """Independent records held in a list (ImageNet files, LLaVA conversations), seed-shuffled."""

    def plan(self, shard_size: int, seed: int, map_fn: Callable = map) -> list[ShardTask]:
        items = self.items()
        order = list(range(len(items)))
        random.Random(seed).shuffle(order)
        return [ShardTask(k, [items[i] for i in order[s:s + shard_size]], len(order[s:s + shard_size]),
                          {"records": len(order[s:s + shard_size]), "shuffled": True})
                for k, s in enumerate(range(0, len(order), shard_size))]


class ImageNetSource(ListSource):
    """`nXXXXXXXX/*.JPEG` folders; each image's document is its class name (the synset's first lemma)."""

    kind = "imagenet"

    def __init__(self, root: str, names: dict[str, str], synsets_file: str, lemmas_file: str | None):
        self.root, self.names = os.path.abspath(root), names
        self.input = self.root
        self.synsets_file, self.lemmas_file = synsets_file, lemmas_file
        self._items: list[tuple[str, str]] | None = None

    def items(self) -> list[tuple[str, str]]:
        if self._items is None:
            self._items = []
            for folder in sorted(e.name for e in os.scandir(self.root) if e.is_dir()):
                files = sorted(e.name for e in os.scandir(os.path.join(self.root, folder))
                               if e.is_file() and e.name.rpartition(".")[2].lower() in IMAGE_EXTS)
                self._items.extend((folder, f) for f in files)
        return self._items

    def spec(self) -> dict:
        return {"kind": self.kind, "input": self.input, "synsets": os.path.abspath(self.synsets_file),
                "lemmas": self.lemmas_file and os.path.abspath(self.lemmas_file),
                "classes": len(self.names), "images": len(self.items()),
                "listing_sha256": hashlib.sha256("\n".join(f"{w}/{n}" for w, n in self.items()).encode()).hexdigest()}

    def read(self, items: list[tuple[str, str]]) -> Iterator[Record]:
        for wnid, name in items:
            key = f"{wnid}/{name}"
            if wnid not in self.names:
                yield Record(key, error=("unknown_synset", f"folder {wnid} is not in {self.synsets_file}"))
            else:
                yield Record(key, image=os.path.join(self.root, wnid, name), text=self.names[wnid])


class ConversationSource(ListSource):
    """LLaVA conversation JSON: [{"id", "image", "conversations": [{"from", "value"}, ...]}, ...]."""

    kind = "sft"

    def __init__(self, json_file: str, images: str, records: list):
        self.json_file, self.images, self.records = os.path.abspath(json_file), os.path.abspath(images), records
        self.input = self.json_file

    def items(self) -> list[tuple[int, dict]]:
        return list(enumerate(self.records))

    def spec(self) -> dict:
        return {"kind": self.kind, "input": self.input, "bytes": os.path.getsize(self.json_file),
                "images": self.images, "records": len(self.records)}

    def read(self, items: list[tuple[int, dict]]) -> Iterator[Record]:
        label = os.path.basename(self.json_file)
        for index, rec in items:
            key = f"{label}:{rec.get('id', index) if isinstance(rec, dict) else index}"
            key = key.encode("utf-8", "backslashreplace").decode()  # an id is only a name: "\ud800" kept readable
            if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
                yield Record(key, error=("bad_conversation", "record is not an object with a 'conversations' list"))
                continue
            image = rec.get("image")
            if image is not None and not isinstance(image, str):
                yield Record(key, error=("bad_conversation", f"'image' must be one path, got {type(image).__name__}"))
                continue
            if error := bad_text(image=image, conversations=rec["conversations"]):
                yield Record(key, error=error)
                continue
            path = image and ImagePath(os.path.join(self.images, image), self.images)  # only below --images
            yield Record(key, image=path, conversations=rec["conversations"])


@dataclass(frozen=True)
class SubsetFilter:
    """`--include-subsets` / `--exclude-subsets` on SlimPajama's `meta.redpajama_set_name`. A record
    without one is kept by an exclude list (it is in no excluded subset) and dropped by an include
    list (it is in none of the included ones)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def rejects(self, subset: str | None) -> str | None:
        """Why a record of `subset` is dropped, or None to keep it."""
        if subset in self.exclude:
            return f"meta.redpajama_set_name {subset!r} is excluded (--exclude-subsets)"
        if self.include and subset not in self.include:
            return (f"meta.redpajama_set_name {subset!r} is not included (--include-subsets)" if subset
                    else "no meta.redpajama_set_name, and --include-subsets keeps only the named subsets")
        return None


class StreamSource:
    """captions / html / text files read in order (webdataset tar, JSONL, .jsonl.zst, Parquet)."""

    def __init__(self, kind: str, patterns: list[str], files: list[str], subsets: SubsetFilter | None = None):
        self.kind, self.files = kind, [os.path.abspath(f) for f in files]
        self.input = [os.path.abspath(p) for p in patterns]
        self.counts: list[int] | None = None
        self.subsets = subsets

    def plan(self, shard_size: int, seed: int, map_fn: Callable = map) -> list[ShardTask]:
        if self.counts is None:
            self.counts = list(map_fn(_count, [(self.kind, f) for f in self.files]))
        tasks: list[ShardTask] = []
        segments, filled = [], 0
        for file_index, n in enumerate(self.counts):
            start = 0
            while start < n:
                take = min(n - start, shard_size - filled)
                segments.append((file_index, start, start + take))
                filled += take
                start += take
                if filled == shard_size:
                    tasks.append(self._task(len(tasks), segments, filled))
                    segments, filled = [], 0
        if segments:
            tasks.append(self._task(len(tasks), segments, filled))
        return tasks

    def _task(self, k: int, segments: list, records: int) -> ShardTask:
        described = [{"file": self.files[f], "first_record": a, "records": b - a} for f, a, b in segments]
        return ShardTask(k, segments, records, {"records": records, "shuffled": False, "segments": described})

    def spec(self) -> dict:
        spec = {"kind": self.kind, "input": self.input,
                "files": [{"path": f, "bytes": os.path.getsize(f), "records": n}
                          for f, n in zip(self.files, self.counts or [None] * len(self.files))]}
        if self.subsets:  # another filter is another output: part of the spec, so never mixed on resume
            spec["subsets"] = {"include": list(self.subsets.include), "exclude": list(self.subsets.exclude)}
        return spec

    def read(self, segments: list[tuple[int, int, int]]) -> Iterator[Record]:
        # Records are named by their file's path below the inputs' common folder: basenames repeat
        # (SlimPajama's chunk1..chunk10 hold the same file names).
        root = os.path.commonpath([os.path.dirname(f) for f in self.files])
        for file_index, start, stop in segments:
            path = self.files[file_index]
            for record in read_records(self.kind, path, start, stop, os.path.relpath(path, root)):
                reason = self.subsets.rejects(record.subset) if self.subsets and not record.error else None
                if reason:
                    record.error = ("excluded_subset", reason)
                yield record


def _count(args: tuple[str, str]) -> int:
    return count_records(*args)


# -- loading the inputs named on the command line (errors become exit status 2) -----------------

def load_synsets(synsets_file: str, lemmas_file: str | None) -> dict[str, str]:
    """wnid -> class name (first lemma, '_' as space) from LOC_synset_mapping.txt-style lines
    ("n01440764 tench, Tinca tinca") or from ImageNet-21K's wnids.txt + lemmas.txt pair."""
    lines = _read_lines(synsets_file)
    names: dict[str, str] = {}
    if lemmas_file is not None:
        lemmas = _read_lines(lemmas_file)
        if len(lemmas) != len(lines):
            raise InputError(f"{synsets_file} has {len(lines)} synsets but {lemmas_file} has {len(lemmas)} lemma lines")
        pairs = [(n, w.strip(), lem) for (n, w), (_, lem) in zip(lines, lemmas)]
    else:
        pairs = [(n, *(line.strip().split(None, 1) + [""])[:2]) for n, line in lines]
    for n, wnid, lemma in pairs:
        name = lemma.split(",")[0].strip().replace("_", " ")
        if not wnid or " " in wnid or not name:
            raise InputError(f"{lemmas_file or synsets_file}:{n}: expected '<wnid> <name>[, <synonym>...]'"
                             f" (or one wnid per line with --lemmas), got {lemma or wnid!r}")
        names[wnid] = name
    if not names:
        raise InputError(f"{synsets_file}: no synsets")
    return names


def _read_lines(path: str) -> list[tuple[int, str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from e
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def load_conversations(json_file: str) -> list:
    try:
        records = json.loads(Path(json_file).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{json_file}: not a readable JSON file ({e})") from e
    if not isinstance(records, list):
        raise InputError(f"{json_file}: expected a JSON list of conversations, got a {type(records).__name__}")
    return records
