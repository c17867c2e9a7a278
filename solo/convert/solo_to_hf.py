"""SOLO checkpoint (saved at any TP size) -> a HF folder stock transformers loads as FuyuForCausalLM.

megatron-core's dist_checkpointing reads the checkpoint into one TP=1 model (it reshards whatever
layout it was saved with); safetensors writes the shards; transformers writes the config, the
generation config and the tokenizer (`tokenizer.json` built offline from the sentencepiece model
by the `tokenizers` library, equal to `SOLOTokenizer`, with the SOLO tokens added after its
pieces). The prompt template the checkpoint was trained on (`solo.templates`) is recorded in the
processor config and config.json, and generation_config.json carries its rule: stop on its stop
id, suppress every other id >= 32000.

Why Fuyu: `FuyuForCausalLM` (transformers 5.x) is a decoder (`text_config`, here Mistral with
`sliding_window` = the model's `attention_window_tokens`, null for full causal attention; its
`language_model` is a `MistralModel`, which applies the window in every attention implementation)
whose input embedding at every
`image_token_id` (32001, `<vpatch>`) position is *replaced* by `vision_embed_tokens(patch)`, a
`Linear(3*P*P -> hidden)` with bias. SOLO *adds* the `<vpatch>` embedding to a bias-free
projection, so the export writes that embedding row into `vision_embed_tokens.bias`: the two
models compute the same input embedding. The projection's columns are permuted to Fuyu's
(row, column, channel) patch flattening (`layouts.patch_columns_to_fuyu`); `SOLOProcessor` emits
patches in that order. Padded vocabulary rows are dropped (vocab 33,031). Tensor names are the
ones `FuyuForCausalLM.save_pretrained` writes (`language_model.model.*`, `language_model.lm_head`,
`vision_embed_tokens.*`), the names transformers has always used for Fuyu checkpoints.
Memory: one TP=1 model plus one shard (`--max-shard-gb`, 2 GB by default).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from solo.config import ModelConfig
from solo.convert.common import (
    SOLO_VOCAB,
    ConversionError,
    check_output,
    empty_model,
    single_process_world,
    staged_output,
)
from solo.convert.layouts import hf_shape, mistral_entries, patch_columns_to_fuyu, read_hf
from solo.convert.model_card import model_card
from solo.convert.processor import SOLOProcessor
from solo.templates import TEMPLATES, get_template
from solo.tokenizer import SP_VOCAB_SIZE, SPECIAL_TOKENS, SOLOTokenizer

log = logging.getLogger("solo.convert")

MAX_SHARD_BYTES = 2 * 1024**3  # peak memory is the model plus one shard
INDEX_FILE = "model.safetensors.index.json"


def fuyu_name(hf_name: str) -> str:
    """Mistral name -> the name in a saved FuyuForCausalLM."""
    return "language_model." + hf_name


def model_config_from_meta(checkpoint: Path) -> ModelConfig:
    from solo.checkpoint import read_meta

    saved = read_meta(checkpoint).get("model")
    if not isinstance(saved, dict):
        raise ConversionError(f"{checkpoint}: solo_meta.json has no model config")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    model = ModelConfig(**{k: v for k, v in saved.items() if k in names})
    if model.vocab_size != SOLO_VOCAB:
        raise ConversionError(f"{checkpoint}: vocab_size {model.vocab_size}, the SOLO tokenizer has {SOLO_VOCAB}")
    return model


def template_from_meta(checkpoint: Path) -> str:
    """The prompt template the checkpoint was trained on (checkpoints from before templates were
    recorded: plain, the pretraining layout)."""
    from solo.checkpoint import read_meta

    name = read_meta(checkpoint).get("template", "plain")
    if name not in TEMPLATES:
        raise ConversionError(f"{checkpoint}: solo_meta.json names template {name!r}; known: {sorted(TEMPLATES)}")
    return name


def _stored_dtype(checkpoint: Path) -> torch.dtype:
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    return metadata["embedding.word_embeddings.weight"].dtype


def _tensors(solo, model: ModelConfig, patch_id: int):
    """(name, shape, make) for every exported tensor, in file order; `make()` builds it from `solo`."""
    params = dict(solo.named_parameters())
    for entry in mistral_entries(model.num_layers):
        shape = hf_shape(entry, model, SOLO_VOCAB)
        yield fuyu_name(entry.hf), shape, (lambda e=entry: read_hf(params[e.solo].data, e, model, SOLO_VOCAB))
    yield ("vision_embed_tokens.weight", (model.hidden_size, model.patch_dim),
           lambda: patch_columns_to_fuyu(params["patch_projection.weight"].data, model.patch_size))
    yield ("vision_embed_tokens.bias", (model.hidden_size,),
           lambda: params["embedding.word_embeddings.weight"].data[patch_id].clone())


def _write_weights(
    folder: Path, solo, model: ModelConfig, patch_id: int, dtype: torch.dtype, max_shard_bytes: int,
) -> None:
    """safetensors shards of at most `max_shard_bytes` (one tensor per shard if larger) + the index."""
    from safetensors.torch import save_file

    items = list(_tensors(solo, model, patch_id))
    size = torch.tensor([], dtype=dtype).element_size()
    shards, current, current_bytes = [], [], 0
    for item in items:
        nbytes = size * int(torch.Size(item[1]).numel())
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape, make in shard:
            tensor = make().to(dtype).contiguous()
            assert tuple(tensor.shape) == tuple(shape), (name, tensor.shape, shape)
            tensors[name] = tensor
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors  # one shard in memory at a time
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_configs(folder: Path, model: ModelConfig, dtype: torch.dtype, tok: SOLOTokenizer, template: str) -> None:
    from transformers import FuyuConfig, GenerationConfig, MistralConfig

    text = MistralConfig(
        vocab_size=SOLO_VOCAB, hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups, head_dim=model.hidden_size // model.num_attention_heads,
        hidden_act="silu", max_position_embeddings=model.max_position_embeddings,
        rms_norm_eps=model.norm_epsilon, rope_theta=model.rope_theta,
        sliding_window=model.attention_window_tokens,  # as trained; None: full causal attention
        tie_word_embeddings=False, initializer_range=model.init_method_std,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
    )
    config = FuyuConfig(
        text_config=text.to_dict(), patch_size=model.patch_size, num_channels=3,
        image_size=model.max_image_side, image_token_id=tok.patch_id, tie_word_embeddings=False,
        initializer_range=model.init_method_std,
        # transformers before 5.2x sizes `vision_embed_tokens` from these top-level fields, not
        # from text_config (seen with 5.17: a 4096-wide projection and a load error otherwise).
        hidden_size=model.hidden_size, vocab_size=SOLO_VOCAB,
    )
    config.architectures = ["FuyuForCausalLM"]
    config.solo_template = template  # solo.templates; SOLOProcessor reads it from its own config file
    config.dtype = dtype
    config.text_config.dtype = dtype
    config.save_pretrained(folder)
    # The authors' generation rule: no id >= 32000 but the template's stop id; stop on it or </s>.
    chosen = get_template(template)
    stop = chosen.stop_ids()
    GenerationConfig(
        bos_token_id=tok.bos_id, eos_token_id=stop[0] if len(stop) == 1 else stop, pad_token_id=tok.pad_id,
        do_sample=False,
        suppress_tokens=chosen.suppressed_ids(),
    ).save_pretrained(folder)


def hf_tokenizer(tok: SOLOTokenizer):
    """`SOLOTokenizer` as a HF fast tokenizer (the `tokenizers` library runs it), id for id.

    sentencepiece's BPE merges, at each step, the adjacent pair whose merged piece has the highest
    score; HF's BPE merges by rank, so the merges are ranked by that score (transformers'
    `generate_merges` with the scores). transformers' own Llama conversion ranks them otherwise and
    merged whitespace first ("a  b" -> "▁a" "▁▁" "b"; sentencepiece: "▁a" "▁" "▁b", because "▁▁"
    scores -1e9). The normalizer is sentencepiece's dummy prefix and space marker, applied to each
    text run between added tokens (as `SOLOTokenizer.encode` per segment), also when the run starts
    with a space (Metaspace would skip the prefix there: " lead" -> "▁lead", sentencepiece "▁" "▁lead").
    The special tokens stay text inside user text (`split_special_tokens`), as in `SOLOTokenizer`:
    callers insert special ids by id (`SOLOProcessor`), or pass `split_special_tokens=False`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    pieces = [tok.id_to_piece(i) for i in range(SP_VOCAB_SIZE)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    scores = {piece: tok.piece_score(i) for i, piece in enumerate(pieces)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=generate_merges(vocab, scores), unk_token="<unk>",
                                   fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    control = [tok.id_to_piece(i) for i in (tok.unk_id, tok.bos_id, tok.eos_id)]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control + list(SPECIAL_TOKENS)])
    bos = tok.id_to_piece(tok.bos_id)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=control[2], unk_token=control[0], pad_token=control[0],
        add_bos_token=True, add_eos_token=False, split_special_tokens=True, clean_up_tokenization_spaces=False,
    )


def write_tokenizer(folder: Path, tok: SOLOTokenizer, model: ModelConfig, template: str = "plain") -> None:
    """tokenizer.model (sentencepiece, read by SOLOProcessor) + tokenizer.json/tokenizer_config.json
    (read by `AutoTokenizer.from_pretrained`; `hf_tokenizer`) + the HF processor (`processing_solo`)."""
    # copies tokenizer.model, writes our processor config (the model's patch size, image side, template)
    SOLOProcessor(tok, model.patch_size, model.max_image_side, template).save_pretrained(folder)
    hf = hf_tokenizer(tok)
    wrong = {t: hf.convert_tokens_to_ids(t) for t, i in tok.special_tokens.items() if hf.convert_tokens_to_ids(t) != i}
    if len(hf) != tok.vocab_size or wrong:
        raise RuntimeError(f"HF tokenizer ids differ from SOLO's: size {len(hf)}, tokens {list(wrong.items())[:3]}")
    # The tokenizer with the template's chat template, the processor configs and processing_solo.py
    # (the remote code AutoProcessor loads with trust_remote_code=True).
    from solo.convert.processing_solo import SOLOHFProcessor, SOLOImageProcessor

    image_processor = SOLOImageProcessor(model.patch_size, model.max_image_side)
    SOLOHFProcessor(image_processor, hf, template=template).save_pretrained(folder)


def _read(checkpoint: Path, fn, *args, **kwargs):
    """megatron-core / torch DCP raise their own types (a CheckpointException is not even an
    Exception) for missing, truncated or mismatched tensor files: one clear ConversionError instead."""
    from torch.distributed.checkpoint.api import CheckpointException

    from solo.checkpoint import CheckpointError

    try:
        return fn(*args, **kwargs)
    except CheckpointError as e:
        raise ConversionError(str(e)) from e
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        detail = (str(e).strip().splitlines() or [""])[-1][:300]
        raise ConversionError(f"{checkpoint}: cannot read the checkpoint's tensors ({type(e).__name__}: {detail}); "
                              f"is the folder complete and written by solo-train or solo-convert?") from e


def convert_solo_to_hf(
    checkpoint: str | os.PathLike, output: str | os.PathLike, dtype: str | None = None,
    tokenizer_model: str | os.PathLike | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Export; returns the output folder. `dtype`: "bfloat16"/"float32" (default: as stored)."""
    from solo.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint

    output = Path(output)
    check_output(output)
    try:
        checkpoint = resolve_checkpoint(checkpoint)
    except CheckpointError as e:
        raise ConversionError(str(e)) from e
    model = model_config_from_meta(checkpoint)
    template = template_from_meta(checkpoint)
    try:
        tok = SOLOTokenizer(tokenizer_model) if tokenizer_model else SOLOTokenizer.default()
    except (OSError, ValueError) as e:
        raise ConversionError(f"tokenizer {tokenizer_model or '(packaged)'}: {e}") from e
    with single_process_world(seed=0):
        stored = _read(checkpoint, _stored_dtype, checkpoint)
        out_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype] if dtype else stored
        solo = empty_model(model, stored)
        _read(checkpoint, load_checkpoint, checkpoint, solo, load_rng=False)
        log.info("%s: %d layers, hidden %d, stored %s -> %s (%s)", checkpoint, model.num_layers,
                 model.hidden_size, stored, output, out_dtype)
        with staged_output(output) as tmp:
            _write_weights(tmp, solo, model, tok.patch_id, out_dtype, max_shard_bytes)
            _write_configs(tmp, model, out_dtype, tok, template)
            write_tokenizer(tmp, tok, model, template)
            card = model_card(checkpoint, model, template, str(out_dtype).removeprefix("torch."))
            (tmp / "README.md").write_text(card)
    log.info("wrote %s: load with transformers.FuyuForCausalLM.from_pretrained and "
             "AutoProcessor.from_pretrained(trust_remote_code=True) (README.md in it says how)", output)
    return output

