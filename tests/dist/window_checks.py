"""torchrun worker for tests/test_attention_window.py: logits of a windowed SOLO checkpoint on packed rows.

Loads --checkpoint (its meta gives the model config, the attention window included) into one fp32
SOLOModel per backend ("local": block-diagonal mask, "flex": FlexAttention), both through
solo.checkpoint.load_checkpoint, and runs each packed row of --rows (npz: row_<name> = the documents'
tokens back to back, lengths_<name> = their lengths; collate pads to --seq) through
solo.data.batch. Rank 0 writes logits_<backend>_<name> [seq, vocab] to --out.
"""

import argparse
from types import SimpleNamespace

import numpy as np
import torch

from solo.checkpoint import load_checkpoint, resolve_checkpoint
from solo.config import ParallelConfig
from solo.convert.solo_to_hf import model_config_from_meta
from solo.data.batch import attention_inputs, collate
from solo.distributed import destroy_distributed, init_distributed, rank
from solo.model import build_model


def row_logits(model, backend, tokens, lengths, seq):
    sample = SimpleNamespace(tokens=tokens, loss_mask=np.zeros(len(tokens), dtype=np.uint8),
                             document_lengths=list(lengths), patches=[])
    batch = collate([sample], seq_length=seq)
    mask, packed = attention_inputs(batch, backend)
    with torch.no_grad():
        out = model(batch.tokens, batch.position_ids, mask, patches=batch.patches, packed_seq_params=packed)
    return out[0].float().numpy()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--rows", required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = np.load(args.rows)
    names = [key.removeprefix("row_") for key in rows.files if key.startswith("row_")]
    init_distributed(tensor_parallel=1, seed=5)
    checkpoint = resolve_checkpoint(args.checkpoint)
    model_config = model_config_from_meta(checkpoint)
    results = {}
    for backend in ("local", "flex"):
        model = build_model(model_config, ParallelConfig(), backend=backend)
        load_checkpoint(checkpoint, model, load_rng=False)
        for name in names:
            tokens, lengths = rows[f"row_{name}"].astype(np.int32), rows[f"lengths_{name}"]
            results[f"logits_{backend}_{name}"] = row_logits(model, backend, tokens, lengths, args.seq)
    if rank() == 0:
        np.savez(args.out, **results)
    destroy_distributed()


if __name__ == "__main__":
    main()
