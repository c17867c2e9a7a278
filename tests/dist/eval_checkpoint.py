"""torchrun worker: the loss of a checkpoint on step 0's global batch of a stage, at a given TP.

Used by tests/test_train.py to check that a checkpoint written at TP=2 loads at TP=1 (megatron-core
dist_checkpointing reshards) and gives the same loss.
"""

import argparse
import json

import torch

from solo.checkpoint import load_checkpoint, resolve_checkpoint
from solo.config import load_config
from solo.data.batch import attention_inputs, collate
from solo.data.dataset import StageData
from solo.distributed import destroy_distributed, init_distributed, rank
from solo.model import build_model


def checkpoint_model(parser: argparse.ArgumentParser):
    """(args, config, model): CONFIG [--checkpoint] [--out] [overrides] parsed, the processes grouped
    by the config's TP, and the checkpoint's weights loaded into the local-spec model."""
    parser.add_argument("config")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    init_distributed(cfg.parallel.tensor_parallel, seed=cfg.seed)
    model = build_model(cfg.model, cfg.parallel, backend="local")
    load_checkpoint(resolve_checkpoint(args.checkpoint), model, load_rng=False)
    return args, cfg, model


def main():
    args, cfg, model = checkpoint_model(argparse.ArgumentParser())
    data = StageData(cfg.data, cfg.global_batch_size, cfg.train_steps, cfg.model.patch_size)
    total = count = 0.0
    with torch.no_grad():
        for sample in data.global_batch(0):
            batch = collate([sample], data.seq_length)
            mask, _ = attention_inputs(batch, "local")
            per_token = model(batch.tokens, batch.position_ids, mask, patches=batch.patches, labels=batch.labels)
            total += float((per_token * batch.loss_mask).sum())
            count += float(batch.loss_mask.sum())
    if rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"loss": total / count}, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
