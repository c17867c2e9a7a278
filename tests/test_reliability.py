"""Reliability (issue #8): faults, resume and bad input, each proven here.

Training runs are real: solo.train under torchrun on 2 gloo ranks (TP=2, DP=1, fp32 on CPU) with the
tiny model and the shards of tests/shard_fixtures.py. One uninterrupted run is the reference; every
faulted run must end with the reference's per-step losses *and* a final checkpoint whose every
tensor (weights, Adam moments, fp32 main params, RNG states) and common state (scheduler, Adam step
counts) equals the reference's bit for bit. Checkpoints are read back in this process with torch's
DCP reader (megatron-core's `torch_dist` format is DCP), so comparing costs no extra launch.

Faults are real too: SIGKILL of the whole job at seeded points, SIGTERM to the ranks, a kill while a
checkpoint is being committed, a full disk (a small tmpfs: we run as root here; skipped elsewhere),
corrupted shard files, and NaN losses through the real backward pass. The two hooks that make some
of them deterministic are in `solo.faults` ($SOLO_FAULT_INJECT, off by default).
"""

from __future__ import annotations

import collections
import errno
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.shard_fixtures import write_sources
from tests.test_train import run_train_single_process, stage_config
from tests.tmpfs import full_disk_open, mount_tmpfs, resize_tmpfs, unmount
from tests.torchrun import free_port, torchrun
from tests.warm import run_train

STEPS = 6  # train_steps of every run compared with the reference
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# -- helpers -----------------------------------------------------------------------------------

def config(root: Path, save_dir: Path, **extra) -> Path:
    """The reference recipe (checkpoints at steps 2, 4, 6, all kept) with `extra` on top."""
    return stage_config(root, "stage1", save_dir=save_dir, **{"save_interval_steps": 2, "keep_checkpoints": 3,
                                                                "train_steps": STEPS, **extra})


def launch(config_path: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    """torchrun with 2 ranks in its own session (so the whole job can be killed), output to a log."""
    log = open(config_path.with_suffix(f".{time.monotonic_ns()}.log"), "w+")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "solo.train", str(config_path), *overrides]
    proc = subprocess.Popen(cmd, env={**ENV, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log = log
    return proc


def output(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    proc.log.seek(0)
    return proc.log.read()


def steps_logged(save_dir: Path) -> int:
    path = save_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for_steps(proc: subprocess.Popen, save_dir: Path, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while steps_logged(save_dir) < n:
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"run ended or stalled before step {n}:\n{output(proc)[-4000:]}")
        time.sleep(0.02)


def losses(save_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "metrics.jsonl is not one row per step"
    return [r["loss"] for r in rows]


def latest(save_dir: Path) -> str:
    return (save_dir / "latest").read_text().strip()


def checkpoint_state(checkpoint: Path) -> dict:
    """Everything a checkpoint holds, flattened: DCP tensors/objects and common.pt (scheduler, ...)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sharded: dict = {}
    _load_state_dict(sharded, storage_reader=FileSystemReader(str(checkpoint)),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    common = torch.load(checkpoint / "common.pt", weights_only=False)
    flat: dict = {}

    def walk(value, key):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        else:
            flat[key] = value.getvalue() if isinstance(value, io.BytesIO) else value

    walk(sharded, "dcp")
    walk(common, "common")
    return flat


def assert_same_state(a: Path, b: Path, skip: tuple[str, ...] = ()) -> None:
    sa, sb = checkpoint_state(a), checkpoint_state(b)
    sa = {k: v for k, v in sa.items() if not any(s in k for s in skip)}
    sb = {k: v for k, v in sb.items() if not any(s in k for s in skip)}
    assert sorted(sa) == sorted(sb), f"{a} and {b} hold different entries"
    differ = [k for k in sa if not (torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k])]
    assert not differ, f"{a} != {b} in {len(differ)} entries, e.g. {differ[:5]}"
    assert any(k.startswith("dcp/embedding") for k in sa)


def assert_resumed_exactly(save_dir: Path, reference: Path) -> None:
    assert losses(save_dir) == losses(reference)  # exact float equality, every step
    assert latest(save_dir) == f"iter_{STEPS:07d}"
    assert_same_state(save_dir / f"iter_{STEPS:07d}", reference / f"iter_{STEPS:07d}")
    assert not list(save_dir.glob(".tmp-*")), "partial files left behind"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    write_sources(root / "shards")
    return root


@pytest.fixture(scope="module")
def reference(root) -> Path:
    """The uninterrupted run every faulted run is compared with."""
    save_dir = root / "runs" / "reference"
    torchrun("-m solo.train", 2, config(root, save_dir))
    assert latest(save_dir) == f"iter_{STEPS:07d}" and len(losses(save_dir)) == STEPS
    return save_dir


# -- 1. SIGKILL at seeded points, then restart -------------------------------------------------

@pytest.mark.distributed
@pytest.mark.parametrize("seed", [1, 5, 9])
def test_sigkill_at_a_random_point_then_restart_equals_an_uninterrupted_run(root, reference, seed):
    """Kill the whole job (torchrun, ranks, checkpoint writers) `delay` s after step `k` is logged,
    wherever that lands (mid-step or mid-save), and run the same command again."""
    rng = random.Random(seed)
    k, delay = rng.randint(1, STEPS - 2), rng.uniform(0, 1.0)  # seeds 1, 5, 9: steps 2, 3, 4
    save_dir = root / "runs" / f"sigkill-{seed}"
    cfg = config(root, save_dir)
    proc = launch(cfg)
    wait_for_steps(proc, save_dir, k)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    output(proc)
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    resumed_from = latest(save_dir) if (save_dir / "latest").exists() else "scratch"
    print(f"killed {delay:.2f} s after step {k} was logged ({steps_logged(save_dir)} logged); "
          f"resuming from {resumed_from}")
    torchrun("-m solo.train", 2, cfg)
    assert_resumed_exactly(save_dir, reference)


# -- 2. SIGTERM (preemption) -------------------------------------------------------------------

@pytest.mark.distributed
def test_sigterm_saves_the_current_step_exits_0_and_resumes_exactly(root, reference):
    save_dir = root / "runs" / "sigterm"
    cfg = config(root, save_dir, save_interval_steps=100)  # no periodic checkpoint: only the preemption one
    proc = launch(cfg)
    wait_for_steps(proc, save_dir, 2)
    # What a scheduler does to the task processes; the ranks agree on the stop through an all-reduce.
    for rank in psutil.Process(proc.pid).children():
        rank.send_signal(signal.SIGTERM)
    log = output(proc)
    assert proc.returncode == 0, log[-4000:]  # torchrun exits 0 only if every rank did
    stopped = re.search(r"stop requested \(SIGTERM\): saved step (\d+), exiting", log)
    assert stopped, log[-4000:]
    step = int(stopped.group(1))
    assert 2 <= step < STEPS and steps_logged(save_dir) == step
    assert latest(save_dir) == f"iter_{step:07d}"
    assert json.loads((save_dir / "result.json").read_text())["preempted"] is True
    torchrun("-m solo.train", 2, cfg)
    assert_resumed_exactly(save_dir, reference)


def launch_script(cfg: Path, log_suffix: str) -> subprocess.Popen:
    """scripts/pretrain.sh on 2 gloo ranks, as a scheduler starts it; its output goes to a log file."""
    log = open(cfg.with_suffix(log_suffix), "w+")
    proc = subprocess.Popen(["bash", "scripts/pretrain.sh", str(cfg)], cwd=Path(__file__).parent.parent,
                            env={**ENV, "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port())},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


@pytest.mark.distributed
def test_sigusr1_to_the_launch_script_saves_and_resumes_exactly(root, reference):
    """The signal a scheduler sends ahead of a time limit (SLURM --signal=B:USR1@600) reaches only
    scripts/pretrain.sh: torchrun must survive it and the ranks must save and stop."""
    save_dir = root / "runs" / "sigusr1"
    cfg = config(root, save_dir, save_interval_steps=100)
    proc = launch_script(cfg, ".usr1.log")
    wait_for_steps(proc, save_dir, 2)
    proc.send_signal(signal.SIGUSR1)  # the launch script alone, not its process group
    out = output(proc)
    assert proc.returncode == 0, out[-4000:]
    stopped = re.search(r"stop requested \(SIGUSR1\): saved step (\d+), exiting", out)
    assert stopped, out[-4000:]
    step = int(stopped.group(1))
    assert 2 <= step < STEPS and latest(save_dir) == f"iter_{step:07d}"
    torchrun("-m solo.train", 2, cfg)
    assert_resumed_exactly(save_dir, reference)


# -- 3. A crash while a checkpoint is being written ----------------------------------------------

@pytest.mark.distributed
def test_crash_during_checkpoint_write_keeps_the_previous_checkpoint(root, reference):
    save_dir = root / "runs" / "crash-in-save"
    cfg = config(root, save_dir)
    # Every rank SIGKILLs itself once step 4's tensors are on disk, before the rename commits them.
    proc = launch(cfg, env={"SOLO_FAULT_INJECT": "crash_in_save@step=4"})
    log = output(proc)
    assert proc.returncode != 0 and "saved" in log and steps_logged(save_dir) == 4, log[-4000:]
    partial = save_dir / ".tmp-iter_0000004"
    assert list(partial.glob("*.distcp")), "the fault should hit after the tensors were written"
    assert not (save_dir / "iter_0000004").exists()
    assert latest(save_dir) == "iter_0000002"  # `latest` never names a partial checkpoint
    assert_same_state(save_dir / "iter_0000002", reference / "iter_0000002")
    # A crash while the pointer itself was being replaced leaves a half-written temporary: ignored.
    (save_dir / ".tmp-latest").write_text("iter_00")
    # Resume with another save interval: the stale .tmp-iter_0000004 is never reused, only removed.
    torchrun("-m solo.train", 2, cfg, "save_interval_steps=3")
    assert [p.name for p in sorted(save_dir.glob("iter_*"))] == ["iter_0000002", "iter_0000003", "iter_0000006"]
    assert_resumed_exactly(save_dir, reference)


# -- 4. Disk full ------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    yield disk
    unmount(disk)


@pytest.mark.distributed
def test_disk_full_during_checkpoint_is_a_clear_error_and_a_rerun_completes(root, reference, small_disk):
    # One checkpoint is ~70 MB: the step-2 checkpoint fits in 100 MB, step 4's does not.
    mount_tmpfs(small_disk, "100m")
    save_dir = small_disk / "run"
    cfg = config(root, save_dir, keep_checkpoints=2)
    proc = launch(cfg)
    log = output(proc)
    assert proc.returncode != 0 and re.search(r"exitcode\s*:\s*2\b", log), log[-4000:]
    assert "solo-train: error:" in log and "writing the checkpoint of step 4 failed" in log, log[-4000:]
    assert "disk full?" in log and "last complete checkpoint is " + str(save_dir / "iter_0000002") in log
    assert "Traceback" not in log.split("solo-train: error:")[0].split("saved")[-1]
    assert sorted(p.name for p in save_dir.iterdir()) == [".solo-train.lock", "iter_0000002", "latest", "metrics.jsonl"]
    assert latest(save_dir) == "iter_0000002"
    assert_same_state(save_dir / "iter_0000002", reference / "iter_0000002")
    resize_tmpfs(small_disk, "320m")
    torchrun("-m solo.train", 2, cfg)
    assert_resumed_exactly(save_dir, reference)


def _write_shard(prefix: Path, samples) -> None:
    """What solo-preprocess does per shard: write, and abort on any error."""
    from solo.data.shards import ShardWriter

    writer = ShardWriter(prefix, 32)
    try:
        for sample in samples:
            writer.add_sample(sample)
        writer.finish({"source": "text", "seq_length": 256, "patch_size": 32})
    except BaseException:
        writer.abort()
        raise


class _FullDisk:
    """A disk that holds `budget` bytes of shard writes, then fails them with ENOSPC, as a real full
    disk does (megatron-core's builders write through the module's `open`). No root needed."""

    def __init__(self, budget: int):
        self.budget = budget

    def open(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        disk, write = self, f.write

        def limited(data):
            if len(data) > disk.budget:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            disk.budget -= len(data)
            return write(data)

        f.write = limited
        return f


@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_disk_full_while_writing_shards_is_a_clear_error_and_a_rerun_completes(root, tmp_path, monkeypatch, disk):
    from megatron.core.datasets import indexed_dataset

    from solo.data.shards import ShardError, list_shards, open_shard

    reference = [s.sample(i) for s in map(open_shard, list_shards(root / "shards" / "text")) for i in range(len(s))]
    out = tmp_path / "disk" / "text"
    if disk == "tmpfs":
        mount_tmpfs(out.parent, "160k")
    else:
        full = _FullDisk(60_000)  # the text shards take ~100 kB
        monkeypatch.setattr(indexed_dataset, "open", full.open, raising=False)
    out.mkdir(parents=True)
    try:
        shards = [reference[k:k + 8] for k in range(0, len(reference), 8)]
        with pytest.raises(ShardError) as failed:
            for k, samples in enumerate(shards):
                _write_shard(out / f"shard-{k:05d}", samples)
        message = str(failed.value)
        assert "No space left on device" in message and f"{out}/shard-0000" in message, message
        written = list_shards(out)
        assert written and len(written) < len(shards)
        # Nothing of the failed shard is left: no temporary, and no part file without its manifest.
        complete = {Path(p).name for p in written}
        assert all(f.name.split(".")[0] in complete for f in out.iterdir()), sorted(f.name for f in out.iterdir())
        if disk == "tmpfs":
            resize_tmpfs(out.parent, "4m")  # the operator frees space
        else:
            full.budget = 1 << 30
        for k, samples in enumerate(shards):  # the rerun: complete shards are skipped
            if f"shard-{k:05d}" not in complete:
                _write_shard(out / f"shard-{k:05d}", samples)
        again = [open_shard(p, verify_checksum=True) for p in list_shards(out)]
        assert len(again) == len(shards)
        reread = [s.sample(i) for s in again for i in range(len(s))]
        assert all(np.array_equal(a.tokens, b.tokens) and a.document_lengths == b.document_lengths
                   for a, b in zip(reread, reference, strict=True))
    finally:
        if disk == "tmpfs":
            unmount(out.parent)


def test_disk_full_while_writing_json_leaves_no_temporary(tmp_path, monkeypatch):
    """The manifest write: an injected ENOSPC (in-process) must not leave `.tmp-manifest.json`."""
    from solo import fileio

    monkeypatch.setattr(fileio, "open", full_disk_open(".tmp-manifest.json"), raising=False)
    with pytest.raises(OSError, match="No space left"):
        fileio.atomic_write_json(tmp_path / "manifest.json", {"shards": 1})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# -- 5. Corrupted shards: a clear error naming the shard at start-up ----------------------------

def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _idx_pointer_offset(path: Path) -> int:
    """Offset of the second sequence pointer in a megatron-core .idx (after the int32 lengths)."""
    header = 9 + 8 + 1  # magic, version, dtype code
    count = int(np.frombuffer(path.read_bytes()[header:header + 8], np.int64)[0])
    return header + 16 + 4 * count + 8


def _corrupt(shards: Path, how: str) -> tuple[Path, bool]:
    """Damage text/shard-00003 in one way; returns (the shard prefix, whether checksums are needed)."""
    prefix = shards / "text" / "shard-00003"
    tokens_bin = Path(f"{prefix}.tokens.bin")
    if how == "truncated_bin":
        tokens_bin.write_bytes(tokens_bin.read_bytes()[:-100])
    elif how == "idx_of_another_shard":
        # A tool bug rather than bit rot: the manifest agrees with the swapped .idx (size, checksum).
        other = shards / "text" / "shard-00001.tokens.idx"
        shutil.copy(other, f"{prefix}.tokens.idx")
        manifest_path = Path(f"{prefix}.json")
        manifest = json.loads(manifest_path.read_text())
        other_manifest = json.loads((shards / "text" / "shard-00001.json").read_text())
        manifest["files"]["shard-00003.tokens.idx"] = other_manifest["files"]["shard-00001.tokens.idx"]
        manifest_path.write_text(json.dumps(manifest))
    elif how == "idx_pointer_flipped":  # same size, only an offset into the .bin changes
        _flip_byte(Path(f"{prefix}.tokens.idx"), _idx_pointer_offset(Path(f"{prefix}.tokens.idx")))
    elif how == "bin_byte_flipped":  # same size: only the checksum can see it
        _flip_byte(Path(f"{prefix}.loss.bin"), Path(f"{prefix}.loss.bin").stat().st_size // 2)
        return prefix, True
    elif how == "file_missing":
        Path(f"{prefix}.pixels.idx").unlink()
    return prefix, False


CORRUPTIONS = {
    "truncated_bin": "truncated",
    "idx_of_another_shard": "mismatched .idx",
    "idx_pointer_flipped": "corrupted .idx",
    "bin_byte_flipped": "does not match its",
    "file_missing": "missing",
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupted_shard_is_named_when_the_stage_data_opens(root, tmp_path, how):
    from solo.config import DataConfig, DataSource
    from solo.data.dataset import StageData
    from solo.data.shards import ShardError

    shards = tmp_path / "shards"
    shutil.copytree(root / "shards", shards)
    prefix, checksums = _corrupt(shards, how)
    data = DataConfig(sources=(DataSource("images", str(shards / "images"), 0.7),
                               DataSource("text", str(shards / "text"), 0.3)),
                      seq_length_tokens=256, verify_checksums=checksums)
    with pytest.raises(ShardError) as error:
        StageData(data, global_batch_size=4, train_steps=STEPS, patch_size=32)
    assert str(prefix) in str(error.value) and CORRUPTIONS[how] in str(error.value), str(error.value)


def test_solo_train_refuses_a_corrupted_shard_with_exit_2_before_any_step(root, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(root / "shards", shards)
    prefix, _ = _corrupt(shards, "bin_byte_flipped")
    cfg = stage_config(root, "stage1", save_dir=tmp_path / "run")
    proc = run_train_single_process(
        cfg, "parallel.tensor_parallel=1", "data.verify_checksums=true",
        f"data.sources=[{{name: images, path: {shards}/images, fraction: 0.7}}, "
        f"{{name: text, path: {shards}/text, fraction: 0.3}}]")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"solo-train: error: {prefix}: shard-00003.loss.bin does not match its" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- 6. A loss that turns NaN ------------------------------------------------------------------

# The loss itself turns NaN, or only the gradients do (the loss of that step is finite): megatron-core's
# gradient check (a constant loss scale of 1) must catch the second before it reaches the weights.
FAULTS = {"nonfinite_loss": r"non-finite loss nan at step 3 \(data position: blend samples 8..11\)",
          "nonfinite_grad": r"non-finite gradients at step 3 \(data position: blend samples 8..11\) with a finite "
                            r"loss \d+\.\d{4}"}


@pytest.mark.distributed
@pytest.mark.parametrize("fault", FAULTS)
def test_nonfinite_loss_stops_with_step_and_data_position_and_keeps_the_last_checkpoint(root, reference, fault):
    save_dir = root / "runs" / f"{fault}-stop"
    proc = launch(config(root, save_dir), env={"SOLO_FAULT_INJECT": f"{fault}@step=3"})
    log = output(proc)
    assert proc.returncode != 0 and re.search(r"exitcode\s*:\s*3\b", log), log[-4000:]
    assert re.search(f"solo-train: {FAULTS[fault]}; stopping. The last good checkpoint is "
                     + re.escape(str(save_dir / "iter_0000002")), log), log[-4000:]
    assert losses(save_dir) == losses(reference)[:2]  # the NaN step is reported, never logged as a step
    assert latest(save_dir) == "iter_0000002"
    assert_same_state(save_dir / "iter_0000002", reference / "iter_0000002")


@pytest.fixture(scope="module")
def skipped(root, reference) -> dict[str, Path]:
    """Per fault: the reference recipe with `nonfinite_loss: skip`, the fault at step 3 and a
    checkpoint after every step (one run serves both tests below)."""
    runs = {}
    for fault in FAULTS:
        save_dir = root / "runs" / f"{fault}-skip"
        cfg = config(root, save_dir, save_interval_steps=1, keep_checkpoints=STEPS, nonfinite_loss="skip")
        proc = launch(cfg, env={"SOLO_FAULT_INJECT": f"{fault}@step=3"})
        log = output(proc, timeout=600)  # 6 steps and 6 checkpoints: the other runs save 3
        assert proc.returncode == 0, log[-4000:]
        assert re.search(f"{FAULTS[fault]}; skipping this batch", log), log[-4000:]
        runs[fault] = save_dir
    return runs


@pytest.mark.distributed
@pytest.mark.parametrize("fault", FAULTS)
def test_nonfinite_loss_skip_leaves_the_weights_of_that_step_unchanged(skipped, fault):
    save_dir = skipped[fault]
    curve = losses(save_dir)
    assert len(curve) == STEPS and np.isfinite(curve[:2] + curve[3:]).all()
    assert np.isnan(curve[2]) == (fault == "nonfinite_loss")
    # Step 3 changed nothing, the schedule included: weights, Adam moments and step counts, LR as after step 2.
    assert_same_state(save_dir / "iter_0000002", save_dir / "iter_0000003", skip=("rng_state",))
    after = checkpoint_state(save_dir / "iter_0000004")
    before = checkpoint_state(save_dir / "iter_0000003")
    weights = [k for k in after if k.startswith("dcp/") and "optimizer" not in k and isinstance(after[k], torch.Tensor)
               and after[k].is_floating_point()]
    assert all(torch.isfinite(after[k]).all() for k in weights)
    assert any(not torch.equal(after[k], before[k]) for k in weights), "step 4 should train again"


def lrs(save_dir: Path) -> list[float]:
    return [json.loads(line)["lr"] for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
@pytest.mark.parametrize("fault", FAULTS)
def test_a_skipped_step_does_not_advance_the_lr_schedule(skipped, reference, fault):
    """As Megatron-LM: the schedule steps on applied updates only. The logged lr is the one the next
    step uses, so skipping step 3 shifts the rest of the curve by one step."""
    faulty, clean = lrs(skipped[fault]), lrs(reference)
    assert faulty[:2] == clean[:2]
    assert faulty[2] == faulty[1] == clean[1]  # step 4 runs at the LR of step 3 of the clean run
    assert faulty[2:] == clean[1:-1] and faulty[-1] != clean[-1]


# -- 7. Fuzzing the readers of untrusted input ---------------------------------------------------
# Each example must end, fast, in a result or in the reader's typed error naming the input; memory
# must stay bounded over the whole run (a decoder that honours a forged 60000x60000 header would not).

FUZZ = settings(max_examples=600, deadline=3000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
RSS_BUDGET = 500 << 20


class PeakRSS:
    """The peak resident memory of this process inside a `with` block, above its level at entry.
    A thread samples it every 2 ms: a decoder that briefly allocates gigabytes and frees them
    again counts, which comparing the RSS before and after would miss."""

    def __init__(self, interval_s: float = 0.002):
        self.process, self.interval_s = psutil.Process(), interval_s

    def __enter__(self):
        import threading

        self.start = self.peak = self.process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(self.interval_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def grown(self) -> int:
        return self.peak - self.start


def test_peak_rss_sees_a_spike_that_is_freed_again():
    with PeakRSS() as memory:
        spike = np.ones(600 * 2**20, np.uint8)  # touched: resident
        time.sleep(0.05)
        del spike
    assert memory.grown > 500 * 2**20 and psutil.Process().memory_info().rss < memory.peak


@pytest.fixture
def bounded_memory():
    import faulthandler

    faulthandler.dump_traceback_later(300, exit=True)  # a hang fails loudly instead of stalling CI
    with PeakRSS() as memory:
        yield
    faulthandler.cancel_dump_traceback_later()
    assert memory.grown < RSS_BUDGET, f"peak RSS grew by {memory.grown / 2**20:.0f} MB while fuzzing"


def _photo(name: str, fmt: str, side: int = 96, **save) -> bytes:
    import skimage.data
    from PIL import Image

    with Image.open(os.path.join(os.path.dirname(skimage.data.__file__), name)) as im:
        im = im.convert("RGBA" if fmt == "PNG" else "RGB")
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, fmt, **save)
        return buf.getvalue()


def _seeds() -> list[bytes]:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    return [_photo("chelsea.png", "JPEG", exif=exif.tobytes()), _photo("coffee.png", "PNG"),
            _photo("rocket.jpg", "GIF"), _photo("astronaut.png", "WEBP"), _photo("camera.png", "BMP"),
            _photo("horse.png", "TIFF")]


SEEDS = _seeds()


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A real encoded file with a few bit flips, byte overwrites (huge sizes in headers included),
    a truncation, or another format's header spliced in."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "overwrite", "truncate", "splice", "header"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            data[at:at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff",
                                                    b"\x00\x00\xea\x60"]))
        elif op == "truncate":
            del data[at:]
        elif op == "splice":
            other = draw(st.sampled_from(seeds))
            data[at:] = other[draw(st.integers(0, len(other) - 1)):]
        else:  # a header early in the file, where dimensions and chunk lengths live
            at = draw(st.integers(0, min(64, len(data) - 1)))
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


def _check_image(data: bytes) -> None:
    from solo.vision import REASONS, ImageLoadError, load_image

    try:
        image = load_image(data, name="fuzzed-input")
    except ImageLoadError as e:
        assert str(e).startswith("fuzzed-input: ") and e.reason in REASONS
    else:
        assert image.mode == "RGB" and image.width > 0 and image.height > 0
        np.asarray(image)


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_load_image_random_bytes(bounded_memory, data):
    _check_image(data)


@FUZZ
@given(mutated(SEEDS))
def test_fuzz_load_image_mutated_real_files(bounded_memory, data):
    _check_image(data)


# The preprocessing readers (solo/preprocess, package solo.preprocess), when installed.

@pytest.fixture(scope="module")
def preprocess(tmp_path_factory):
    formats = pytest.importorskip("solo.preprocess.formats")
    documents = pytest.importorskip("solo.preprocess.documents")
    sources = pytest.importorskip("solo.preprocess.sources")
    from solo.tokenizer import SOLOTokenizer

    layout = documents.Layout(SOLOTokenizer.default(), 1024, 32, 128)
    return formats, documents, sources, layout, tmp_path_factory.mktemp("fuzz-inputs")


def _tar_bytes(records: list[tuple[str, bytes, str]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, image, caption in records:
            for name, payload in ((f"{key}.jpg", image), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _zst_bytes(lines: list[dict]) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress("".join(json.dumps(x) + "\n" for x in lines).encode())


INPUTS = {
    "captions.tar": _tar_bytes([(f"{i:05d}", SEEDS[0], f"a cat, picture {i}") for i in range(3)]),
    "text.jsonl.zst": _zst_bytes([{"text": f"document {i} " * 20} for i in range(6)]),
    "text.jsonl": "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(6)).encode(),
    "llava.json": json.dumps([{"id": i, "image": "cat.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": f"A cat ({i})."}]}
        for i in range(3)]).encode(),
}
KIND = {"captions.tar": "captions", "text.jsonl.zst": "text", "text.jsonl": "text"}


def _check_input(preprocess, name: str, data: bytes) -> None:
    """Reading a damaged input yields records (bad ones carry their reason) or an InputError naming
    the file; planning counts exactly the records a shard reads; every record builds documents or
    is skipped with a reason."""
    formats, documents, sources, layout, folder = preprocess
    path = folder / name
    path.write_bytes(data)
    (folder / "cat.jpg").write_bytes(SEEDS[0])
    try:
        if name == "llava.json":
            source = sources.ConversationSource(str(path), str(folder), sources.load_conversations(str(path)))
            kind, records = "sft", list(source.read(source.items()))
        else:
            kind = KIND[name]
            records = list(formats.read_records(kind, str(path), 0, None))
            assert formats.count_records(kind, str(path)) == len(records), "planning and reading disagree"
    except formats.InputError as e:
        assert str(path) in str(e)
        return
    for record in records:
        assert isinstance(record, formats.Record) and name in record.key
        try:
            documents.build(kind, record, layout)
        except documents.Skip as s:
            assert s.reason


@FUZZ
@given(st.sampled_from(sorted(INPUTS)).flatmap(lambda name: st.tuples(st.just(name), mutated([INPUTS[name]]))))
def test_fuzz_preprocess_readers_on_damaged_inputs(preprocess, bounded_memory, case):
    _check_input(preprocess, *case)


# -- 8. Untrusted paths, small inputs that decode huge, corrupt shard content (issue 17) ----------

def test_image_paths_are_confined_to_regular_files_under_the_declared_root(tmp_path):
    from solo.data.shards import read_folder_manifest
    from solo.preprocess.cli import main
    from solo.vision import MAX_IMAGE_FILE_BYTES

    def preprocess(*args) -> dict:
        out = tmp_path / f"out-{time.monotonic_ns()}"
        assert main([*map(str, args), "--output", str(out), "--seq-length", "2048", "--max-side", "256",
                     "--workers", "1"]) == 0
        return read_folder_manifest(out)

    cat, secret = _photo("chelsea.png", "JPEG", 128), _photo("coffee.png", "JPEG", 128)
    (tmp_path / "secret.jpg").write_bytes(secret)  # beside the data, outside its root
    data = tmp_path / "data"
    (data / "images" / "dir.jpg").mkdir(parents=True)
    (data / "images" / "cat.jpg").write_bytes(cat)
    (data / "images" / "alias.jpg").symlink_to("cat.jpg")  # a link that stays inside: read
    (data / "images" / "out.jpg").symlink_to(tmp_path / "secret.jpg")
    with open(data / "images" / "huge.jpg", "wb") as f:  # sparse: costs no disk
        f.truncate(MAX_IMAGE_FILE_BYTES + 1)
    paths = {"images/cat.jpg": None, "images/alias.jpg": None, "../secret.jpg": "image_outside_root",
             str(tmp_path / "secret.jpg"): "image_outside_root", "images/out.jpg": "image_outside_root",
             "images/huge.jpg": "image_too_large", "images/dir.jpg": "unreadable_file",
             "images/missing.jpg": "unreadable_file"}
    expected = dict(sorted(collections.Counter(r for r in paths.values() if r).items()))
    (data / "pairs.jsonl").write_text("".join(json.dumps({"image": p, "caption": f"picture {p}"}) + "\n"
                                              for p in paths))
    manifest = preprocess("captions", "--input", data / "pairs.jsonl")
    assert manifest["skipped"] == expected and manifest["totals"]["documents"] == 2

    # LLaVA JSON (paths below --images) and Parquet (below the file's folder) go the same way.
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    (data / "llava.json").write_text(json.dumps([{"id": p, "image": p, "conversations": turns} for p in
                                                 ("cat.jpg", "../../secret.jpg", str(tmp_path / "secret.jpg"))]))
    manifest = preprocess("sft", "--input", data / "llava.json", "--images", data / "images")
    assert manifest["skipped"] == {"image_outside_root": 2} and manifest["totals"]["documents"] == 1
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [{"bytes": None, "path": p} for p in ("images/cat.jpg", "../secret.jpg")],
                             "caption": ["inside", "outside"]}), data / "pairs.parquet")
    manifest = preprocess("captions", "--input", data / "pairs.parquet")
    assert manifest["skipped"] == {"image_outside_root": 1} and manifest["totals"]["documents"] == 1


FIFO_CHILD = """
import sys
from solo.preprocess.documents import Layout, Skip, build
from solo.preprocess.formats import read_records
from solo.tokenizer import SOLOTokenizer
from solo.vision import ImageLoadError, load_image

layout = Layout(SOLOTokenizer.default(), 2048, 32, 256)
for record in read_records("captions", sys.argv[1], 0, None):
    try:
        build("captions", record, layout)
    except Skip as s:
        print(s.reason)
for path in ("/dev/zero", sys.argv[2]):  # a path outside any record (ImageNet listings): no root
    try:
        load_image(path)
    except ImageLoadError as e:
        print(e.reason)
"""


def test_a_fifo_or_device_named_by_a_record_is_refused_without_reading_it(tmp_path):
    # In a child with a deadline and a memory limit: before the fix a FIFO blocked the run forever
    # and /dev/zero was read until memory ran out.
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    os.mkfifo(data / "images" / "fifo.jpg")
    (data / "images" / "zero.jpg").symlink_to("/dev/zero")
    (data / "pairs.jsonl").write_text("".join(json.dumps({"image": p, "caption": "x"}) + "\n" for p in
                                              ("images/fifo.jpg", "images/zero.jpg", "/dev/zero")))
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
    done = subprocess.run([sys.executable, "-c", limit + FIFO_CHILD, str(data / "pairs.jsonl"),
                           str(data / "images" / "fifo.jpg")],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["not_a_regular_file", "image_outside_root", "image_outside_root",
                                   "not_a_regular_file", "not_a_regular_file"]


MEMORY_CHILD = """
import resource, sys
from solo.preprocess.documents import Layout, Skip, build
from solo.preprocess.formats import read_records
from solo.tokenizer import SOLOTokenizer

layout = Layout(SOLOTokenizer.default(), 2048, 32, int(sys.argv[3]))
kind, path = sys.argv[1], sys.argv[2]
list(read_records(kind, path, 0, None))  # warm: the readers' imports and buffers
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcomes = []
for record in read_records(kind, path, 0, None):
    try:
        outcomes.append(f"{len(build(kind, record, layout))} documents")
    except Skip as s:
        outcomes.append(s.reason)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, *outcomes)
"""


def _peak_mb_and_outcomes(kind: str, path: Path, max_side: int = 256) -> tuple[int, list[str]]:
    """Read and build every record of `path` in a child; (its peak RSS growth in MB, outcomes)."""
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, kind, str(path), str(max_side)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    peak, *outcomes = done.stdout.split(maxsplit=1)
    return int(peak), outcomes[0].replace(" documents", "_documents").split() if outcomes else []


def _tiny_png(width: int, height: int, color_type: int) -> bytes:
    """A PNG of one colour: a few hundred KB whatever its size (color type 6: RGBA, 2: RGB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + width * {2: 3, 6: 4}[color_type])
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_a_small_png_that_decodes_to_gigabytes_is_refused_before_decoding(tmp_path):
    from solo.vision import MAX_DECODED_BYTES

    bomb = _tiny_png(9400, 9400, 6)  # 343 KB; RGBA under PIL's pixel limit: 353 MB decoded, 2.3 GB converted
    assert len(bomb) < 400_000 and 9400 * 9400 * 4 > MAX_DECODED_BYTES
    (tmp_path / "big.png").write_bytes(bomb)
    (tmp_path / "small.png").write_bytes(_tiny_png(640, 480, 2))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"image": f, "caption": "x"}) + "\n"
                                                  for f in ("big.png", "small.png")))
    peak_mb, outcomes = _peak_mb_and_outcomes("captions", tmp_path / "pairs.jsonl")
    assert outcomes == ["decoded_too_large", "1_documents"] and peak_mb < 100, (peak_mb, outcomes)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    # 8000x6000 decoded whole is 192 MB (over the limit); PIL's draft decodes it at 1/4 scale for a
    # 1024-pixel target, so it is read, and costs a sixteenth.
    from PIL import Image

    from solo.vision import MAX_DECODED_BYTES

    gradient = Image.linear_gradient("L").resize((8000, 6000)).convert("RGB")
    assert 8000 * 6000 * 3 > MAX_DECODED_BYTES
    gradient.save(tmp_path / "photo.jpg", quality=80)
    del gradient
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "photo.jpg", "caption": "a gradient"}) + "\n")
    peak_mb, outcomes = _peak_mb_and_outcomes("captions", tmp_path / "pairs.jsonl", max_side=1024)
    assert outcomes == ["1_documents"] and peak_mb < 120, (peak_mb, outcomes)


def test_a_small_zst_holding_a_huge_document_is_streamed_and_skipped(tmp_path):
    import zstandard

    from solo.preprocess.formats import MAX_RECORD_BYTES

    huge = b'{"text": "' + b"a" * (200 << 20) + b'"}\n'  # 200 MiB of one document in ~6 KB
    lines = b'{"text": "before"}\n' + huge + b'{"text": "after"}\n'
    data = zstandard.ZstdCompressor().compress(lines)
    del huge, lines
    assert len(data) < 10_000 and 200 << 20 > MAX_RECORD_BYTES
    (tmp_path / "docs.jsonl.zst").write_bytes(data)
    peak_mb, outcomes = _peak_mb_and_outcomes("text", tmp_path / "docs.jsonl.zst")
    assert outcomes == ["1_documents", "document_too_large", "1_documents"] and peak_mb < 100, (peak_mb, outcomes)


# -- 9. Issue 17: the training and checkpoint side ------------------------------------------------

@pytest.mark.parametrize("args", [
    ["hf-to-solo", "--hf", "x", "--output", "y", "--tp", "0"],
    ["hf-to-solo", "--hf", "x", "--output", "y", "--tp", "-2"],
    ["hf-to-solo", "--hf", "x", "--output", "y", "--seed", "-1"],
    ["solo-to-hf", "--checkpoint", "x", "--output", "y", "--max-shard-gb", "0"],
])
def test_solo_convert_refuses_non_positive_counts_before_reading_anything(args, capsys):
    from solo.convert.cli import main

    with pytest.raises(SystemExit) as exited:
        main(args)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"solo-convert {args[0]}: error: argument {args[-2]}" in err, err


def train_tp1(config_path: Path, *overrides: str, env: dict | None = None, timeout: float = 600):
    """solo.train as one process (TP=1), as a user runs it on one machine, started warm
    (tests/warm.py). Output goes to files and the process group is killed at the end: a SIGKILLed
    run leaves the checkpoint writer's multiprocessing helpers behind, which would hold pipes open
    and outlive the test."""
    env = {**ENV, "MASTER_PORT": str(free_port()), **(env or {})}
    out, err = (config_path.with_suffix(f".{time.monotonic_ns()}{kind}") for kind in (".out", ".err"))
    return run_train([config_path, "parallel.tensor_parallel=1", *overrides], env, out, err, timeout)


@pytest.fixture(scope="module")
def four_steps(root) -> Path:
    """A finished one-process run: checkpoints at steps 2 and 4 (the rollback and damage tests copy it)."""
    save_dir = root / "runs" / "four-steps"
    proc = train_tp1(config(root, save_dir, train_steps=4))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert latest(save_dir) == "iter_0000004" and len(losses(save_dir)) == 4
    return save_dir


def copy_run(run: Path, to: Path, latest_name: str | None = None) -> Path:
    shutil.copytree(run, to)
    if latest_name is not None:
        (to / "latest").write_text(latest_name + "\n")
    return to


@pytest.mark.distributed
def test_rollback_with_keep_1_never_prunes_what_latest_names_and_resumes(root, four_steps, tmp_path):
    """`latest` rolled back to step 2 while steps 4 exists, keep_checkpoints=1: the step-3 save must
    survive its own pruning, so a crash at the next save leaves a run that resumes (issue 17, item 1)."""
    save_dir = copy_run(four_steps, tmp_path / "run", "iter_0000002")
    cfg = config(root, save_dir, train_steps=4, save_interval_steps=1, keep_checkpoints=1)
    crashed = train_tp1(cfg, env={"SOLO_FAULT_INJECT": "crash_in_save@step=4"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-4000:]
    assert latest(save_dir) == "iter_0000003" and (save_dir / "iter_0000003" / "solo_meta.json").is_file()
    assert not (save_dir / "iter_0000002").exists()  # older than the new save: pruned
    # Every file of the new checkpoint is recorded with its size and checksum (item 7).
    record = json.loads((save_dir / "iter_0000003" / "checksums.json").read_text())
    on_disk = {p.name: p.stat().st_size for p in (save_dir / "iter_0000003").iterdir() if p.name != "checksums.json"}
    assert {name: f["bytes"] for name, f in record["files"].items()} == on_disk and ".metadata" in on_disk
    resumed = train_tp1(cfg)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {save_dir / 'iter_0000003'}" in resumed.stdout
    assert losses(save_dir) == losses(four_steps)


@pytest.mark.distributed
def test_missing_latest_resumes_from_the_newest_verified_checkpoint_and_says_so(root, four_steps, tmp_path):
    """No `latest` beside iter_* folders (and the newest one damaged): never a silent restart from
    random weights (item 1); a cut last line of metrics.jsonl is dropped with a log line (item 12)."""
    save_dir = copy_run(four_steps, tmp_path / "run")
    (save_dir / "latest").unlink()
    _flip_byte(save_dir / "iter_0000004" / "__0_0.distcp", 1000)
    metrics = (save_dir / "metrics.jsonl").read_text()
    (save_dir / "metrics.jsonl").write_text(metrics[:len(metrics) - 40])  # killed mid-write of step 4's row
    proc = train_tp1(config(root, save_dir, train_steps=4))
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert f"{save_dir}: no `latest` pointer; resuming from the newest verified checkpoint iter_0000002" in out, out
    assert "iter_0000004 is damaged" in out and "__0_0.distcp" in out, out
    assert "metrics.jsonl: dropped a partial last line" in out, out
    assert "random init" not in out and losses(save_dir) == losses(four_steps)


def _craft_metadata_pickle(checkpoint: Path) -> None:
    import pickle

    class Exploit:
        def __reduce__(self):
            return (exec, ("open('/tmp/pwned', 'w')",))

    (checkpoint / ".metadata").write_bytes(pickle.dumps(Exploit()))
    record_path = checkpoint / "checksums.json"  # re-recorded: only the unpickler can refuse it now
    if record_path.exists():
        from solo.fileio import checksum_file

        record = json.loads(record_path.read_text())
        record["files"][".metadata"] = {"bytes": (checkpoint / ".metadata").stat().st_size,
                                        "xxh3_128": checksum_file(checkpoint / ".metadata")}
        record_path.write_text(json.dumps(record))


DAMAGE = {
    "flipped_distcp": (lambda c: _flip_byte(c / "__0_1.distcp", 4096), "__0_1.distcp does not match its checksum"),
    "truncated_distcp": (lambda c: (c / "__0_0.distcp").write_bytes((c / "__0_0.distcp").read_bytes()[:-999]),
                         "__0_0.distcp has"),
    "missing_metadata": (lambda c: (c / ".metadata").unlink(), ".metadata is missing"),
    "crafted_pickle": (_craft_metadata_pickle, "refusing to unpickle builtins.exec"),
}


@pytest.mark.distributed
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_at_resume_is_one_error_line_exit_2(root, four_steps, tmp_path, damage):
    """Items 7 and 11: verified at load (size and xxh3 of every file), any other load failure
    becomes one `solo-train: error:` line naming the checkpoint."""
    save_dir = copy_run(four_steps, tmp_path / "run")
    damage_fn, message = DAMAGE[damage]
    damage_fn(save_dir / "iter_0000004")
    proc = train_tp1(config(root, save_dir, train_steps=4))
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("solo-train: error:")]
    assert len(errors) == 1 and str(save_dir / "iter_0000004") in errors[0], proc.stderr[-3000:]
    assert message in errors[0], errors[0]
    assert "Traceback" not in proc.stderr and not Path("/tmp/pwned").exists()


@pytest.mark.distributed
def test_truncated_solo_meta_is_an_error_naming_the_file(root, four_steps, tmp_path):
    save_dir = copy_run(four_steps, tmp_path / "run")
    meta = save_dir / "iter_0000004" / "solo_meta.json"
    meta.write_text(meta.read_text()[:50])
    proc = train_tp1(config(root, save_dir, train_steps=4))
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert f"solo-train: error: {meta}: not valid JSON" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.distributed
def test_rerunning_a_finished_stage_keeps_its_result(root, four_steps, tmp_path):
    """Item 14: the rerun of a finished stage says so, exits 0 and leaves result.json as it was."""
    save_dir = copy_run(four_steps, tmp_path / "run")
    before = (save_dir / "result.json").read_bytes()
    assert len(json.loads(before)["losses"]) == 4
    proc = train_tp1(config(root, save_dir, train_steps=4))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "already finished at step 4 of 4" in proc.stdout, proc.stdout[-3000:]
    assert (save_dir / "result.json").read_bytes() == before


@pytest.mark.distributed
def test_nonfinite_stop_names_no_unverified_checkpoint_as_good(root, four_steps, tmp_path):
    """Item 7: a checkpoint without a checksum record (written before they existed) loads with a
    warning, and is not called "the last good checkpoint"."""
    save_dir = copy_run(four_steps, tmp_path / "run", "iter_0000002")
    (save_dir / "iter_0000002" / "checksums.json").unlink()
    proc = train_tp1(config(root, save_dir, train_steps=4), env={"SOLO_FAULT_INJECT": "nonfinite_loss@step=3"})
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert f"{save_dir / 'iter_0000002'} has no checksums.json: loaded unverified" in proc.stdout, proc.stdout[-3000:]
    assert "stopping. No verified checkpoint to go back to" in proc.stderr, proc.stderr[-3000:]


def _stage_data(shards: Path, **data_overrides):
    from solo.config import DataConfig, DataSource
    from solo.data.dataset import StageData

    data = DataConfig(sources=(DataSource("images", str(shards / "images"), 0.7),
                               DataSource("text", str(shards / "text"), 0.3)), seq_length_tokens=256, **data_overrides)
    return lambda **kw: StageData(data, global_batch_size=4, train_steps=STEPS, patch_size=32, **kw)


def test_an_unfinished_shard_folder_is_refused_unless_allowed(root, tmp_path):
    """Item 5: a folder manifest saying `complete: false` (a killed solo-preprocess)."""
    from solo.data.shards import ShardError

    shards = tmp_path / "shards"
    shutil.copytree(root / "shards", shards)
    manifest = json.loads((shards / "text" / "manifest.json").read_text())
    (shards / "text" / "manifest.json").write_text(json.dumps(
        {**manifest, "shards_planned": 30, "shards_complete": 14, "complete": False}))
    with pytest.raises(ShardError, match=re.escape(f"data source 'text': {shards / 'text'} is unfinished "
                                                   "(14 of 30 shards complete")) as error:
        _stage_data(shards)()
    assert "data.allow_incomplete=true" in str(error.value)
    assert _stage_data(shards, allow_incomplete=True)().sources[1].shards == manifest["shards"]


@pytest.mark.parametrize("recorded", [True, False])
def test_token_ids_beyond_the_model_vocabulary_are_refused_before_compute(root, tmp_path, recorded):
    """Item 6: from the shard manifest's `token_id_range` when solo-preprocess recorded it, else
    from the tokens themselves."""
    from solo.data.shards import ShardError, list_shards, open_shard

    shards = tmp_path / "shards"
    shutil.copytree(root / "shards", shards)
    for p in list_shards(shards / "text") + list_shards(shards / "images"):
        if recorded:  # as solo-preprocess records it
            path = Path(f"{p}.json")
            ids = np.concatenate([s.tokens for s in map(open_shard(p).sample, range(len(open_shard(p))))])
            path.write_text(json.dumps({**json.loads(path.read_text()),
                                        "token_id_range": [int(ids.min()), int(ids.max())]}))
    build = _stage_data(shards)
    build(vocab_size=33031)  # the tokenizer's vocabulary: fine
    with pytest.raises(ShardError) as error:
        build(vocab_size=10)
    message = str(error.value)
    assert "model.vocab_size=10" in message and "token ids up to" in message and str(shards) in message, message


@pytest.mark.distributed
def test_a_second_job_on_the_save_dir_is_refused_and_ranks_die_with_their_launcher(root, tmp_path):
    """Item 10: the save_dir lock names its holder; SIGKILL of torchrun alone (not its process
    group) takes the ranks down within seconds, and they write no further checkpoint."""
    import fcntl

    save_dir = tmp_path / "run"
    # Far more steps than the test lets it run: the second job must find the first still training.
    cfg = config(root, save_dir, train_steps=5000, save_interval_steps=1, keep_checkpoints=2)
    job = launch(cfg)
    try:
        wait_for_steps(job, save_dir, 1)
        ranks = psutil.Process(job.pid).children()
        assert len(ranks) == 2
        second = train_tp1(cfg, timeout=180)
        assert second.returncode == 2, second.stderr[-3000:]
        assert re.search(rf"solo-train: error: {re.escape(str(save_dir))} is in use by another run "
                         rf"\(pid \d+ on {re.escape(os.uname().nodename)}", second.stderr), second.stderr[-3000:]
        job.kill()  # torchrun alone: its ranks lose their launcher
        _, alive = psutil.wait_procs(ranks, timeout=10)
        assert not alive, f"ranks {[p.pid for p in alive]} outlived their launcher"
        written = sorted(p.name for p in save_dir.iterdir())
        time.sleep(2)
        assert sorted(p.name for p in save_dir.iterdir()) == written
        with open(save_dir / ".solo-train.lock", "a") as lock:  # released with its holder
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        for rank in psutil.Process().children(recursive=True):
            rank.kill()


@pytest.mark.distributed
def test_sigterm_to_the_launch_script_saves_and_it_exits_0(root):
    """Item 17: torchrun exits 1 after a SIGTERM of its own even when every rank saved and exited 0
    (and kills ranks still saving 30 s after it). scripts/pretrain.sh hands a SIGTERM to the ranks
    instead, so the clean stop is exit 0 and the save has all the time it needs."""
    save_dir = root / "runs" / "sigterm-script"
    proc = launch_script(config(root, save_dir, save_interval_steps=100), ".term.log")
    wait_for_steps(proc, save_dir, 2)
    proc.send_signal(signal.SIGTERM)  # the launch script alone, as `scancel --signal=TERM --batch` does
    out = output(proc)
    stopped = re.search(r"stop requested \(SIGTERM\): saved step (\d+), exiting", out)
    assert stopped, out[-4000:]
    assert proc.returncode == 0, out[-4000:]
    assert json.loads((save_dir / "result.json").read_text())["preempted"] is True
    assert latest(save_dir) == f"iter_{int(stopped.group(1)):07d}"
