"""A training stage's data: shards of every source, blended by megatron-core's BlendedDataset.

Each shard (see `solo.data.shards`) is one megatron-core `MegatronDataset`; its sampling weight is
the source's fraction times the shard's share of the source's packed sequences, read from the shard
manifests, so nobody types per-shard weights by hand (the SOLO authors did, after a notebook). A
shard asked for more samples than it holds is re-read in a new order each epoch. Sample `i` of the
blend is a pure function of (shards, fractions, seed, i): the data position of a run is its step.

Checked before any compute, besides each shard's own checks (`open_shard`): a folder that
solo-preprocess did not finish (`complete: false` in its manifest.json) is refused unless
`data.allow_incomplete`, and every token id must lie in the model's vocabulary. The id range comes
from each shard manifest's `token_id_range` when solo-preprocess recorded it; shards written
before that are scanned (one read of their tokens.bin, 4 bytes a token: seconds per GB, from the
page cache on every rank after the first).
"""

from __future__ import annotations

import logging
import math
import resource
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from solo.config import DataConfig
from solo.data.shards import PARTS, Shard, ShardError, list_shards, open_shard, read_folder_manifest
from solo.templates import get_template

logging.getLogger("megatron.core.datasets").setLevel(logging.ERROR)


class PackedShardDataset(MegatronDataset):
    """One shard of packed sequences; index `i` reads epoch `i // len(shard)` in a seeded order."""

    def __init__(self, shard: Shard, prefix: str, shard_id: int, num_samples: int,
                 config: BlendedMegatronDatasetConfig):
        # num_samples >= len(shard): the blend may draw a shard for several epochs.
        super().__init__(shard, prefix, np.arange(len(shard)), max(num_samples, len(shard)), Split.train, config)
        self.shard_id = shard_id
        self._epoch, self._order = -1, None

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: Shard) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: BlendedMegatronDatasetConfig) -> Shard:
        return open_shard(dataset_path)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        return {"sample": self.read(idx)}

    def read(self, idx: int, with_patches: bool = True):
        epoch, position = divmod(int(idx), len(self.dataset))
        if epoch != self._epoch:
            rng = np.random.default_rng([self.config.random_seed, self.shard_id, epoch])
            self._epoch, self._order = epoch, rng.permutation(len(self.dataset))
        return self.dataset.sample(int(self._order[position]), with_patches=with_patches)


@dataclass(frozen=True)
class SourceSummary:
    name: str
    shards: int
    samples: int
    fraction: float


class StageData:
    """The blend of one stage. `global_batch(step)` gives the packed samples of a step."""

    def __init__(self, data: DataConfig, global_batch_size: int, train_steps: int,
                 patch_size: int | None = None, vocab_size: int | None = None):
        if not data.sources:
            raise ValueError("data.sources is empty: a stage needs at least one source of shards")
        config = BlendedMegatronDatasetConfig(random_seed=data.seed, sequence_length=data.seq_length_tokens)
        listed = []
        for source in data.sources:
            prefixes = list_shards(source.path)  # raises a clear error for a missing folder
            _check_finished(source.name, source.path, data.allow_incomplete)
            if not prefixes:
                raise ShardError(f"data source {source.name!r}: no complete shards in {source.path}")
            listed.append((source, prefixes))
        _check_shard_count(sum(len(p) for _, p in listed))
        opened, self.sources = [], []
        for source, prefixes in listed:
            shards = [open_shard(p, verify_checksum=data.verify_checksums) for p in prefixes]
            for prefix, shard in zip(prefixes, shards, strict=True):
                _check_compatible(prefix, shard.manifest, data.seq_length_tokens, patch_size)
                if vocab_size is not None:
                    _check_token_ids(prefix, shard.manifest, vocab_size)
                _check_template(prefix, shard.manifest, data.template)
            opened.append((source, prefixes, shards))
            self.sources.append(SourceSummary(source.name, len(shards), sum(len(s) for s in shards), source.fraction))
        self.samples_per_epoch = sum(s.samples for s in self.sources)
        self.global_batch_size = global_batch_size
        self.train_steps = train_steps or math.ceil(self.samples_per_epoch / global_batch_size)
        self.seq_length = data.seq_length_tokens
        self.stop_id = get_template(data.template).stop_id  # carries loss in collate
        size = self.train_steps * global_batch_size
        datasets, weights = [], []
        for (source, prefixes, shards), summary in zip(opened, self.sources, strict=True):
            for prefix, shard in zip(prefixes, shards, strict=True):
                datasets.append(PackedShardDataset(shard, prefix, len(datasets), size, config))
                weights.append(source.fraction * len(shard) / summary.samples)
        self.blend = BlendedDataset(datasets, weights, size, config)

    def global_batch(self, step: int) -> list:
        start = step * self.global_batch_size
        return [self.blend[i]["sample"] for i in range(start, start + self.global_batch_size)]

    def rank_batch(self, step: int, dp_rank: int, dp_size: int, with_patches: bool = True) -> list:
        """This data-parallel rank's contiguous share of the global batch of `step` (`with_patches`:
        see `Shard.sample`)."""
        return [self.read(i, with_patches) for i in self.rank_indices(step, dp_rank, dp_size)]

    def rank_indices(self, step: int, dp_rank: int, dp_size: int) -> range:
        """The blend indices of `rank_batch`."""
        per_rank = self.global_batch_size // dp_size
        start = step * self.global_batch_size + dp_rank * per_rank
        return range(start, start + per_rank)

    def read(self, i: int, with_patches: bool = True):
        """`self.blend[i]["sample"]`, the image bytes optional (BlendedDataset's own lookup)."""
        dataset = self.blend.datasets[self.blend.dataset_index[i]]
        return dataset.read(int(self.blend.dataset_sample_index[i]), with_patches)

    def shard_of(self, i: int) -> str:
        """The prefix of the shard blend sample `i` comes from."""
        return self.blend.datasets[self.blend.dataset_index[i]].dataset.prefix


# megatron-core's IndexedDataset memory-maps each .idx and .bin, and every map holds a file
# descriptor: a shard keeps about 7 open (measured, megatron-core 0.16.1). BlendedDataset indexes
# datasets with int16.
FILES_PER_SHARD = 8
MAX_SHARDS = 32766


def _check_shard_count(shards: int) -> None:
    """Fail before opening anything if the stage's shards cannot all be open at once."""
    if shards > MAX_SHARDS:
        raise ShardError(f"the stage's sources hold {shards:,} shards; megatron-core's BlendedDataset takes at "
                         f"most {MAX_SHARDS:,}: preprocess with a larger --shard-size")
    needed = FILES_PER_SHARD * shards + 512  # and the rest of the process: sockets, logs, checkpoints
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        # A whole ImageNet21K stage is ~1,600 shards: more than the usual soft limit of 1,024 files.
        raise_to = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raise_to, hard))
        if raise_to < needed:
            raise ShardError(f"the stage's {shards:,} shards need about {needed:,} open files, the hard limit is "
                             f"{hard:,}: raise it (ulimit -Hn) or preprocess with a larger --shard-size")


def _check_compatible(prefix: str, manifest: dict, seq_length: int, patch_size: int | None) -> None:
    if manifest.get("seq_length") != seq_length:
        raise ShardError(
            f"{prefix}: packed for seq_length {manifest.get('seq_length')}, the stage uses "
            f"data.seq_length_tokens={seq_length}"
        )
    if patch_size is not None and manifest.get("patch_size") not in (None, patch_size):
        raise ShardError(
            f"{prefix}: patches of size {manifest.get('patch_size')}, the model uses patch_size={patch_size}"
        )


def _check_finished(name: str, folder: str, allowed: bool) -> None:
    """A killed solo-preprocess leaves complete shards and a manifest.json saying `complete: false`:
    training on them would silently drop the rest of the source from the blend."""
    if not (Path(folder) / "manifest.json").is_file():
        return  # shards written by other tools (tests) carry no folder manifest
    manifest = read_folder_manifest(folder)
    if manifest.get("complete", True) is False and not allowed:
        raise ShardError(
            f"data source {name!r}: {folder} is unfinished ({manifest.get('shards_complete')} of "
            f"{manifest.get('shards_planned')} shards complete; was solo-preprocess stopped?). Rerun solo-preprocess "
            f"to finish it, or set data.allow_incomplete=true to train on the complete shards")


def token_id_range(prefix: str, manifest: dict) -> tuple[int, int] | None:
    """(min, max) token id of a shard: recorded by solo-preprocess, else read from its tokens."""
    recorded = manifest.get("token_id_range")
    if isinstance(recorded, list) and len(recorded) == 2:
        return int(recorded[0]), int(recorded[1])
    path = Path(f"{prefix}.tokens.bin")
    if path.stat().st_size == 0:
        return None
    tokens = np.memmap(path, dtype=PARTS["tokens"], mode="r")
    block = 1 << 26  # 256 MB of int32 at a time: bounded memory for any shard size
    bounds = [(int(c.min()), int(c.max())) for c in (tokens[i:i + block] for i in range(0, len(tokens), block))]
    return min(low for low, _ in bounds), max(high for _, high in bounds)


def _check_token_ids(prefix: str, manifest: dict, vocab_size: int) -> None:
    ids = token_id_range(prefix, manifest)
    if ids is not None and (ids[0] < 0 or ids[1] >= vocab_size):
        raise ShardError(f"{prefix}: token ids up to {ids[1]} (lowest {ids[0]}), the model has "
                         f"model.vocab_size={vocab_size}: ids must lie in [0, {vocab_size})")


def _check_template(prefix: str, manifest: dict, template: str) -> None:
    """Supervised shards must be in the stage's template; the others are "plain" by construction.
    One template per stage, so a mix is refused too (each shard is compared with the config)."""
    source = manifest.get("source")
    if not (isinstance(source, dict) and source.get("kind") == "sft"):
        return
    recorded = manifest.get("template")
    if recorded is None:
        raise ShardError(f"{prefix}: supervised shard without a recorded template (made before templates "
                         f"were recorded: chatml, no loss on <|im_end|>); re-run solo-preprocess sft --template ...")
    if recorded != template:
        raise ShardError(f"{prefix}: supervised shard laid out in template {recorded!r}, the stage config says "
                         f"data.template={template!r}; re-run solo-preprocess sft --template {template} or set "
                         f"data.template={recorded}")
