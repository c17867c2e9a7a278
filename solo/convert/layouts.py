"""Where each HuggingFace Mistral tensor lives inside SOLOModel (megatron-core layout).

Pure tensor bookkeeping, no IO: `hf_to_solo` and `solo_to_hf` stream tensors through these
functions one at a time. Names and layouts (megatron-core 0.16.1, local or TE spec, TP=1 view):

    HF (Mistral / SOLO authors)                   SOLOModel
    model.embed_tokens.weight [V_hf, H]           embedding.word_embeddings.weight [V_pad, H], rows 0..V_hf-1
    model.layers.i.input_layernorm.weight         decoder.layers.i.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj.weight  decoder.layers.i.self_attention.linear_qkv.weight
    model.layers.i.self_attn.o_proj.weight        decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.post_attention_layernorm.weight decoder.layers.i.pre_mlp_layernorm.weight
    model.layers.i.mlp.{gate,up}_proj.weight      decoder.layers.i.mlp.linear_fc1.weight
    model.layers.i.mlp.down_proj.weight           decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                             decoder.final_layernorm.weight
    lm_head.weight [V_hf, H]                      output_layer.weight [V_pad, H], rows 0..V_hf-1
    model.embed_vision_patch.weight (authors)     patch_projection.weight [H, 3*P*P]

`linear_qkv` holds, per query group g (megatron-core's `get_query_key_value_tensors` splits it so),
the g-th group's query heads, then its key head, then its value head: rows
[q_(g*n) .. q_(g*n+n-1), k_g, v_g] for g = 0..G-1, n = heads / groups, each head `head_dim` rows.
`linear_fc1` is [gate; up] (megatron-core's gated `linear_fc1`, SwiGLU: silu(gate) * up).
Both RoPE implementations rotate the two halves of each head (HF `rotate_half`, megatron-core
`rotary_interleaved=False`), so query/key rows need no permutation from the HF order.
Megatron-core splits these fused weights per tensor-parallel rank itself (groups are contiguous,
fc1 is split as [gate_r; up_r]); the TP=1 layout is all a conversion needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from solo.config import ModelConfig

# The SOLO authors' name for the patch projection (`MultimodalMistralModel.embed_vision_patch`).
AUTHORS_PATCH_NAME = "model.embed_vision_patch.weight"
# Buffers some older HF checkpoints store; recomputed by every RoPE implementation, never weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Entry:
    hf: str  # HF Mistral name
    solo: str  # SOLOModel parameter name
    part: str = ""  # "", "rows" (vocabulary rows), "q", "k", "v", "gate", "up"


def mistral_entries(num_layers: int) -> list[Entry]:
    """Every HF Mistral tensor of a `num_layers` model, in checkpoint order."""
    entries = [Entry("model.embed_tokens.weight", "embedding.word_embeddings.weight", "rows")]
    for i in range(num_layers):
        hf, solo = f"model.layers.{i}.", f"decoder.layers.{i}."
        entries += [
            Entry(hf + "input_layernorm.weight", solo + "input_layernorm.weight"),
            Entry(hf + "self_attn.q_proj.weight", solo + "self_attention.linear_qkv.weight", "q"),
            Entry(hf + "self_attn.k_proj.weight", solo + "self_attention.linear_qkv.weight", "k"),
            Entry(hf + "self_attn.v_proj.weight", solo + "self_attention.linear_qkv.weight", "v"),
            Entry(hf + "self_attn.o_proj.weight", solo + "self_attention.linear_proj.weight"),
            Entry(hf + "post_attention_layernorm.weight", solo + "pre_mlp_layernorm.weight"),
            Entry(hf + "mlp.gate_proj.weight", solo + "mlp.linear_fc1.weight", "gate"),
            Entry(hf + "mlp.up_proj.weight", solo + "mlp.linear_fc1.weight", "up"),
            Entry(hf + "mlp.down_proj.weight", solo + "mlp.linear_fc2.weight"),
        ]
    entries += [
        Entry("model.norm.weight", "decoder.final_layernorm.weight"),
        Entry("lm_head.weight", "output_layer.weight", "rows"),
    ]
    return entries


def head_dim(model: ModelConfig) -> int:
    return model.hidden_size // model.num_attention_heads


def hf_shape(entry: Entry, model: ModelConfig, hf_vocab: int) -> tuple[int, ...]:
    """The shape the HF tensor of `entry` must have for `model`."""
    h, d = model.hidden_size, head_dim(model)
    name = entry.hf.rsplit(".", 2)[-2]  # e.g. "q_proj", "input_layernorm", "embed_tokens"
    shapes = {
        "embed_tokens": (hf_vocab, h), "lm_head": (hf_vocab, h),
        "q_proj": (model.num_attention_heads * d, h),
        "k_proj": (model.num_query_groups * d, h), "v_proj": (model.num_query_groups * d, h),
        "o_proj": (h, model.num_attention_heads * d),
        "gate_proj": (model.ffn_hidden_size, h), "up_proj": (model.ffn_hidden_size, h),
        "down_proj": (h, model.ffn_hidden_size),
        "input_layernorm": (h,), "post_attention_layernorm": (h,), "norm": (h,),
    }
    if entry.hf == "lm_head.weight":
        return shapes["lm_head"]
    return shapes[name]


def _qkv_groups(param: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """linear_qkv weight as [groups, heads_per_group + 2, head_dim, hidden] (a view)."""
    per_group = model.num_attention_heads // model.num_query_groups
    return param.view(model.num_query_groups, per_group + 2, head_dim(model), param.shape[-1])


def solo_slot(param: torch.Tensor, part: str, model: ModelConfig, rows: int = 0) -> torch.Tensor:
    """The view of SOLO parameter `param` holding one HF tensor, in HF's row order but grouped
    ([groups, heads_per_group or 1, head_dim, hidden] for q/k/v). `rows`: vocabulary rows (part "rows")."""
    if part == "":
        return param
    if part == "rows":
        return param[:rows]
    if part in ("q", "k", "v"):
        grouped = _qkv_groups(param, model)
        per_group = grouped.shape[1] - 2
        return {"q": grouped[:, :per_group], "k": grouped[:, per_group:per_group + 1],
                "v": grouped[:, per_group + 1:]}[part]
    if part in ("gate", "up"):
        gate, up = param.view(2, param.shape[0] // 2, param.shape[1])
        return gate if part == "gate" else up
    raise ValueError(f"unknown layout part {part!r}")


def write_hf(param: torch.Tensor, entry: Entry, tensor: torch.Tensor, model: ModelConfig) -> None:
    """Copy one HF tensor into its place in `param` (casting to the parameter's dtype)."""
    slot = solo_slot(param, entry.part, model, rows=tensor.shape[0])
    with torch.no_grad():
        slot.copy_(tensor.view(slot.shape))


def read_hf(param: torch.Tensor, entry: Entry, model: ModelConfig, rows: int = 0) -> torch.Tensor:
    """The HF tensor of `entry` from `param` (a fresh contiguous tensor, safe to save)."""
    shape = hf_shape(entry, model, rows)
    return solo_slot(param, entry.part, model, rows=rows).reshape(shape).clone()


# Patch flattening. Training (and the SOLO authors) flatten a patch as (channel, row, column);
# Fuyu's documented input (`FuyuImageProcessor.patchify_image`) is (row, column, channel). The export
# permutes the projection's columns to Fuyu's order and `SOLOProcessor` emits Fuyu-order patches,
# so the exported folder follows Fuyu's convention; the product W @ p is unchanged.
def patch_columns_to_fuyu(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[hidden, 3*P*P] in (c, y, x) column order -> (y, x, c) column order."""
    h = weight.shape[0]
    return weight.view(h, 3, patch_size, patch_size).permute(0, 2, 3, 1).reshape(h, -1).contiguous()


def patch_columns_from_fuyu(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of `patch_columns_to_fuyu`."""
    h = weight.shape[0]
    return weight.view(h, patch_size, patch_size, 3).permute(0, 3, 1, 2).reshape(h, -1).contiguous()


def patches_to_fuyu(patches, patch_size: int):
    """Patches [..., 3*P*P] (numpy or torch) from (c, y, x) to (y, x, c) flattening."""
    lead = patches.shape[:-1]
    grid = patches.reshape(*lead, 3, patch_size, patch_size)
    order = (*range(len(lead)), len(lead) + 1, len(lead) + 2, len(lead))
    moved = grid.permute(order) if isinstance(patches, torch.Tensor) else grid.transpose(order)
    return moved.reshape(*lead, 3 * patch_size * patch_size)
