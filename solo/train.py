"""The training loop: `solo-train CONFIG.yaml [key=value ...]` under torchrun.

Read it top to bottom. megatron-core does the heavy lifting: parallel groups
(`initialize_model_parallel`), the model (`GPTModel` via `solo.model`), gradient reduction
(`DistributedDataParallel`), the sharded optimizer (`get_megatron_optimizer` with
`use_distributed_optimizer`), the LR/WD schedule (`OptimizerParamScheduler`), micro-batching
(`get_forward_backward_func`) and checkpoints (`dist_checkpointing`, via `solo.checkpoint`).

A stage starts from the previous stage's weights (`init_from`) with a fresh optimizer and
schedule; a run that finds a checkpoint in its own `save_dir` resumes it exactly (weights,
optimizer, schedule, RNG, data position = step). SIGTERM/SIGINT/SIGUSR1 save a checkpoint and exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import signal
import sys
import time
from functools import partial

import torch
import torch.distributed as dist

from solo.checkpoint import (
    CheckpointError,
    check_model_shape,
    check_stage_finished,
    fault_injected,
    latest_checkpoint,
    load_checkpoint,
    model_meta,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from solo.config import ConfigError, TrainConfig, load_config
from solo.data.batch import attention_inputs
from solo.data.dataset import StageData
from solo.data.prefetch import StepPrefetcher
from solo.data.shards import ShardError
from solo.distributed import destroy_distributed, device, init_distributed
from solo.metrics import MetricsLogger, training_flops
from solo.model import build_model
from solo.tokenizer import TOKEN_IDS


class NonFiniteLoss(RuntimeError):
    pass


class StopRequest:
    """SIGTERM, SIGINT or SIGUSR1: finish the step, save, exit 0. Ranks agree via all-reduce, so a
    signal to any one rank stops them all at the same step.

    SIGUSR1 is the one to schedule ahead of a time limit (SLURM `--signal=USR1@600`,
    scripts/pretrain.sh forwards it to the ranks): torchrun gives ranks only 30 s after a SIGTERM
    before it kills them, less than a 7B step plus its checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.requested: str | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train(cfg: TrainConfig) -> dict:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    gpu = torch.cuda.is_available()
    bf16 = gpu and cfg.precision == "bf16"
    p = cfg.parallel
    init_distributed(p.tensor_parallel, p.pipeline_parallel, p.context_parallel, seed=cfg.seed)
    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    if cfg.global_batch_size % (dp_size * cfg.micro_batch_size):
        raise ValueError(f"global_batch_size {cfg.global_batch_size} is not divisible by "
                         f"data-parallel size {dp_size} x micro_batch_size {cfg.micro_batch_size}")

    # 1. Everything that can be wrong with the inputs is checked before any compute.
    data = StageData(cfg.data, cfg.global_batch_size, cfg.train_steps, cfg.model.patch_size)
    resume = latest_checkpoint(cfg.save_dir)
    init = resolve_checkpoint(cfg.init_from) if (cfg.init_from and resume is None) else None
    for checkpoint in (resume, init):
        if checkpoint is not None:
            check_model_shape(checkpoint, cfg.model)
    if init is not None:
        check_stage_finished(cfg.init_from, init)
    pad_id = TOKEN_IDS.pad_id  # fixed: no sentencepiece model is loaded to learn it

    # 2. Model, optimizer, schedule.
    model = build_model(cfg.model, p, bf16=bf16, recompute_num_layers=cfg.recompute_num_layers)
    config = model.config
    module = Float16Module(config, model) if bf16 else model
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=gpu, use_distributed_optimizer=p.use_distributed_optimizer,
            bucket_size=40_000_000 if gpu else None,
        ),
        module=module,
    )
    config.finalize_model_grads_func = finalize_model_grads
    if gpu:
        config.no_sync_func = ddp.no_sync
    o = cfg.optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
            bf16=bf16, params_dtype=config.params_dtype, use_distributed_optimizer=p.use_distributed_optimizer,
            # A constant loss scale of 1 changes no number (the loss is never multiplied by it here)
            # but turns on megatron-core's inf/NaN check of the gradients: a step whose gradients
            # are not finite is skipped inside optimizer.step() instead of writing NaN into weights.
            loss_scale=1.0,
        ),
        [ddp],
    )
    steps = data.train_steps
    scheduler = OptimizerParamScheduler(
        # megatron-core needs warmup < decay steps: short runs (tests, demos) warm up for less.
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=min(o.lr_warmup_steps, steps - 1),
        lr_decay_steps=steps, lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=steps, wd_incr_style="constant",
        # On resume the config and the checkpoint must agree (megatron-core's default would quietly
        # keep the checkpoint's values and ignore a changed optimizer.lr or train_steps).
        use_checkpoint_opt_param_scheduler=False,
    )
    layout = {"tensor_parallel": p.tensor_parallel, "pipeline_parallel": p.pipeline_parallel,
              "data_parallel": dp_size}
    step = 0
    if resume is not None:
        same_layout = read_meta(resume).get("parallel") == layout
        step = load_checkpoint(resume, model, optimizer, scheduler, load_rng=same_layout)["step"]
    elif init is not None:
        load_checkpoint(init, model, load_rng=False)  # weights only: fresh optimizer and schedule

    # 3. The loop.
    log = MetricsLogger(cfg, start_step=step, total_steps=steps, sources=data.sources)
    log.info(f"stage {cfg.stage}: steps {step} -> {steps}, {layout}, backend {model.backend}, "
             f"{'bf16' if bf16 else 'fp32'}, " + ("resumed from " + str(resume) if resume else
                                                  "initialized from " + str(init) if init else "random init"))
    stop = StopRequest()
    forward_backward = get_forward_backward_func()
    microbatches = cfg.global_batch_size // (dp_size * cfg.micro_batch_size)
    meta = model_meta(cfg.model, layout, template=cfg.data.template, stage=cfg.stage, train_steps=steps,
                      config=dataclasses.asdict(cfg))
    last_saved = resume
    result = {"stage": cfg.stage, "steps": steps, "losses": []}
    prefetch = StepPrefetcher(data, dp_rank, dp_size, cfg.micro_batch_size, pad_id)

    while step < steps:
        started = time.perf_counter()
        micro_batches = prefetch.get(step)  # read and collated (on the CPU) while the last step ran
        batches = (b.to(device()) for b in micro_batches)  # one micro batch on the device at a time
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_step = partial(_forward_step, model.backend)
        if fault_injected("nonfinite_loss", step + 1):
            forward_step = _nan_loss(forward_step)
        if fault_injected("nonfinite_grad", step + 1):
            forward_step = _nan_grad(forward_step)
        reduced = forward_backward(
            forward_step_func=forward_step, data_iterator=batches,
            model=[ddp], num_microbatches=microbatches, seq_length=data.seq_length,
            micro_batch_size=cfg.micro_batch_size, forward_only=False,
        )
        stats = _reduce_stats(reduced, micro_batches)
        position = (f"at step {step + 1} (data position: blend samples {step * cfg.global_batch_size}.."
                    f"{(step + 1) * cfg.global_batch_size - 1})")
        if not math.isfinite(stats["loss"]):
            fault, weights_touched = f"non-finite loss {stats['loss']} {position}", False
        else:
            updated, grad_norm, _ = optimizer.step()
            # Not updated: megatron-core found inf/NaN gradients and skipped the step. Updated with a
            # non-finite norm: the FP32Optimizer (no distributed optimizer) has no such check.
            fault = None if updated and math.isfinite(grad_norm) else (
                f"non-finite gradients {position} with a finite loss {stats['loss']:.4f}")
            weights_touched = updated
        if fault:
            if cfg.nonfinite_loss == "stop" or weights_touched:
                prefetch.close()
                raise NonFiniteLoss(f"{fault}; stopping. The last good checkpoint is {last_saved}")
            log.info(f"{fault}; skipping this batch (nonfinite_loss=skip)")
            grad_norm = float("nan")
        scheduler.step(increment=1)
        step += 1
        elapsed = time.perf_counter() - started
        flops = training_flops(cfg.model, stats["tokens"], stats["attention_pairs"])
        log.step(step, stats, lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm, seconds=elapsed, flops=flops)
        result["losses"].append(stats["loss"])

        preempted = stop.agreed()
        if step % cfg.save_interval_steps == 0 or step == steps or preempted:
            last_saved = save_checkpoint(cfg.save_dir, step, model, optimizer, scheduler, meta, cfg.keep_checkpoints)
            log.info(f"saved {last_saved}")
        if preempted:
            log.info(f"stop requested ({stop.requested or 'signal on another rank'}): saved step {step}, exiting")
            result["preempted"] = True
            break
    prefetch.close()
    result["checkpoint"] = str(last_saved)
    log.close(result)
    return result


def _forward_step(backend, data_iterator, model):
    batch = next(data_iterator)
    if backend != "local" and batch.tokens.shape[0] > 1:
        batch = batch.as_one_row()
    attention_mask, packed_seq_params = attention_inputs(batch, backend)
    per_token_loss = model(batch.tokens, batch.position_ids, attention_mask, patches=batch.patches,
                           labels=batch.labels, packed_seq_params=packed_seq_params)
    return per_token_loss, partial(_loss, batch)


def _nan_loss(forward_step):
    """Fault injection (SOLO_FAULT_INJECT=nonfinite_loss@step=N): the per-token loss times NaN, so
    the loss and, through backward, every gradient are NaN, as in a real divergence."""
    def poisoned(data_iterator, model):
        per_token_loss, loss_func = forward_step(data_iterator, model)
        return per_token_loss * float("nan"), loss_func
    return poisoned


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: gradients diverge while the loss stays finite."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _nan_grad(forward_step):
    """Fault injection (SOLO_FAULT_INJECT=nonfinite_grad@step=N): that step's gradients are NaN and
    its loss is not, as when a bad batch overflows in backward only."""
    def poisoned(data_iterator, model):
        per_token_loss, loss_func = forward_step(data_iterator, model)
        return _NaNGradient.apply(per_token_loss), loss_func
    return poisoned


def _loss(batch, per_token_loss):
    """Sum of the loss over target tokens; megatron-core divides by the global token count."""
    mask = batch.loss_mask
    vision = mask * batch.vision_mask
    total = (per_token_loss * mask).sum()
    stats = torch.stack([total, mask.sum(), (per_token_loss * vision).sum(), vision.sum()]).detach()
    return total, mask.sum().to(torch.int), {"stats": stats}


def _reduce_stats(reduced: list, batches: list) -> dict:
    """Losses of this step's micro batches (`reduced`) and what they cost (from `batches`, the
    collated micro batches), summed over the data-parallel ranks."""
    from megatron.core import parallel_state

    stats = torch.zeros(6, dtype=torch.float64, device=device())
    if reduced:  # only the last pipeline stage computes losses
        stats[:4] = torch.stack([r["stats"] for r in reduced]).sum(0)
    if parallel_state.is_pipeline_first_stage():  # counted once per pipeline
        stats[4] = sum(b.tokens.numel() for b in batches)
        lengths = [(b.cu_seqlens[1:] - b.cu_seqlens[:-1]).double() for b in batches]  # padding: a document
        stats[5] = sum(float((n * (n + 1) / 2).sum()) for n in lengths)
    dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
    dist.all_reduce(stats, group=parallel_state.get_pipeline_model_parallel_group())
    loss_sum, count, vl_sum, vl_count, tokens, pairs = stats.tolist()
    text_sum, text_count = loss_sum - vl_sum, count - vl_count
    return {
        "loss": loss_sum / max(count, 1) if math.isfinite(loss_sum) else loss_sum,
        "vl_loss": vl_sum / vl_count if vl_count else None,
        "text_loss": text_sum / text_count if text_count else None,
        "loss_tokens": count, "tokens": tokens, "attention_pairs": pairs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="solo-train", description="Train one SOLO stage (run under torchrun).",
        epilog="Example: torchrun --nproc_per_node 8 -m solo.train configs/stage1.yaml optimizer.lr=1e-4",
    )
    parser.add_argument("config", help="stage YAML (configs/stage1.yaml, ...)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tensor_parallel=2")
    args = parser.parse_args(argv)
    try:
        train(load_config(args.config, args.overrides))
    except (ConfigError, ShardError, CheckpointError, ValueError) as e:
        # Bad input: one clear line, before any compute where it can be checked up front.
        print(f"solo-train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLoss as e:
        print(f"solo-train: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        if dist.is_initialized():
            destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
