"""Checkpoints: megatron-core dist_checkpointing (torch_dist format), made crash-safe.

megatron-core writes and reads the sharded tensors (any TP/DP layout can load any other: a TP=2
checkpoint loads at TP=1). This module adds what a month-long run needs around it:

* a checkpoint is written to `SAVE_DIR/.tmp-iter_NNNNNNN`, renamed to `iter_NNNNNNN` only once
  every rank has finished, and only then does the `latest` pointer (itself replaced atomically)
  name it: a crash mid-write leaves the previous checkpoint as the one resumed;
* `solo_meta.json` beside the tensors records the step, the model shape and the parallel layout,
  so a checkpoint of another shape is refused with a clear message before any compute; the
  attention window, which changes what the weights mean without changing a shape, may not change
  when a run resumes and is warned about when a stage starts from other weights;
* the newest `keep` checkpoints are kept, older ones removed;
* a save that fails (disk full, ...) removes its partial folder and raises a CheckpointError that
  says so; the previous checkpoint stays `latest`. `.tmp-iter_*` folders left by a crash are
  removed by the next save.

A save passes the `crash_in_save` point of `solo.faults` (off unless SOLO_FAULT_INJECT is set).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from megatron_patches import optimizer_state, safe_load
from solo.config import ModelConfig
from solo.faults import crash_if_injected
from solo.fileio import atomic_write_text, replace_durably

# megatron_patches.apply (init_distributed) applies this too; here as well because every checkpoint
# read in solo-megatron goes through this module or follows its import, process groups or not:
# from here on torch DCP unpickles nothing but its own metadata and weights-only objects.
safe_load.apply()

log = logging.getLogger("solo.checkpoint")

META_FILE = "solo_meta.json"
LATEST_FILE = "latest"
# The fields of ModelConfig that decide tensor shapes or what the weights mean (RoPE base, norm
# epsilon: a model trained with one and run with another loads fine and is silently wrong); the
# rest (e.g. max_image_side) may change between stages.
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "vocab_size", "patch_size", "rope_theta", "norm_epsilon")


class CheckpointError(RuntimeError):
    pass


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a save dir whose `latest` names one."""
    path = Path(path)
    if (path / LATEST_FILE).is_file():
        name = (path / LATEST_FILE).read_text().strip()
        path = path / name
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"{path}: not a SOLO checkpoint (no {META_FILE}; is the path right?)")
    return path


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    save_dir = Path(save_dir)
    if not (save_dir / LATEST_FILE).is_file():
        return None
    return resolve_checkpoint(save_dir)


def read_meta(checkpoint: Path) -> dict:
    return json.loads((checkpoint / META_FILE).read_text())


def check_model_shape(checkpoint: Path, model: ModelConfig) -> None:
    saved = read_meta(checkpoint).get("model", {})
    wrong = [f"{k}: checkpoint {saved.get(k)} vs config {getattr(model, k)}"
             for k in SHAPE_FIELDS if saved.get(k) != getattr(model, k)]
    if wrong:
        raise CheckpointError(f"{checkpoint}: model shape does not match the config: " + "; ".join(wrong))


def check_attention_window(checkpoint: Path, model: ModelConfig, resuming: bool) -> None:
    """A run resumes with the attention it started with (refused otherwise). A new stage may start
    from weights trained with another window, e.g. a full-attention model given Mistral's window:
    said on rank 0, since the weights then compute something else than they were trained for.
    Checkpoints from before the option have no field: they were trained with full attention."""
    saved = read_meta(checkpoint).get("model", {}).get("attention_window_tokens")
    wanted = model.attention_window_tokens
    if saved == wanted:
        return
    shown = ["null" if w is None else w for w in (saved, wanted)]  # as the YAML says it
    change = f"attention_window_tokens: checkpoint {shown[0]} vs config {shown[1]} (null: full causal attention)"
    if resuming:
        raise CheckpointError(
            f"{checkpoint}: {change}. A run resumes with the attention window it started with; to change it, "
            f"start a new save_dir with init_from={checkpoint}"
        )
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.warning("%s: %s; this stage trains these weights with the config's window", checkpoint, change)


def check_stage_finished(init_from: str | Path, checkpoint: Path) -> None:
    """`init_from` naming a save dir means that stage's final weights: refuse an unfinished stage
    (preempted or killed), which a chained launch would otherwise build on without a word."""
    if not (Path(init_from) / LATEST_FILE).is_file():
        return  # a checkpoint folder named on purpose (or a converted checkpoint): taken as it is
    meta = read_meta(checkpoint)
    total = meta.get("train_steps")
    if total is not None and meta.get("step", 0) < total:
        raise CheckpointError(
            f"init_from {init_from}: stage {meta.get('stage')!r} stopped at step {meta.get('step')} of {total} "
            f"(preempted or killed?). Finish it first (rerunning its command resumes it), or set init_from "
            f"to the checkpoint folder {checkpoint} to start from those weights anyway."
        )


def _rng_object() -> ShardedObject:
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    shape = (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size())
    return ShardedObject("rng_state", state, shape, (pp, tp), replica_id=parallel_state.get_data_parallel_rank())


# 'fully_reshardable' (megatron-core 0.16): the distributed optimizer's state is stored per
# parameter in canonical shape, so a checkpoint resumes under another TP/DP layout.
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _sharded_state(model, optimizer=None, scheduler=None, with_rng: bool = True, loading: bool = False) -> dict:
    # A fresh dict each time: megatron-core writes the current DP group into it in place.
    state = {"model": model.sharded_state_dict(metadata=dict(SHARDING_METADATA))}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=loading,
                                                          metadata=dict(SHARDING_METADATA))
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_object()
    return state


def save_checkpoint(save_dir: str | Path, step: int, model, optimizer, scheduler, meta: dict, keep: int = 2) -> Path:
    """Collective: every rank calls it. `model` is the unwrapped SOLOModel."""
    save_dir = Path(save_dir)
    final = save_dir / f"iter_{step:07d}"
    tmp = save_dir / f".tmp-iter_{step:07d}"
    if dist.get_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob(".tmp-iter_*"):  # left by a crash mid-save; never resumable
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    try:
        dist_checkpointing.save(_sharded_state(model, optimizer, scheduler), str(tmp))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - raised on every rank alike
        # A full disk surfaces as a torch zip-writer error ("unexpected pos ...") without an errno:
        # say how much space is left, then give the partial folder's space back.
        free = shutil.disk_usage(save_dir).free
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        # DCP details the failures on its coordinator (rank 0) only.
        cause = ("see rank 0" if isinstance(e, CheckpointException) and not e.failures
                 else (str(e).strip().splitlines() or [type(e).__name__])[-1])
        raise CheckpointError(
            f"{save_dir}: writing the checkpoint of step {step} failed ({cause}); {free:,} bytes free "
            f"on that filesystem{' (disk full?)' if free < 64 << 20 else ''}. The partial folder was "
            f"removed; the last complete checkpoint is {latest_checkpoint(save_dir)}."
        ) from e
    _barrier()
    crash_if_injected("crash_in_save", step)
    if dist.get_rank() == 0:
        atomic_write_text(tmp / META_FILE, json.dumps({**meta, "step": step}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        replace_durably(tmp, final)  # the folder's files are synced by megatron-core's writer
        atomic_write_text(save_dir / LATEST_FILE, final.name + "\n")
        _prune(save_dir, keep)
    _barrier()
    return final


def _prune(save_dir: Path, keep: int) -> None:
    done = sorted(p for p in save_dir.glob("iter_*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(checkpoint: Path, model, optimizer=None, scheduler=None, load_rng: bool = True) -> dict:
    """Load into `model` (and optimizer/scheduler/RNG when given). Returns the checkpoint's meta."""
    meta = read_meta(checkpoint)
    check_model_shape(checkpoint, model.model_config)
    if optimizer is not None:  # its load-path patches are applied by init_distributed (megatron_patches.apply)
        optimizer_state.init_empty_adam_state(optimizer)
    state = dist_checkpointing.load(
        _sharded_state(model, optimizer, scheduler, with_rng=load_rng, loading=True), str(checkpoint)
    )
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        try:
            scheduler.load_state_dict(state["scheduler"])
        except AssertionError as e:  # megatron-core compares every schedule value with an assert
            raise CheckpointError(
                f"{checkpoint}: the config's schedule differs from the checkpoint's ({e}). A run resumes with the "
                f"schedule it started with; to change it, start a new save_dir with init_from={checkpoint}"
            ) from e
    if load_rng:
        rng = state["rng_state"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    return meta


def model_meta(model_config: ModelConfig, parallel: dict, **extra) -> dict:
    return {"model": dataclasses.asdict(model_config), "parallel": parallel, **extra}
