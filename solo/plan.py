"""Memory plan: bytes per GPU of a stage's config, before any GPU is touched (`solo-train CONFIG --plan`).

Pure arithmetic from the config: no torch, no GPU, no torchrun. What it counts, per GPU (with
pipeline parallelism the fuller of the first stage, with the embedding and the micro batches 1F1B
keeps in flight, and the last, with the output layer and the logits):

* **weights, gradient buffer, optimizer shard**, as megatron-core 0.16.1 keeps them:
  `DistributedDataParallel` puts every parameter of the rank's TP/PP shard in one contiguous param
  buffer (bf16, 2 B; the model's params are views of it) and one grad buffer (fp32, 4 B, because
  solo.train sets `grad_reduce_in_fp32`); the distributed optimizer holds fp32 main params and Adam's
  two moments (12 B) for 1/DP of them (`shard_main_param = shard_model_param.clone().float()` in
  `optimizer/distrib_optimizer.py`): 6 + 12/DP bytes per parameter, as megatron-core's distributed
  optimizer table says. Without the distributed optimizer: 18. fp32 runs: 4 + 4 + 8/DP (the fp32
  params are their own main params).
* **activations** of one micro batch, per layer (Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", counted for this layer: RMSNorm, GQA, SwiGLU, no
  dropout, fused/flash attention without the [s, s] matrix), in elements per token: the layer input,
  the attention-norm output, the pre-MLP residual and the MLP-norm output (4h, split by TP only under
  sequence parallelism); rotated q, k, v, the attention output and its contiguous copy for the
  output projection (3h + 2kv); fc1's output, SiLU's output and the product (4f) (split by TP). A
  recomputed layer keeps only its input (h). Peaks: the end of the forward pass (everything kept +
  the logits and cross entropy: bf16 logits, megatron-core's fp32 copy, the bf16 gradient, 8 B per
  token and vocabulary entry / TP, counted for every token: the model computes them at target
  positions only, so this is the bound of an all-text micro batch) or the backward of a recomputed
  chunk (kept inputs + the chunk's full activations + the gradients in flight, counted as one more
  layer). The "local" backend (CPU) also keeps its [heads, s, s] attention scores and probabilities.
* **reserve**: 1 GiB (CUDA context, NCCL) + 15% of the above for the caching allocator's
  fragmentation (`docs/train_throughput_h100.log`: reserved is 6-20% above allocated).

Calibration (the error of the activation model; the parameter count is exact, tested against the
built model, and the buffers follow megatron-core's code): the project's H100 log
(`docs/train_throughput_h100.log`, benchmarks/train_throughput.py: the mistral-7b layer shape, one
32,768-token packed row, bf16, TP=1, DP=1, flex backend; peak allocated, the plan without reserve):

    4 layers, no recompute      measured 51.6 GiB, plan 49.5 GiB (-4.1%; activations 30.1 vs 32.2, -6.5%)
    4 layers, full (block 4)    measured 31.1 GiB, plan 31.1 GiB (+0.1%)
    8 layers, full (block 8)    measured 45.7 GiB, plan 46.8 GiB (+2.3%)
    12 layers, full (block 12)  measured 60.4 GiB, plan 62.4 GiB (+3.3%)

(the measured recompute peaks do not grow with the kept layer inputs as the plan's do, so the plan
errs on the safe side as layers are added), and peaks measured on the CPU (fp32, local backend, 4
layers of hidden 128: the growth of peak RSS over the built model with its gradients,
`tests/test_plan.py::test_plan_matches_a_measured_peak_on_the_cpu`): -12% to +7% at 256 and 1,024
tokens, without recompute, full/uniform/2 and full/block/1 (the test allows 15%). So: activations
within about 12% (under rather than over without recompute), totals within 5% for the 7B shapes; the
15% reserve covers the difference.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from solo.config import ModelConfig, TrainConfig

GIB = 2**30
CONTEXT_BYTES = 1 * GIB  # CUDA context, NCCL communicators and buffers
ALLOCATOR_HEADROOM = 0.15  # caching-allocator fragmentation over the allocated peak
LOGITS_BYTES = 8  # per token and vocabulary entry: bf16 logits + fp32 copy + bf16 gradient


class PlanError(ValueError):
    """A config whose plan does not fit the device (solo-train exits 2 with the table)."""


@dataclass(frozen=True)
class Activations:
    full_layer: int  # bytes of one layer kept whole
    kept_input: int  # bytes of one recomputed layer's (or chunk's) saved input
    peak: int
    phase: str  # where the peak is


@dataclass(frozen=True)
class Plan:
    cfg: TrainConfig
    data_parallel: int
    params: int  # on this GPU
    weights: int
    grads: int
    optimizer: int
    activations: Activations
    reserve: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations.peak + self.reserve

    def fits(self, device_bytes: int) -> bool:
        return self.total <= device_bytes


def layer_params(m: ModelConfig, tp: int) -> int:
    kv = m.hidden_size // m.num_attention_heads * m.num_query_groups
    h, f = m.hidden_size, m.ffn_hidden_size
    split = h * (h + 2 * kv) + h * h + 3 * h * f  # QKV, output projection, fc1 (gate + up), fc2
    return split // tp + 2 * h  # the two norms are whole on every TP rank


def params_per_gpu(m: ModelConfig, tp: int, pp: int) -> int:
    """The fuller of the first (embedding, patch projection) and last (final norm, output layer) stage."""
    layers = m.num_layers // pp * layer_params(m, tp)
    vocab = m.padded_vocab_size * m.hidden_size // tp
    first = layers + vocab + m.patch_dim * m.hidden_size
    last = layers + vocab + m.hidden_size
    return max(first, last) if pp > 1 else first + vocab + m.hidden_size


def parameter_bytes(params: int, bf16: bool, distributed_optimizer: bool, dp: int) -> tuple[int, int, int]:
    """(weights, grad buffer, optimizer state) bytes, as megatron-core's DDP + optimizer hold them."""
    shard = dp if distributed_optimizer else 1
    optimizer = (12 if bf16 else 8) * params // shard  # (fp32 main params +) Adam exp_avg + exp_avg_sq
    return (2 if bf16 else 4) * params, 4 * params, optimizer


def activations(cfg: TrainConfig, bf16: bool, backend: str = "flash") -> Activations:
    """Peak activation bytes on the fuller of the first and last pipeline stage (see the module docstring)."""
    m, p = cfg.model, cfg.parallel
    tp, sp = p.tensor_parallel, p.sequence_parallel
    e = 2 if bf16 else 4
    tokens = cfg.data.seq_length_tokens // p.context_parallel * cfg.micro_batch_size
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = h // m.num_attention_heads * m.num_query_groups
    seq_split = tp if sp else 1
    full = tokens * e * (4 * h // seq_split + (3 * h + 2 * kv + 4 * f) // tp)
    if backend == "local":  # DotProductAttention keeps the softmax of every head ([heads, s, s]) and
        heads = m.num_attention_heads // tp  # k and v repeated to every head (GQA)
        full += cfg.micro_batch_size * heads * (cfg.data.seq_length_tokens // p.context_parallel) ** 2 * e
        full += tokens * e * 2 * (h - kv) // tp
    kept_input = tokens * e * h // seq_split
    layers = m.num_layers // p.pipeline_parallel
    # 1F1B: the first stage runs min(PP, micro batches) forward passes before its first backward.
    microbatches = cfg.global_batch_size // cfg.micro_batch_size
    in_flight = min(p.pipeline_parallel, microbatches)
    n, method, granularity = cfg.recompute_num_layers, cfg.recompute_method, cfg.recompute_granularity
    # kept: what one micro batch's forward pass leaves for backward; chunk: what backward recomputes
    # on top of it at the worst moment (a block-recomputed layer comes after the kept layers are freed).
    if granularity == "full" and method == "uniform":  # every layer recomputed, n at a time
        kept, chunk = (layers // n) * kept_input, n * full
    elif granularity == "full":  # block: the first n layers recomputed one by one, the others kept
        kept, chunk = n * kept_input + (layers - n) * full, full if n == layers else 0
    else:  # none, or selective (core attention only, which flash attention does not keep anyway)
        kept, chunk = layers * full, 0
    head = tokens * (LOGITS_BYTES * m.padded_vocab_size // tp + 2 * e * h)  # logits; final norm + output input
    # The first stage holds `in_flight` micro batches, the last stage one and the logits (PP=1: both).
    forward_end = max(in_flight * kept, kept + head)
    backward = in_flight * kept + chunk + full  # + the gradients in flight, about one layer's worth
    if forward_end >= backward:
        return Activations(full, kept_input, forward_end, "end of forward (logits and loss)")
    return Activations(full, kept_input, backward, "backward of a recomputed chunk" if chunk else "backward")


def make_plan(cfg: TrainConfig, world_size: int | None = None, backend: str = "flash",
              bf16: bool | None = None) -> Plan:
    """`world_size`: GPUs of the run (default $WORLD_SIZE, else 8); `backend` "local" adds its [s, s] scores."""
    p = cfg.parallel
    world = world_size or int(os.environ.get("WORLD_SIZE", 0)) or 8
    model_parallel = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
    dp = max(world // model_parallel, 1)
    bf16 = cfg.precision == "bf16" if bf16 is None else bf16
    params = params_per_gpu(cfg.model, p.tensor_parallel, p.pipeline_parallel)
    weights, grads, optimizer = parameter_bytes(params, bf16, p.use_distributed_optimizer, dp)
    act = activations(cfg, bf16, backend)
    reserve = CONTEXT_BYTES + int(ALLOCATOR_HEADROOM * (weights + grads + optimizer + act.peak))
    return Plan(cfg, dp, params, weights, grads, optimizer, act, reserve)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def render(plan: Plan, device_bytes: int | None = None) -> str:
    cfg, p, a = plan.cfg, plan.cfg.parallel, plan.activations
    recompute = (cfg.recompute_granularity if cfg.recompute_granularity != "full"
                 else f"full, {cfg.recompute_method}, {cfg.recompute_num_layers} layers")
    dtype = "bf16" if plan.weights == 2 * plan.params else "fp32"
    shard = plan.data_parallel if p.use_distributed_optimizer else 1
    rows = [
        ("parameters on this GPU", f"{plan.params / 1e9:.3f} B", "fullest stage" if p.pipeline_parallel > 1 else ""),
        (f"weights ({dtype} param buffer)", _gib(plan.weights), ""),
        ("gradient buffer (fp32)", _gib(plan.grads), ""),
        (f"optimizer shard (1/{shard})", _gib(plan.optimizer), "fp32 main params + 2 Adam moments"),
        ("activations (peak)", _gib(a.peak), f"at the {a.phase}"),
        ("  per layer kept whole", _gib(a.full_layer), ""),
        ("  per recomputed input kept", _gib(a.kept_input), ""),
        ("reserve", _gib(plan.reserve), "CUDA context + allocator headroom"),
        ("total", _gib(plan.total), ""),
    ]
    if device_bytes:
        verdict = "fits" if plan.fits(device_bytes) else "DOES NOT FIT"
        rows.append(("device", _gib(device_bytes), f"{verdict} ({(device_bytes - plan.total) / GIB:+.1f} GiB)"))
    header = (f"memory plan per GPU: {cfg.model.preset} ({cfg.model.num_layers} layers), TP={p.tensor_parallel} x "
              f"PP={p.pipeline_parallel} x CP={p.context_parallel} x DP={plan.data_parallel}"
              + (", sequence parallel" if p.sequence_parallel else "")
              + f", {cfg.data.seq_length_tokens} tokens x micro batch {cfg.micro_batch_size}, {dtype}, "
              f"recompute {recompute}")
    return "\n".join([header] + [f"  {label:<30}{value:>13}   {note}".rstrip() for label, value, note in rows])


def _candidates(cfg: TrainConfig):
    """Changes to try, least costly first: recompute (compute only), then more TP, then PP."""
    layers = cfg.model.num_layers // cfg.parallel.pipeline_parallel
    already_full_uniform = cfg.recompute_granularity == "full" and cfg.recompute_method == "uniform"
    if not already_full_uniform:
        for n in range(1, layers + 1):  # block: recompute as few layers as fit
            yield {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": n}
    for n in sorted((d for d in range(1, layers + 1) if layers % d == 0), reverse=True):
        yield {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": n}
    for key in ("tensor_parallel", "pipeline_parallel"):
        size = getattr(cfg.parallel, key)
        for factor in (2, 4, 8):
            yield {f"parallel.{key}": size * factor}


def _apply(cfg: TrainConfig, change: dict) -> TrainConfig | None:
    top = {k: v for k, v in change.items() if not k.startswith("parallel.")}
    parallel = {k.split(".", 1)[1]: v for k, v in change.items() if k.startswith("parallel.")}
    if parallel.get("tensor_parallel", 1) > 1 and not cfg.parallel.sequence_parallel:
        parallel["sequence_parallel"] = True
    try:
        return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **parallel), **top).validate()
    except ValueError:
        return None


def smallest_fitting_change(cfg: TrainConfig, device_bytes: int, world_size: int | None = None) -> str | None:
    """The first change (as key=value overrides) whose plan fits, or None."""
    world = world_size or int(os.environ.get("WORLD_SIZE", 0)) or 8
    for change in _candidates(cfg):
        changed = _apply(cfg, change)
        if changed is None:
            continue
        model_parallel = changed.parallel.tensor_parallel * changed.parallel.pipeline_parallel
        if model_parallel > world or world % model_parallel:
            continue
        if make_plan(changed, world).fits(device_bytes):
            return " ".join(f"{k}={v}" for k, v in change.items())
    return None


def check_fits(cfg: TrainConfig, device_bytes: int | None, world_size: int | None = None) -> None:
    """Stop before step 1 when the plan does not fit the device; `device_bytes` None (CPU): no check."""
    if not device_bytes:
        return
    plan = make_plan(cfg, world_size)
    if plan.fits(device_bytes):
        return
    change = smallest_fitting_change(cfg, device_bytes, world_size)
    hint = f"smallest change that fits: {change}" if change else "no single change fits: use more GPUs"
    raise PlanError(f"the memory plan does not fit the device ({device_bytes / GIB:.1f} GiB); {hint}\n"
                    + render(plan, device_bytes))


def print_plan(cfg: TrainConfig, gpu_memory_gib: float | None = None, gpus: int | None = None) -> int:
    """`solo-train CONFIG --plan [--gpu-memory-gib N] [--gpus N]`: the table (against 80 GiB unless told);
    with --gpu-memory-gib a plan that does not fit raises PlanError (exit 2) naming the change that fits."""
    device_bytes = int((gpu_memory_gib or 80) * GIB)
    if gpu_memory_gib is not None:
        check_fits(cfg, device_bytes, gpus)
    print(render(make_plan(cfg, gpus), device_bytes), flush=True)
    return 0
