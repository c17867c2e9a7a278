"""torchrun worker for tests/test_convert.py: logits of converted SOLO checkpoints at TP=--tp.

For each --checkpoint: load it with solo.checkpoint.load_checkpoint into a fp32 SOLOModel at
TP=--tp (dist_checkpointing reshards), run the single-document packed batch of --inputs through
solo.data.batch (collate + local block-diagonal mask) and gather the logits. Rank 0 writes them to
--out (npz: logits_<i>, dtype_<i>). With --save DIR the first checkpoint is saved again from this
TP layout (solo.checkpoint.save_checkpoint), for the export-from-any-TP test.
"""

import argparse
from types import SimpleNamespace

import numpy as np
import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from solo.checkpoint import load_checkpoint, model_meta, resolve_checkpoint, save_checkpoint
from solo.config import ParallelConfig
from solo.convert.solo_to_hf import model_config_from_meta
from solo.data.batch import attention_inputs, collate
from solo.distributed import destroy_distributed, init_distributed, rank
from solo.model import build_model


def logits(checkpoint, tp, tokens, patches, save=None):
    checkpoint = resolve_checkpoint(checkpoint)
    model_config = model_config_from_meta(checkpoint)
    model = build_model(model_config, ParallelConfig(tensor_parallel=tp), backend="local")
    load_checkpoint(checkpoint, model, load_rng=False)
    if save:
        layout = {"tensor_parallel": tp, "pipeline_parallel": 1, "data_parallel": 1}
        save_checkpoint(save, 0, model, None, None, model_meta(model_config, layout), keep=1)
    sample = SimpleNamespace(tokens=tokens, loss_mask=np.zeros(len(tokens), dtype=np.uint8),
                             document_lengths=[len(tokens)], patches=[patches] if len(patches) else [])
    batch = collate([sample], seq_length=len(tokens))
    mask, packed = attention_inputs(batch, "local")
    with torch.no_grad():
        out = model(batch.tokens, batch.position_ids, mask, patches=batch.patches, packed_seq_params=packed)
        out = gather_from_tensor_model_parallel_region(out)
    return out[0, :, :model_config.vocab_size].float().numpy(), str(next(model.parameters()).dtype)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", action="append", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", help="save the first checkpoint again from this TP layout")
    args = parser.parse_args()
    inputs = np.load(args.inputs)
    tokens, patches = inputs["tokens"].astype(np.int32), inputs["patches"].astype(np.uint8)
    init_distributed(tensor_parallel=args.tp, seed=5)
    results = {}
    for i, checkpoint in enumerate(args.checkpoint):
        save = args.save if i == 0 else None
        results[f"logits_{i}"], results[f"dtype_{i}"] = logits(checkpoint, args.tp, tokens, patches, save)
    if rank() == 0:
        np.savez(args.out, **results)
    destroy_distributed()


if __name__ == "__main__":
    main()
