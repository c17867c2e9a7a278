"""`solo-preprocess`: public datasets in their native formats -> packed SOLO shards.

    solo-preprocess imagenet --input train/ --synsets LOC_synset_mapping.txt --output shards/imagenet
    solo-preprocess imagenet --input 21k/ --synsets wnids.txt --lemmas lemmas.txt --output ...
    solo-preprocess captions --input 'cc3m/*.tar' --output shards/cc3m
    solo-preprocess html     --input 'websight/*.parquet' --output shards/websight
    solo-preprocess sft      --input llava.json --images llava/images --output shards/llava [--template chatml]
    solo-preprocess text     --input 'slimpajama/*.jsonl.zst' --output shards/slimpajama
    solo-preprocess stats shards/cc3m [--per-shard]

argparse lives here only. Arguments and inputs are checked before any work: a wrong one exits
with status 2 and a message naming the path. So does an OS error during the run (a full disk, an
unreadable input): one line naming the file, no half-written shard left, and the same command
run again resumes.
"""

from __future__ import annotations

import argparse
import errno
import glob
import logging
import os
import sys
from pathlib import Path

from solo.preprocess.formats import STREAM_SUFFIXES, InputError, stream_format
from solo.templates import SFT_TEMPLATES

# Records per shard: enough tokens per shard that the last, partly filled sample costs < 1% at
# seq_length 32768 (e.g. 8192 ImageNet images of ~300 tokens = 75 samples), few enough that a
# shard's raw patches (3 KiB per vision token) stay a few GB.
DEFAULT_SHARD_SIZE = {"imagenet": 8192, "captions": 16384, "html": 4096, "sft": 8192, "text": 16384}
SCHEMAS = {
    "captions": "JSONL lines: {\"image\": path relative to the file | \"image_base64\": ...,\n"
                "\"caption\" (or txt/text)}.\n"
                "Parquet: an image column (image as {bytes, path} | jpg | png | ...) and caption/txt/text.",
    "html": "JSONL lines: {\"image\": path | \"image_base64\": ..., \"html\" (or text)}.\n"
            "Parquet (e.g. WebSight): an image column and html/text. HTML too long for --seq-length is cut.",
    "text": "JSONL lines / Parquet rows with a \"text\" field (SlimPajama). Documents longer than\n"
            "--seq-length are cut into pieces of at most --seq-length tokens.",
}
STREAM_KINDS = {"captions": STREAM_SUFFIXES, "html": STREAM_SUFFIXES, "text": (".jsonl", ".jsonl.zst", ".parquet")}


def usable_cpus() -> int:
    # The CPU set SLURM, a cgroup cpuset or taskset gives this process, not the machine's cores:
    # on a shared node os.cpu_count() would start a worker per core of the whole node.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", required=True, help="folder of shards (created; a rerun resumes it)")
    common.add_argument("--tokenizer", default=None,
                        help="sentencepiece model file (default: Mistral-7B-v0.1's, from mistral-common)")
    common.add_argument("--seq-length", type=int, default=32768, help="tokens per packed sample")
    common.add_argument("--patch-size", type=int, default=32)
    common.add_argument("--max-side", type=int, default=1024, help="longest image side after resizing")
    common.add_argument("--workers", type=int, default=usable_cpus(),
                        help="processes (default: the CPUs this process may run on)")
    common.add_argument("--shard-size", type=int, default=None,
                        help="records per shard (default: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_SHARD_SIZE.items()) + ")")
    common.add_argument("--seed", type=int, default=0, help="record and document order")

    parser = argparse.ArgumentParser(prog="solo-preprocess", description=__doc__.split("\n\nargparse")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("imagenet", parents=[common], help="ImageNet(-21K) nXXXXXXXX/*.JPEG folders")
    p.add_argument("--input", required=True, help="folder of synset folders")
    p.add_argument("--synsets", required=True, help="LOC_synset_mapping.txt, or wnids.txt with --lemmas")
    p.add_argument("--lemmas", default=None, help="lemma lines matching --synsets line by line (ImageNet-21K)")
    for kind, what in (("captions", "image-caption pairs: webdataset .tar (KEY.jpg + KEY.txt/.json), JSONL, Parquet"),
                       ("html", "(image, HTML) pairs: webdataset .tar (KEY.png + KEY.html), JSONL, Parquet"),
                       ("text", "text documents: JSONL / .jsonl.zst / Parquet with a 'text' field")):
        p = sub.add_parser(kind, parents=[common], help=what, description=f"{what}.\n\n{SCHEMAS[kind]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--input", required=True, nargs="+", metavar="PATTERN",
                       help="files, folders or glob patterns (quote them; ** recurses)")
    p = sub.add_parser("sft", parents=[common], help="LLaVA-style conversation JSON")
    p.add_argument("--input", required=True, help="JSON list of {id, image, conversations}")
    p.add_argument("--images", required=True, help="folder the 'image' paths are relative to")
    p.add_argument("--template", default="solo-inst", choices=SFT_TEMPLATES,
                   help="conversation layout (solo.templates): solo-inst, the released SOLO-7B's [INST] layout "
                        "(default), or chatml")
    p = sub.add_parser("stats", help="summary of a shard folder (its totals, as in the paper's Table 1)")
    p.add_argument("folder")
    p.add_argument("--per-shard", action="store_true", help="a row per shard above the totals")
    return parser


def _expand(patterns: list[str], suffixes: tuple[str, ...]) -> list[str]:
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = [os.path.join(pattern, n) for n in os.listdir(pattern) if stream_format(n) in suffixes]
            if not found:
                raise InputError(f"--input {pattern}: folder holds no {', '.join(suffixes)} files")
        else:
            found = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
            if not found:
                raise InputError(f"--input {pattern}: no files match")
        for f in found:
            if stream_format(f) not in suffixes:
                raise InputError(f"--input {f}: unsupported file type (expected {', '.join(suffixes)})")
        files.extend(found)
    return sorted(set(files))


def _require(path: str | None, what: str, folder: bool = False) -> None:
    if path is not None and not (os.path.isdir(path) if folder else os.path.isfile(path)):
        raise InputError(f"{what} {path}: no such {'folder' if folder else 'file'}")


def build_source(args):
    from solo.preprocess import sources

    if args.command == "imagenet":
        _require(args.input, "--input", folder=True)
        _require(args.synsets, "--synsets")
        _require(args.lemmas, "--lemmas")
        source = sources.ImageNetSource(args.input, sources.load_synsets(args.synsets, args.lemmas),
                                        args.synsets, args.lemmas)
        if not source.items():
            raise InputError(f"--input {args.input}: no images in its synset folders ({args.input}/nXXXXXXXX/*.JPEG)")
        return source
    if args.command == "sft":
        _require(args.input, "--input")
        _require(args.images, "--images", folder=True)
        return sources.ConversationSource(args.input, args.images, sources.load_conversations(args.input))
    return sources.StreamSource(args.command, args.input, _expand(args.input, STREAM_KINDS[args.command]))


def _check_options(args) -> None:
    for name in ("seq_length", "patch_size", "max_side", "workers", "shard_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.max_side % args.patch_size:
        raise InputError(f"--max-side {args.max_side} is not a multiple of --patch-size {args.patch_size}")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise InputError(f"--output {args.output} exists and is not a folder")
    _require(args.tokenizer, "--tokenizer")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("solo.preprocess").setLevel(logging.INFO)
    from solo.data.shards import ShardError
    from solo.preprocess.output import UsageError

    try:
        if args.command == "stats":
            from solo.preprocess.stats import render

            print(render(args.folder, per_shard=args.per_shard))
            return 0
        _check_options(args)
        source = build_source(args)
        from solo.preprocess.documents import Layout
        from solo.preprocess.pipeline import Options, run
        from solo.tokenizer import SOLOTokenizer

        tokenizer = SOLOTokenizer(args.tokenizer) if args.tokenizer else SOLOTokenizer.default()
        options = Options(args.seq_length, args.patch_size, args.max_side, args.seed,
                          args.shard_size or DEFAULT_SHARD_SIZE[args.command])
        layout = Layout(tokenizer, args.seq_length, args.patch_size, args.max_side,
                        template=args.template if args.command == "sft" else "plain")
        run(source, layout, options, Path(args.output), args.workers)
    except (InputError, UsageError, ShardError) as e:
        print(f"solo-preprocess: error: {e}{_disk_full(getattr(e, 'errno', None))}", file=sys.stderr)
        return 2
    except OSError as e:  # reading an input, or writing the spill file or manifest.json
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"solo-preprocess: error: {where}{e.strerror or e}{_disk_full(e.errno)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("solo-preprocess: interrupted; rerun the same command to finish", file=sys.stderr)
        return 130
    return 0


def _disk_full(error_number: int | None) -> str:
    if error_number == errno.ENOSPC:
        return " (disk full: free space, then rerun the same command to finish)"
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
