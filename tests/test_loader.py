"""solo.data.loader: worker processes give the read-ahead thread's batches, name a damaged shard, and
leave no process behind (closed, by an exception, or SIGKILLed); training with them resumes exactly."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from solo.config import ConfigError, DataConfig, DataSource, load_config
from solo.data.dataset import StageData
from solo.data.loader import default_workers
from solo.data.prefetch import StepPrefetcher
from solo.data.shards import ShardError
from tests.shard_fixtures import write_blend_sources, write_sources
from tests.torchrun import torchrun

FIELDS = ("tokens", "labels", "loss_mask", "vision_mask", "position_ids", "cu_seqlens", "patches")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_blend_sources(tmp_path_factory.mktemp("loader"))


def stage_data(folders, fractions: dict, global_batch_size: int, train_steps: int) -> StageData:
    sources = tuple(DataSource(name, str(folders[name]), f) for name, f in fractions.items())
    return StageData(DataConfig(sources=sources, seq_length_tokens=256), global_batch_size, train_steps)


def alive(pids) -> list[int]:
    """The pids still running (a zombie, dead but not yet reaped, is not)."""
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return running


def wait_gone(pids, timeout: float = 10.0) -> list[int]:
    deadline = time.time() + timeout
    while alive(pids) and time.time() < deadline:
        time.sleep(0.05)
    return alive(pids)


@pytest.mark.parametrize("with_patches", [True, False])
def test_workers_give_the_batches_of_the_thread_for_every_step(folders, with_patches):
    data = stage_data(folders, {"text": 0.6, "images": 0.4}, global_batch_size=8, train_steps=6)
    steps = [0, 1, 2, 3, 4, 5, 2, 5, 0]  # in order, then out of turn: the workers restart at that step
    batches = []
    with StepPrefetcher(data, 1, 2, 2, 0, with_patches=with_patches, workers=2) as workers, \
            StepPrefetcher(data, 1, 2, 2, 0, with_patches=with_patches) as thread:
        for step in steps:
            got, expected = workers.get(step), thread.get(step)
            assert len(got) == len(expected) == 2
            for a, b in zip(got, expected, strict=True):
                for name in FIELDS:
                    assert torch.equal(getattr(a, name), getattr(b, name)), (step, name)
            batches += got
        assert len(workers._workers.pids()) == 2
    with_images = [b for b in batches if b.vision_mask.any()]
    assert with_images and all(b.patches.numel() == 0 for b in with_images) != with_patches
    # The tensors came back through shared memory, not through a pipe.
    assert all(b.tokens.is_shared() and (b.patches.is_shared() or not b.patches.numel()) for b in batches)


def test_the_default_worker_count_shares_the_cores_of_the_node(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers(None) == 7
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers(None) == 8  # at most 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers(None) == 0  # the CPU test machine: the thread reads
    assert default_workers(3) == 3


def test_a_negative_worker_count_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {preset: tiny}\n")
    with pytest.raises(ConfigError, match=r"data.loader_workers=-1 must be null .* or >= 0"):
        load_config(config, ["data.loader_workers=-1"])
    assert load_config(config, ["data.loader_workers=2"]).data.loader_workers == 2
    assert load_config(config).data.loader_workers is None


def damage_tokens(data: StageData, i: int) -> str:
    prefix = data.shard_of(i)
    with open(f"{prefix}.tokens.bin", "r+b") as f:
        f.write(np.array([10**6], np.int32).tobytes())  # an id beyond the vocabulary, seen through the map
    return rf"{prefix} sample \d+: token id 1000000"


def failing_read(data: StageData, i: int) -> str:
    real = data.read
    data.read = lambda j, with_patches=True: (_ for _ in ()).throw(OSError(5, "Input/output error")) \
        if j == i else real(j, with_patches)  # set before the workers fork: they inherit it
    return rf"{data.shard_of(i)}: reading step 1 failed: OSError: \[Errno 5\] Input/output error"


def truncate_pixels(data: StageData, i: int) -> str:
    prefix = data.shard_of(i)
    os.truncate(f"{prefix}.pixels.bin", 0)  # the worker's memory-mapped read hits SIGBUS and kills it
    return rf"a data loader worker died reading step 1 from .*{prefix}.*exited unexpectedly"


@pytest.mark.parametrize("damage", [damage_tokens, failing_read, truncate_pixels])
def test_a_damaged_shard_surfaces_at_its_step_naming_the_shard(folders, tmp_path, damage):
    shutil.copytree(folders["images"], tmp_path / "images")
    data = stage_data({"images": tmp_path / "images"}, {"images": 1.0}, global_batch_size=1, train_steps=3)
    step1 = data.rank_indices(1, 0, 1)
    assert {data.shard_of(i) for i in step1}.isdisjoint(data.shard_of(i) for i in data.rank_indices(0, 0, 1))
    message = damage(data, step1[0])
    with StepPrefetcher(data, 0, 1, 1, 0, workers=2) as prefetch:
        assert len(prefetch.get(0)) == 1
        with pytest.raises(ShardError, match=message):
            prefetch.get(1)
        pids = prefetch._workers.pids()
    assert not alive(pids)


def test_no_worker_is_left_after_close_or_an_exception(folders):
    data = stage_data(folders, {"text": 0.6, "images": 0.4}, global_batch_size=4, train_steps=5)
    # Processes of the session that were there before (tests/warm.py's helper) are not the loader's.
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    new_children = lambda: [p for p in psutil.Process().children(recursive=True) if p.pid not in before]  # noqa: E731
    prefetch = StepPrefetcher(data, 0, 1, 1, 0, workers=2)
    prefetch.get(0)
    pids = prefetch._workers.pids()
    assert len(alive(pids)) == 2
    prefetch.close()
    assert not alive(pids) and not new_children()
    prefetch.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="the step failed"):
        with StepPrefetcher(data, 0, 1, 1, 0, workers=2) as prefetch:
            prefetch.get(0)
            pids = prefetch._workers.pids()
            raise RuntimeError("the step failed")
    assert len(pids) == 2 and not alive(pids) and not new_children()


# A process with a 2-worker loader mid-run, that prints its workers' pids and waits to be killed.
LOADER_PROCESS = """
import json, sys, time
from pathlib import Path
from solo.config import DataConfig, DataSource
from solo.data.dataset import StageData
from solo.data.prefetch import StepPrefetcher
data = StageData(DataConfig(sources=(DataSource("text", sys.argv[1], 1.0),), seq_length_tokens=256), 4, 5)
prefetch = StepPrefetcher(data, 0, 1, 1, 0, workers=2)
prefetch.get(0)
print(json.dumps(prefetch._workers.pids()), flush=True)
time.sleep(300)
"""


def test_sigkill_of_the_rank_takes_its_workers_along(folders):
    proc = subprocess.Popen([sys.executable, "-c", LOADER_PROCESS, str(folders["text"])], stdout=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        pids = json.loads(proc.stdout.readline())
        assert len(alive(pids)) == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not wait_gone(pids, timeout=3.0)  # the kernel's parent-death signal, not a poll


def worker_processes(config) -> list[int]:
    """Processes of a run (ranks, their workers): their command line names its config."""
    return [p.pid for p in psutil.process_iter(["cmdline"]) if str(config) in " ".join(p.info["cmdline"] or [])]


@pytest.mark.distributed
def test_training_with_workers_matches_the_thread_and_resumes_exactly_after_a_sigkill(tmp_path):
    """TP=2 on 2 ranks: TP rank 0 reads with 2 workers, rank 1 receives. Every rank SIGKILLs itself
    while step 4's checkpoint is written; the workers go with them; the rerun resumes from step 2."""
    from tests.test_reliability import launch as launch_2_ranks
    from tests.test_reliability import losses, output
    from tests.test_train import stage_config

    write_sources(tmp_path / "shards")
    thread = stage_config(tmp_path, "stage1", save_dir=tmp_path / "thread")
    torchrun("-m solo.train", 2, thread, "data.loader_workers=0")
    workers = stage_config(tmp_path, "stage1", save_dir=tmp_path / "workers")
    proc = launch_2_ranks(workers, "data.loader_workers=2", env={"SOLO_FAULT_INJECT": "crash_in_save@step=4"})
    log = output(proc)
    assert proc.returncode != 0 and (tmp_path / "workers" / "iter_0000002").is_dir(), log[-4000:]
    assert "data: 2 loader worker processes" in log, log[-4000:]
    assert not wait_gone(worker_processes(workers), timeout=5.0)
    torchrun("-m solo.train", 2, workers, "data.loader_workers=2")
    assert losses(tmp_path / "workers") == losses(tmp_path / "thread")
    assert len(losses(tmp_path / "thread")) == 6
