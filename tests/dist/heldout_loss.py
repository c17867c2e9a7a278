"""torchrun worker: a checkpoint's loss over every sample of some shard folders, computed one
sample at a time with the model's own forward (no megatron-core schedule, no blend, no data-parallel
split): the independent recomputation tests/test_validation.py compares solo.evaluate with.

Writes {"loss", "vl_loss", "text_loss", "samples"} as JSON to --out.
"""

import argparse
import json

import torch
from eval_checkpoint import checkpoint_model  # a sibling: torchrun puts this folder on sys.path

from solo.data.batch import attention_inputs, collate
from solo.data.shards import list_shards, open_shard
from solo.distributed import destroy_distributed, rank
from solo.templates import get_template


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--folders", nargs="+", required=True)
    args, cfg, model = checkpoint_model(parser)
    model.eval()
    stop_id = get_template(cfg.data.template).stop_id
    sums = {"all": [0.0, 0.0], "vl": [0.0, 0.0]}
    samples = 0
    with torch.no_grad():
        for folder in args.folders:
            for prefix in list_shards(folder):
                shard = open_shard(prefix)
                for i in range(len(shard)):
                    batch = collate([shard.sample(i)], cfg.data.seq_length_tokens, stop_id=stop_id)
                    mask, _ = attention_inputs(batch, "local")
                    per_token = model(batch.tokens, batch.position_ids, mask, patches=batch.patches,
                                      labels=batch.labels)
                    for key, weight in (("all", batch.loss_mask), ("vl", batch.loss_mask * batch.vision_mask)):
                        sums[key][0] += float((per_token * weight).double().sum())
                        sums[key][1] += float(weight.sum())
                    samples += 1
    (total, count), (vl, vl_count) = sums["all"], sums["vl"]
    if rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"loss": total / count, "vl_loss": vl / vl_count if vl_count else None,
                       "text_loss": (total - vl) / (count - vl_count) if count > vl_count else None,
                       "samples": samples}, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
