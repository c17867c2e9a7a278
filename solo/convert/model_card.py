"""The export's model card (README.md): what the model is, what it was trained on, how to use it.

Everything comes from the checkpoint's `solo_meta.json` (stage, train_steps, step, template, the
stage config with its `data.sources`, `converted_from` for an import), from the `solo_meta.json`
of each earlier stage its `init_from` names, and from each source's `manifest.json`
(`solo-preprocess`'s folder manifest: kind, documents, samples, tokens, images), where those
folders are still reachable from the machine that exports; what is not is said so.
"""

from __future__ import annotations

import json
from pathlib import Path

from solo.config import ModelConfig
from solo.templates import get_template
from solo.tokenizer import SP_VOCAB_SIZE, SPECIAL_TOKENS, TOKEN_IDS

MAX_STAGES = 8  # init_from chains longer than the project's three stages are cut here
LAYOUTS = {
    "plain": "`<s>` IMAGE prompt (the pretraining layout: the model continues the text)",
    "solo-inst": "IMAGE `<s>[INST] {prompt} [/INST]` answer `</s>` (the released SOLO-7B's layout)",
    "chatml": "`<s><|im_start|>user\\n` IMAGE `\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n` answer `<|im_end|>`",
}


def stage_history(checkpoint: Path) -> list[tuple[Path, dict]]:
    """(checkpoint, meta) of this stage and the earlier ones its `init_from` chain reaches, oldest first."""
    from solo.checkpoint import CheckpointError, read_meta, resolve_checkpoint

    chain, current = [], checkpoint
    while current is not None and len(chain) < MAX_STAGES:
        meta = read_meta(current)
        chain.append((current, meta))
        parent = (meta.get("config") or {}).get("init_from") or ""
        try:
            current = resolve_checkpoint(parent) if parent else None
        except (CheckpointError, OSError, ValueError):
            chain.append((Path(parent), {}))  # named but not reachable here
            current = None
    return chain[::-1]


def _source_line(source: dict) -> str:
    path = Path(str(source.get("path", "")))
    line = f"| {source.get('name', '?')} | {source.get('fraction', '?')} | `{path}` |"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return line + " not reachable at export |"
    totals, spec = manifest.get("totals", {}), manifest.get("spec", {})
    kind = spec.get("kind") or (spec.get("source") or {}).get("kind") or "?"
    counts = ", ".join(f"{totals[k]:,} {k}" for k in ("documents", "samples", "tokens", "images") if k in totals)
    return line + f" {kind}: {counts} |"


def _stage_section(path: Path, meta: dict) -> list[str]:
    if not meta:
        return [f"### (earlier stage at `{path}`: not reachable at export)", ""]
    stage = meta.get("stage", "?")
    lines = [f"### Stage `{stage}`", ""]
    if stage == "converted":
        source = meta.get("converted_from", {})
        return lines + [f"Converted from the {source.get('format', '?')} checkpoint `{source.get('path', '?')}` "
                        f"({source.get('dtype', '?')}); no training in this project.", ""]
    steps = meta.get("train_steps")
    lines.append(f"Step {meta.get('step', '?')} of {steps if steps is not None else '?'}, "
                 f"template `{meta.get('template', 'plain')}`.")
    config = meta.get("config") or {}
    sources = (config.get("data") or {}).get("sources") or []
    if sources:
        lines += ["", "| source | fraction | path | contents (manifest.json) |", "|---|---|---|---|"]
        lines += [_source_line(s) for s in sources]
    if config:
        lines += ["", f"Global batch {config.get('global_batch_size', '?')}, sequence length "
                  f"{(config.get('data') or {}).get('seq_length_tokens', '?')} tokens, "
                  f"peak lr {(config.get('optimizer') or {}).get('lr', '?')}."]
    return lines + [""]


def model_card(checkpoint: Path, model: ModelConfig, template: str, dtype: str) -> str:
    chosen = get_template(template)
    names = {TOKEN_IDS.eos_id: "</s>", **{SP_VOCAB_SIZE + i: t for i, t in enumerate(SPECIAL_TOKENS)}}
    stops = " or ".join(f"`{names[i]}` (id {i})" for i in chosen.stop_ids())
    window = model.attention_window_tokens or "none (full causal attention)"
    lines = [
        "---", "library_name: transformers", "pipeline_tag: image-text-to-text",
        "tags: [solo, fuyu, vision-language, solo-megatron]", "---", "",
        "# SOLO vision-language model", "",
        "A single transformer for vision and language (SOLO, arXiv 2407.06438): image patches enter the",
        "decoder as tokens through one linear projection, no vision encoder. Trained with solo-megatron",
        "and exported by `solo-convert solo-to-hf` as a stock transformers `FuyuForCausalLM` (a Mistral",
        "decoder; the projection is Fuyu's `vision_embed_tokens`).", "",
        f"{model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} heads "
        f"({model.num_query_groups} key-value groups), vocabulary 33,031 (Mistral's 32,000 + SOLO's tokens), "
        f"patches of {model.patch_size}x{model.patch_size} pixels, images up to {model.max_image_side} pixels "
        f"a side, attention window {window}, weights in {dtype}.", "",
        "## Training", "",
    ]
    for path, meta in stage_history(checkpoint):
        lines += _stage_section(path, meta)
    lines += [
        "## Prompt template", "",
        f"`{template}`: {LAYOUTS[template]}. IMAGE is `<vision>` rows of `<vpatch>` joined by `<vrow_sep>`, "
        f"closed by `{'<vision>' if template == 'solo-inst' else '</vision>'}`. The chat template in "
        "`tokenizer_config.json` writes this layout; generation_config.json stops on "
        f"{stops} and suppresses every other id >= 32000.", "",
        "## Use", "",
        "The processor (SOLO's resize rule, no padding, ImageNet mean/std, the layout above) is",
        "`processing_solo.py` in this folder, loaded as remote code: `trust_remote_code=True` is for",
        "the processor only, the model is stock transformers. With `solo-megatron` installed,",
        "`solo.convert.processing_solo.SOLOHFProcessor.from_pretrained(folder)` is the same code",
        "without remote code.", "",
        "```python",
        "import torch",
        "from transformers import AutoProcessor, FuyuForCausalLM, pipeline",
        "",
        'processor = AutoProcessor.from_pretrained("MODEL", trust_remote_code=True)',
        'model = FuyuForCausalLM.from_pretrained("MODEL", dtype=torch.bfloat16, device_map="auto")',
        'messages = [{"role": "user", "content": [{"type": "image", "image": "photo.jpg"},',
        '                                         {"type": "text", "text": "What is in the image?"}]}]',
        "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,",
        '                                       return_dict=True, return_tensors="pt")',
        "inputs = inputs.to(model.device, model.dtype)  # pixel_values in the model's dtype",
        "out = model.generate(**inputs, max_new_tokens=64)",
        'print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "",
        "# a batch: several conversations (images of any size), padded on the left",
        "batch = processor.apply_chat_template([messages, other_messages], add_generation_prompt=True,",
        '                                      tokenize=True, return_dict=True, return_tensors="pt",',
        '                                      processor_kwargs={"padding": True}).to(model.device, model.dtype)',
        "",
        'pipe = pipeline("image-text-to-text", model="MODEL", trust_remote_code=True)',
        "pipe(text=messages, max_new_tokens=64)",
        "```", "",
        "`pixel_values` come as float32: move them with `.to(model.device, model.dtype)` (casts only",
        "the float tensors) for a bf16/fp16 model; the pipeline does it itself. `device_map=\"auto\"`",
        "needs `accelerate` (`pip install solo-megatron[hf]`).", "",
    ]
    return "\n".join(lines)
