"""torchrun worker: train megatron-core GPTModel with TP x DP and the distributed optimizer.

Launched by tests/test_cpu_backend.py. Rank 0 writes the per-step losses, a held-out loss and the
world / tensor-parallel / data-parallel sizes to the JSON file named on the command line, so runs
with different layouts can be compared.
"""

import argparse
import json

import torch
import torch.nn.functional as F

from solo.distributed import destroy_distributed, init_distributed, rank


def build(tp: int):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, use_cpu_initialization=True, calculate_per_token_loss=True,
        params_dtype=torch.float32,
    )
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=128, max_sequence_length=64, position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True, overlap_grad_reduce=False
        ),
        module=model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.0, clip_grad=1.0,
                        use_distributed_optimizer=True, bf16=False, fp16=False),
        [ddp],
    )
    return ddp, optimizer


def batches(step: int, global_batch: int, seq: int):
    g = torch.Generator().manual_seed(1000 + step)
    # A learnable pattern (each row counts up from a random start) so the loss must fall.
    starts = torch.randint(0, 128, (global_batch, 1), generator=g)
    return (starts + torch.arange(seq + 1)) % 128


def forward_step(data_iterator, model):
    tokens = next(data_iterator)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
    per_token = model(inputs, position_ids, None, labels=labels)

    def loss_func(output):
        total = output.float().sum()
        count = torch.tensor(output.numel(), dtype=torch.int)
        return total, count, {"loss": torch.stack([total.detach(), count.float()])}

    return per_token, loss_func


def main():
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    init_distributed(tensor_parallel=args.tp, seed=7)
    model, optimizer = build(args.tp)
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    global_batch, seq = 4, 32
    per_dp = global_batch // dp
    forward_backward = get_forward_backward_func()
    losses = []
    for step in range(args.steps + 1):
        tokens = batches(step, global_batch, seq)[dp_rank * per_dp:(dp_rank + 1) * per_dp]
        training = step < args.steps  # the last batch is held out: forward only
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(
            forward_step_func=forward_step, data_iterator=iter(tokens.split(1)), model=[model],
            num_microbatches=per_dp, seq_length=seq, micro_batch_size=1, forward_only=not training,
        )
        if training:
            optimizer.step()
        summed = torch.stack([r["loss"] for r in reduced]).sum(0)
        torch.distributed.all_reduce(summed, group=parallel_state.get_data_parallel_group())
        losses.append((summed[0] / summed[1]).item())
    if rank() == 0:
        with open(args.out, "w") as f:
            # The layout that really ran, so the test can tell a TP2xDP2 run from a degenerate one.
            json.dump({"train_losses": losses[:-1], "heldout_loss": losses[-1],
                       "world_size": torch.distributed.get_world_size(),
                       "tensor_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
                       "data_parallel_size": dp}, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
