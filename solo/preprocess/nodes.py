"""One shard folder written by several machines: which shards a node writes, and how the nodes agree.

The shard plan (`sources.*.plan`) is a pure function of the inputs and options and a shard's bytes
depend only on its records, so every node makes the same plan and writes its own contiguous block
of it (`NodeSplit.shards`): N partial runs into one folder give the files of one run. The nodes
share nothing but that folder, usually on NFS, Lustre or GPFS, where flock is unreliable; they
agree through file operations that are atomic there too:

* `.nodes/plan.json`: the folder's spec and node count, created by the first node to get there
  (os.link of a finished temporary: fails if the name exists). A node whose spec or node count
  differs is refused before it writes anything.
* `manifest.json`: created once, incomplete (`complete: false`, same no-replace link), so that
  training refuses the folder until every node is done; only a final manifest ever replaces it.
* `.nodes/node-RRRRR.json`: node R's record that its shards are complete (host, time: the ledger,
  not the data). Then R looks at the folder: every node renames its shards into place before it
  looks, so of two nodes finishing together at least one sees the other's shards, and whoever sees
  every planned shard writes the final manifest.json,
  under a temporary of its own, renamed over the old one. Every writer writes the same bytes, so
  concurrent finishers are harmless. `solo-preprocess finalize OUT` does the same by hand (where a
  shared file system shows other machines' files late, or after deleting and redoing a shard).

A node's killed run is resumed by rerunning that node: it removes only its own shards' leftovers.
The SLURM variables that name a node are read by `split_from`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from solo.fileio import TEMP_PREFIX, atomic_write, create_once
from solo.preprocess import output
from solo.preprocess.output import UsageError

log = logging.getLogger("solo.preprocess")
LEDGER = ".nodes"


@dataclass(frozen=True)
class NodeSplit:
    num_nodes: int = 1
    node_rank: int = 0

    @property
    def split(self) -> bool:
        return self.num_nodes > 1

    def shards(self, planned: int) -> range:
        """Node `node_rank`'s block of shards 0..planned-1 (the blocks differ by at most one shard)."""
        return block(planned, self.num_nodes, self.node_rank)

    def __str__(self) -> str:
        return f"node {self.node_rank} of {self.num_nodes}"


ONE_MACHINE = NodeSplit()


def block(planned: int, num_nodes: int, rank: int) -> range:
    return range(rank * planned // num_nodes, (rank + 1) * planned // num_nodes)


# -- which node this is: flags, else SLURM -------------------------------------------------------

def split_from(num_nodes: int | None, node_rank: int | None, env) -> NodeSplit:
    """The node count and rank: each flag given wins; a missing one comes from a SLURM job array
    (`sbatch --array`) or an srun step of several tasks; neither: one node. ValueError on a rank
    that is not below the count, or SLURM variables that name no rank."""
    found = _from_slurm(env)
    n = num_nodes if num_nodes is not None else (found[0] if found else 1)
    if node_rank is not None:
        rank, where = node_rank, f"--node-rank {node_rank}"
    elif found:
        rank, where = found[1], f"node rank {found[1]} (from {found[2]})"
    elif n > 1:
        raise ValueError(f"--num-nodes {n} needs --node-rank (or a SLURM job array or srun step to take it from)")
    else:
        rank, where = 0, ""
    if rank >= n:
        raise ValueError(f"{where} is not below {'--num-nodes' if num_nodes is not None else 'the node count'} {n}")
    return NodeSplit(n, rank)


def _from_slurm(env) -> tuple[int, int, str] | None:
    array, step = _slurm_array(env), _srun_step(env)
    if array and step and array[0] > 1 and step[0] > 1:
        raise ValueError(f"both a SLURM job array ({array[2]}) and an srun step of {step[0]} tasks: "
                         "pass --num-nodes and --node-rank")
    for found in (array, step):
        if found and found[0] > 1:
            return found
    return None


def _int_var(env, name: str, default: int | None = None) -> int:
    text = env.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={text!r} is not an integer") from None


def _slurm_array(env) -> tuple[int, int, str] | None:
    """sbatch --array=MIN-MAX[:STEP]: SLURM_ARRAY_TASK_COUNT tasks with SLURM_ARRAY_TASK_ID =
    MIN, MIN+STEP, ... MAX; the node rank is the task's place in that range. A list of indices
    (--array=1,3,7) is no range: its ranks must be given (a rerun of some tasks, say)."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task = _int_var(env, "SLURM_ARRAY_TASK_ID")
    low = _int_var(env, "SLURM_ARRAY_TASK_MIN", task)
    step = _int_var(env, "SLURM_ARRAY_TASK_STEP", 1)
    count = _int_var(env, "SLURM_ARRAY_TASK_COUNT", 1)
    high = _int_var(env, "SLURM_ARRAY_TASK_MAX", low + step * (count - 1))
    where = (f"SLURM_ARRAY_TASK_ID {task} of {count} tasks {low}-{high}" + (f":{step}" if step != 1 else ""))
    if step < 1 or (task - low) % step or high - low != step * (count - 1):
        raise ValueError(f"{where}: the array's indices are not a range MIN-MAX[:STEP]; "
                         "pass --num-nodes and --node-rank")
    return count, (task - low) // step, where


def _srun_step(env) -> tuple[int, int, str] | None:
    """`srun --ntasks N solo-preprocess ...`: task SLURM_PROCID of SLURM_STEP_NUM_TASKS. Only a
    step's variables: a batch script's own shell has SLURM_NTASKS (the job's) and SLURM_PROCID 0 too,
    and would write a fraction of the folder, believing itself node 0."""
    if "SLURM_STEP_NUM_TASKS" not in env or "SLURM_PROCID" not in env:
        return None
    count, rank = _int_var(env, "SLURM_STEP_NUM_TASKS"), _int_var(env, "SLURM_PROCID")
    return count, rank, f"srun task SLURM_PROCID {rank} of SLURM_STEP_NUM_TASKS {count}"


# -- the folder's ledger -----------------------------------------------------------------------

def lock(out: Path, split: NodeSplit):
    """One process per node rank on this machine (flock: a guard against a double start, not a
    coordination between machines)."""
    if not split.split:
        return output.lock(out)
    (out / LEDGER).mkdir(exist_ok=True)
    return output.lock(out, name=f"{LEDGER}/lock-{split.node_rank:05d}",
                       holder=f"another solo-preprocess process as {split}")


def check_folder(out: Path, spec: dict, spec_sha: str, planned: int, split: NodeSplit) -> None:
    """A node claims the folder (or finds it claimed alike); a one-machine run refuses a split folder."""
    path = out / LEDGER / "plan.json"
    if not split.split:
        if path.exists():
            theirs = _read_json(path)
            raise UsageError(f"{out} is split across {theirs.get('num_nodes')} nodes ({path}): run each "
                             f"--node-rank of --num-nodes {theirs.get('num_nodes')}, then "
                             f"`solo-preprocess finalize {out}` if no node completed it")
        return
    mine = {"spec_sha256": spec_sha, "num_nodes": split.num_nodes, "shards_planned": planned,
            "assignment": "contiguous blocks: node r writes shards r*P//N .. (r+1)*P//N - 1", "spec": spec}
    _create_once(out, path, json.dumps(mine, indent=1).encode(), f"{split.node_rank:05d}")
    theirs = _read_json(path)
    if theirs.get("num_nodes") != split.num_nodes:
        raise UsageError(f"{out} is split across {theirs.get('num_nodes')} nodes ({path}), this run says "
                         f"--num-nodes {split.num_nodes}; use the folder's node count or a new --output folder")
    if theirs.get("spec_sha256") != spec_sha:
        keys = _differing(theirs.get("spec", {}), spec)
        raise UsageError(f"{out} is being written from other inputs or options ({path}: {', '.join(keys)} "
                         "differ); every node must run the same command, only --node-rank differs")


def start(out: Path, spec: dict, spec_sha: str, planned: int, done: dict, split: NodeSplit) -> None:
    """The node's leftovers removed; manifest.json created incomplete if no node did yet."""
    output.remove_stale_temps(out, split.shards(planned))
    for stale in (out / LEDGER).glob(f"{TEMP_PREFIX}*.{split.node_rank:05d}"):
        stale.unlink()
    manifest = output.summarize(spec, spec_sha, planned, done)
    _create_once(out, out / "manifest.json", output.manifest_bytes(manifest), f"{split.node_rank:05d}")


def finish(out: Path, spec: dict, spec_sha: str, planned: int, split: NodeSplit) -> dict:
    """Record this node as done; complete manifest.json if every planned shard is there. Returns
    the folder's manifest as this node sees it (written only when complete)."""
    mine = split.shards(planned)
    record = {"node_rank": split.node_rank, "num_nodes": split.num_nodes, "shards": [mine.start, mine.stop],
              "host": socket.gethostname(), "pid": os.getpid(), "finished_unix_s": round(time.time(), 3)}
    _replace(out, out / LEDGER / f"node-{split.node_rank:05d}.json", json.dumps(record, indent=1).encode(),
             f"{split.node_rank:05d}")
    done = output.complete_shards(out, spec_sha)
    manifest = output.summarize(spec, spec_sha, planned, done)
    if manifest["complete"]:
        _replace(out, out / "manifest.json", output.manifest_bytes(manifest), f"{split.node_rank:05d}")
        log.info("%s: every node is done; %s/manifest.json is complete", split, out)
    else:
        log.info("%s: its %d shards are complete; waiting for %s (the last node to finish completes "
                 "manifest.json, or run `solo-preprocess finalize %s`)", split, len(mine),
                 "; ".join(missing(out, planned, done)), out)
    return manifest


def finalize(out: Path) -> dict:
    """`solo-preprocess finalize OUT`: the complete manifest.json, or a UsageError naming what is missing."""
    plan_path, manifest_path = out / LEDGER / "plan.json", out / "manifest.json"
    if plan_path.is_file():
        plan = _read_json(plan_path)
    elif manifest_path.is_file():
        plan = _read_json(manifest_path)
    else:
        raise UsageError(f"{out}: neither {LEDGER}/plan.json nor manifest.json (not a solo-preprocess output folder)")
    try:
        spec, spec_sha, planned = plan["spec"], plan["spec_sha256"], int(plan["shards_planned"])
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{plan_path if plan_path.is_file() else manifest_path}: no spec, spec_sha256 and "
                         f"shards_planned ({e!r})") from e
    done = output.complete_shards(out, spec_sha)
    if len(done) < planned:
        raise UsageError(f"{out}: cannot finalize, {missing_summary(out, planned, done)}")
    manifest = output.summarize(spec, spec_sha, planned, done)
    _replace(out, out / "manifest.json", output.manifest_bytes(manifest), f"finalize-{os.getpid()}")
    return manifest


def missing_summary(out: Path, planned: int, done) -> str | None:
    """'3 of 7 shards missing: node 1 of 2 (not finished): shard-00003, ...; rerun ...', None if none."""
    gaps = missing(out, planned, done)
    if not gaps:
        return None
    split = (out / LEDGER / "plan.json").is_file()
    rerun = ("rerun those nodes (the same command with their --node-rank); the last one completes manifest.json"
             if split else "rerun the same command to finish")
    return f"{sum(k not in done for k in range(planned))} of {planned} shards missing: {'; '.join(gaps)}; {rerun}"


def missing(out: Path, planned: int, done) -> list[str]:
    """What is missing, by node where the folder is split: ['node 1 of 3 (not finished): shard-00002,
    shard-00003', ...]; one entry for a folder of one machine."""
    absent = [k for k in range(planned) if k not in done]
    plan_path = out / LEDGER / "plan.json"
    num_nodes = _read_json(plan_path).get("num_nodes", 1) if plan_path.is_file() else 1
    if num_nodes == 1:
        return [_names(absent)] if absent else []
    lines = []
    for rank in range(num_nodes):
        theirs = [k for k in block(planned, num_nodes, rank) if k not in done]
        if theirs:
            state = "finished, shards since removed" if (out / LEDGER / f"node-{rank:05d}.json").exists() \
                else "not finished"
            lines.append(f"node {rank} of {num_nodes} ({state}): {_names(theirs)}")
    return lines


def _names(shards: list[int], shown: int = 8) -> str:
    names = ", ".join(f"shard-{k:05d}" for k in shards[:shown])
    return names + (f" and {len(shards) - shown} more" if len(shards) > shown else "")


# -- atomic files on a shared file system ------------------------------------------------------

def _temp(out: Path, name: str, tag: str) -> Path:
    """A temporary in the ledger named by its writer (`tag`): two machines never write the same one."""
    return out / LEDGER / f"{TEMP_PREFIX}{name}.{tag}"


def _create_once(out: Path, path: Path, data: bytes, tag: str) -> bool:
    """Create `path` unless it exists, through this writer's own temporary (solo.fileio)."""
    return create_once(path, data, _temp(out, path.name, tag))


def _replace(out: Path, path: Path, data: bytes, tag: str) -> None:
    """Replace `path` by `data`, all or nothing, through a temporary of this writer's own."""
    atomic_write(path, data, temp=_temp(out, path.name, tag))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable: {e}") from e
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a JSON object")
    return data


def _differing(theirs: dict, mine: dict) -> list[str]:
    keys = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
    return keys or ["the spec"]
