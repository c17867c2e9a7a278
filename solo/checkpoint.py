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
* `checksums.json` records the size and xxh3-128 of every file, written before the rename that
  commits the folder; a checkpoint is verified against it when loaded (the ranks share the
  hashing), so a flipped byte or a cut file is a CheckpointError naming the file, never silently
  loaded weights. A folder without the record (solo-convert's output, or saved before records
  existed) loads with a warning and is never called a good checkpoint;
* pruning keeps the `keep` newest checkpoints *up to the step just written*: it never removes what
  `latest` names nor the new folder (after a rollback of `latest`, folders of later steps, an
  abandoned future, are left alone until the run overwrites them);
* a save dir with `iter_*` folders but no `latest` resumes from the newest one that verifies, and
  says so; a save dir whose checkpoints all fail is a clear error, never a restart from scratch;
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
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from megatron_patches import optimizer_state, safe_load
from solo.config import ModelConfig
from solo.faults import crash_if_injected
from solo.fileio import CHECKSUM, atomic_write_text, checksum_file, replace_durably

# megatron_patches.apply (init_distributed) applies this too; here as well because every checkpoint
# read in solo-megatron goes through this module or follows its import, process groups or not:
# from here on torch DCP unpickles nothing but its own metadata and weights-only objects.
safe_load.apply()

log = logging.getLogger("solo.checkpoint")

META_FILE = "solo_meta.json"
LATEST_FILE = "latest"
CHECKSUMS_FILE = "checksums.json"
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


def _step_folders(save_dir: Path) -> list[Path]:
    """Committed checkpoints (renamed into place only once complete), oldest step first."""
    found = [p for p in save_dir.glob("iter_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def resume_checkpoint(save_dir: str | Path) -> Path | None:
    """Collective: the checkpoint a run in `save_dir` resumes from (None: a new run).

    `latest` names it. Without `latest` (deleted by hand, or lost with a disk) but with `iter_*`
    folders, the newest one that verifies is taken and the log says so: never random weights."""
    save_dir = Path(save_dir)
    if (save_dir / LATEST_FILE).is_file() or not save_dir.is_dir():
        return latest_checkpoint(save_dir)
    candidates = [p for p in reversed(_step_folders(save_dir)) if (p / META_FILE).is_file()]
    rejected = []
    for checkpoint in candidates:
        try:
            verified = verify_checkpoint(checkpoint)
        except CheckpointError as e:
            rejected.append(str(e))
            continue
        skipped = f" ({'; '.join(rejected)})" if rejected else ""
        _say(f"{save_dir}: no `latest` pointer; resuming from the newest verified checkpoint {checkpoint.name}"
             f"{'' if verified else ' (unverified: no ' + CHECKSUMS_FILE + ')'}{skipped}")
        return checkpoint
    if candidates:
        raise CheckpointError(f"{save_dir}: no `latest` pointer, and no checkpoint there verifies: "
                              + "; ".join(rejected))
    return None


def read_meta(checkpoint: Path) -> dict:
    return _read_json(Path(checkpoint) / META_FILE)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from e
    except ValueError as e:  # a cut file: JSONDecodeError, or bytes that are not UTF-8
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is damaged or truncated") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _say(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[solo] {message}", flush=True)


# -- integrity: the size and checksum of every file ------------------------------------------------

def _my_share(files: list[Path]) -> list[Path]:
    """Round-robin over the ranks, so a 7B checkpoint is hashed by all of them at once."""
    if not dist.is_initialized():
        return files
    return files[dist.get_rank()::dist.get_world_size()]


def _gather(items: list) -> list:
    """Every rank's `items`, concatenated, on every rank."""
    if not dist.is_initialized():
        return items
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def record_checksums(folder: Path) -> None:
    """Collective: hash the folder's files (each rank its share), rank 0 writes the record."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS_FILE)
    entries = _gather([(p.name, p.stat().st_size, checksum_file(p)) for p in _my_share(files)])
    if not dist.is_initialized() or dist.get_rank() == 0:
        record = {"files": {name: {"bytes": size, CHECKSUM: digest} for name, size, digest in sorted(entries)}}
        atomic_write_text(folder / CHECKSUMS_FILE, json.dumps(record, indent=1))


def verify_checkpoint(checkpoint: Path) -> bool:
    """Collective: True if every recorded file is there with its size and checksum; False for a
    checkpoint without a record; a CheckpointError naming the damaged file(s) otherwise."""
    if not (checkpoint / CHECKSUMS_FILE).is_file():
        return False
    files = _read_json(checkpoint / CHECKSUMS_FILE).get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{checkpoint / CHECKSUMS_FILE}: no 'files' table; the file is damaged")
    problems = _gather([_file_problem(checkpoint, name, files[name]) for name in _my_share(sorted(files))])
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"{checkpoint} is damaged: " + "; ".join(problems))
    return True


def _file_problem(checkpoint: Path, name: str, expected: dict) -> str | None:
    path = checkpoint / name
    if not path.is_file():
        return f"{name} is missing"
    if path.stat().st_size != expected.get("bytes"):
        return f"{name} has {path.stat().st_size} bytes, {expected.get('bytes')} were written (truncated?)"
    if checksum_file(path) != expected.get(CHECKSUM):
        return f"{name} does not match its checksum ({CHECKSUM}, corrupted)"
    return None


def good_checkpoint_label(checkpoint: Path | None) -> str:
    """How the run names the checkpoint to go back to. Each one this process holds was either
    verified at load or hashed as it was written: that is what a record here means."""
    if checkpoint is not None and (Path(checkpoint) / CHECKSUMS_FILE).is_file():
        return f"The last good checkpoint is {checkpoint}"
    if checkpoint is not None:
        return f"No verified checkpoint to go back to ({checkpoint} has no {CHECKSUMS_FILE})"
    return "No checkpoint was saved"


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
    _barrier()
    record_checksums(tmp)  # before the rename: a committed folder always has its record
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        replace_durably(tmp, final)  # the folder's files are synced by megatron-core's writer
        atomic_write_text(save_dir / LATEST_FILE, final.name + "\n")
        _prune(save_dir, final, keep)
    _barrier()
    return final


def _prune(save_dir: Path, written: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints up to the one just written (which `latest` names).

    By step, not by folder name alone, and never beyond `written`: after `latest` was rolled back,
    later folders belong to an abandoned future, and counting them would delete the new save."""
    if keep <= 0:
        return
    step = int(written.name[5:])
    older = [p for p in _step_folders(save_dir) if int(p.name[5:]) < step]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(checkpoint: Path, model, optimizer=None, scheduler=None, load_rng: bool = True) -> dict:
    """Collective. Verify `checkpoint` (sizes and checksums), then load it into `model` (and
    optimizer/scheduler/RNG when given). Returns the checkpoint's meta."""
    meta = read_meta(checkpoint)
    check_model_shape(checkpoint, model.model_config)
    if not verify_checkpoint(checkpoint):
        _say(f"warning: {checkpoint} has no {CHECKSUMS_FILE}: loaded unverified (converted by solo-convert, or "
             "saved before checkpoints recorded checksums)")
    if optimizer is not None:  # its load-path patches are applied by init_distributed (megatron_patches.apply)
        optimizer_state.init_empty_adam_state(optimizer)
    try:
        # Read on its own first: a .metadata DCP cannot read (a refused pickle) would otherwise be
        # logged with a traceback by DCP's fallback to per-rank metadata before it fails.
        FileSystemReader(str(checkpoint)).read_metadata()
        state = dist_checkpointing.load(
            _sharded_state(model, optimizer, scheduler, with_rng=load_rng, loading=True), str(checkpoint)
        )
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's own types; CheckpointException is no Exception
        raise CheckpointError(f"{checkpoint}: cannot read the checkpoint's tensors ({_cause(e)}); is the folder "
                              "complete and written by solo-train or solo-convert?") from e
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


def _cause(e: BaseException) -> str:
    """The line that says what went wrong: DCP wraps each rank's exception in a CheckpointException
    whose message is a traceback dump."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]  # (exception, stack summary) per failed rank
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return f"{type(e).__name__}: {lines[-1][:300]}"


def model_meta(model_config: ModelConfig, parallel: dict, template: str = "plain", **extra) -> dict:
    """`template`: the prompt template the weights were last trained on (solo.templates); the
    export records it and solo-generate uses it by default."""
    return {"model": dataclasses.asdict(model_config), "parallel": parallel, "template": template, **extra}
