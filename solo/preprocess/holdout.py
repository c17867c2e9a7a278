"""`--holdout-fraction F`: a deterministic share of a source's records kept out of its shards and
written as a folder of its own, `<output>/heldout`, for validation (`data.eval_sources`, solo.evaluate).

A record is held out when the sha256 of (seed, its key) falls below F: the split depends on the
record alone, never on the shard size, the worker count or the order of reading, so a rerun, or
another machine, holds out the same records, and no record is on both sides (two records with the
same key, a duplicated id, go to the same side: no copy of a held-out record is trained on). The
two folders are two ordinary runs of the pipeline over the same source, each reading only its side
(`Split`); each records the split in its spec, so a rerun with another F is refused, not mixed.
The held-out run reads the inputs once more; it decodes and packs only the held-out records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

from solo.preprocess.nodes import ONE_MACHINE, NodeSplit
from solo.preprocess.pipeline import Options, run

HELDOUT_FOLDER = "heldout"


def held_out(key: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}\0{key}".encode("utf-8", "backslashreplace")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


class Split:
    """`source` with only the records of one side of the split: the held-out ones or the others."""

    def __init__(self, source, fraction: float, seed: int, heldout: bool):
        self.source, self.fraction, self.seed, self.heldout = source, fraction, seed, heldout
        self.kind, self.input = source.kind, source.input

    def plan(self, *args, **kwargs):
        return self.source.plan(*args, **kwargs)

    def spec(self) -> dict:
        side = "heldout" if self.heldout else "train"
        return {**self.source.spec(), "holdout": {"fraction": self.fraction, "seed": self.seed, "side": side}}

    def read(self, items):
        for record in self.source.read(items):
            if held_out(record.key, self.fraction, self.seed) == self.heldout:
                yield record


def run_with_holdout(source, layout, options: Options, out: Path, workers: int, fraction: float,
                     split: NodeSplit = ONE_MACHINE) -> tuple[dict, dict]:
    """The training folder `out` and the held-out folder `out/heldout`: (their manifests). Under
    `split` a node writes its block of each folder's plan."""
    train = run(Split(source, fraction, options.seed, heldout=False), layout, options, out, workers, split)
    # Shards of the held-out folder are planned over all records but keep about F of them: plan
    # them 1/F times larger, so they hold about as many records as a training shard.
    larger = dataclasses.replace(options, shard_size=math.ceil(options.shard_size / fraction))
    heldout = run(Split(source, fraction, options.seed, heldout=True), layout, larger, out / HELDOUT_FOLDER, workers,
                  split)
    return train, heldout
