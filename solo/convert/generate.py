"""solo-generate: greedy generation from an exported SOLO model (`solo-convert solo-to-hf`).

transformers runs the model (`FuyuForCausalLM.generate`, greedy, KV cache; the image patches enter
at the first step through Fuyu's `pixel_values`); `SOLOProcessor` builds the inputs exactly as
training did, in the template the model was trained on (`--template` for another). As the SOLO
authors' demo, every id >= 32000 is suppressed but the template's stop id, and generation ends on
`</s>` or that id (`solo.templates`; the export's generation_config.json says the same).

    solo-generate --model export/solo-hf --image dog.jpg --prompt "A photo of" --template plain
    solo-generate --model export/solo-hf --image dog.jpg --prompt "What is in the image?" --template solo-inst
    solo-generate --model export/solo-hf --image dog.jpg --image cat.png --prompt "What is in the image?"

Several `--image` run as one batch, padded on the left (`batch_inputs`); each answer is printed on
its own line, and the throughput (new tokens per second of `generate`) on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

from solo.templates import TEMPLATES


def load(model_dir: str, dtype: str = "auto"):
    """(model, processor) from an exported folder."""
    import torch
    from transformers import FuyuForCausalLM

    from solo.convert.processor import SOLOProcessor

    if dtype == "auto":  # bf16 matmuls are slow on most CPUs: compute in fp32 there
        dtype = "auto" if torch.cuda.is_available() else "float32"
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = FuyuForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, SOLOProcessor.from_pretrained(model_dir)


def fuyu_inputs(model, inputs: dict) -> dict:
    """`SOLOProcessor` output named as this transformers' `FuyuForCausalLM.forward` wants it:
    `pixel_values` (5.23), `image_patches` in earlier releases (5.17 ignores `pixel_values`
    silently), plus `image_patches_indices` (patch number at each `<vpatch>`, else -1) where the
    signature still has it. Moved to the model's device and dtype."""
    import inspect

    params = inspect.signature(model.forward).parameters
    out = {k: v.to(model.device) for k, v in inputs.items()}
    if "pixel_values" in out:
        patches = out.pop("pixel_values").to(model.dtype)
        out["pixel_values" if "pixel_values" in params else "image_patches"] = patches
        if "image_patches_indices" in params:
            is_patch = out["input_ids"] == model.config.image_token_id
            out["image_patches_indices"] = (is_patch.cumsum(-1) - 1).masked_fill(~is_patch, -1)
    return out


def batch_inputs(processor, images, prompts, template: str | None = None) -> dict:
    """Tensors for several (image or None, prompt) pairs: each encoded by `SOLOProcessor` (the
    training code), then padded on the left into one batch as the HF processor pads
    (`processing_solo.pad_batch`: masked `<vpatch>` ids for the patches a smaller image lacks)."""
    from solo.convert.layouts import patches_to_fuyu
    from solo.convert.processing_solo import pad_batch
    from solo.vision import normalize_patches

    samples = []
    for image, prompt in zip(images, prompts, strict=True):
        encoded = processor.encode(image, prompt, template)
        pixels = patches_to_fuyu(normalize_patches(encoded.patches), processor.patch_size)
        samples.append((encoded.input_ids, pixels if len(pixels) else None))
    tok = processor.tokenizer
    return dict(pad_batch(samples, tok.pad_id, tok.patch_id, processor.patch_dim, "left", "pt"))


def generate_batch(model, processor, images, prompts, max_new_tokens: int = 32,
                   template: str | None = None) -> list[list[int]]:
    """The generated ids of each (image, prompt) (prompt excluded), each ending with its first stop
    id unless `max_new_tokens` ran out. `template`: a `solo.templates` name (default: the
    processor's, i.e. the model's)."""
    import torch

    from solo.templates import get_template

    chosen = get_template(template or processor.template)
    inputs = fuyu_inputs(model, batch_inputs(processor, images, prompts, chosen.name))
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=chosen.stop_ids(), suppress_tokens=chosen.suppressed_ids(),
            pad_token_id=processor.tokenizer.pad_id,
        )
    stops = set(chosen.stop_ids())
    return [_until_stop(row, stops) for row in out[:, inputs["input_ids"].shape[1]:].tolist()]


def _until_stop(ids: list[int], stops: set[int]) -> list[int]:
    # A finished row of a batch is padded after its stop id.
    end = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
    return ids[:end]


def generate(model, processor, image=None, prompt: str = "", max_new_tokens: int = 32,
             template: str | None = None) -> list[int]:
    """`generate_batch` of one (image, prompt)."""
    return generate_batch(model, processor, [image], [prompt], max_new_tokens, template)[0]


def _pairs(images: list[str], prompts: list[str]) -> tuple[list, list[str]]:
    """One prompt for every image, or one per image; no image: the prompts alone."""
    if not images:
        return [None] * len(prompts or [""]), prompts or [""]
    if len(prompts) <= 1:
        return images, (prompts or [""]) * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} --prompt for {len(images)} --image: give one, or one per image")
    return images, prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="solo-generate", description="Greedy generation from an exported SOLO model.")
    parser.add_argument("--model", required=True, help="folder written by `solo-convert solo-to-hf`")
    parser.add_argument("--image", action="append", default=[],
                        help="image file; repeat for a batch (optional: text-only prompts work too)")
    parser.add_argument("--prompt", action="append", default=[],
                        help="text after the image; one for every image, or one per --image")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default=None,
                        help="prompt layout (default: the one the model was trained on, from the export)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="compute dtype (auto: as stored on GPU, float32 on CPU)")
    args = parser.parse_args(argv)
    from solo.vision import ImageLoadError

    try:
        images, prompts = _pairs(args.image, args.prompt)
        model, processor = load(args.model, args.dtype)
        start = time.perf_counter()
        answers = generate_batch(model, processor, images, prompts, args.max_new_tokens, template=args.template)
        seconds = time.perf_counter() - start
    except (FileNotFoundError, ImageLoadError, ValueError, OSError) as e:
        print(f"solo-generate: error: {e}", file=sys.stderr, flush=True)
        return 2
    stops = processor.stop_ids(args.template)
    for ids in answers:
        print(processor.decode(ids[:-1] if ids and ids[-1] in stops else ids))
    tokens = sum(map(len, answers))
    print(f"solo-generate: {tokens} new tokens for {len(answers)} prompt(s) in {seconds:.2f} s "
          f"({tokens / seconds:.1f} tokens/s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
