"""Step logging: one structured console line per step, a metrics.jsonl per run, wandb.

wandb does the experiment tracking (offline by default: `wandb sync SAVE_DIR/wandb/...` uploads
later; `wandb_mode=online` logs live). `metrics.jsonl` is what `solo-plot` reads. Only global
rank 0 writes; every value it logs has already been reduced over the data-parallel group.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from solo.config import ModelConfig, TrainConfig
from solo.fileio import atomic_write_json, atomic_write_text

# Dense bf16 peak per GPU (tensor cores), for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "B200": 2250e12, "L40S": 362e12}


def peak_flops_per_device() -> float | None:
    if not torch.cuda.is_available():
        return None  # CPU runs report no MFU
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def attention_pairs(document_lengths: torch.Tensor, window_tokens: int | None) -> torch.Tensor:
    """(query, key) pairs attended in documents of these lengths: causal, and with a window of w
    tokens (the query included) a query sees min(position + 1, w) keys. A 0-dim float64 tensor on
    the lengths' device: summed there, with no host sync per micro batch."""
    n = document_lengths.double()
    if window_tokens is None:
        return (n * (n + 1) / 2).sum()
    w = torch.clamp(n, max=window_tokens)
    return (w * (w + 1) / 2 + (n - w) * w).sum()


def training_flops(model: ModelConfig, tokens: float, attention_pairs: float) -> float:
    """Forward + backward FLOPs of a step: 3 x (2 x matmul params per token + attention).

    `attention_pairs` counts the (query, key) pairs actually attended (causal, within documents and
    the attention window: `attention_pairs`), so packing many short documents is not credited with
    full-sequence attention.
    """
    h, kv = model.hidden_size, model.hidden_size // model.num_attention_heads * model.num_query_groups
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * model.ffn_hidden_size
    matmul_params = model.num_layers * per_layer + h * model.vocab_size
    attention = 4 * h * model.num_layers * attention_pairs  # QK^T and AV, 2 FLOPs per MAC
    return 3 * (2 * matmul_params * tokens + attention)


class MetricsLogger:
    def __init__(self, cfg: TrainConfig, start_step: int, total_steps: int, sources):
        self.cfg = cfg
        self.start_step, self.total_steps = start_step, total_steps
        self.is_writer = dist.get_rank() == 0
        self.world = dist.get_world_size()
        self.peak = peak_flops_per_device()
        self.wandb = None
        if not self.is_writer:
            return
        self.dir = Path(cfg.save_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self.info("data: " + ", ".join(f"{s.name} {s.fraction:.0%} ({s.shards} shards, {s.samples} sequences)"
                                       for s in sources))
        if cfg.wandb_mode != "disabled":
            import wandb

            run_id_file = self.dir / "wandb_run_id"
            run_id = run_id_file.read_text().strip() if run_id_file.exists() else uuid.uuid4().hex[:12]
            atomic_write_text(run_id_file, run_id)
            self.wandb = wandb.init(
                project=cfg.wandb_project, name=cfg.stage, id=run_id, resume="allow", dir=str(self.dir),
                mode=cfg.wandb_mode, config=dataclasses.asdict(cfg),
            )

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: keep the file one line per step."""
        if not self.metrics_path.exists():
            return
        kept = [line for _, line, row in self._rows() if row["step"] <= step]
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def _rows(self):
        """(line number, line, row) of metrics.jsonl. A kill while a row was being appended leaves
        a cut last line: dropped, and said. A bad line elsewhere is an error naming it."""
        text = self.metrics_path.read_text()
        lines = text.splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = row["step"] if isinstance(row, dict) else None
            except (ValueError, KeyError):
                step = None
            if isinstance(step, int):
                yield n, line, row
            elif n == len(lines) and not text.endswith("\n"):
                self.info(f"{self.metrics_path}: dropped a partial last line (line {n}, cut while being written)")
            else:
                raise ValueError(f"{self.metrics_path}: line {n} is not a metrics row (JSON with a step): "
                                 f"{line[:80]!r}")

    def info(self, message: str) -> None:
        if self.is_writer:
            print(f"[solo {self.cfg.stage}] {message}", flush=True)

    def step(self, step: int, stats: dict, lr: float, grad_norm, seconds: float, flops: float,
             extra: dict | None = None) -> None:
        """`seconds`: the step's own time; `extra`: what was measured after this step (solo.evaluate:
        val_loss, ...; solo.probe: probe_accuracy, ...), joined to the step's row, sent to wandb and
        printed on a line of its own whatever the log interval."""
        if not self.is_writer:
            return
        tokens_per_s = stats["tokens"] / seconds
        memory_gb = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                     else psutil.Process().memory_info().rss) / 2**30
        record = {
            "stage": self.cfg.stage, "step": step, "loss": stats["loss"], "vl_loss": stats["vl_loss"],
            "text_loss": stats["text_loss"], "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": tokens_per_s, "step_s": seconds,
            "mfu": flops / seconds / (self.peak * self.world) if self.peak else None,
            "memory_gb": memory_gb, **(extra or {}),
        }
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        if step % self.cfg.log_interval_steps == 0 or step == self.total_steps:
            fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            print(
                f"[solo {self.cfg.stage}] step {step}/{self.total_steps} | loss {record['loss']:.4f} "
                f"| vl {fmt(record['vl_loss'], '.4f')} | text {fmt(record['text_loss'], '.4f')} "
                f"| lr {lr:.3e} | grad {fmt(record['grad_norm'], '.3f')} | {tokens_per_s:,.0f} tok/s "
                f"| mfu {fmt(record['mfu'], '.1%')} | mem {memory_gb:.2f} GB",
                flush=True,
            )
        if extra:
            fmt = lambda v: "-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.4f}"  # noqa: E731
            print(f"[solo {self.cfg.stage}] step {step}/{self.total_steps} | "
                  + " | ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in extra.items()), flush=True)

    def close(self, result: dict) -> None:
        _copy_result(result)
        if not self.is_writer:
            return
        if self.start_step >= self.total_steps and (self.dir / "result.json").exists():
            # A rerun of a finished stage ran no step: its result is the one of the run that did.
            self.info(f"stage already finished at step {self.start_step} of {self.total_steps}; "
                      f"{self.dir / 'result.json'} kept as it was")
            return
        atomic_write_json(self.dir / "result.json", result, indent=2)
        if self.wandb is not None:
            self.wandb.finish()


RESULT_COPY_ENV = "SOLO_RESULT_FILE"


def _copy_result(result: dict) -> None:
    """scripts/pretrain.sh reads the result of this node's ranks from $SOLO_RESULT_FILE: torchrun
    exits 1 after any signal, even when every rank saved and exited 0, and the script must tell a
    clean preemption from a failure. Every node's local rank 0 writes it (ranks agree on the stop)."""
    path = os.environ.get(RESULT_COPY_ENV)
    if path and os.environ.get("LOCAL_RANK", "0") == "0":
        atomic_write_json(path, result, indent=2)
