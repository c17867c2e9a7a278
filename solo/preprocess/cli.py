"""`solo-preprocess`: public datasets in their native formats -> packed SOLO shards.

    solo-preprocess imagenet --input train/ --synsets LOC_synset_mapping.txt --output shards/imagenet
    solo-preprocess imagenet --input winter21_whole/ --synsets wnids.txt --lemmas lemmas.txt --output ...
    solo-preprocess imagenet --input imagenet21k_resized/ --synsets imagenet21k_miil_tree.pth --output ...
    solo-preprocess captions --input 'cc3m/*' --output shards/cc3m          (an img2dataset folder)
    solo-preprocess captions --input energon_ds/ --split val --output shards/val
    solo-preprocess html     --input 'websight/*.parquet' --output shards/websight
    solo-preprocess sft      --input llava.json --images llava/images --output shards/llava [--template chatml]
    solo-preprocess sft      --input all_data.jsonl --output shards/sft --holdout-fraction 0.01  (+ shards/sft/heldout)
    solo-preprocess text     --input 'slimpajama/*.jsonl.zst' --output shards/slimpajama \
                             --exclude-subsets RedPajamaCommonCrawl,RedPajamaC4
    solo-preprocess stats shards/cc3m [--per-shard]
    solo-preprocess captions ... --num-nodes 8 --node-rank 3      (one machine's part; SLURM arrays: implied)
    solo-preprocess finalize shards/cc3m                           (after all nodes, if none completed it)
    solo-preprocess captions --input 'cc3m/*' --output shards/cc3m-jpeg --pixels jpeg   (the image as JPEG q95)
    solo-preprocess stats shards/cc3m [--per-shard] [--tokens 22B]

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

from solo.preprocess.formats import STREAM_SUFFIXES, TAR_SUFFIXES, InputError, parse_fields, stream_format
from solo.templates import SFT_TEMPLATES
from solo.vision import JPEG_SUBSAMPLINGS, PIXEL_KINDS

# Records per shard: enough tokens per shard that the last, partly filled sample costs < 1% at
# seq_length 32768 (e.g. 8192 ImageNet images of ~300 tokens = 75 samples), few enough that a
# shard's raw patches (3 KiB per vision token) stay a few GB.
DEFAULT_SHARD_SIZE = {"imagenet": 8192, "captions": 16384, "html": 4096, "sft": 8192, "text": 16384}
SCHEMAS = {
    "imagenet": "--input: nXXXXXXXX/ folders of images and/or nXXXXXXXX.tar per-synset tars (the members of\n"
                "winter21_whole.tar.gz: unpack that once, the per-synset tars are read in place), mixed freely;\n"
                "or ImageNet-21K-P's root holding imagenet21k_train/ and imagenet21k_val/ (--split).\n"
                "--synsets: LOC_synset_mapping.txt ('n01440764 tench, Tinca tinca'), wnids.txt + --lemmas\n"
                "lemmas.txt, or ImageNet-21K-P's imagenet21k_miil_tree.pth (read without running pickle code).\n"
                "The document's text is the synset's first lemma, '_' as a space.",
    "captions": "JSONL lines: {\"image\": path relative to the file | \"image_base64\": ...,\n"
                "\"caption\" (or txt/text)}.\n"
                "Parquet: an image column (image as {bytes, path} | jpg | png | ...) and caption/txt/text.\n"
                "Webdataset .tar / .tar.gz: KEY.jpg with KEY.txt, KEY.json {\"caption\"}, KEY.json holding a\n"
                "LLaVA-Pretrain conversation (the gpt turn is the caption), or KEY.cls + KEY.json {\"class_name\"}\n"
                "(timm); any other layout with --fields image=jpg,text=json:caption.\n"
                "JSON (a list): LLaVA-Pretrain's blip_laion_cc_sbu_558k.json, the gpt turn as the caption (the\n"
                "instruction and <image> dropped), image paths relative to the file; JSONL lines alike.\n"
                "img2dataset output folders as they are ('dir/*' or dir): the metadata .parquet and\n"
                "*_stats.json beside each tar are not records (their counts go to the manifest).\n"
                "energon folders (.nv-meta/): the tars of --split, read with dataset.yaml's field_map.",
    "html": "JSONL lines: {\"image\": path | \"image_base64\": ..., \"html\" (or text)}.\n"
            "Parquet (e.g. WebSight): an image column and html/text. HTML too long for --seq-length is cut.",
    "sft": "JSON (a list) or JSON Lines (one a line) of LLaVA records {\"id\", \"image\": path | [paths],\n"
           "\"conversations\": [{\"from\": human|gpt|system, \"value\"}, ...]}, paths relative to --images.\n"
           "Webdataset tars/folders: KEY.jpg + KEY.json holding the conversation (Megatron-LM's\n"
           "convert_llava_pretrain_to_wds.py), or an energon VQA folder (context, answers).",
    "text": "JSONL lines / Parquet rows with a \"text\" field (SlimPajama). Documents longer than\n"
            "--seq-length are cut into pieces of at most --seq-length tokens.",
}
STREAM_KINDS = {"captions": STREAM_SUFFIXES, "html": tuple(s for s in STREAM_SUFFIXES if s != ".json"),
                "text": (".jsonl", ".jsonl.zst", ".parquet"),
                "sft": TAR_SUFFIXES}


def usable_cpus() -> int:
    # The CPU set SLURM, a cgroup cpuset or taskset gives this process, not the machine's cores:
    # on a shared node os.cpu_count() would start a worker per core of the whole node.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _int_at_least(least: int):
    """An argparse type: an int >= `least`; anything else is a usage error (exit 2) before any work."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {'positive' if least == 1 else f'>= {least}'}, got {value}")
        return value
    parse.__name__ = "positive integer" if least == 1 else f"integer >= {least}"
    return parse


positive, non_negative = _int_at_least(1), _int_at_least(0)


_TOKEN_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def token_count(text: str) -> int:
    """An argparse type: a positive number of tokens, `22B`, `4.5e9`, `300M`, `22000000000`."""
    scale = _TOKEN_SUFFIXES.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens (22B, 4.5e9, 300M), got {text!r}") from None
    if not 1 <= value < 1e18:
        raise argparse.ArgumentTypeError(f"must be at least 1 token, got {text!r}")
    return round(value)


token_count.__name__ = "token count"


def _int_in(low: int, high: int):
    at_least = _int_at_least(low)

    def parse(text: str) -> int:
        if (value := at_least(text)) > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value
    parse.__name__ = f"integer in [{low}, {high}]"
    return parse
def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", required=True, help="folder of shards (created; a rerun resumes it)")
    common.add_argument("--tokenizer", default=None,
                        help="sentencepiece model file (default: Mistral-7B-v0.1's, from mistral-common)")
    common.add_argument("--seq-length", type=positive, default=32768, help="tokens per packed sample")
    common.add_argument("--patch-size", type=positive, default=32)
    common.add_argument("--max-side", type=positive, default=1024, help="longest image side after resizing")
    common.add_argument("--workers", type=positive, default=usable_cpus(),
                        help="processes (default: the CPUs this process may run on)")
    common.add_argument("--shard-size", type=positive, default=None,
                        help="records per shard (default: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_SHARD_SIZE.items()) + ")")
    common.add_argument("--seed", type=non_negative, default=0, help="record and document order (>= 0)")
    common.add_argument("--num-nodes", type=positive, default=None,
                        help="machines writing the one --output folder, each its block of the shard plan (default: "
                        "SLURM_ARRAY_TASK_COUNT in a job array, SLURM_STEP_NUM_TASKS in an srun step, else 1)")
    common.add_argument("--node-rank", type=non_negative, default=None,
                        help="this machine's place among them, below --num-nodes (default: from SLURM_ARRAY_TASK_ID "
                        "and _MIN/_STEP, or SLURM_PROCID in an srun step)")
    common.add_argument("--pixels", choices=PIXEL_KINDS, default="raw",
                        help="how shards store images: raw uint8 patches (3,072 B per vision token, read by memory "
                        "map), or the resized image as one jpeg or png file, decoded when read (README, pixel storage)")
    common.add_argument("--jpeg-quality", type=_int_in(1, 100), default=None,
                        help="--pixels jpeg: quality (default 95)")
    common.add_argument("--jpeg-subsampling", choices=JPEG_SUBSAMPLINGS, default=None,
                        help="--pixels jpeg: chroma subsampling (default 4:4:4, full colour resolution)")
    common.add_argument("--holdout-fraction", type=_fraction, default=0.0, metavar="F",
                        help="hold this share of the records out of --output, deterministically (by a hash of "
                        "seed and record key), and write them to OUTPUT/heldout for validation (default 0: none)")

    parser = argparse.ArgumentParser(prog="solo-preprocess", description=__doc__.split("\n\nargparse")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("imagenet", parents=[common], help="ImageNet(-21K) synset folders or per-synset tars",
                       description=SCHEMAS["imagenet"], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of nXXXXXXXX/ folders and/or nXXXXXXXX.tar files, "
                   "or ImageNet-21K-P's root (imagenet21k_train/, imagenet21k_val/)")
    p.add_argument("--split", default="train", choices=("train", "val"),
                   help="ImageNet-21K-P's imagenet21k_<split> folder (default train)")
    p.add_argument("--synsets", required=True,
                   help="LOC_synset_mapping.txt, wnids.txt with --lemmas, or imagenet21k_miil_tree.pth")
    p.add_argument("--lemmas", default=None, help="lemma lines matching --synsets line by line (ImageNet-21K)")
    for kind, what in (("captions", "image-caption pairs: webdataset .tar (KEY.jpg + KEY.txt/.json), JSONL, Parquet"),
                       ("html", "(image, HTML) pairs: webdataset .tar (KEY.png + KEY.html), JSONL, Parquet"),
                       ("text", "text documents: JSONL / .jsonl.zst / Parquet with a 'text' field")):
        p = sub.add_parser(kind, parents=[common], help=what, description=f"{what}.\n\n{SCHEMAS[kind]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--input", required=True, nargs="+", metavar="PATTERN",
                       help="files, folders or glob patterns (quote them; ** recurses)")
        _stream_options(p, kind)
        if kind == "text":
            _add_subset_options(p)
    p = sub.add_parser("sft", parents=[common], help="LLaVA-style conversations: JSON, JSON Lines, webdataset",
                       description=SCHEMAS["sft"], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", metavar="PATTERN",
                   help="one .json / .jsonl file of {id, image, conversations}, or webdataset tars / folders")
    p.add_argument("--images", default=None,
                   help="folder the 'image' paths are relative to (default: the JSON file's folder)")
    _stream_options(p, "sft")
    p.add_argument("--image-position", choices=("first", "as-is"), default="first",
                   help="a record's one <image>: moved to the front of its turn as LLaVA's training does and the "
                   "SOLO processor places it (first, the default), or kept where the data put it (as-is); "
                   "records with several images always keep theirs")
    p.add_argument("--template", default="solo-inst", choices=SFT_TEMPLATES,
                   help="conversation layout (solo.templates): solo-inst, the released SOLO-7B's [INST] layout "
                        "(default), or chatml")
    p = sub.add_parser("stats", help="summary of a shard folder (its totals, as in the paper's Table 1)")
    p.add_argument("folder")
    p.add_argument("--per-shard", action="store_true", help="a row per shard above the totals")
    p.add_argument("--tokens", type=token_count, default=None, metavar="N",
                   help="project the folder's bytes per token onto N tokens (22B, 4.5e9, 300M; default: "
                   "22B, the paper's three stages)")
    p = sub.add_parser("finalize", help="complete manifest.json of a folder written by several nodes",
                       description="Writes the complete manifest.json once every planned shard is there (the last "
                       "node does so itself; this is for file systems that show other machines' files late). "
                       "Exits 2 naming the missing shards and their nodes otherwise.")
    p.add_argument("folder")
    return parser


def _add_subset_options(p) -> None:
    p.add_argument("--exclude-subsets", default="", metavar="NAME[,NAME]",
                   help="drop records whose meta.redpajama_set_name is one of these (the SOLO authors: "
                   "RedPajamaCommonCrawl,RedPajamaC4); records without one are kept")
    p.add_argument("--include-subsets", default="", metavar="NAME[,NAME]",
                   help="keep only records whose meta.redpajama_set_name is one of these; records "
                   "without one are dropped. Dropped records count as skipped: excluded_subset")


def _subset_filter(args):
    from solo.preprocess.sources import SubsetFilter

    include, exclude = (tuple(n.strip() for n in getattr(args, key, "").split(",") if n.strip())
                        for key in ("include_subsets", "exclude_subsets"))
    if set(include) & set(exclude):
        raise InputError(f"--include-subsets and --exclude-subsets both name {sorted(set(include) & set(exclude))}")
    return SubsetFilter(include, exclude) if include or exclude else None


def _stream_options(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--split", default="train",
                   help="the split of an energon folder's .nv-meta/split.yaml (train, val, test; default train)")
    if kind != "text":
        roles = {"captions": "image, text", "html": "image, text", "sft": "image, conversation | context, answers"}
        p.add_argument("--fields", default=None, metavar="ROLE=EXT[:KEY],...",
                       help=f"webdataset members by role ({roles[kind]}), e.g. image=jpg,text=json:caption; "
                       "alternatives with '|' (default: the common layouts are recognized)")


def _expand(patterns: list[str], suffixes: tuple[str, ...], split: str = "train") -> tuple[list[str], list[str]]:
    """(input files, img2dataset stats files) of the patterns: files, folders (an energon folder:
    its --split), globs. img2dataset's metadata Parquet and `*_stats.json` are set aside."""
    from solo.preprocess.sources import energon_split, is_energon, is_img2dataset_sidecar

    files, stats = [], []
    for pattern in patterns:
        if os.path.isdir(pattern) and is_energon(pattern):
            found = energon_split(pattern, split)
        elif os.path.isdir(pattern):
            # A folder's .json files are sidecars (img2dataset stats, timm's _info.json); a JSON list
            # of records is named on its own.
            found = [os.path.join(pattern, n) for n in os.listdir(pattern)
                     if (stream_format(n) in suffixes and stream_format(n) != ".json") or n.endswith("_stats.json")]
            if not any(stream_format(f) in suffixes and not is_img2dataset_sidecar(f) for f in found):
                raise InputError(f"--input {pattern}: folder holds no {', '.join(suffixes)} files")
        else:
            found = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
            if not found:
                raise InputError(f"--input {pattern}: no files match")
        for f in found:
            if is_img2dataset_sidecar(f):
                stats.extend([f] if f.endswith("_stats.json") else [])
            elif stream_format(f) not in suffixes:
                raise InputError(f"--input {f}: unsupported file type (expected {', '.join(suffixes)})")
            else:
                files.append(f)
    return sorted(set(files)), sorted(set(stats))


def _fields(args):
    """--fields, else the field map of the energon folders among the inputs, else None (detected)."""
    from solo.preprocess.sources import energon_fields, is_energon

    if getattr(args, "fields", None):
        return parse_fields(args.command, args.fields)
    maps = [energon_fields(p, args.command) for p in args.input if os.path.isdir(p) and is_energon(p)]
    if any(m != maps[0] for m in maps):
        raise InputError("--input: energon folders with different field maps; preprocess them one at a time")
    return maps[0] if maps else None


def _require(path: str | None, what: str, folder: bool = False) -> None:
    if path is not None and not (os.path.isdir(path) if folder else os.path.isfile(path)):
        raise InputError(f"{what} {path}: no such {'folder' if folder else 'file'}")


def build_source(args):
    from solo.preprocess import sources

    if args.command == "imagenet":
        _require(args.input, "--input", folder=True)
        _require(args.synsets, "--synsets")
        _require(args.lemmas, "--lemmas")
        root = sources.imagenet_root(args.input, args.split)
        source = sources.ImageNetSource(root, sources.load_synsets(args.synsets, args.lemmas),
                                        args.synsets, args.lemmas)
        if not source.items():
            raise InputError(f"--input {args.input}: no images (expected nXXXXXXXX/*.JPEG folders, nXXXXXXXX.tar "
                             "per-synset tars as winter21_whole.tar.gz holds them, or ImageNet-21K-P's "
                             "imagenet21k_train/ and imagenet21k_val/)")
        return source
    if args.command == "sft" and _conversation_file(args.input):
        [path] = args.input
        images = args.images or os.path.dirname(os.path.abspath(path))
        _require(path, "--input")
        _require(images, "--images", folder=True)
        return sources.ConversationSource(path, images, sources.load_conversations(path))
    files, stats = _expand(args.input, STREAM_KINDS[args.command], args.split)
    if not files:
        raise InputError(f"--input {' '.join(args.input)}: no input files")
    upstream = sources.img2dataset_totals(stats)
    if upstream:
        logging.getLogger("solo.preprocess").info(
            "img2dataset: %(successes)d of %(count)d URLs downloaded (failed to download %(failed_to_download)d, "
            "to resize %(failed_to_resize)d); the failures never reached the tars", upstream)
    return sources.StreamSource(args.command, args.input, files, _fields(args), upstream, _subset_filter(args))


def _conversation_file(inputs: list[str]) -> bool:
    """sft's --input is one JSON / JSON Lines file, unless it names webdataset tars or folders."""
    return len(inputs) == 1 and not (os.path.isdir(inputs[0]) or glob.has_magic(inputs[0])
                                     or stream_format(inputs[0]) in TAR_SUFFIXES)


def _check_options(args) -> None:
    # Each value alone is checked by its argparse type; here what depends on several, or on files.
    if args.max_side % args.patch_size:
        raise InputError(f"--max-side {args.max_side} is not a multiple of --patch-size {args.patch_size}")
    if args.pixels != "jpeg" and (given := [f for f in ("jpeg_quality", "jpeg_subsampling") if getattr(args, f)]):
        raise InputError(f"--{given[0].replace('_', '-')} applies to --pixels jpeg, not --pixels {args.pixels}")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise InputError(f"--output {args.output} exists and is not a folder")
    _require(args.tokenizer, "--tokenizer")


def _node_split(parser: argparse.ArgumentParser, args):
    from solo.preprocess.nodes import split_from

    try:
        return split_from(args.num_nodes, args.node_rank, os.environ)
    except ValueError as e:
        parser.error(str(e))  # exit 2, before any work


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    split = _node_split(parser, args) if args.command not in ("stats", "finalize") else None
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("solo.preprocess").setLevel(logging.INFO)
    from solo.data.shards import ShardError
    from solo.preprocess.output import UsageError

    try:
        if args.command == "stats":
            from solo.preprocess.stats import report

            text, documents = report(args.folder, per_shard=args.per_shard,
                                     **({"tokens": args.tokens} if args.tokens else {}))
            print(text)
            if documents == 0:
                raise ShardError(f"{args.folder}: its shards hold no documents (every record was skipped)")
            return 0
        if args.command == "finalize":
            return _finalize(args.folder)
        _check_options(args)
        source = build_source(args)
        from solo.preprocess.documents import Layout
        from solo.preprocess.pipeline import Options, run, skip_summary
        from solo.tokenizer import SOLOTokenizer

        tokenizer = SOLOTokenizer(args.tokenizer) if args.tokenizer else SOLOTokenizer.default()
        options = Options(args.seq_length, args.patch_size, args.max_side, args.seed,
                          args.shard_size or DEFAULT_SHARD_SIZE[args.command], _pixel_storage(args))
        layout = Layout(tokenizer, args.seq_length, args.patch_size, args.max_side,
                        image_first=getattr(args, "image_position", "first") == "first",
                        template=args.template if args.command == "sft" else "plain")
        if args.holdout_fraction:
            from solo.preprocess.holdout import HELDOUT_FOLDER, run_with_holdout

            manifest, heldout = run_with_holdout(source, layout, options, Path(args.output), args.workers,
                                                 args.holdout_fraction, split)
            if heldout["complete"] and heldout["totals"]["documents"] == 0:
                raise UsageError(f"--holdout-fraction {args.holdout_fraction}: no documents held out in "
                                 f"{Path(args.output) / HELDOUT_FOLDER} ({heldout['totals']['records']:,} records; "
                                 f"{skip_summary(heldout['skipped'])}): hold out a larger fraction")
        else:
            manifest = run(source, layout, options, Path(args.output), args.workers, split)
        if manifest["complete"] and manifest["totals"]["documents"] == 0:
            raise UsageError(f"--output {args.output}: no documents from {manifest['totals']['records']:,} records "
                             f"({skip_summary(manifest['skipped'])})")
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


def _finalize(folder: str) -> int:
    from solo.preprocess.nodes import finalize
    from solo.preprocess.output import UsageError

    manifest = finalize(Path(folder))
    t = manifest["totals"]
    if t["documents"] == 0:
        raise UsageError(f"{folder}: no documents from {t['records']:,} records")
    print(f"{folder}: complete, {manifest['shards_complete']} shards, {t['documents']:,} documents, "
          f"{t['samples']:,} samples")
    return 0
def _pixel_storage(args):
    from solo.data.shards import PixelStorage

    return PixelStorage(args.pixels, args.jpeg_quality or 95, args.jpeg_subsampling or "4:4:4")


def _disk_full(error_number: int | None) -> str:
    if error_number == errno.ENOSPC:
        return " (disk full: free space, then rerun the same command to finish)"
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
