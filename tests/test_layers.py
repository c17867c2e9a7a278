"""solo.layers: the layers the local spec plugs into megatron-core (document attention, SP norm)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType

from solo.layers import FlexDocumentAttention, SequenceParallelTorchNorm

HEADS, GROUPS, DIM = 4, 2, 16
LENGTHS = [7, 18, 1, 14]  # a one-token document and none on a 128-token block boundary


def attention(window_size=None):
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, attention_dropout=0.0, window_size=window_size)
    return FlexDocumentAttention(config, 1, AttnMaskType.causal, "self")


def reference(query, key, value, window=None):
    """Dense attention with a mask built token by token: causal, only within one's document and,
    with a window of w tokens, only the last w of them (the query included: HF Mistral's rule)."""
    doc = torch.tensor([d for d, n in enumerate(LENGTHS) for _ in range(n)])
    mask = (doc[:, None] == doc[None, :]) & torch.ones(len(doc), len(doc), dtype=torch.bool).tril()
    if window is not None:
        for q in range(len(doc)):
            mask[q, : max(q - window + 1, 0)] = False
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    k, v = (t.repeat_interleave(HEADS // GROUPS, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).permute(2, 0, 1, 3).reshape(len(doc), 1, -1)


def packed_inputs(seed: int):
    """Query, key, value of the LENGTHS documents packed in one row, and their PackedSeqParams."""
    seq = sum(LENGTHS)
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(seq, 1, HEADS, DIM, generator=gen)
    key, value = (torch.randn(seq, 1, GROUPS, DIM, generator=gen) for _ in range(2))
    cu_seqlens = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return query, key, value, PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens)


def test_document_attention_matches_a_dense_same_document_causal_mask():
    query, key, value, params = packed_inputs(seed=0)
    layer = attention()
    out = layer(query, key, value, None, packed_seq_params=params)
    torch.testing.assert_close(out, reference(query, key, value), rtol=1e-5, atol=1e-5)
    mask = params._solo_block_mask  # built once, then shared by every layer of the forward pass
    torch.testing.assert_close(layer(query, key, value, None, packed_seq_params=params), out)
    assert params._solo_block_mask is mask


@pytest.mark.parametrize("window", [1, 5, 16])
def test_document_attention_with_a_sliding_window_matches_a_dense_windowed_mask(window):
    query, key, value, params = packed_inputs(seed=1)
    out = attention(window_size=(window - 1, 0))(query, key, value, None, packed_seq_params=params)
    torch.testing.assert_close(out, reference(query, key, value, window), rtol=1e-5, atol=1e-5)
    # The window bites (documents of 14 and 18 tokens are longer than 5): full attention differs.
    if window < max(LENGTHS):
        assert (out - reference(query, key, value)).abs().max() > 1e-3


def test_document_attention_refuses_a_window_that_is_not_causal():
    with pytest.raises(ValueError, match="window_size must be"):
        attention(window_size=(4, 4))


def test_document_attention_needs_document_boundaries():
    query = torch.zeros(8, 1, HEADS, DIM)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        attention()(query, query[:, :, :GROUPS], query[:, :, :GROUPS], None, packed_seq_params=None)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_norm_is_torchs_own_and_marked_for_the_sequence_parallel_reduction(sequence_parallel):
    config = SimpleNamespace(normalization="RMSNorm", params_dtype=torch.float32, sequence_parallel=sequence_parallel)
    norm = SequenceParallelTorchNorm(config, 64, eps=1e-6)
    assert type(norm) is torch.nn.RMSNorm and norm.eps == 1e-6  # same module, same checkpoint keys
    assert [p.sequence_parallel for p in norm.parameters()] == [sequence_parallel]
