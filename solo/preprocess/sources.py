"""What a run reads, and which records go into which shard.

Records are enumerated deterministically (sorted files, members and lines in file order) and cut
into shards of `shard_size` records, so shard k is a function of (inputs, k, seed, options):

* ImageNet folders and per-synset tars, and LLaVA JSON / JSON Lines, are lists of independent
  records: the whole list is shuffled with the seed first (ImageNet is sorted by class; a shard
  must mix classes). A synset tar's images are read at their offsets, never extracted.
* Streamed files (webdataset tars, JSONL, `.jsonl.zst`, Parquet) are read in order: shard k holds
  records [k*S, (k+1)*S) of the concatenated files, so every shard reads its files sequentially
  once. These corpora come shuffled (img2dataset, SlimPajama); the order of documents inside a
  shard is shuffled with the seed before packing anyway. Planning counts the records of every
  file (in the worker pool), reading only headers/lines.

The readers per stream format live in `formats.py`. Energon folders (`.nv-meta/split.yaml`,
`dataset.yaml`, PyYAML and braceexpand) and img2dataset's sidecar files are resolved here too.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from solo.preprocess.formats import (
    IMAGE_EXTS,
    TAR_SUFFIXES,
    FieldMap,
    InputError,
    Record,
    bad_text,
    count_records,
    parse_fields,
    read_records,
)
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
    """ImageNet's synset folders and/or per-synset tars; each image's document is its class name
    (the synset's first lemma). See `imagenet_tree` for the layouts read."""

    kind = "imagenet"

    def __init__(self, root: str, names: dict[str, str], synsets_file: str, lemmas_file: str | None):
        self.root, self.names = os.path.abspath(root), names
        self.input = self.root
        self.synsets_file, self.lemmas_file = synsets_file, lemmas_file
        self._items: list[tuple] | None = None

    def items(self) -> list[tuple]:
        """(wnid, image name, None) for a file in a synset folder, (wnid, member name, (offset,
        size)) for a member of `wnid.tar`: read in place, never extracted."""
        if self._items is None:
            self._items = [item for wnid, tar in imagenet_tree(self.root)
                           for item in (_tar_images(self.root, wnid) if tar else _folder_images(self.root, wnid))]
        return self._items

    def spec(self) -> dict:
        listing = "\n".join(f"{w}/{n}" if at is None else f"{w}.tar/{n}@{at[0]}+{at[1]}" for w, n, at in self.items())
        return {"kind": self.kind, "input": self.input, "synsets": os.path.abspath(self.synsets_file),
                "lemmas": self.lemmas_file and os.path.abspath(self.lemmas_file),
                "classes": len(self.names), "images": len(self.items()),
                "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}

    def read(self, items: list[tuple]) -> Iterator[Record]:
        for wnid, name, at in items:
            key = f"{wnid}/{name}" if at is None else f"{wnid}.tar:{name}"
            if wnid not in self.names:
                yield Record(key, error=("unknown_synset", f"synset {wnid} is not in {self.synsets_file}"))
            elif at is None:
                yield Record(key, image=os.path.join(self.root, wnid, name), text=self.names[wnid])
            else:
                with open(os.path.join(self.root, f"{wnid}.tar"), "rb") as f:
                    f.seek(at[0])
                    yield Record(key, image=f.read(at[1]), text=self.names[wnid])


# ImageNet-21K-P (Alibaba-MIIL's processed ImageNet-21K): a root holding these two folders.
IMAGENET21K_P_SPLITS = {"train": "imagenet21k_train", "val": "imagenet21k_val"}
_COMPRESSED = (".tar.gz", ".tgz", ".tar.zst", ".zip")


def imagenet_root(path: str, split: str) -> str:
    """The folder of synsets under --input: itself, or ImageNet-21K-P's `imagenet21k_<split>`."""
    if not any(_is_wnid(n.partition(".")[0]) for n in os.listdir(path)):
        p_split = os.path.join(path, IMAGENET21K_P_SPLITS.get(split, f"imagenet21k_{split}"))
        if os.path.isdir(p_split):
            return p_split
    return path


def imagenet_tree(root: str) -> list[tuple[str, bool]]:
    """(wnid, is a tar) per synset of `root`, sorted: `nXXXXXXXX/` folders of images and
    `nXXXXXXXX.tar` archives (winter21_whole.tar.gz holds one per synset), mixed freely. A synset
    present as both, or a compressed archive, is an error: nothing is dropped silently."""
    synsets: dict[str, bool] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir():
            wnid, tar = entry.name, False
        elif entry.name.endswith(_COMPRESSED):
            raise InputError(f"{entry.path}: a compressed archive; unpack it once (tar xf {entry.name}) and pass the "
                             "folder of synset folders or nXXXXXXXX.tar files it holds (those are read unextracted)")
        elif entry.name.endswith(".tar") and entry.is_file():
            wnid, tar = entry.name[:-4], True
        else:
            continue  # synset lists, READMEs
        if wnid in synsets:
            raise InputError(f"{root}: synset {wnid} is both a folder and {wnid}.tar (half extracted?); "
                             "keep one of them (tars are read without extracting)")
        synsets[wnid] = tar
    return sorted(synsets.items())


def _is_wnid(name: str) -> bool:
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def _folder_images(root: str, wnid: str) -> list[tuple]:
    return [(wnid, name, None) for name in sorted(e.name for e in os.scandir(os.path.join(root, wnid))
                                                  if e.is_file() and _is_image(e.name))]


def _tar_images(root: str, wnid: str) -> list[tuple]:
    """The image members of `wnid.tar` with where their bytes are (headers only are read)."""
    path = os.path.join(root, f"{wnid}.tar")
    try:
        with tarfile.open(path, "r:") as tar:
            members = [m for m in tar if m.isfile() and _is_image(m.name)]
            tar.fileobj.seek(tar.offset)  # where tarfile stopped: the end-of-archive zero blocks
            end = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
    except (tarfile.TarError, EOFError) as e:
        raise InputError(f"{path}: not a readable tar ({e}); download or copy it again") from e
    # tarfile stops silently at a header cut short or missing: every member after it would be lost.
    if end != bytes(2 * tarfile.BLOCKSIZE):
        raise InputError(f"{path}: no end-of-archive marker at byte {tar.offset} of {os.path.getsize(path)} "
                         "(truncated or damaged); download or copy it again")
    return sorted((wnid, m.name, (m.offset_data, m.size)) for m in members)


def _is_image(name: str) -> bool:
    return name.rpartition(".")[2].lower() in IMAGE_EXTS


class ConversationSource(ListSource):
    """LLaVA conversations, a JSON list or JSON Lines: {"id", "image": path | [paths],
    "conversations": [{"from", "value"}, ...]}; image paths relative to `images`."""

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
            if isinstance(rec, BadLine):
                yield Record(f"{label}:{rec.line}", error=("bad_json", rec.detail))
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
                yield Record(key, error=("bad_conversation", "record is not an object with a 'conversations' list"))
                continue
            image = rec.get("image")
            paths = [image] if isinstance(image, str) else image
            if image is not None and not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
                yield Record(key, error=("bad_conversation", f"'image' must be a path or a list of paths, "
                                                             f"got {type(image).__name__}"))
                continue
            named = {f"image {i}": p for i, p in enumerate(paths or [])}
            if error := bad_text(conversations=rec["conversations"], **named):
                yield Record(key, error=error)
                continue
            joined = [ImagePath(os.path.join(self.images, p), self.images) for p in paths or []]  # only below --images
            yield Record(key, image=joined if isinstance(image, list) else (joined or [None])[0],
                         conversations=rec["conversations"])


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
    """captions / html / text files read in order (webdataset tar, JSONL, .jsonl.zst, Parquet);
    `fields` maps webdataset members to roles, `upstream` is what img2dataset's `*_stats.json`
    say about the records that never reached the files (failed downloads, for the manifest)."""

    def __init__(self, kind: str, patterns: list[str], files: list[str], fields: FieldMap | None = None,
                 upstream: dict | None = None, subsets: SubsetFilter | None = None):
        self.kind, self.files = kind, [os.path.abspath(f) for f in files]
        self.input = [os.path.abspath(p) for p in patterns]
        self.counts: list[int] | None = None
        self.fields, self.upstream, self.subsets = fields, upstream, subsets

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
                          for f, n in zip(self.files, self.counts or [None] * len(self.files), strict=True)]}
        if self.fields is not None:
            spec["fields"] = {role: [list(alt) for alt in alts] for role, alts in self.fields.items()}
        if self.upstream is not None:
            spec["img2dataset"] = self.upstream
        if self.subsets:  # another filter is another output: part of the spec, so never mixed on resume
            spec["subsets"] = {"include": list(self.subsets.include), "exclude": list(self.subsets.exclude)}
        return spec

    def read(self, segments: list[tuple[int, int, int]]) -> Iterator[Record]:
        # Records are named by their file's path below the inputs' common folder: basenames repeat
        # (SlimPajama's chunk1..chunk10 hold the same file names).
        root = os.path.commonpath([os.path.dirname(f) for f in self.files])
        for file_index, start, stop in segments:
            path = self.files[file_index]
            for record in read_records(self.kind, path, start, stop, os.path.relpath(path, root), self.fields):
                reason = self.subsets.rejects(record.subset) if self.subsets and not record.error else None
                if reason:
                    record.error = ("excluded_subset", reason)
                yield record


def _count(args: tuple[str, str]) -> int:
    return count_records(*args)


# -- loading the inputs named on the command line (errors become exit status 2) -----------------

def load_synsets(synsets_file: str, lemmas_file: str | None) -> dict[str, str]:
    """wnid -> class name (first lemma, '_' as space) from LOC_synset_mapping.txt-style lines
    ("n01440764 tench, Tinca tinca"), from ImageNet-21K's wnids.txt + lemmas.txt pair, or from
    ImageNet-21K-P's `imagenet21k_miil_tree.pth`."""
    if synsets_file.endswith(".pth"):
        return _class_names(load_miil_tree(synsets_file), synsets_file)
    lines = _read_lines(synsets_file)
    names: dict[str, str] = {}
    if lemmas_file is not None:
        lemmas = _read_lines(lemmas_file)
        if len(lemmas) != len(lines):
            raise InputError(f"{synsets_file} has {len(lines)} synsets but {lemmas_file} has {len(lemmas)} lemma lines")
        pairs = [(n, w.strip(), lem) for (n, w), (_, lem) in zip(lines, lemmas, strict=True)]
    else:
        pairs = [(n, *(line.strip().split(None, 1) + [""])[:2]) for n, line in lines]
    for n, wnid, lemma in pairs:
        name = _first_lemma(lemma)
        if not wnid or " " in wnid or not name:
            raise InputError(f"{lemmas_file or synsets_file}:{n}: expected '<wnid> <name>[, <synonym>...]'"
                             f" (or one wnid per line with --lemmas), got {lemma or wnid!r}")
        names[wnid] = name
    if not names:
        raise InputError(f"{synsets_file}: no synsets")
    return names


def _first_lemma(lemmas: str) -> str:
    return lemmas.split(",")[0].strip().replace("_", " ")


def load_miil_tree(path: str) -> dict:
    """ImageNet-21K-P's semantic tree (a `torch.save`d dict: `class_list` the wnids as a numpy
    array, `class_description` wnid -> lemma, `class_tree_list` and `child_2_parent` the
    hierarchy), read by torch's weights-only unpickler: only these numpy array and scalar
    constructors are allowed, no pickled code runs."""
    import numpy as np
    import torch

    core = np._core.multiarray
    allowed = [core._reconstruct, (core._reconstruct, "numpy.core.multiarray._reconstruct"), core.scalar,
               (core.scalar, "numpy.core.multiarray.scalar"), np.ndarray, np.dtype, np.dtypes.StrDType,
               np.dtypes.BytesDType, np.dtypes.Int64DType, np.dtypes.Int32DType, np.dtypes.ObjectDType]
    try:
        with torch.serialization.safe_globals(allowed):
            tree = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        raise InputError(f"{path}: not a readable ImageNet-21K-P tree ({str(e).splitlines()[-1][:300]})") from e
    if not isinstance(tree, dict) or not isinstance(tree.get("class_description"), dict):
        raise InputError(f"{path}: expected a dict with 'class_list' and 'class_description' "
                         f"(imagenet21k_miil_tree.pth), got {type(tree).__name__}")
    return tree


def _class_names(tree: dict, path: str) -> dict[str, str]:
    descriptions = tree["class_description"]
    wnids = [str(w) for w in tree.get("class_list", descriptions)]
    missing = [w for w in wnids if not isinstance(descriptions.get(w), str) or not _first_lemma(descriptions[w])]
    if missing or not wnids:
        raise InputError(f"{path}: {len(missing)} classes without a class_description (first: {missing[:3]})"
                         if missing else f"{path}: no classes")
    return {w: _first_lemma(descriptions[w]) for w in wnids}


def _json_line(n: int, line: str):
    try:
        return json.loads(line)
    except ValueError as e:
        return BadLine(n, f"line {n} is not JSON ({e})")


def _read_lines(path: str) -> list[tuple[int, str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from e
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


@dataclass
class BadLine:
    """A JSON Lines line that is not JSON: skipped as `bad_json` by the shard that reads it."""
    line: int
    detail: str


def load_conversations(json_file: str) -> list:
    """The records of a JSON list, or of JSON Lines (`.jsonl`, or a file whose first line is an object)."""
    try:
        text = Path(json_file).read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise InputError(f"{json_file}: not a readable JSON file ({e})") from e
    if json_file.endswith(".jsonl") or isinstance(_json_line(0, text.lstrip().partition("\n")[0]), dict):
        return [_json_line(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        records = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{json_file}: not a readable JSON file ({e})") from e
    if not isinstance(records, list):
        raise InputError(f"{json_file}: expected a JSON list of conversations, got a {type(records).__name__}")
    return records


# -- megatron-energon prepared folders and img2dataset output folders ---------------------------

ENERGON_META = ".nv-meta"
# energon sample types -> the roles their field_map keys play here.
ENERGON_ROLES = {"image": "image", "caption": "text", "context": "context", "answers": "answers",
                 "text": "text", "conversation": "conversation"}


def is_energon(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, ENERGON_META, "split.yaml"))


def energon_split(folder: str, split: str) -> list[str]:
    """The tars of `split` in an `energon prepare`d folder: `.nv-meta/split.yaml`'s split_parts
    (brace patterns, relative to the folder; braceexpand, as energon expands them), less `exclude`."""
    import braceexpand

    meta = _yaml(os.path.join(folder, ENERGON_META, "split.yaml"))
    parts = meta.get("split_parts") if isinstance(meta, dict) else None
    if not isinstance(parts, dict) or split not in parts:
        raise InputError(f"{folder}/{ENERGON_META}/split.yaml: no split {split!r} in its split_parts "
                         f"({', '.join(parts) if isinstance(parts, dict) else 'none'}); choose one with --split")
    excluded = {n for pattern in meta.get("exclude") or [] for n in braceexpand.braceexpand(pattern)}
    names = [n for pattern in parts[split] or [] for n in braceexpand.braceexpand(pattern) if n not in excluded]
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise InputError(f"{folder}/{ENERGON_META}/split.yaml: split {split!r} names {missing[0]}, which does not "
                         f"exist ({len(missing)} missing)")
    return [os.path.join(folder, n) for n in names]


def energon_fields(folder: str, kind: str) -> FieldMap | None:
    """The roles of `.nv-meta/dataset.yaml`'s field_map (`image: jpg`, `caption: json[caption]`,
    alternatives `jpg,png`); None when the folder has no dataset.yaml or maps no fields."""
    path = os.path.join(folder, ENERGON_META, "dataset.yaml")
    if not os.path.isfile(path):
        return None
    meta = _yaml(path)
    if isinstance(meta, dict) and "sample_loader" in meta and "field_map" not in meta:
        raise InputError(f"{path}: the dataset is read by a sample_loader (Python code, not run here); "
                         "name its members with --fields")
    field_map = meta.get("field_map") if isinstance(meta, dict) else None
    if not field_map:
        return None
    spec = []
    for name, value in field_map.items():
        role = ENERGON_ROLES.get(name)
        if role is None or not isinstance(value, str):
            continue  # fields SOLO does not train on (answer_weights, metadata)
        alternatives = [alt.strip().replace("[", ":").rstrip("]") for alt in value.split(",")]
        spec.append(f"{role}={'|'.join(alternatives)}")
    return parse_fields(kind, ",".join(spec), what=f"{path}: field_map") if spec else None


def _yaml(path: str):
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise InputError(f"{path}: not a readable YAML file ({e})") from e


IMG2DATASET_COUNTS = ("count", "successes", "failed_to_download", "failed_to_resize")


def is_img2dataset_sidecar(path: str) -> bool:
    """img2dataset writes beside each shard `NNNNN_stats.json` and, for the tar output format,
    `NNNNN.parquet` with one row of metadata per URL (no image): neither holds records."""
    if path.endswith("_stats.json"):
        return True
    if path.endswith(".parquet"):
        stem = path[:-len(".parquet")]
        return any(os.path.isfile(stem + s) for s in TAR_SUFFIXES) and _is_metadata_parquet(path)
    return False


def _is_metadata_parquet(path: str) -> bool:
    import pyarrow.parquet as pq

    from solo.preprocess.formats import IMAGE_COLUMNS

    try:
        names = pq.read_schema(path).names
    except Exception:  # noqa: BLE001 - a damaged file is read (and reported) as data
        return False
    return {"key", "status", "error_message"} <= set(names) and not set(IMAGE_COLUMNS) & set(names)


def img2dataset_totals(stats_files: list[str]) -> dict | None:
    """The sums of img2dataset's per-shard counts: the URLs it tried, downloaded, failed."""
    if not stats_files:
        return None
    totals = dict.fromkeys(IMG2DATASET_COUNTS, 0)
    for path in sorted(stats_files):
        try:
            stats = json.loads(Path(path).read_text(encoding="utf-8"))
            for k in IMG2DATASET_COUNTS:
                totals[k] += int(stats[k])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}: not an img2dataset stats file ({e})") from e
    totals["stats_files"] = len(stats_files)
    return totals
