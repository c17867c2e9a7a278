"""The output folder: its lock, the run's fingerprint, which shards are complete, manifest.json.

A shard is complete when its manifest exists (solo.data.shards renames it last). Every shard
manifest carries the sha256 of the run's spec (inputs, options, tokenizer, tool version), so a
rerun with other inputs or options into the same folder is refused instead of mixing shards.
fcntl's flock keeps two runs on one machine apart; it is released by the kernel when a run dies.
Runs split across machines (`--num-nodes`) coordinate without it: see nodes.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from solo.data.shards import FORMAT_VERSION, ShardError, read_shard_manifest
from solo.fileio import TEMP_PREFIX, atomic_write, fsync_dir
from solo.preprocess import __version__
from solo.preprocess.documents import template_of


class UsageError(ValueError):
    """Wrong arguments or inputs, found before any work: exit status 2."""


def lock(out: Path, wait_s: float = 10.0, name: str = ".lock", holder: str = "another solo-preprocess process"):
    handle = open(out / name, "w")
    deadline = time.monotonic() + wait_s  # the workers of a just-killed run may still be exiting
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise UsageError(f"{out} is being written by {holder}") from None
            time.sleep(0.1)


def spec_of(source, layout, options) -> tuple[dict, str]:
    """The run's fingerprint: (spec, its sha256)."""
    with open(layout.tokenizer.model_file, "rb") as f:
        tokenizer_sha = hashlib.sha256(f.read()).hexdigest()
    spec = {"tool_version": __version__, "format_version": FORMAT_VERSION, "source": source.spec(),
            "tokenizer_sha256": tokenizer_sha, "template": template_of(source.kind, layout), **asdict(options)}
    if source.kind == "sft":
        spec["image_first"] = layout.image_first
    return spec, hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def complete_shards(out: Path, spec_sha: str) -> dict[int, dict]:
    done = {}
    for path in sorted(out.glob("shard-*.json")):
        try:
            manifest = read_shard_manifest(path.with_suffix(""))
            if not isinstance(manifest.get("shard"), int) or isinstance(manifest["shard"], bool):
                raise ShardError(f"{path}: not a shard manifest of solo-preprocess (no shard number)")
        except ShardError as e:
            raise UsageError(f"{e}; delete the shard's files to redo it") from e
        if manifest.get("spec_sha256") != spec_sha:
            raise UsageError(f"{out} holds shards made from other inputs or options ({path.name}); "
                             "use a new --output folder or delete this one")
        done[int(manifest["shard"])] = manifest
    return done


def folder_manifest(out: Path, spec: dict, spec_sha: str, planned: int, done: dict[int, dict]) -> dict:
    manifest = summarize(spec, spec_sha, planned, done)
    atomic_write(out / "manifest.json", manifest_bytes(manifest))
    return manifest


def manifest_bytes(manifest: dict) -> bytes:
    """manifest.json's bytes: one encoding, so whichever node writes it writes the same file."""
    return (json.dumps(manifest, indent=1) + "\n").encode()


def summarize(spec: dict, spec_sha: str, planned: int, done: dict[int, dict]) -> dict:
    """The folder manifest of the complete shards `done`: a pure function of their manifests."""
    keys = ("records", "documents", "sequences", "samples", "tokens", "text_tokens", "loss_tokens",
            "vision_tokens", "images", "padding_tokens", "truncated", "padded_images")
    totals = {k: sum(m["counts"].get(k, 0) for m in done.values()) for k in keys}
    capacity = totals["samples"] * spec["seq_length"]
    totals["fill"] = round(totals["tokens"] / capacity, 6) if capacity else 0.0
    skipped: Counter = Counter()
    subsets: dict[str, Counter] = {}
    dropped: Counter = Counter()
    for m in done.values():
        skipped.update(m.get("skipped", {}))
        dropped.update(m.get("dropped", {}))
        for name, tally in m.get("subsets", {}).items():
            subsets.setdefault(name, Counter()).update(tally)
    manifest = {
        "tool": "solo-preprocess", "format_version": FORMAT_VERSION, "spec": spec, "spec_sha256": spec_sha,
        "shards_planned": planned, "shards_complete": len(done), "complete": len(done) == planned,
        "totals": totals, "skipped": dict(sorted(skipped.items())), "dropped": dict(sorted(dropped.items())),
        **({"subsets": {k: dict(v) for k, v in sorted(subsets.items())}} if subsets else {}),
        "shards": [{"name": f"shard-{k:05d}", **{c: m["counts"].get(c, 0) for c in ("records", "documents",
                    "samples", "tokens", "vision_tokens", "images", "fill")},
                    "skipped": sum(m.get("skipped", {}).values()),
                    "bytes": sum(f["bytes"] for f in m["files"].values())}
                   for k, m in sorted(done.items())],
    }
    return manifest


def remove_stale_temps(out: Path, shards: range | None = None) -> None:
    """What a killed or failed run leaves (never visible as shards), removed before writing again:
    temp files, and the parts of a shard stopped while renaming them, before its manifest.
    `shards`: only the files of these (a node of a split run leaves the other nodes' files alone:
    they may be writing them right now)."""
    def mine(name: str) -> bool:
        return shards is None or shard_number(name) in shards

    for stale in out.glob(f"{TEMP_PREFIX}*"):
        if mine(stale.name[len(TEMP_PREFIX):]):
            stale.unlink()
    for part in out.glob("shard-*.*.*"):  # shard-00003.tokens.bin, ...
        if mine(part.name) and not (out / f"{part.name.split('.')[0]}.json").exists():
            part.unlink()
    fsync_dir(out)


def shard_number(name: str) -> int:
    """3 for 'shard-00003.tokens.bin' (and 'shard-00003.spill'), -1 for a name of no shard."""
    stem = name.split(".")[0]
    digits = stem[len("shard-"):]
    return int(digits) if stem.startswith("shard-") and digits.isdigit() else -1
