"""Keep megatron-core on plain local files (megatron-core 0.16.1, `megatron.core.msc_utils`).

megatron-core switches its file I/O to NVIDIA's multi-storage-client whenever that package is
importable (`MultiStorageClientFeature` defaults to "available"), and megatron-energon pulls it in.
Then `IndexedDatasetBuilder` writes each shard file through a `.NAME.tmp` stand-in without a real
file descriptor (so shard writing loses its kernel copies and its temp-name/rename protocol, see
`solo.data.shards`), and dist_checkpointing reads and writes through the same layer. solo-megatron
reads and writes local POSIX paths only, so the feature is switched off, as Megatron-LM's
`--disable-msc` does.
"""

from __future__ import annotations

from megatron.core.msc_utils import MultiStorageClientFeature


def apply() -> None:
    """Idempotent: megatron-core reads the flag at every open."""
    MultiStorageClientFeature.disable()

