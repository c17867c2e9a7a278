"""The training data loader against the 7B step, for shards storing pixels raw, as PNG and as JPEG.

    python3 benchmarks/data_loader.py                     # the paper's shape: GBS 128 on DP 4, 32,768 tokens
    python3 benchmarks/data_loader.py --step-seconds 60   # against a given step time instead of the H100 log's
    python3 benchmarks/data_loader.py --cpu-smoke         # 1,024-token rows, for the test suite

Rows are image-heavy packed samples of scikit-image's photographs resized by the SOLO rule
(`solo.vision.encode_image`, sides up to 1,024) with their captions, written as real shards of each
storage kind (`solo.data.shards.ShardWriter(pixels=...)`). Measured on the project's own path:
`solo.data.prefetch.StepPrefetcher` with `workers` processes (`solo.data.loader`; 0: the read-ahead
thread) hands out one data-parallel rank's steps (global batch / DP samples, one micro batch of one
row each) back to back, so its wall time per step is what the loader takes to read, decode and
collate a rank's step. Reported per kind: pixel bytes per vision token, PSNR of the decoded patches
against the raw ones (min and median over the images), samples per second per worker, the time a
rank's step of data takes with 8 workers against the step time (target: under a quarter), and the
host memory per rank (unique set size of the rank and its workers, peak over the run: the collated
steps held and the decode buffers; the shards' memory-mapped pages are page cache and not counted).

Step time: `--step-seconds`, else derived from docs/train_throughput_h100.log (the fitted 7B step of
one 32,768-token micro batch per GPU, recompute full) for TP=2 x DP=4 on 8 GPUs: a DP rank's
samples x 32,768 tokens / (2 GPUs x tokens/s per GPU). Worker counts the machine has no cores for
(one is left to the rank) are projected from the per-worker rate measured with one worker.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solo.config import DataConfig, DataSource  # noqa: E402
from solo.data.dataset import StageData  # noqa: E402
from solo.data.loader import default_workers  # noqa: E402
from solo.data.prefetch import StepPrefetcher  # noqa: E402
from solo.data.shards import PackedSample, ShardWriter, list_shards, open_shard  # noqa: E402
from solo.demo_data import PHOTOS, skimage_photo  # noqa: E402
from solo.fileio import atomic_write_json  # noqa: E402
from solo.tokenizer import TOKEN_IDS, SOLOTokenizer  # noqa: E402
from solo.vision import encode_image, image_token_ids  # noqa: E402

PATCH = 32
KINDS = ("raw", "png", "jpeg")
H100_LOG = Path(__file__).resolve().parents[1] / "docs" / "train_throughput_h100.log"
GPUS_PER_DP_RANK = 2  # TP=2 x DP=4 on one 8-GPU node (configs/stage1.yaml)
MIB = 2**20


def photo_documents(tok: SOLOTokenizer, max_side: int) -> list[tuple[list[int], list[int], np.ndarray]]:
    """(tokens, loss, patches) of every photograph with its caption, loss on the caption."""
    docs = []
    for file, (_, caption) in PHOTOS.items():
        image = encode_image(skimage_photo(file), PATCH, max_side)
        text = tok.encode(caption)
        tokens = [tok.bos_id] + image_token_ids(image.rows, image.cols, tok) + text + [tok.eos_id]
        docs.append((tokens, [0] * (len(tokens) - len(text) - 1) + [1] * (len(text) + 1), image.patches))
    return docs


def image_heavy_row(docs, seq: int, rng) -> PackedSample:
    """Photographs in a random order until the next one does not fit; a text document fills the rest."""
    picked, used = [], 0
    for k in rng.permutation(np.arange(10 * len(docs)) % len(docs)):
        tokens, loss, patches = docs[k]
        if used + len(tokens) > seq:
            break
        picked.append((tokens, loss, [patches]))
        used += len(tokens)
    if seq - used >= 2:
        text = [TOKEN_IDS.bos_id] + rng.integers(3, 32000, seq - used - 1).tolist()
        picked.append((text, [0] + [1] * (len(text) - 1), None))
    return PackedSample.of_documents(picked)


def write_folder(folder: Path, rows: list[PackedSample], seq: int, kind: str) -> None:
    folder.mkdir(parents=True)
    writer = ShardWriter(folder / "shard-00000", PATCH, seq_length=seq, pixels=kind)
    for row in rows:
        writer.add_sample(row)
    writer.finish({"source": f"photos-{kind}", "seq_length": seq, "patch_size": PATCH})
    atomic_write_json(folder / "manifest.json", {"shards": 1, "samples": len(rows)})


def bytes_per_vision_token(folder: Path) -> float:
    shard = open_shard(list_shards(folder)[0])
    return Path(f"{shard.prefix}.pixels.bin").stat().st_size / shard.manifest["counts"]["vision_tokens"]


def psnr(folder: Path, raw_folder: Path) -> list[float]:
    """PSNR in dB of every image read back from `folder` against the raw patches (inf: exact)."""
    shard, raw = open_shard(list_shards(folder)[0]), open_shard(list_shards(raw_folder)[0])
    values = []
    for i in range(len(raw)):
        for got, want in zip(shard.sample(i).patches, raw.sample(i).patches, strict=True):
            mse = float(np.mean((got.astype(np.float64) - want) ** 2))
            values.append(float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse))
    return values


def unique_memory(process: psutil.Process) -> int:
    """Unique set size of the process and its children (the loader's workers)."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_full_info().uss
        except psutil.Error:
            pass
    return total


def time_loader(folder: Path, seq: int, global_batch: int, dp: int, workers: int, steps: int) -> tuple[float, int]:
    """(seconds per rank step, peak added unique memory) of `steps` steps after one warm-up step."""
    data = StageData(DataConfig(sources=(DataSource("photos", str(folder), 1.0),), seq_length_tokens=seq),
                     global_batch, steps + 1, PATCH)
    me = psutil.Process()
    before, peak = unique_memory(me), 0
    with StepPrefetcher(data, 0, dp, 1, TOKEN_IDS.pad_id, workers=workers) as prefetch:
        held = prefetch.get(0)  # forks the workers, fills the pipeline
        started = time.perf_counter()
        for step in range(1, steps + 1):
            held = prefetch.get(step)  # the step before is dropped as training drops it
            peak = max(peak, unique_memory(me) - before)
        seconds = (time.perf_counter() - started) / steps
    del held
    return seconds, peak


def step_seconds_from_log(samples_per_rank: int, seq: int) -> tuple[float, str]:
    text = H100_LOG.read_text()
    match = re.search(r"32 layers \(7B\): ([\d.]+) s/step, ([\d,]+) tokens/s per GPU", text)
    if not match:
        raise SystemExit(f"data_loader.py: error: no 7B fit in {H100_LOG}; pass --step-seconds")
    per_gpu = float(match.group(2).replace(",", ""))
    seconds = samples_per_rank * seq / (GPUS_PER_DP_RANK * per_gpu)
    return seconds, (f"derived from {H100_LOG.relative_to(H100_LOG.parents[1])}: {per_gpu:,.0f} tokens/s per H100, "
                     f"{samples_per_rank} rows of {seq:,} tokens on a DP rank of {GPUS_PER_DP_RANK} GPUs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8, help="distinct rows written per kind (steps re-read them)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement, after one warm-up")
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--step-seconds", type=float, default=None, help="the step time to compare with")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="1,024-token rows of small images, 1 step, 1 worker measured")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.seq, args.global_batch, args.rows, args.steps, args.max_side = 1024, 8, 2, 1, 128
    samples = args.global_batch // args.dp
    step_s, source = (args.step_seconds, "given (--step-seconds)") if args.step_seconds else \
        step_seconds_from_log(samples, args.seq)
    cores = default_workers(None) + 1  # this process's cores (its affinity), as the training default sees them
    rng = np.random.default_rng(0)
    docs = photo_documents(SOLOTokenizer.default(), args.max_side)
    rows = [image_heavy_row(docs, args.seq, rng) for _ in range(args.rows)]
    vision = np.mean([np.count_nonzero(r.tokens == TOKEN_IDS.patch_id) / args.seq for r in rows])
    print(f"shape: global batch {args.global_batch} on DP {args.dp} = {samples} rows of {args.seq:,} tokens per rank "
          f"step, {vision:.0%} vision tokens ({len(docs)} photographs, sides <= {args.max_side})")
    print(f"step time {step_s:.1f} s ({source}); target: a rank's step of data in < {step_s / 4:.1f} s "
          f"with <= 8 workers")
    print(f"this machine: {cores} cores for the loader; worker counts beyond {cores - 1} are projected")
    with tempfile.TemporaryDirectory() as tmp:
        folders = {kind: Path(tmp) / kind for kind in KINDS}
        for kind, folder in folders.items():
            write_folder(folder, rows, args.seq, kind)
        for kind, folder in folders.items():
            report(kind, folder, folders["raw"], args, samples, step_s, cores)
    return 0


def report(kind: str, folder: Path, raw: Path, args, samples: int, step_s: float, cores: int) -> None:
    values = psnr(folder, raw)
    quality = "exact" if all(v == float("inf") for v in values) else \
        f"PSNR min {min(values):.1f} dB, median {statistics.median(values):.1f} dB"
    print(f"{kind:>4}: {bytes_per_vision_token(folder):7.1f} bytes per vision token, {quality}")
    thread_s, thread_mem = time_loader(folder, args.seq, args.global_batch, args.dp, 0, args.steps)
    print(f"      read-ahead thread: {thread_s:6.2f} s per rank step ({thread_s / step_s:.3f} of the step), "
          f"host memory +{thread_mem / MIB:,.0f} MiB")
    one_s, one_mem = time_loader(folder, args.seq, args.global_batch, args.dp, 1, args.steps)
    per_worker = samples / one_s
    print(f"      1 worker: {per_worker:6.2f} samples/s per worker, {one_s:6.2f} s per rank step, "
          f"host memory +{one_mem / MIB:,.0f} MiB")
    measured = 1 if args.cpu_smoke else cores - 1  # the smoke run measures one worker on any machine
    for workers in (2, 4, 8):
        if workers <= measured:
            seconds, memory = time_loader(folder, args.seq, args.global_batch, args.dp, workers, args.steps)
            how = f"measured, host memory +{memory / MIB:,.0f} MiB"
        else:
            seconds, how = samples / (per_worker * workers), "projected from 1 worker"
        print(f"      {workers} workers: {seconds:6.2f} s per rank step, loader/step {seconds / step_s:.3f} "
              f"({'meets' if seconds < step_s / 4 else 'misses'} the 1/4 target; {how})")


if __name__ == "__main__":
    sys.exit(main())
