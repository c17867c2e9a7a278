"""torchrun worker (2 ranks): the loss of a checkpoint on step 0's micro batches through
megatron-core's pipeline schedule (forward only: FlexAttention has no backward on the CPU), first
as TP=1 x PP=2, then, the groups rebuilt in the same world, as PP=1 (DP=2; each rank the whole
batch). The packed backends run a micro batch of b rows as one row of b*s tokens, so the stages
exchange [b*s, 1, h] (`solo.train.activation_shape`); a wrong shape reshapes the activations.

    pipeline_forward.py CONFIG --checkpoint DIR --backend flex --out OUT.json [key=value ...]
"""

import argparse
import json

import torch
from megatron.core import parallel_state

from solo import train as solo_train
from solo.checkpoint import load_checkpoint, resolve_checkpoint
from solo.config import load_config
from solo.data.dataset import StageData
from solo.data.prefetch import StepPrefetcher
from solo.distributed import init_distributed, rank
from solo.tokenizer import TOKEN_IDS


def pipeline_loss(cfg, data, checkpoint, backend: str) -> float:
    training = solo_train.build_training(cfg, data.train_steps, backend=backend)
    load_checkpoint(checkpoint, training.model, load_rng=False)
    with StepPrefetcher(data, 0, 1, cfg.micro_batch_size, TOKEN_IDS.pad_id,
                        with_patches=parallel_state.is_pipeline_first_stage()) as prefetch:
        micro_batches = prefetch.get(0)
    consumed = []
    seq, mbs = solo_train.activation_shape(backend, training.seq_length, training.micro_batch_size)
    with torch.no_grad():
        reduced = training.forward_backward(
            forward_step_func=training.forward_step, data_iterator=solo_train._device_batches(micro_batches, consumed),
            model=[training.ddp], num_microbatches=len(micro_batches), seq_length=seq, micro_batch_size=mbs,
            forward_only=True)
    sums = torch.zeros(2, dtype=torch.float64)
    if reduced:
        sums += torch.stack([torch.stack([r["loss_sum"], r["loss_tokens"]]) for r in reduced]).sum(0).double()
    torch.distributed.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
    training.model.config.finalize_model_grads_func = None
    return float(sums[0] / sums[1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    checkpoint = resolve_checkpoint(args.checkpoint)
    losses = {}
    for pp in (2, 1):
        cfg = load_config(args.config, [*args.overrides, "parallel.tensor_parallel=1",
                                        f"parallel.pipeline_parallel={pp}"])
        init_distributed(1, pp, seed=cfg.seed)
        seeds = [None] * 2  # each rank's torch seed: per pipeline stage, as Megatron-LM
        torch.distributed.all_gather_object(seeds, torch.initial_seed())
        losses[f"seeds_pp{pp}"] = seeds
        # DP=2 at PP=1: each rank reads the whole batch (dp_rank 0 of 1) and computes the whole loss.
        data = StageData(cfg.data, cfg.global_batch_size, cfg.train_steps, cfg.model.patch_size)
        losses[f"pp{pp}"] = pipeline_loss(cfg, data, checkpoint, args.backend)
        parallel_state.destroy_model_parallel()
    if rank() == 0:
        with open(args.out, "w") as f:
            json.dump(losses, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
