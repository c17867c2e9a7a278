"""RMSNorm/LayerNorm for the local layer spec that works under sequence parallelism.

Why: megatron-core 0.16.1's `WrappedTorchNorm` (the local spec's norm) asserts
`not config.sequence_parallel`, because plain torch norms lack the `sequence_parallel` parameter
attribute that `finalize_model_grads` uses to all-reduce their gradients across tensor-parallel
ranks (each rank only sees its slice of the sequence). Setting that attribute is all it takes; the
module is otherwise torch's own `RMSNorm`/`LayerNorm`, so checkpoints are unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class SequenceParallelTorchNorm:
    """Drop-in for megatron-core's WrappedTorchNorm (same constructor) that allows sequence parallel."""

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
