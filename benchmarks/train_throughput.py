"""Training throughput of the mistral-7b layer shape on one GPU, extrapolated to the full 32 layers.

    python3 benchmarks/train_throughput.py --layers 4,8,12 --no-recompute-layers 4
    python3 benchmarks/train_throughput.py --cpu-smoke        # tiny, on the CPU (automatic without a GPU)

What a step is: the path of `solo.train` — SOLOModel (flex backend: local megatron-core layers +
FlexAttention document masking), bf16 params under megatron-core's Float16Module, megatron-core
DistributedDataParallel (fp32 grad buffer), the distributed optimizer (fp32 main params, Adam) from
`get_megatron_optimizer`, `get_forward_backward_func` — with one micro batch: a 32,768-token packed
row of ~30 realistic documents (text documents of ~1,000 tokens and image-caption documents with
images up to 1024x1024 = 32x32 patches). Timed: forward + backward + optimizer step, synchronized.

The full 7B (32 layers, ~18 bytes per parameter for bf16 weights + fp32 grads, main weights and
Adam moments) does not fit one 80 GB GPU, so the mistral-7b *layer shape* runs with as many layers as
fit (full activation recompute by default) and the step time is fitted as t(L) = a + b*L over the
layer counts measured, then evaluated at L = 32 (on one H100 80GB, 12 layers with full recompute is
the most that fits: 60 GiB peak; 16 layers runs out of memory). Model FLOPs per step: 3 x (2 x matmul params x
tokens + 4 x hidden x layers x attended (query, key) pairs within documents), as `solo.metrics`;
recomputation is not credited (MFU, not HFU). Baseline: the SOLO paper's 20K tokens/s on 8 x A100
for the 7B, i.e. 2.5K tokens/s per GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solo.config import MODEL_PRESETS, ModelConfig, ParallelConfig  # noqa: E402
from solo.data.batch import attention_inputs, collate  # noqa: E402
from solo.distributed import destroy_distributed, device, init_distributed  # noqa: E402
from solo.model import SOLOModel, transformer_config  # noqa: E402
from solo.tokenizer import SP_VOCAB_SIZE, TOKEN_IDS  # noqa: E402
from solo.vision import image_token_ids  # noqa: E402

IDS = TOKEN_IDS  # the ids SOLOTokenizer gives, without loading its sentencepiece model
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
BASELINE_TOKENS_PER_GPU = 20_000 / 8  # SOLO paper: 20K tokens/s on 8 x A100 (7B)
FULL_LAYERS = 32


def packed_row(seq: int, patch_size: int, rng, image_fraction: float = 0.35, text_tokens=(600, 1400)):
    """Documents back to back until the row is full (the last one cut, as the packer does)."""
    tokens, loss, lengths, patches = [], [], [], []
    grids = [(32, 32), (32, 32), (24, 32), (32, 24), (16, 16), (28, 20)]  # up to 1024x1024 pixels
    cap = max(4, seq // 32)
    n_images = 0
    while len(tokens) < seq:
        if rng.random() < image_fraction:
            rows, cols = grids[rng.integers(len(grids))]
            rows, cols = min(rows, cap), min(cols, cap)
            caption = rng.integers(3, SP_VOCAB_SIZE, int(rng.integers(20, 120))).tolist()
            doc = [IDS.bos_id] + image_token_ids(rows, cols, IDS) + caption + [IDS.eos_id]
            doc_loss = [0] * (len(doc) - len(caption) - 1) + [1] * (len(caption) + 1)
            pix = rng.integers(0, 256, (rows * cols, 3 * patch_size**2), dtype=np.uint8)
        else:
            n = int(rng.integers(*text_tokens))
            doc = [IDS.bos_id] + rng.integers(3, SP_VOCAB_SIZE, n - 2).tolist() + [IDS.eos_id]
            doc_loss, pix = [0] + [1] * (n - 1), None
        room = seq - len(tokens)
        if len(doc) > room:  # cut the last document; an image must stay whole, so fill with text
            if pix is not None:
                doc = [IDS.bos_id] + rng.integers(3, SP_VOCAB_SIZE, room - 1).tolist()
                doc_loss, pix = [0] + [1] * (room - 1), None
            doc, doc_loss = doc[:room], doc_loss[:room]
        tokens += doc
        loss += doc_loss
        lengths.append(len(doc))
        if pix is not None:
            patches.append(pix)
            n_images += 1
    sample = SimpleNamespace(tokens=np.array(tokens, dtype=np.int32), loss_mask=np.array(loss, dtype=np.uint8),
                             document_lengths=lengths, patches=patches)
    return sample, n_images


def matmul_params(model: ModelConfig) -> int:
    h, kv = model.hidden_size, model.hidden_size // model.num_attention_heads * model.num_query_groups
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * model.ffn_hidden_size
    return model.num_layers * per_layer + h * model.vocab_size


def step_flops(model: ModelConfig, tokens: float, pairs: float) -> float:
    """Forward + backward model FLOPs (the formula of solo.metrics.training_flops)."""
    return 3 * (2 * matmul_params(model) * tokens + 4 * model.hidden_size * model.num_layers * pairs)


def forward_step(backend, data_iterator, model):
    batch = next(data_iterator)
    attention_mask, packed_seq_params = attention_inputs(batch, backend)
    per_token = model(batch.tokens, batch.position_ids, attention_mask, patches=batch.patches,
                      labels=batch.labels, packed_seq_params=packed_seq_params)

    def loss_func(per_token_loss):
        mask = batch.loss_mask
        total = (per_token_loss.float() * mask).sum()
        return total, mask.sum().to(torch.int), {"loss": torch.stack([total.detach(), mask.sum()])}

    return per_token, loss_func


def measure(model_cfg: ModelConfig, batch, backend: str, bf16: bool, recompute_layers: int,
            steps: int, warmup: int) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    gpu = torch.cuda.is_available()
    config = transformer_config(model_cfg, ParallelConfig(), bf16=bf16, recompute_num_layers=recompute_layers)
    if gpu:
        config.use_cpu_initialization = False  # billions of weights: initialize on the GPU
    started = time.perf_counter()
    model = SOLOModel(config, model_cfg, backend, pre_process=True, post_process=True)
    if gpu:
        model.cuda(torch.cuda.current_device())
    module = Float16Module(config, model) if bf16 else model
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=gpu,
                                                 use_distributed_optimizer=True,
                                                 bucket_size=40_000_000 if gpu else None),
        module=module,
    )
    config.finalize_model_grads_func = finalize_model_grads
    if gpu:
        config.no_sync_func = ddp.no_sync
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-5, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                        clip_grad=1.0, bf16=bf16, params_dtype=config.params_dtype, use_distributed_optimizer=True),
        [ddp],
    )
    params = sum(p.numel() for p in model.parameters())
    build_s = time.perf_counter() - started
    forward_backward = get_forward_backward_func()
    seq = batch.tokens.shape[1]

    def step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(forward_step_func=partial(forward_step, backend), data_iterator=iter([batch]),
                                   model=[ddp], num_microbatches=1, seq_length=seq, micro_batch_size=1,
                                   forward_only=False)
        _, grad_norm, _ = optimizer.step()
        loss = torch.stack([r["loss"] for r in reduced]).sum(0)
        return float(loss[0] / loss[1]), grad_norm

    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss, grad_norm = step()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    result = {
        "layers": model_cfg.num_layers, "recompute_layers": recompute_layers, "params": params,
        "build_s": build_s, "first_step_s": times[0], "step_s": float(np.median(times[warmup:])),
        "step_s_all": times, "losses": losses, "grad_norm": float(grad_norm),
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if gpu else None,
    }
    del step, optimizer, ddp, module, model
    config.finalize_model_grads_func = config.no_sync_func = None
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (automatic without a GPU)")
    parser.add_argument("--layers", default="4,8,12", help="layer counts to measure, comma-separated")
    parser.add_argument("--recompute", choices=["full", "none"], default="full",
                        help="activation recompute of every layer (megatron recompute_granularity=full)")
    parser.add_argument("--no-recompute-layers", default="",
                        help="also measure these layer counts without recompute (the recompute overhead)")
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default="flex")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args()

    smoke = args.cpu_smoke or not torch.cuda.is_available()
    if smoke:
        torch.cuda.is_available = lambda: False
        base = ModelConfig(preset="tiny", num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                           ffn_hidden_size=172, patch_size=32)
        args.layers, args.no_recompute_layers = "1,2", "1"
        args.seq, args.steps, args.warmup = min(args.seq, 1024), 2, 1
        args.backend = "local"  # FlexAttention has no backward on the CPU
        bf16 = False
    else:
        base, bf16 = MODEL_PRESETS["mistral-7b"], True
    init_distributed(seed=1234)
    gpu = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if gpu else "CPU (smoke)"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)

    rng = np.random.default_rng(0)
    sample, n_images = packed_row(args.seq, base.patch_size, rng, text_tokens=(600, 1400) if not smoke else (60, 140))
    batch = collate([sample], args.seq, pad_id=IDS.pad_id).to(device())
    lengths = np.asarray(sample.document_lengths, dtype=np.float64)
    pairs = float((lengths * (lengths + 1) / 2).sum())
    print(f"device: {name}; torch {torch.__version__}; backend {args.backend}; {'bf16' if bf16 else 'fp32'}; "
          f"layer shape hidden {base.hidden_size}, heads {base.num_attention_heads}/{base.num_query_groups} groups, "
          f"ffn {base.ffn_hidden_size}, vocab {base.vocab_size} (padded {base.padded_vocab_size})", flush=True)
    print(f"packed row: {args.seq} tokens, {len(lengths)} documents ({n_images} with images, "
          f"{int(batch.patches.shape[0])} patches), mean document {lengths.mean():.0f} tokens, "
          f"{int(batch.loss_mask.sum())} loss tokens, attended pairs {pairs:.3e} "
          f"({pairs / (args.seq * (args.seq + 1) / 2):.1%} of full causal)", flush=True)

    plan = [(int(n), args.recompute == "full") for n in args.layers.split(",") if n]
    plan += [(int(n), False) for n in args.no_recompute_layers.split(",") if n]
    results = []
    for layers, recompute in plan:
        cfg = dataclasses.replace(base, num_layers=layers)
        try:
            r = measure(cfg, batch, args.backend, bf16, layers if recompute else 0, args.steps, args.warmup)
        except torch.OutOfMemoryError as e:
            print(f"{layers} layers, recompute {'full' if recompute else 'none'}: OUT OF MEMORY ({str(e).splitlines()[0]})",
                  flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        flops = step_flops(cfg, args.seq, pairs)
        r.update(recompute="full" if recompute else "none", tokens_per_s=args.seq / r["step_s"],
                 model_tflops=flops / r["step_s"] / 1e12, mfu=flops / r["step_s"] / peak if peak else None)
        results.append(r)
        mem = f", peak memory {r['peak_alloc_gib']:.1f} GiB allocated / {r['peak_reserved_gib']:.1f} GiB reserved" if gpu else ""
        print(f"{layers} layers, recompute {r['recompute']}: {r['params'] / 1e9:.3f}B params, step {r['step_s']:.3f} s "
              f"(first {r['first_step_s']:.1f} s, build {r['build_s']:.1f} s), {r['tokens_per_s']:,.0f} tokens/s, "
              f"{r['model_tflops']:.0f} model TFLOP/s" + (f", MFU {r['mfu']:.1%}" if peak else "") + f"{mem}; "
              f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, grad norm {r['grad_norm']:.3f}", flush=True)

    full = [r for r in results if r["recompute"] == "full"] if args.recompute == "full" else \
        [r for r in results if r["recompute"] == "none"]
    summary = {"device": name, "seq": args.seq, "documents": len(lengths), "image_documents": n_images,
               "attended_pairs": pairs, "results": results}
    if len(full) >= 2:
        x = np.array([r["layers"] for r in full], dtype=np.float64)
        y = np.array([r["step_s"] for r in full])
        b, a = np.polyfit(x, y, 1)
        t32 = a + b * FULL_LAYERS
        cfg32 = dataclasses.replace(base, num_layers=FULL_LAYERS)
        flops32 = step_flops(cfg32, args.seq, pairs)
        tps = args.seq / t32
        ratio = tps / BASELINE_TOKENS_PER_GPU
        summary["extrapolation"] = {"fixed_s": a, "per_layer_s": b, "step_s_32": t32, "tokens_per_s_32": tps,
                                    "mfu_32": flops32 / t32 / peak if peak else None, "vs_paper": ratio}
        print(f"fit over {[int(v) for v in x]} layers (recompute {full[0]['recompute']}): step = {a:.3f} s + "
              f"{b:.4f} s x layers -> 32 layers (7B): {t32:.2f} s/step, {tps:,.0f} tokens/s per GPU"
              + (f", MFU {flops32 / t32 / peak:.1%}" if peak else ""), flush=True)
        nr = [r for r in results if r["recompute"] == "none"] if args.recompute == "full" else []
        if nr:
            r = nr[0]
            b_nr = (r["step_s"] - a) / r["layers"]
            t32_nr = a + b_nr * FULL_LAYERS
            summary["extrapolation"].update(step_s_32_no_recompute=t32_nr, tokens_per_s_32_no_recompute=args.seq / t32_nr)
            print(f"without recompute ({r['layers']} layers measured, same fixed part): {b_nr:.4f} s x layers -> "
                  f"32 layers: {t32_nr:.2f} s/step, {args.seq / t32_nr:,.0f} tokens/s per GPU"
                  + (f", MFU {flops32 / t32_nr / peak:.1%}" if peak else "")
                  + " (compute only: 32 layers of activations need TP/PP or recompute to fit)", flush=True)
        paper_mfu = BASELINE_TOKENS_PER_GPU * flops32 / args.seq / PEAK_BF16["A100"]
        print(f"vs the SOLO paper's 20K tokens/s on 8 x A100 (2,500 tokens/s per GPU, ~{paper_mfu:.0%} MFU on A100 "
              f"by this FLOP count): {ratio:.2f}x per GPU"
              + (f" (peak bf16 {name.split()[1] if len(name.split()) > 1 else name} / A100 = {peak / PEAK_BF16['A100']:.2f}x)"
                 if peak else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    destroy_distributed()
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
