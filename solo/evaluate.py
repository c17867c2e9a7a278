"""Validation: the loss on held-out data every `eval_interval_steps`, logged beside the training loss.

The held-out data is a blend of its own (`data.eval_sources`: the folders `solo-preprocess
--holdout-fraction` writes, or any shard folder), built by the same `StageData` as training, so its
shards are checked the same way (template, vocabulary, sequence length) before any compute. Every
evaluation reads the same `eval_samples` samples: the first global batch of that blend, each data-
parallel rank its contiguous share, one rank per tensor-parallel group reading (as training). The
forward pass is `solo.train.eval_step`: megatron-core's schedule with `forward_only=True`.

Evaluating changes nothing about training: its blend is a separate object (the training blend's
position stays the step), the forward pass takes no gradient and draws no random number, and the
weights, optimizer and schedule are only read. tests/test_validation.py proves it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from solo.config import TrainConfig
from solo.data.dataset import StageData
from solo.data.prefetch import StepPrefetcher
from solo.tokenizer import TOKEN_IDS


class Validation:
    """`due(step)` says whether `step` (1-based, just finished) is evaluated; `run(forward)` evaluates."""

    def __init__(self, cfg: TrainConfig, dp_rank: int, dp_size: int, reads: bool, with_patches: bool):
        self.interval = cfg.eval_interval_steps
        self.data = eval_data(cfg, dp_size) if self.interval else None
        self._reader = StepPrefetcher(self.data, dp_rank, dp_size, cfg.micro_batch_size, TOKEN_IDS.pad_id,
                                      reads=reads, with_patches=with_patches) if self.data else None

    def due(self, step: int, last_step: int) -> bool:
        return bool(self.interval) and (step % self.interval == 0 or step == last_step)

    def run(self, forward: Callable) -> dict:
        """`forward(micro_batches) -> StepStats` (solo.train.eval_step bound to the run's model);
        returns the metrics row entries: val_loss, val_vl_loss, val_text_loss, val_s."""
        started = time.perf_counter()
        stats = forward(self._reader.get(0))  # one "step" of eval_samples: read now, on this thread
        return {"val_loss": stats.loss, "val_vl_loss": stats.vl_loss, "val_text_loss": stats.text_loss,
                "val_s": time.perf_counter() - started}


def eval_data(cfg: TrainConfig, dp_size: int) -> StageData:
    """The held-out blend: `eval_samples` samples of `data.eval_sources`, each sample read once."""
    if cfg.eval_samples % (dp_size * cfg.micro_batch_size):
        raise ValueError(f"eval_samples {cfg.eval_samples} is not divisible by data-parallel size {dp_size} x "
                         f"micro_batch_size {cfg.micro_batch_size}")
    data = StageData(dataclasses.replace(cfg.data, sources=cfg.data.eval_sources), cfg.eval_samples, 1,
                     cfg.model.patch_size, cfg.model.vocab_size)
    for source in data.sources:
        # More would read held-out samples twice, weighting them double in the loss.
        if source.fraction * cfg.eval_samples > source.samples + 1e-6:
            raise ValueError(f"eval_samples={cfg.eval_samples} takes {source.fraction * cfg.eval_samples:g} samples of "
                             f"data.eval_sources {source.name!r}, which holds {source.samples}: lower eval_samples "
                             "or hold out more data")
    return data
