"""solo-convert: move weights between HuggingFace and SOLO checkpoints (one process, CPU is enough).

    solo-convert hf-to-solo --hf Mistral-7B-v0.1/ --output ckpt/mistral-solo --tp 2
    solo-convert hf-to-solo --hf SOLO-7B/ --output ckpt/solo-7b          # the authors' release
    solo-convert solo-to-hf --checkpoint runs/stage3 --output export/solo-hf

`hf-to-solo` reads safetensors and writes a megatron-core dist_checkpointing folder (use it as
`init_from`); `solo-to-hf` writes a folder transformers loads as `FuyuForCausalLM` (see
`solo.convert.solo_to_hf`). Both validate everything before writing and write into a temporary
folder renamed at the end, so a failed run leaves no output.
"""

from __future__ import annotations

import argparse
import logging
import sys

DTYPES = ("bfloat16", "float32")


def _number(kind: type, minimum: float, strict: bool):
    """An argparse type: a `kind` above (or from) `minimum`, so a bad count is a usage error, exit 2."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not (value > minimum if strict else value >= minimum) or value != value:  # NaN too
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="solo-convert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_solo = commands.add_parser("hf-to-solo", help="HF Mistral / SoloForCausalLM -> SOLO checkpoint")
    to_solo.add_argument("--hf", required=True, help="HF folder: config.json + *.safetensors")
    to_solo.add_argument("--output", required=True, help="new checkpoint folder (must not exist)")
    to_solo.add_argument("--tp", type=_number(int, 0, strict=True), default=1,
                         help="tensor-parallel size to check the shape against (the checkpoint itself loads at any TP)")
    to_solo.add_argument("--seed", type=_number(int, 0, strict=False), default=1234,
                         help="seed of the new patch projection")
    to_solo.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: the HF weights' dtype)")
    to_hf = commands.add_parser("solo-to-hf", help="SOLO checkpoint (any TP) -> HF FuyuForCausalLM folder")
    to_hf.add_argument("--checkpoint", required=True, help="checkpoint folder, or a save dir with `latest`")
    to_hf.add_argument("--output", required=True, help="new HF folder (must not exist)")
    to_hf.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: as stored)")
    to_hf.add_argument("--tokenizer", help="Mistral-7B-v0.1 sentencepiece model (default: the packaged one)")
    to_hf.add_argument("--max-shard-gb", type=_number(float, 0, strict=True), default=2.0,
                       help="safetensors shard size limit (peak memory is the model plus one shard)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("solo").setLevel(logging.INFO)  # ours only: megatron-core's INFO lines are noise here

    from solo.checkpoint import CheckpointError
    from solo.convert.common import ConversionError
    from solo.convert.hf_to_solo import convert_hf_to_solo
    from solo.convert.solo_to_hf import convert_solo_to_hf

    try:
        if args.command == "hf-to-solo":
            out = convert_hf_to_solo(args.hf, args.output, tp=args.tp, seed=args.seed, dtype=args.dtype)
        else:
            out = convert_solo_to_hf(args.checkpoint, args.output, dtype=args.dtype, tokenizer_model=args.tokenizer,
                                     max_shard_bytes=int(args.max_shard_gb * 1024**3))
    except (ConversionError, CheckpointError, FileNotFoundError) as e:
        print(f"solo-convert: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(out)
    return 0


if __name__ == "__main__":  # dist_checkpointing's writer spawns processes: keep the guard
    sys.exit(main())
