"""Host memory of the training read-ahead per tensor-parallel rank: every TP rank reading (before)
vs TP rank 0 reading and broadcasting to the others (now, `solo.data.batch.broadcast_batch`).

    python3 benchmarks/read_ahead_memory.py                 # image-heavy 32K rows, 4 micro batches a step
    python3 benchmarks/read_ahead_memory.py --cpu-smoke     # 1K rows, for the test suite

Image-heavy packed rows (`train_throughput.packed_row`, images up to 1024x1024) are written as real
shards (solo.data.shards.ShardWriter); `solo.data.prefetch.StepPrefetcher`, as `solo.train` runs
it, hands out step 0 and reads step 1 ahead. Measured: the resident memory (RSS, psutil) that this
adds to the process and the bytes of the collated tensors it holds, for a rank that reads
(`reads=True`: TP rank 0 now, every TP rank before) and for one that receives (`reads=False`: TP
ranks 1.. now). What a receiving rank holds instead is one micro batch at a time, on the device.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_throughput import packed_row  # noqa: E402
from solo.config import DataConfig, DataSource  # noqa: E402
from solo.data.dataset import StageData  # noqa: E402
from solo.data.prefetch import StepPrefetcher  # noqa: E402
from solo.data.shards import PackedSample, ShardWriter  # noqa: E402
from solo.fileio import atomic_write_json  # noqa: E402
from solo.tokenizer import TOKEN_IDS  # noqa: E402

PATCH = 32
MIB = 2**20


def write_shard(folder: Path, rows: int, seq: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    writer = ShardWriter(folder / "shard-00000", PATCH)
    for _ in range(rows):
        sample, _ = packed_row(seq, PATCH, rng, image_fraction=0.6)
        writer.add_sample(PackedSample(sample.tokens, sample.loss_mask, sample.document_lengths, sample.patches))
    writer.finish({"source": "images", "seq_length": seq, "patch_size": PATCH})
    atomic_write_json(folder / "manifest.json", {"shards": 1, "samples": rows})


def held(data: StageData, micro_batches: int, reads: bool) -> tuple[float, float]:
    """(RSS added, bytes of collated tensors) while step 0 is handed out and step 1 read ahead."""
    gc.collect()
    before = psutil.Process().memory_info().rss
    with StepPrefetcher(data, 0, 1, 1, TOKEN_IDS.pad_id, reads=reads) as prefetch:
        step0 = prefetch.get(0)
        step1 = prefetch._next[1].result()  # the read-ahead, complete
        rss = psutil.Process().memory_info().rss - before
        tensors = sum(t.nbytes for b in step0 + step1 if b is not None for t in b.__dict__.values())
    del step0, step1
    return rss, tensors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--micro-batches", type=int, default=4, help="per step and data-parallel rank")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size, for the per-node totals")
    parser.add_argument("--cpu-smoke", action="store_true", help="1,024-token rows")
    args = parser.parse_args()
    seq = 1024 if args.cpu_smoke else args.seq
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        write_shard(folder, 2 * args.micro_batches, seq)
        data = StageData(DataConfig(sources=(DataSource("images", str(folder), 1.0),), seq_length_tokens=seq),
                         global_batch_size=args.micro_batches, train_steps=2, patch_size=PATCH)
        receiving = held(data, args.micro_batches, reads=False)  # first: nothing read yet
        reading = held(data, args.micro_batches, reads=True)
    print(f"read-ahead of {args.micro_batches} micro batches of one {seq}-token row a step (2 steps held):")
    for name, (rss, tensors) in (("a rank that reads", reading), ("a rank that receives", receiving)):
        print(f"  {name:<21}: RSS +{rss / MIB:8.1f} MiB, collated tensors {tensors / MIB:8.1f} MiB")
    print(f"TP rank != 0: before {reading[0] / MIB:.1f} MiB (every TP rank read), after {receiving[0] / MIB:.1f} MiB; "
          f"per TP group of {args.tp}: before {args.tp * reading[0] / MIB:.1f} MiB, after {reading[0] / MIB:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
