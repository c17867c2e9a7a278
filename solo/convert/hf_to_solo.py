"""HF Mistral (or the SOLO authors' `SoloForCausalLM`) -> a SOLO checkpoint (our format).

safetensors reads the HF weights, one tensor at a time (`safe_open`; pickle files are refused);
megatron-core's dist_checkpointing writes the result (torch_dist format, resharded to any TP size
on load) next to `solo_meta.json`, so the folder is a `solo.checkpoint` checkpoint: pass it as
`init_from` to a training stage.

Memory: the SOLOModel is built once, empty, in the checkpoint's dtype (no random init of 7B
weights); each HF tensor is read, copied into its place and dropped. Peak memory is one model plus
the embedding matrix twice over (its mean is taken in float32): about 15.5 GB for Mistral-7B in
bf16. (Measured on a 191M-parameter bf16 model: 948 MB peak RSS, 390 MB of it before the model.)

What is new in a Mistral checkpoint and how it starts (docs/design.md "Model"):
* embedding and output rows 32000..33030 (the SOLO special tokens): the mean of the 32,000
  existing rows of the same matrix, in float32 (HF `resize_token_embeddings(mean_resizing=True)`
  without its noise; every new token starts as an "average" token instead of a random direction);
* rows past 33,031 (padding to a multiple of 128): zero; they are never predicted;
* the patch projection: normal(0, initializer_range) drawn from a CPU generator seeded by `seed`,
  as HF/the authors initialize a fresh `nn.Linear` and as SOLOModel itself does.
A `SoloForCausalLM` checkpoint already has 33,031 rows and `model.embed_vision_patch.weight`
(flattened (channel, row, column), our training order): all of it is kept.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from solo.config import MODEL_PRESETS, ModelConfig
from solo.convert.common import ConversionError, check_output, empty_model, single_process_world, staged_output
from solo.convert.layouts import AUTHORS_PATCH_NAME, IGNORED_SUFFIXES, hf_shape, mistral_entries, write_hf
from solo.tokenizer import SP_VOCAB_SIZE
from solo.tokenizer import VOCAB_SIZE as SOLO_VOCAB

log = logging.getLogger("solo.convert")

MISTRAL_ARCH, AUTHORS_ARCH = "MistralForCausalLM", "SoloForCausalLM"
_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}


@dataclass
class HFSource:
    folder: Path
    kind: str  # "mistral" or "solo" (the authors' format)
    config: dict
    files: dict[str, Path]  # tensor name -> safetensors file
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors dtype names ("BF16", "F32", ...)


# -- reading and checking the HF folder (no torch model, nothing written) ----------------------------

def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise ConversionError(f"{folder}: no such directory")
    if not path.is_file():
        raise ConversionError(f"{path}: missing (a HF checkpoint folder has config.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return config


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index}: not a safetensors index (no weight_map): {e}") from e
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConversionError(f"{index} names shard(s) that are missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles:
        raise ConversionError(
            f"{folder}: only pickle weights ({pickles}); solo-convert reads safetensors only, since "
            "loading a pickle can run code. Convert them to safetensors first, in a sandbox you trust."
        )
    raise ConversionError(f"{folder}: no *.safetensors weights found")


def read_hf_source(folder: str | os.PathLike) -> HFSource:
    """Check config.json (a Mistral or SoloForCausalLM) and list every tensor: names, shapes, files."""
    from safetensors import safe_open

    folder = Path(folder)
    config = _read_config(folder)
    archs = config.get("architectures") or []
    if AUTHORS_ARCH in archs:
        kind = "solo"
    elif config.get("model_type") == "mistral" and (not archs or MISTRAL_ARCH in archs):
        kind = "mistral"
    else:
        raise ConversionError(
            f"{folder / 'config.json'}: model_type {config.get('model_type')!r}, architectures {archs}: "
            f"not a Mistral checkpoint; solo-convert reads {MISTRAL_ARCH} (model_type 'mistral') or "
            f"the SOLO authors' {AUTHORS_ARCH}"
        )
    files, shapes, dtypes = {}, {}, {}
    for path in _weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name.endswith(IGNORED_SUFFIXES):
                        continue
                    if name in files:
                        raise ConversionError(f"tensor {name} is in both {files[name]} and {path}")
                    piece = f.get_slice(name)
                    files[name], shapes[name], dtypes[name] = path, tuple(piece.get_shape()), piece.get_dtype()
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
    return HFSource(folder, kind, config, files, shapes, dtypes)


def _rope_theta(config: dict, where: str) -> float:
    # transformers < 5 writes `rope_theta` (and `rope_scaling`), 5.x writes `rope_parameters`.
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling")
    if scaling or params.get("rope_type", "default") != "default":
        raise ConversionError(f"{where}: RoPE scaling {scaling or params} is not supported (plain RoPE only)")
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if theta != int(theta):  # SOLOModel passes rotary_base as an int (megatron-core's GPTModel)
        raise ConversionError(f"{where}: rope_theta {theta} is not an integer")
    return theta


def _attention_window(config: dict, where: str) -> int | None:
    # HF's `sliding_window: w` (a query sees keys q - w < kv <= q) is `attention_window_tokens: w`.
    # Absent, transformers' MistralConfig and the authors' SoloConfig both default to 4096.
    window = config.get("sliding_window", 4096)
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConversionError(f"{where}: sliding_window {window!r} is neither null nor a positive integer")
    return window


def model_config_from_hf(src: HFSource) -> ModelConfig:
    """Our ModelConfig for the HF config.json (shape fields; vocab is always the SOLO 33,031)."""
    c, where = src.config, str(src.folder / "config.json")
    try:
        layers, hidden = int(c["num_hidden_layers"]), int(c["hidden_size"])
        heads, ffn = int(c["num_attention_heads"]), int(c["intermediate_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{where}: missing or bad model size field {e}") from e
    groups = int(c.get("num_key_value_heads") or heads)
    checks = [
        (c.get("hidden_act", "silu") == "silu", f"hidden_act {c.get('hidden_act')!r} (SOLO uses SwiGLU: silu)"),
        (hidden % heads == 0 and heads % groups == 0,
         f"hidden_size {hidden}, {heads} heads, {groups} key/value heads do not divide"),
        (c.get("head_dim") in (None, hidden // heads),
         f"head_dim {c.get('head_dim')} != hidden_size / num_attention_heads = {hidden // max(heads, 1)}"),
        (not c.get("attention_bias") and not c.get("mlp_bias"), "attention/MLP biases are not supported"),
        (not c.get("tie_word_embeddings", False), "tied input/output embeddings (SOLO's output layer is untied)"),
    ]
    for ok, problem in checks:
        if not ok:
            raise ConversionError(f"{where}: {problem}")
    vocab = int(c.get("vocab_size", 0))
    expected_vocab = SOLO_VOCAB if src.kind == "solo" else SP_VOCAB_SIZE
    if vocab != expected_vocab:
        raise ConversionError(
            f"{where}: vocab_size {vocab}, expected {expected_vocab} "
            f"({'the SOLO vocabulary' if src.kind == 'solo' else 'the Mistral-7B-v0.1 tokenizer'})"
        )
    patch_size = 32
    if src.kind == "solo":
        patch_size = int(c.get("vision_patch_size", 32))
    max_positions = int(c.get("max_position_embeddings", 32768))
    shape = dict(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
        ffn_hidden_size=ffn, norm_epsilon=float(c.get("rms_norm_eps", 1e-5)), rope_theta=_rope_theta(c, where),
        vocab_size=SOLO_VOCAB, patch_size=patch_size, max_position_embeddings=max_positions,
        init_method_std=float(c.get("initializer_range", 0.02)), attention_window_tokens=_attention_window(c, where),
    )
    preset = next((name for name, p in MODEL_PRESETS.items()
                   if all(getattr(p, k) == v for k, v in shape.items() if k != "max_position_embeddings")), "custom")
    return ModelConfig(preset=preset, **shape)


def expected_tensors(src: HFSource, model: ModelConfig) -> dict[str, tuple[int, ...]]:
    hf_vocab = SOLO_VOCAB if src.kind == "solo" else SP_VOCAB_SIZE
    shapes = {e.hf: hf_shape(e, model, hf_vocab) for e in mistral_entries(model.num_layers)}
    if src.kind == "solo":
        shapes[AUTHORS_PATCH_NAME] = (model.hidden_size, model.patch_dim)
    return shapes


def check_tensors(src: HFSource, model: ModelConfig) -> None:
    """Every expected tensor present with its shape, nothing unexpected (it would be lost)."""
    expected = expected_tensors(src, model)
    where = src.folder
    missing = sorted(set(expected) - set(src.files))
    if missing:
        raise ConversionError(f"{where}: {len(missing)} tensor(s) missing from the safetensors files, "
                              f"e.g. {missing[:5]}")
    unexpected = sorted(set(src.files) - set(expected))
    if unexpected:
        raise ConversionError(f"{where}: unexpected tensor(s) {unexpected[:5]} (in {src.files[unexpected[0]]}); "
                              "a conversion would drop them")
    for name, shape in expected.items():
        if src.shapes[name] != shape:
            raise ConversionError(
                f"{src.files[name]}: tensor {name} has shape {list(src.shapes[name])}, config.json implies "
                f"{list(shape)} (layers {model.num_layers}, hidden {model.hidden_size}, heads "
                f"{model.num_attention_heads}/{model.num_query_groups}, ffn {model.ffn_hidden_size})"
            )
        if src.dtypes[name] not in _DTYPES:
            raise ConversionError(f"{src.files[name]}: tensor {name} has dtype {src.dtypes[name]}")


def check_tensor_parallel(model: ModelConfig, tp: int) -> None:
    problems = [f"{what} {n} is not divisible by --tp {tp}" for what, n in (
        ("num_attention_heads", model.num_attention_heads), ("num_key_value_heads", model.num_query_groups),
        ("padded vocabulary", model.padded_vocab_size), ("intermediate_size", model.ffn_hidden_size),
    ) if n % tp]
    if tp < 1 or problems:
        raise ConversionError(f"tensor parallel size {tp}: " + ("; ".join(problems) or "must be >= 1"))


def _fill(model_module, src: HFSource, model: ModelConfig, seed: int) -> dict:
    from safetensors import safe_open

    def tensor(name: str) -> torch.Tensor:
        # One open per tensor: safetensors maps the whole file, and pages of a file kept open stay
        # in this process's resident memory; closing after each read keeps the peak at one model.
        with safe_open(str(src.files[name]), framework="pt") as f:
            return f.get_tensor(name)

    params = dict(model_module.named_parameters())
    written: set[str] = set()
    notes = {}
    for entry in mistral_entries(model.num_layers):
        value = tensor(entry.hf)
        param = params[entry.solo]
        write_hf(param.data, entry, value, model)
        if entry.part == "rows":
            _fill_new_rows(param.data, value, src.kind)
        written.add(entry.solo)
        del value
    projection = params["patch_projection.weight"]
    if src.kind == "solo":
        projection.data.copy_(tensor(AUTHORS_PATCH_NAME))
        notes["patch_projection"] = f"kept from {AUTHORS_PATCH_NAME}"
        notes["special_rows"] = "kept from the checkpoint"
    else:
        generator = torch.Generator().manual_seed(seed)
        draw = torch.randn(projection.shape, generator=generator, dtype=torch.float32)
        projection.data.copy_(draw * model.init_method_std)
        notes["patch_projection"] = f"normal(0, {model.init_method_std}), CPU generator seed {seed}"
        notes["special_rows"] = f"mean of rows 0..{SP_VOCAB_SIZE - 1} of the same matrix"
    written.add("patch_projection.weight")
    unwritten = sorted(set(params) - written)
    if unwritten:  # would leave uninitialized memory in the checkpoint: a bug, never silent
        raise RuntimeError(f"conversion left parameters unset: {unwritten}")
    return notes


def _fill_new_rows(param: torch.Tensor, hf_rows: torch.Tensor, kind: str) -> None:
    """Rows the HF matrix lacks: special tokens (Mistral only) get the mean row, padding zero."""
    with torch.no_grad():
        n = hf_rows.shape[0]
        if kind == "mistral":
            param[n:SOLO_VOCAB] = hf_rows.float().mean(dim=0).to(param.dtype)
        param[SOLO_VOCAB:] = 0


def _dtype(src: HFSource, requested: str | None) -> torch.dtype:
    if requested:
        return {"bfloat16": torch.bfloat16, "float32": torch.float32}[requested]
    stored = _DTYPES[src.dtypes["model.embed_tokens.weight"]]
    if stored == torch.float16:
        log.warning("%s: float16 weights are written as float32 (lossless; SOLO trains in bf16/fp32)", src.folder)
        return torch.float32
    return stored


def convert_hf_to_solo(
    hf_dir: str | os.PathLike, output: str | os.PathLike, tp: int = 1, seed: int = 1234,
    dtype: str | None = None,
) -> Path:
    """Convert; returns the checkpoint folder. Every check runs before anything is written."""
    from megatron.core import dist_checkpointing

    from solo.checkpoint import META_FILE, model_meta

    output = Path(output)
    check_output(output)
    src = read_hf_source(hf_dir)
    model = model_config_from_hf(src)
    check_tensors(src, model)
    check_tensor_parallel(model, tp)
    torch_dtype = _dtype(src, dtype)
    log.info("%s (%s): %d layers, hidden %d -> %s, %s", src.folder, src.kind, model.num_layers,
             model.hidden_size, output, torch_dtype)

    with single_process_world(seed):
        solo = empty_model(model, torch_dtype)
        notes = _fill(solo, src, model, seed)
        meta = model_meta(
            model, {"tensor_parallel": 1, "pipeline_parallel": 1, "data_parallel": 1},
            # The authors' SoloForCausalLM (SOLO-7B) was fine-tuned on their [INST] layout.
            template="solo-inst" if src.kind == "solo" else "plain",
            step=0, stage="converted",
            converted_from={
                "format": src.kind, "path": str(src.folder.resolve()),
                "architectures": src.config.get("architectures"), "dtype": str(torch_dtype).removeprefix("torch."),
                # dist_checkpointing reshards on load: this is the TP size the conversion was checked for.
                "tensor_parallel": tp, **notes,
            },
        )
        with staged_output(output) as tmp:
            dist_checkpointing.save({"model": solo.sharded_state_dict()}, str(tmp))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    log.info("wrote %s (load with solo.checkpoint.load_checkpoint, or init_from=%s)", output, output)
    return output
