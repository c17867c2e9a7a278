"""Packed samples -> the tensors SOLOModel takes.

A packed sample (one row of `seq_length` tokens, see `solo.data.shards`) holds whole documents
back to back. Here it becomes model inputs: labels shifted by one, a loss mask that never crosses a
document boundary nor predicts an id >= 32000 (docs/design.md "Loss"), position ids that restart at each
document, the document boundaries as cumulative lengths, and the raw uint8 patches in the order
their `<vpatch>` tokens appear (SOLOModel normalizes them on its device: a quarter of the bytes of
float32 to copy and to move, and no CPU pass over them). `attention_inputs` turns the boundaries
into what the chosen attention backend needs: a block-diagonal causal mask (CPU, local spec) or
megatron-core `PackedSeqParams` (FlexAttention or TransformerEngine THD).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from solo.data.shards import VOCAB_SIZE, ShardError
from solo.tokenizer import SP_VOCAB_SIZE

FIRST_SPECIAL_ID = SP_VOCAB_SIZE  # 32000: no loss on any id from here on


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [b, s] int64 model inputs
    labels: torch.Tensor  # [b, s] int64, labels[:, j] = tokens[:, j + 1]
    loss_mask: torch.Tensor  # [b, s] float32, 1 where labels[:, j] is a target
    vision_mask: torch.Tensor  # [b, s] bool, token belongs to a document with an image
    position_ids: torch.Tensor  # [b, s] int64, restart at every document
    cu_seqlens: torch.Tensor  # [n_docs + 1] int32 over the batch read row by row (padding = one doc)
    patches: torch.Tensor  # [n_patches, 3 * P * P] uint8, as stored (normalized by SOLOModel)

    def as_one_row(self) -> PackedBatch:
        """[b, s] -> [1, b*s]: the packed (THD / FlexAttention) backends take the batch as one row;
        `cu_seqlens` already counts over the batch read row by row."""
        flat = {k: v.reshape(1, -1) for k, v in self.__dict__.items()
                if k not in ("cu_seqlens", "patches")}
        return PackedBatch(**flat, cu_seqlens=self.cu_seqlens, patches=self.patches)

    def to(self, device) -> PackedBatch:
        return PackedBatch(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})


def collate(samples, seq_length: int, pad_id: int = 0, vocab_size: int = VOCAB_SIZE) -> PackedBatch:
    """`samples`: objects with `tokens`, `loss_mask`, `document_lengths` and `patches` (a list of
    uint8 [n, 3P²] arrays), as `solo.data.shards.PackedSample`. A token id outside [0, vocab_size)
    or a loss flag other than 0/1 (a shard changed after it was written) is a ShardError naming the
    sample's `origin` (its shard and index)."""
    rows = len(samples)
    tokens = np.full((rows, seq_length + 1), pad_id, dtype=np.int64)
    targets = np.zeros((rows, seq_length + 1), dtype=np.float32)
    starts = np.zeros((rows, seq_length + 1), dtype=bool)
    vision = np.zeros((rows, seq_length), dtype=bool)
    positions = np.zeros((rows, seq_length), dtype=np.int64)
    lengths, patches = [], []
    for r, sample in enumerate(samples):
        n = len(sample.tokens)
        if n > seq_length or sum(sample.document_lengths) != n:
            raise ValueError(
                f"packed sample {r}: {n} tokens in documents of lengths summing to "
                f"{sum(sample.document_lengths)}, sequence length {seq_length}"
            )
        tokens[r, :n] = sample.tokens
        targets[r, :n] = sample.loss_mask
        offset = 0
        for length in sample.document_lengths:
            starts[r, offset] = True
            positions[r, offset:offset + length] = np.arange(length)
            vision[r, offset:offset + length] = bool((sample.tokens[offset:offset + length] >= FIRST_SPECIAL_ID).any())
            offset += length
        row_lengths = list(sample.document_lengths)
        if n < seq_length:  # the padding is a document of its own: it attends only to itself
            starts[r, n] = True
            positions[r, n:] = np.arange(seq_length - n)
            row_lengths.append(seq_length - n)
        lengths.extend(row_lengths)
        patches.extend(sample.patches)
    _check_values(samples, tokens, targets, vocab_size)
    labels = tokens[:, 1:]
    # A label is a target only inside its document (the next token is no document start) and only
    # for natural-language ids.
    loss_mask = targets[:, 1:] * ~starts[:, 1:] * (labels < FIRST_SPECIAL_ID)
    patch_array = np.concatenate(patches) if patches else np.zeros((0, 0), dtype=np.uint8)
    return PackedBatch(
        tokens=torch.from_numpy(tokens[:, :-1].copy()),
        labels=torch.from_numpy(labels.copy()),
        loss_mask=torch.from_numpy(loss_mask.astype(np.float32)),
        vision_mask=torch.from_numpy(vision),
        position_ids=torch.from_numpy(positions),
        cu_seqlens=torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
        patches=torch.from_numpy(patch_array),
    )


def _check_values(samples, tokens: np.ndarray, flags: np.ndarray, vocab_size: int) -> None:
    bad_ids, bad_flags = (tokens < 0) | (tokens >= vocab_size), (flags != 0) & (flags != 1)
    if not (bad_ids.any() or bad_flags.any()):
        return
    r, j = np.argwhere(bad_ids | bad_flags)[0]
    what = f"token id {tokens[r, j]}" if bad_ids[r, j] else f"loss flag {int(flags[r, j])}"
    where = getattr(samples[r], "origin", "") or f"packed sample {r}"
    raise ShardError(f"{where}: {what} at position {j} (ids are 0..{vocab_size - 1}, flags 0 or 1): "
                     "the shard's files changed after it was written; data.verify_checksums=true finds which")


def block_diagonal_causal_mask(cu_seqlens: torch.Tensor, rows: int, seq_length: int) -> torch.Tensor:
    """[rows, 1, s, s] bool, True where attention is NOT allowed (megatron-core's convention)."""
    total = rows * seq_length
    positions = torch.arange(total, device=cu_seqlens.device)
    doc = torch.bucketize(positions, cu_seqlens[1:].to(positions.dtype), right=True).view(rows, seq_length)
    same_doc = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool, device=doc.device).tril()
    return ~(same_doc & causal).unsqueeze(1)


def attention_inputs(batch: PackedBatch, backend: str):
    """(attention_mask, packed_seq_params) for SOLOModel.forward under `backend`."""
    rows, seq_length = batch.tokens.shape
    if backend == "local":
        return block_diagonal_causal_mask(batch.cu_seqlens, rows, seq_length), None
    if rows != 1:
        raise ValueError(f"the {backend} attention backend takes the packed batch as one row, got {rows} rows")
    # THD restarts RoPE per document, so its max length is the longest document's; the 'sbhd'
    # carrier of the flex backend keeps RoPE over the whole row (megatron-core sizes RoPE by it).
    lengths = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
    max_len = int(lengths.max()) if backend == "te" else seq_length
    params = PackedSeqParams(
        qkv_format="thd" if backend == "te" else "sbhd",
        cu_seqlens_q=batch.cu_seqlens, cu_seqlens_kv=batch.cu_seqlens,
        max_seqlen_q=max_len, max_seqlen_kv=max_len,
    )
    return None, params
