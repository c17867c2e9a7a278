"""The training loop: `solo-train CONFIG.yaml [key=value ...]` under torchrun.

Read `train` top to bottom: checks, `build_training`, resume, then the loop (read ahead -> step ->
log -> save -> preemption). `train_step` is the one training step; benchmarks/train_throughput.py
times that same function. megatron-core does the heavy lifting: parallel groups
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
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from solo import config as solo_config
from solo.checkpoint import (
    CheckpointError,
    check_attention_window,
    check_model_shape,
    check_stage_finished,
    good_checkpoint_label,
    load_checkpoint,
    model_meta,
    read_meta,
    resolve_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from solo.config import ConfigError, ParallelConfig, TrainConfig, load_config
from solo.data.batch import PackedBatch, attention_inputs, broadcast_batch
from solo.data.dataset import StageData
from solo.data.loader import default_workers
from solo.data.prefetch import StepPrefetcher
from solo.data.shards import ShardError
from solo.distributed import destroy_distributed, device, init_distributed
from solo.evaluate import Validation
from solo.faults import inject_into_forward_step
from solo.metrics import MetricsLogger, attention_pairs, training_flops
from solo.model import SOLOModel, build_model
from solo.plan import check_fits, print_plan
from solo.probe import build_probe
from solo.run_guard import guard_run
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
    p = cfg.parallel
    init_distributed(p.tensor_parallel, p.pipeline_parallel, p.context_parallel, seed=cfg.seed)
    guard_run(cfg.save_dir)  # one run per save_dir; ranks die with torchrun

    # 1. Everything that can be wrong with the inputs is checked before any compute.
    gpu_bytes = torch.cuda.get_device_properties(device()).total_memory if torch.cuda.is_available() else None
    check_fits(cfg, gpu_bytes, dist.get_world_size())
    num_microbatches(cfg)
    data = StageData(cfg.data, cfg.global_batch_size, cfg.train_steps, cfg.model.patch_size, cfg.model.vocab_size)
    # One rank per tensor-parallel group reads (`train_step` broadcasts to the others); image bytes
    # are read on the first pipeline stage only, the only one with the patch embedding.
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    reads, first_stage = parallel_state.get_tensor_model_parallel_rank() == 0, parallel_state.is_pipeline_first_stage()
    validation = Validation(cfg, dp_rank, dp_size, reads=reads, with_patches=first_stage)  # held-out data, checked
    resume, init = _checkpoints_to_load(cfg)
    probe = build_probe(cfg.probe, cfg.save_dir, cfg.model.patch_size)  # held-out images, answered (solo.probe)

    # 2. Model, optimizer, schedule, and the state they start from.
    training = build_training(cfg, data.train_steps)
    step = _load_state(training, resume, init)

    # 3. The loop.
    steps = data.train_steps
    log = MetricsLogger(cfg, start_step=step, total_steps=steps, sources=data.sources)
    log.info(f"stage {cfg.stage}: steps {step} -> {steps}, {training.layout}, backend {training.model.backend}, "
             f"{training.precision}, " + ("resumed from " + str(resume) if resume else
                                          "initialized from " + str(init) if init else "random init"))
    stop = StopRequest()
    meta = model_meta(cfg.model, training.layout, template=cfg.data.template, stage=cfg.stage, train_steps=steps,
                      config=dataclasses.asdict(cfg))
    last_saved = resume
    result = {"stage": cfg.stage, "steps": steps, "losses": []}
    workers = default_workers(cfg.data.loader_workers)
    log.info(f"data: {workers} loader worker processes" if workers else "data: read on the read-ahead thread")
    with StepPrefetcher(data, dp_rank, dp_size, cfg.micro_batch_size, TOKEN_IDS.pad_id, reads=reads,
                        with_patches=first_stage, workers=workers) as prefetch:
        while step < steps:
            started = time.perf_counter()
            micro_batches = prefetch.get(step)  # read and collated (on the CPU) while the last step ran
            done = train_step(training, micro_batches, step)
            if done.fault:
                if cfg.nonfinite_loss == "stop" or done.weights_touched:
                    raise NonFiniteLoss(f"{done.fault}; stopping. {good_checkpoint_label(last_saved)}")
                log.info(f"{done.fault}; skipping this batch (nonfinite_loss=skip)")
            step += 1
            seconds = time.perf_counter() - started
            evaluated = validation.run(partial(eval_step, training)) if validation.due(step, steps) else {}
            probed = probe.after_step(training, step, steps) if probe else {}
            log.step(step, dataclasses.asdict(done.stats), lr=done.lr, grad_norm=done.grad_norm,
                     seconds=seconds, flops=done.flops, extra={**evaluated, **probed})
            result["losses"].append(done.stats.loss)

            preempted = stop.agreed()
            if step % cfg.save_interval_steps == 0 or step == steps or preempted:
                last_saved = save_checkpoint(cfg.save_dir, step, training.model, training.optimizer,
                                             training.scheduler, meta, cfg.keep_checkpoints)
                log.info(f"saved {last_saved}")
            if preempted:
                log.info(f"stop requested ({stop.requested or 'signal on another rank'}): saved step {step}, exiting")
                result["preempted"] = True
                break
    result["checkpoint"] = str(last_saved)
    log.close(result)
    return result


# -- checks and resumption ------------------------------------------------------------------------

def num_microbatches(cfg: TrainConfig) -> int:
    """Micro batches per step and data-parallel rank (megatron-core's groups must be initialized)."""
    dp_size = parallel_state.get_data_parallel_world_size()
    if cfg.global_batch_size % (dp_size * cfg.micro_batch_size):
        raise ValueError(f"global_batch_size {cfg.global_batch_size} is not divisible by "
                         f"data-parallel size {dp_size} x micro_batch_size {cfg.micro_batch_size}")
    return cfg.global_batch_size // (dp_size * cfg.micro_batch_size)


def _checkpoints_to_load(cfg: TrainConfig) -> tuple[Path | None, Path | None]:
    """(this run's latest checkpoint, or None; else the previous stage's `init_from`, or None), checked."""
    resume = resume_checkpoint(cfg.save_dir)
    init = resolve_checkpoint(cfg.init_from) if (cfg.init_from and resume is None) else None
    for checkpoint in (resume, init):
        if checkpoint is not None:
            check_model_shape(checkpoint, cfg.model)
            check_attention_window(checkpoint, cfg.model, resuming=checkpoint is resume)
    if init is not None:
        check_stage_finished(cfg.init_from, init)
    return resume, init


def _load_state(training: Training, resume: Path | None, init: Path | None) -> int:
    """Load what the run starts from; returns the step to continue at."""
    t = training
    if resume is not None:
        # RNG states are saved one per (pipeline, tensor) rank (solo.checkpoint): only under the
        # layout they were saved with are they this rank's generators (another TP/PP size splits
        # the model otherwise, and the saved grid need not even match). A resharded resume keeps
        # its freshly seeded generators: weights, optimizer and schedule still load exactly, and
        # bit-exact resumption is promised for the same layout only.
        same_layout = read_meta(resume).get("parallel") == t.layout
        return load_checkpoint(resume, t.model, t.optimizer, t.scheduler, load_rng=same_layout)["step"]
    if init is not None:
        load_checkpoint(init, t.model, load_rng=False)  # weights only: fresh optimizer and schedule
    return 0


# -- the step ---------------------------------------------------------------------------------------

@dataclass
class Training:
    """What a training step needs, built once by `build_training`."""

    model: SOLOModel  # this rank's model, unwrapped: what checkpoints save and load
    ddp: DistributedDataParallel  # the model (under Float16Module for bf16) with megatron-core's grad buffers
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    forward_backward: Callable  # megatron-core's schedule over the micro batches (get_forward_backward_func)
    forward_step: Callable  # (data_iterator, model) -> (per-token loss, loss function): consumes one micro batch
    num_microbatches: int  # per step and data-parallel rank
    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    layout: dict  # tensor/pipeline/data-parallel sizes, as recorded in checkpoints
    precision: str  # "bf16" or "fp32", as run (the CPU always runs fp32)


@dataclass(frozen=True)
class StepStats:
    """A step's losses and what it cost, summed over the data-parallel ranks and pipeline stages."""

    loss: float  # mean over the step's target tokens (the NaN/inf itself when not finite)
    vl_loss: float | None  # over tokens of documents with an image; None if the step had none
    text_loss: float | None  # over the other target tokens
    loss_tokens: float
    tokens: float  # input tokens, padding included
    attention_pairs: float  # (query, key) pairs attended: causal, within documents


@dataclass(frozen=True)
class StepResult:
    stats: StepStats
    lr: float  # the next step's: after the schedule's step (which a faulty step does not take)
    grad_norm: float  # NaN for a faulty step
    flops: float  # model FLOPs of the step, all ranks (solo.metrics.training_flops)
    fault: str | None  # the non-finite verdict: what went wrong at which step and data position, or None
    weights_touched: bool  # the fault reached the weights (the FP32Optimizer has no inf/NaN check)


def build_training(cfg: TrainConfig, train_steps: int, *, backend: str | None = None,
                   use_cpu_initialization: bool = True) -> Training:
    """This rank's model, DDP, optimizer and a `train_steps` schedule (megatron-core's groups must be
    initialized: `solo.distributed.init_distributed`). `backend`: attention backend, by default
    `solo.model.default_backend()`; `use_cpu_initialization=False` initializes the weights on the GPU
    (for the 7B benchmark; training keeps the TP-independent CPU initialization)."""
    gpu = torch.cuda.is_available()
    bf16 = gpu and cfg.precision == "bf16"
    p = cfg.parallel
    model = build_model(cfg.model, p, backend=backend, bf16=bf16, recompute_num_layers=cfg.recompute_num_layers,
                        recompute_granularity=cfg.recompute_granularity, recompute_method=cfg.recompute_method,
                        use_cpu_initialization=use_cpu_initialization)
    ddp = _data_parallel(model, p, bf16=bf16, gpu=gpu)
    optimizer = get_megatron_optimizer(_optimizer_config(cfg.optimizer, p, bf16, model.config.params_dtype), [ddp])
    return Training(
        model=model, ddp=ddp, optimizer=optimizer, scheduler=_schedule(optimizer, cfg.optimizer, train_steps),
        forward_backward=get_forward_backward_func(), forward_step=partial(_forward_step, model.backend),
        num_microbatches=num_microbatches(cfg), micro_batch_size=cfg.micro_batch_size,
        global_batch_size=cfg.global_batch_size, seq_length=cfg.data.seq_length_tokens,
        layout={"tensor_parallel": p.tensor_parallel, "pipeline_parallel": p.pipeline_parallel,
                "data_parallel": parallel_state.get_data_parallel_world_size()},
        precision="bf16" if bf16 else "fp32",
    )


def _data_parallel(model: SOLOModel, p: ParallelConfig, bf16: bool, gpu: bool) -> DistributedDataParallel:
    config = model.config
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=gpu, use_distributed_optimizer=p.use_distributed_optimizer,
            # Gradients are reduced per bucket of 40M parameters as soon as its backward is done,
            # overlapping the rest of backward: megatron-core's own default up to 40 data-parallel
            # ranks, pinned so buckets (and the reduction order) do not grow with the cluster.
            # Without overlap (CPU) megatron-core reduces everything as one bucket after backward.
            bucket_size=40_000_000 if gpu else None,
        ),
        module=Float16Module(config, model) if bf16 else model,
    )
    # megatron-core's schedule (get_forward_backward_func) finds these on the model config, not as
    # arguments: it calls `finalize_model_grads_func` after the last micro batch's backward to finish
    # the data-parallel reduction and divide the gradients by the step's global count of loss tokens
    # (calculate_per_token_loss); `no_sync_func` keeps the overlapped bucket reduction from firing
    # on every micro batch but the last (without overlap, CPU, nothing fires early to suppress).
    config.finalize_model_grads_func = finalize_model_grads
    if gpu:
        config.no_sync_func = ddp.no_sync
    return ddp


def _optimizer_config(o: solo_config.OptimizerConfig, p: ParallelConfig, bf16: bool,
                      params_dtype: torch.dtype) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        bf16=bf16, params_dtype=params_dtype, use_distributed_optimizer=p.use_distributed_optimizer,
        # A constant loss scale of 1 changes no number (the loss is never multiplied by it here)
        # but turns on megatron-core's inf/NaN check of the gradients: a step whose gradients
        # are not finite is skipped inside optimizer.step() instead of writing NaN into weights.
        loss_scale=1.0,
    )


def _schedule(optimizer: MegatronOptimizer, o: solo_config.OptimizerConfig, steps: int) -> OptimizerParamScheduler:
    return OptimizerParamScheduler(
        # megatron-core needs warmup < decay steps: short runs (tests, demos) warm up for less.
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=min(o.lr_warmup_steps, steps - 1),
        lr_decay_steps=steps, lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=steps, wd_incr_style="constant",
        # On resume the config and the checkpoint must agree (megatron-core's default would quietly
        # keep the checkpoint's values and ignore a changed optimizer.lr or train_steps).
        use_checkpoint_opt_param_scheduler=False,
    )


def train_step(training: Training, micro_batches: list[PackedBatch | None], step: int) -> StepResult:
    """One optimizer step (`step`: 0-based) over this rank's collated micro batches of that step
    (None on tensor-parallel ranks but the first: they receive them): forward and backward through
    megatron-core's schedule, the statistics reduced over the ranks, the optimizer and schedule
    steps, and the verdict on a non-finite loss or gradient (a faulty step leaves weights, Adam
    state and the LR schedule as they were, except where `weights_touched` says otherwise)."""
    t = training
    t.ddp.zero_grad_buffer()
    t.optimizer.zero_grad()
    consumed: list[PackedBatch] = []  # the micro batches as the model saw them, for the statistics
    seq_length, micro_batch_size = activation_shape(t.model.backend, t.seq_length, t.micro_batch_size)
    reduced = t.forward_backward(
        forward_step_func=inject_into_forward_step(t.forward_step, step + 1),  # off unless SOLO_FAULT_INJECT
        data_iterator=_device_batches(micro_batches, consumed),
        model=[t.ddp], num_microbatches=t.num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=False,
    )
    stats = _reduce_stats(reduced, consumed, t.model.model_config.attention_window_tokens)
    first, last = step * t.global_batch_size, (step + 1) * t.global_batch_size - 1
    position = f"at step {step + 1} (data position: blend samples {first}..{last})"
    if not math.isfinite(stats.loss):
        fault, weights_touched, grad_norm = f"non-finite loss {stats.loss} {position}", False, float("nan")
    else:
        updated, grad_norm, _ = t.optimizer.step()
        # Not updated: megatron-core found inf/NaN gradients and skipped the step. Updated with a
        # non-finite norm: the FP32Optimizer (no distributed optimizer) has no such check.
        fault = None if updated and math.isfinite(grad_norm) else (
            f"non-finite gradients {position} with a finite loss {stats.loss:.4f}")
        weights_touched = updated
    if fault is None:
        # As Megatron-LM (`if update_successful: opt_param_scheduler.step(...)`): the schedule counts
        # applied updates, so a skipped batch (nonfinite_loss=skip) leaves the LR where it was.
        t.scheduler.step(increment=1)
    return StepResult(
        stats=stats, lr=t.optimizer.param_groups[0]["lr"], grad_norm=float("nan") if fault else grad_norm,
        flops=training_flops(t.model.model_config, stats.tokens, stats.attention_pairs),
        fault=fault, weights_touched=weights_touched,
    )


def eval_step(training: Training, micro_batches: list[PackedBatch | None]) -> StepStats:
    """The losses of these micro batches under the current weights, forward only: megatron-core's
    schedule with `forward_only=True` (any TP/PP/DP layout), no gradient, weights, optimizer, schedule
    or RNG touched (the model has no dropout; it runs in eval mode all the same, as Megatron-LM's
    `evaluate`). The statistics are reduced over the ranks as a training step's are."""
    t = training
    consumed: list[PackedBatch] = []
    seq_length, micro_batch_size = activation_shape(t.model.backend, t.seq_length, t.micro_batch_size)
    t.ddp.eval()
    try:
        with torch.no_grad():
            reduced = t.forward_backward(
                forward_step_func=t.forward_step, data_iterator=_device_batches(micro_batches, consumed),
                model=[t.ddp], num_microbatches=len(micro_batches), seq_length=seq_length,
                micro_batch_size=micro_batch_size, forward_only=True,
            )
    finally:
        t.ddp.train()
    return _reduce_stats(reduced, consumed, t.model.model_config.attention_window_tokens)


def _device_batches(micro_batches: list[PackedBatch | None], consumed: list[PackedBatch]):
    """The micro batches on the device, one at a time, as megatron-core's schedule asks for them; under
    tensor parallelism TP rank 0's, broadcast to the group (all its ranks ask at the same points of
    the schedule, as Megatron-LM's `get_batch`)."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for batch in micro_batches:
        if tp_group.size() > 1:
            batch = broadcast_batch(batch, device(), parallel_state.get_tensor_model_parallel_src_rank(), tp_group)
        else:
            batch = batch.to(device())
        consumed.append(batch)
        yield batch


def activation_shape(backend: str, seq_length: int, micro_batch_size: int) -> tuple[int, int]:
    """(sequence, batch) of the [s, b, h] activations megatron-core's schedule sends between pipeline
    stages: the packed backends run a micro batch as one row of b x s tokens (`PackedBatch.as_one_row`),
    so their activations are [b*s, 1, h]; the local backend keeps [s, b, h]."""
    return (seq_length, micro_batch_size) if backend == "local" else (seq_length * micro_batch_size, 1)


def _forward_step(backend, data_iterator, model):
    batch = next(data_iterator)
    if backend != "local" and batch.tokens.shape[0] > 1:
        batch = batch.as_one_row()
    attention_mask, packed_seq_params = attention_inputs(batch, backend)
    per_token_loss = model(batch.tokens, batch.position_ids, attention_mask, patches=batch.patches,
                           labels=batch.labels, loss_mask=batch.loss_mask, packed_seq_params=packed_seq_params)
    return per_token_loss, partial(_loss, batch)


# What each micro batch's loss function reports (sums over its target tokens), then the two costs
# counted from the collated batches; `_reduce_stats` adds them up in one all-reduce, in this order.
_LOSS_SUMS = ("loss_sum", "loss_tokens", "vl_loss_sum", "vl_loss_tokens")
_STEP_SUMS = (*_LOSS_SUMS, "tokens", "attention_pairs")


def _loss(batch, per_token_loss):
    """Sum of the loss over target tokens; megatron-core divides by the global token count."""
    mask = batch.loss_mask
    vision = mask * batch.vision_mask
    total = (per_token_loss * mask).sum()
    sums = dict(zip(_LOSS_SUMS, (total, mask.sum(), (per_token_loss * vision).sum(), vision.sum()), strict=True))
    return total, mask.sum().to(torch.int), {name: value.detach() for name, value in sums.items()}


def _reduce_stats(reduced: list[dict], micro_batches: list[PackedBatch], window: int | None) -> StepStats:
    """Losses of this step's micro batches (`reduced`) and what they cost (from `micro_batches`, the
    micro batches the model saw), summed over the data-parallel ranks and the pipeline stages."""
    sums = torch.zeros(len(_STEP_SUMS), dtype=torch.float64, device=device())
    if reduced:  # only the last pipeline stage computes losses
        sums[:len(_LOSS_SUMS)] = torch.stack([torch.stack([r[k] for k in _LOSS_SUMS]) for r in reduced]).sum(0)
    if parallel_state.is_pipeline_first_stage():  # counted once per pipeline
        sums[_STEP_SUMS.index("tokens")] = sum(b.tokens.numel() for b in micro_batches)
        lengths = [b.cu_seqlens[1:] - b.cu_seqlens[:-1] for b in micro_batches]  # padding: a document
        # Summed on the device: the micro batches are there (received or copied), and no sync is needed.
        sums[_STEP_SUMS.index("attention_pairs")] = torch.stack([attention_pairs(n, window) for n in lengths]).sum()
    dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
    s = dict(zip(_STEP_SUMS, sums.tolist(), strict=True))
    text_sum, text_count = s["loss_sum"] - s["vl_loss_sum"], s["loss_tokens"] - s["vl_loss_tokens"]
    return StepStats(
        loss=s["loss_sum"] / max(s["loss_tokens"], 1) if math.isfinite(s["loss_sum"]) else s["loss_sum"],
        vl_loss=s["vl_loss_sum"] / s["vl_loss_tokens"] if s["vl_loss_tokens"] else None,
        text_loss=text_sum / text_count if text_count else None,
        loss_tokens=s["loss_tokens"], tokens=s["tokens"], attention_pairs=s["attention_pairs"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="solo-train", description="Train one SOLO stage (run under torchrun).",
        epilog="Example: torchrun --nproc_per_node 8 -m solo.train configs/stage1.yaml optimizer.lr=1e-4",
    )
    parser.add_argument("config", help="stage YAML (configs/stage1.yaml, ...)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tensor_parallel=2")
    parser.add_argument("--plan", action="store_true",
                        help="print the memory plan per GPU and exit (no GPU, no torchrun)")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="with --plan: check against this GPU size; exit 2 with the change that fits if not")
    parser.add_argument("--gpus", type=int, default=None,
                        help="with --plan: GPUs of the run (default $WORLD_SIZE, else 8)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.plan:
            return print_plan(cfg, args.gpu_memory_gib, args.gpus)
        train(cfg)
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
