"""Shards in a process pool: read records, build documents, pack, write; resume by skipping.

multiprocessing runs one shard per task; a shard's bytes depend only on its records and the
options (documents shuffled with (seed, shard), packed by `packing.pack`, written by
`solo.data.shards.ShardWriter`), so `--workers` never changes the output. A complete shard is one
whose manifest exists; a rerun skips those, deletes stale `.tmp-*` files and writes the rest. Workers
ask the kernel to kill them when the parent dies, so a killed run leaves no writer behind (the
output folder's bookkeeping is in `output.py`; a run split across machines, in `nodes.py`). A run
that fails (a full disk, say) stops the other workers and removes every temporary; the CLI names
the file and the rerun finishes the folder. tqdm shows records/s and tokens/s.

Decoded patches are large (3 KiB per vision token), so a worker spills them to a temporary file in
arrival order and the kernel copies them into the shard in packed order (os.copy_file_range):
memory stays at the token arrays, and the patches never pass through this process again.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from solo.data.shards import PackedSample, PatchesInFile, PixelStorage, ShardWriter
from solo.fileio import discard, naming, temp_path
from solo.preprocess import __version__, nodes, output
from solo.preprocess.documents import Document, Layout, Skip, build, padded_images, template_of
from solo.preprocess.nodes import ONE_MACHINE, NodeSplit
from solo.preprocess.packing import pack
from solo.preprocess.sources import ShardTask
from solo.templates import get_template

log = logging.getLogger("solo.preprocess")
# Skip warnings shown per reason in each process: real corpora skip thousands of records for the
# same reason; the shard manifests count every one and the run ends with the totals by reason.
SKIP_WARNINGS_PER_REASON = 10
_skip_warnings: Counter = Counter()


def _warn_skip(kind: str, key: str, skip: Skip) -> None:
    _skip_warnings[skip.reason] += 1
    n = _skip_warnings[skip.reason]
    if n <= SKIP_WARNINGS_PER_REASON:
        more = "; further skips for this reason are counted, not shown" if n == SKIP_WARNINGS_PER_REASON else ""
        log.warning("skip %s %s: %s: %s%s", kind, key, skip.reason, skip.detail, more)


@dataclass(frozen=True)
class Options:
    seq_length: int
    patch_size: int
    max_side: int
    seed: int
    shard_size: int
    pixels: PixelStorage = field(default_factory=PixelStorage)  # how shards store images (solo.data.shards)


def shard_prefix(out: Path, k: int) -> Path:
    return out / f"shard-{k:05d}"


# -- one shard ---------------------------------------------------------------------------------

class _Spill:
    """Patches in arrival order on disk; `add` returns where they are, as `PatchesInFile` that
    ShardWriter copies into the shard inside the kernel."""

    def __init__(self, path: Path):
        self.path, self.file, self.offset = path, None, 0

    def add(self, patches: np.ndarray) -> PatchesInFile:
        # A failed write (ENOSPC) names no file; the CLI's error must say which disk is full.
        with naming(self.path):
            if self.file is None:
                self.file = open(self.path, "w+b")
            self.file.write(np.ascontiguousarray(patches).data)
        start, self.offset = self.offset, self.offset + patches.nbytes
        return PatchesInFile(self.file.fileno(), start, patches.shape)

    def finish_writing(self) -> None:
        if self.file is not None:
            with naming(self.path):
                self.file.flush()

    def remove(self) -> None:
        discard(self.path, self.file)


def write_shard(task: ShardTask, source, layout: Layout, options: Options, out: Path, spec_sha: str,
                spec_kind: str, shards_planned: int, progress=lambda records, tokens: None) -> dict:
    """Read, build, pack and write shard `task.index`; returns its manifest."""
    prefix = shard_prefix(out, task.index)
    writer = ShardWriter(prefix, options.patch_size, options.seq_length,
                         stop_id=get_template(template_of(spec_kind, layout)).stop_id, pixels=options.pixels.kind,
                         jpeg_quality=options.pixels.jpeg_quality, jpeg_subsampling=options.pixels.jpeg_subsampling)
    spill = _Spill(temp_path(f"{prefix}.spill"))
    try:
        docs: list[tuple[np.ndarray, np.ndarray, list]] = []
        skipped: Counter = Counter()
        dropped: Counter = Counter()  # parts of kept records left out, by reason
        counts = Counter()
        subsets: dict[str, Counter] = {}  # SlimPajama's meta.redpajama_set_name: records, excluded
        pending_records = pending_tokens = 0
        last = time.monotonic()
        for record in source.read(task.items):
            counts["records"] += 1
            pending_records += 1
            if spec_kind == "text":  # per subset ("(none)": no meta), so a filter's effect is visible
                tally = subsets.setdefault(record.subset or "(none)", Counter(records=0, excluded=0))
                tally["records"] += 1
                tally["excluded"] += (record.error or ("",))[0] == "excluded_subset"
            try:
                pieces: list[Document] = build(spec_kind, record, layout)
            except Skip as s:
                skipped[s.reason] += 1
                _warn_skip(spec_kind, record.key, s)
                continue
            counts["documents"] += 1
            counts["truncated"] += any(p.truncated for p in pieces)
            counts["padded"] += sum(padded_images(p, layout.tokenizer, layout.patch_size) for p in pieces)
            dropped.update(p.dropped for p in pieces if p.dropped)
            for piece in pieces:
                docs.append((piece.tokens, piece.loss, [spill.add(p) for p in piece.patches]))
                pending_tokens += len(piece.tokens)
            if time.monotonic() - last > 0.25:
                progress(pending_records, pending_tokens)
                pending_records = pending_tokens = 0
                last = time.monotonic()
        progress(pending_records, pending_tokens)
        # A seed-determined document order, the same for any number of workers.
        order = np.random.default_rng([options.seed, task.index]).permutation(len(docs))
        bins = pack([len(docs[i][0]) for i in order], options.seq_length)
        spill.finish_writing()
        for b in bins:
            chosen = [docs[order[j]] for j in b]
            writer.add_sample(PackedSample(
                tokens=np.concatenate([d[0] for d in chosen]),
                loss_mask=np.concatenate([d[1] for d in chosen]),
                document_lengths=[len(d[0]) for d in chosen],
                patches=[p for d in chosen for p in d[2]],
            ))
        manifest = writer.finish({
            "tool": "solo-preprocess", "tool_version": __version__, "shard": task.index,
            "shards_planned": shards_planned, "source": {"kind": spec_kind, "input": source.input, **task.description},
            "spec_sha256": spec_sha, "template": template_of(spec_kind, layout), **asdict(options),
            "counts": {"records": counts["records"], "documents": counts["documents"],
                       "truncated": counts["truncated"], "padded_images": counts["padded"]},
            "skipped": dict(sorted(skipped.items())),
            "dropped": dict(sorted(dropped.items())),
            **({"subsets": {k: dict(v) for k, v in sorted(subsets.items())}} if subsets else {}),
        })
    except BaseException:
        writer.abort()
        raise
    finally:
        spill.remove()
    c = manifest["counts"]
    log.info("%s: %d records -> %d documents -> %d samples, fill %.2f%%, %d skipped",
             prefix.name, c["records"], c["documents"], c["samples"], 100 * c.get("fill", 0), sum(skipped.values()))
    return manifest


PADDED_WARNING_SHARE = 0.2  # photo corpora have some images on plain backgrounds; not a fifth


def warn_if_padded(totals: dict) -> None:
    images, padded = totals.get("images", 0), totals.get("padded_images", 0)
    if images and padded / images > PADDED_WARNING_SHARE:
        log.warning("%d of %d images (%.0f%%) are letterboxed or padded (uniform bands on two opposite sides): "
                    "SOLO trains on the image as it is, bands included. img2dataset pads with its default "
                    "--resize_mode=border; download with --image_size=1024 --resize_mode=keep_ratio_largest "
                    "--resize_only_if_bigger=True (README, data)", padded, images, 100 * padded / images)


def skip_summary(skipped: dict[str, int]) -> str:
    """'skipped 12 records: missing_text 10, corrupt_image 2' (every reason, most frequent first)."""
    if not skipped:
        return "skipped no records"
    reasons = sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))
    return f"skipped {sum(skipped.values()):,} records: " + ", ".join(f"{r} {n:,}" for r, n in reasons)


# -- worker processes --------------------------------------------------------------------------

_STATE: dict = {}


def _init_worker(state: dict) -> None:
    _STATE.update(state)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
    if sys.platform.startswith("linux"):
        # Die with the parent: an orphan of a killed run must not keep writing temp files.
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != state["parent_pid"]:
            os._exit(1)


def _progress(records: int, tokens: int) -> None:
    if records or tokens:
        _STATE["queue"].put((records, tokens))


def _run_task(task: ShardTask) -> dict:
    s = _STATE
    return write_shard(task, s["source"], s["layout"], s["options"], s["out"], s["spec_sha"], s["kind"],
                       s["planned"], _progress)


# -- the run -----------------------------------------------------------------------------------

def _import_megatron() -> None:
    # Imported once here (seconds: it pulls in torch and megatron.core) so that forked workers
    # inherit it; its warnings about TransformerEngine/apex concern training, not this tool.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.datasets.indexed_dataset  # noqa: F401


def _parallel_map(ctx, workers: int):
    """A `map` over a short-lived pool, for planning (counting the records of each input file)."""
    def map_fn(fn, items):
        items = list(items)
        if workers == 1 or len(items) < 2:
            return list(map(fn, items))
        with ctx.Pool(min(workers, len(items)), _init_worker, ({"parent_pid": os.getpid()},)) as pool:
            return pool.map(fn, items)
    return map_fn


def _nothing() -> None:
    return None


class _Progress:
    """The tqdm bar (records/s, tokens/s) and the folder manifest, rewritten at most every 2 s."""

    def __init__(self, total_records: int, kind: str, write_manifest):
        from tqdm import tqdm

        self.bar = tqdm(total=total_records, unit="rec", unit_scale=True, dynamic_ncols=True, desc=kind,
                        mininterval=0.5)
        self.tokens, self.last_write, self.write_manifest = 0, 0.0, write_manifest

    def advance(self, records: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(records)
        elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)

    def shard_done(self) -> None:
        if time.monotonic() - self.last_write > 2:
            self.write_manifest()
            self.last_write = time.monotonic()

    def close(self) -> None:
        self.bar.close()


def run(source, layout: Layout, options: Options, out: Path, workers: int, split: NodeSplit = ONE_MACHINE) -> dict:
    """Write every missing shard of `source` into `out` (with `split`: this node's block of them);
    returns the folder manifest."""
    out.mkdir(parents=True, exist_ok=True)
    lock = nodes.lock(out, split)
    _skip_warnings.clear()  # forked workers start from this
    pool = progress = None
    tasks: list[ShardTask] = []
    try:
        _import_megatron()
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        t0 = time.monotonic()
        tasks = source.plan(options.shard_size, options.seed, _parallel_map(ctx, workers))
        spec, spec_sha = output.spec_of(source, layout, options)
        nodes.check_folder(out, spec, spec_sha, len(tasks), split)
        done = output.complete_shards(out, spec_sha)
        mine = split.shards(len(tasks))
        todo = [t for t in tasks if t.index in mine and t.index not in done]
        log.info("%s: %d records in %d shards (%d complete, %d to write%s), planned in %.1fs, %d workers",
                 source.kind, sum(t.records for t in tasks), len(tasks), len(done), len(todo),
                 f" as {split}: shards {mine.start}-{mine.stop - 1}" if split.split else "",
                 time.monotonic() - t0, workers)

        if split.split:
            # A node writes manifest.json once (incomplete) and the last node the complete one: a
            # node's progress rewrite could land after the last node's and undo it.
            nodes.start(out, spec, spec_sha, len(tasks), done, split)

            def write_manifest() -> dict:
                return nodes.finish(out, spec, spec_sha, len(tasks), split)

            progress_manifest = _nothing
        else:
            output.remove_stale_temps(out)

            def write_manifest() -> dict:
                return output.folder_manifest(out, spec, spec_sha, len(tasks), done)

            progress_manifest = write_manifest
            manifest = write_manifest()
            if not todo:
                return manifest
        if workers > 1 and len(todo) > 1:
            # Forked before tqdm starts its monitor thread (a fork copies no thread, only its locks).
            queue = ctx.SimpleQueue()
            state = {"source": source, "layout": layout, "options": options, "out": out, "spec_sha": spec_sha,
                     "kind": source.kind, "planned": len(tasks), "queue": queue, "parent_pid": os.getpid()}
            pool = ctx.Pool(min(workers, len(todo)), _init_worker, (state,))
        progress = _Progress(sum(t.records for t in todo), source.kind, progress_manifest)
        if pool is None:
            for task in todo:
                done[task.index] = write_shard(task, source, layout, options, out, spec_sha, source.kind,
                                               len(tasks), progress.advance)
                progress.shard_done()
        else:
            pending = {t.index: pool.apply_async(_run_task, (t,)) for t in todo}
            while pending:
                while not queue.empty():
                    progress.advance(*queue.get())
                for k in [k for k, r in pending.items() if r.ready()]:
                    done[k] = pending.pop(k).get()  # re-raises a worker's exception
                    progress.shard_done()
                time.sleep(0.05)
            while not queue.empty():
                progress.advance(*queue.get())
        progress.close()
        progress = None
        manifest = write_manifest()
        t = manifest["totals"]
        log.info("done: %d shards, %d documents -> %d samples, fill %.2f%%; %s",
                 manifest["shards_complete"], t["documents"], t["samples"], 100 * t["fill"],
                 skip_summary(manifest["skipped"]))
        warn_if_padded(t)
        return manifest
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
            pool = None
        # Workers stopped mid-shard (SIGTERM runs none of their cleanup) leave spill and shard
        # temporaries: removed here, under the lock, so a failed run leaves nothing half-written.
        try:
            output.remove_stale_temps(out, split.shards(len(tasks)) if split.split else None)
        except OSError:
            pass  # the error being raised says more; the rerun removes them
        raise
    finally:
        if progress is not None:
            progress.close()  # the error message starts on a line of its own
        if pool is not None:
            pool.terminate()
            pool.join()
        lock.close()
