"""Layers that fill slots of megatron-core's local GPT layer spec (picked in `solo.model.layer_spec`).

These are not patches: megatron-core is left as it is. Each class fills one spec slot where
megatron-core 0.16.1's own local layer falls short, and says why; PyTorch does the work
(FlexAttention, torch's norms).

Attention is causal inside each packed document, and with a sliding window
(`TransformerConfig.window_size = (w - 1, 0)`, set from `ModelConfig.attention_window_tokens = w`
by `solo.model.transformer_config`) a query sees only the last w tokens of its document, itself
included: keys with `q - w < kv <= q`, HF Mistral's `sliding_window` and flash-attn/TE's
`window_size=(w - 1, 0)`. `window_size[0]` is the one number both local backends read here.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


@functools.cache
def _compiled_flex_attention():
    # Eager FlexAttention materializes scores; compiled, it is a fused block-sparse kernel.
    return torch.compile(flex_attention, dynamic=False)


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] document index of each token, from cumulative document lengths [n_docs + 1]."""
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.bucketize(positions, cu_seqlens[1:].to(positions.dtype), right=True)


def window_left(config: TransformerConfig) -> int | None:
    """How many earlier tokens a query may see (None: all of its document), from megatron-core's
    `window_size` (left, right); right must be 0 (causal)."""
    if config.window_size is None:
        return None
    if config.window_attn_skip_freq is not None:
        raise ValueError("window_attn_skip_freq (full-attention layers between windowed ones) is not supported")
    left, right = config.window_size
    if right != 0 or left < 0:
        raise ValueError(f"window_size must be (w - 1, 0) for a causal sliding window, got {config.window_size}")
    return left


def document_block_mask(cu_seqlens: torch.Tensor, total: int, left: int | None = None):
    docs = document_ids(cu_seqlens, total)

    def same_document_causal(b, h, q, kv):
        return (docs[q] == docs[kv]) & (q >= kv)

    def same_document_window(b, h, q, kv):
        return same_document_causal(b, h, q, kv) & (q - kv <= left)

    mask_mod = same_document_causal if left is None else same_document_window
    return create_block_mask(mask_mod, None, None, total, total, device=cu_seqlens.device)


def outside_window(seq: int, left: int, device) -> torch.Tensor:
    """[s, s] bool, True where the key is more than `left` positions before the query (masked out,
    megatron-core's convention). Documents are contiguous in a row, so row distance is in-document
    distance."""
    positions = torch.arange(seq, device=device)
    return positions[:, None] - positions[None, :] > left


class LocalDocumentAttention(DotProductAttention):
    """megatron-core's local `DotProductAttention` with the sliding window added to the given document
    mask (the local spec's `core_attention`, backend "local").

    Why: with `config.window_size` set, megatron-core 0.16.1's softmax
    (`FusedScaleMaskSoftmax.forward_torch_softmax`) *replaces* the attention mask it is given with a
    plain sliding-window causal mask, so packed documents would attend to each other. Here the
    window is taken out of the softmax and ORed into the block-diagonal document mask instead;
    without a window this is DotProductAttention unchanged (same parameters, same checkpoint).
    """

    def __init__(self, config: TransformerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.left = window_left(config)
        self.scale_mask_softmax.window_size = None

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        if self.left is not None:
            if attention_mask is None:
                raise ValueError("LocalDocumentAttention needs the document mask (solo.data.batch.attention_inputs)")
            attention_mask = attention_mask | outside_window(query.shape[0], self.left, attention_mask.device)
        return super().forward(query, key, value, attention_mask, *args, **kwargs)


class FlexDocumentAttention(MegatronModule):
    """Packed-document attention: the local spec's `core_attention` (backend "flex"), on FlexAttention.

    Why: megatron-core supports packed sequences (documents that must not attend to each other)
    only through TransformerEngine's THD attention; its local `DotProductAttention` asserts
    `packed_seq_params is None`. Where TE is not installed on a GPU, a dense [s, s] mask is out of
    the question at 32,768 tokens (1 GiB per row), so this reads the document boundaries from
    `PackedSeqParams.cu_seqlens_q` (qkv_format 'sbhd', so megatron-core passes the tensors through
    unchanged) and runs FlexAttention with a causal, same-document block mask. Block-sparse:
    masked-out tiles cost nothing. Same signature as megatron-core's DotProductAttention.

    With a sliding window (`config.window_size`) the mask is also banded: a query sees its own
    document's last w tokens only.

    The mask is built once per forward pass of the model, not per layer: `PackedSeqParams` objects
    are shared by all layers (and every layer has the same window), so the block mask is cached on
    them.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("FlexDocumentAttention does not support context parallelism; use TransformerEngine")
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) != 0.0:
            raise ValueError("FlexDocumentAttention has no attention dropout (SOLO trains without dropout)")
        tp = config.tensor_model_parallel_size
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.softmax_scale = softmax_scale
        self.left = window_left(config)
        self.compiled = torch.cuda.is_available()

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if packed_seq_params is None or packed_seq_params.cu_seqlens_q is None:
            raise ValueError("FlexDocumentAttention needs packed_seq_params with cu_seqlens_q (document boundaries)")
        seq, batch = query.shape[0], query.shape[1]
        if batch != 1:
            raise ValueError(f"FlexDocumentAttention expects the packed batch as one row, got batch {batch}")
        block_mask = getattr(packed_seq_params, "_solo_block_mask", None)
        if block_mask is None:
            block_mask = document_block_mask(packed_seq_params.cu_seqlens_q, seq, self.left)
            packed_seq_params._solo_block_mask = block_mask
        # megatron: [s, b, heads, dim] -> flex: [b, heads, s, dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        attend = _compiled_flex_attention() if self.compiled else flex_attention
        out = attend(q, k, v, block_mask=block_mask, scale=self.softmax_scale, enable_gqa=self.heads != self.groups)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)


class SequenceParallelTorchNorm:
    """Drop-in for megatron-core's WrappedTorchNorm (same constructor) that allows sequence parallel.

    Why: `WrappedTorchNorm` (the local spec's norm) asserts `not config.sequence_parallel`, because
    plain torch norms lack the `sequence_parallel` parameter attribute that `finalize_model_grads`
    uses to all-reduce their gradients across tensor-parallel ranks (each rank only sees its slice
    of the sequence). Setting that attribute is all it takes; the module is otherwise torch's own
    `RMSNorm`/`LayerNorm`, so checkpoints are unchanged.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
