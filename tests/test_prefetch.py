"""solo.data.prefetch: reading one step ahead changes nothing but when the work is done."""

import threading

import pytest
import torch

from solo.config import DataConfig, DataSource
from solo.data.batch import collate
from solo.data.dataset import StageData
from solo.data.prefetch import StepPrefetcher
from tests.shard_fixtures import write_blend_sources


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_blend_sources(tmp_path_factory.mktemp("prefetch"))


def data_config(folders, fractions: dict) -> DataConfig:
    return DataConfig(sources=tuple(DataSource(name, str(folders[name]), f) for name, f in fractions.items()),
                      seq_length_tokens=256)


def test_prefetched_steps_equal_direct_reads_and_run_ahead(folders):
    data = StageData(data_config(folders, {"text": 0.6, "images": 0.4}), global_batch_size=8, train_steps=5)
    prefetch = StepPrefetcher(data, dp_rank=1, dp_size=2, micro_batch_size=2, pad_id=0)
    threads = set()
    original = prefetch._load
    prefetch._load = lambda step: (threads.add(threading.current_thread().name), original(step))[1]
    try:
        for step in (0, 1, 2, 4):  # 3 is skipped: a step that was not read ahead is read now
            micro = prefetch.get(step)
            expected = data.rank_batch(step, 1, 2)
            assert len(micro) == 2
            for batch, i in zip(micro, (0, 2), strict=True):
                direct = collate(expected[i:i + 2], data.seq_length, 0)
                for name in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "patches"):
                    assert torch.equal(getattr(batch, name), getattr(direct, name)), name
            if step + 1 < data.train_steps:
                assert prefetch._next[0] == step + 1  # the next step is already on its way
        assert prefetch._next is None  # nothing is read past the last step
        assert any(name.startswith("solo-prefetch") for name in threads)
    finally:
        prefetch.close()


def test_an_error_while_reading_ahead_surfaces_at_its_step(folders):
    data = StageData(data_config(folders, {"text": 1.0}), global_batch_size=4, train_steps=3)
    prefetch = StepPrefetcher(data, 0, 1, 1, 0)
    real = data.rank_batch

    def damaged(step, rank, size, **options):
        if step == 1:
            raise OSError("shard-00003.pixels.bin: Input/output error")
        return real(step, rank, size, **options)

    data.rank_batch = damaged
    try:
        prefetch.get(0)
        with pytest.raises(OSError, match="Input/output error"):
            prefetch.get(1)
    finally:
        prefetch.close()


def test_leaving_the_with_block_by_an_exception_closes_the_prefetcher(folders):
    data = StageData(data_config(folders, {"text": 1.0}), global_batch_size=4, train_steps=5)
    with pytest.raises(RuntimeError, match="the step failed"):
        with StepPrefetcher(data, 0, 1, 1, 0) as prefetch:
            prefetch.get(0)
            assert prefetch._next is not None  # step 1 is being read ahead
            raise RuntimeError("the step failed")
    assert prefetch._pool._shutdown
    with pytest.raises(RuntimeError, match="after shutdown"):
        prefetch.get(3)  # reads step 3 here, then may not hand step 4 to the closed thread


@pytest.mark.distributed
def test_one_tp_rank_reads_and_the_others_receive_the_same_batches(tmp_path):
    """Megatron-LM's data path: TP rank 0 reads and collates, TP rank 1 reads nothing and receives
    every field (uint8 patches, bool vision mask, a batch without images) unchanged."""
    import json

    from tests.torchrun import torchrun

    torchrun("broadcast_checks.py", 2, "--out", tmp_path / "out.json")
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["received_nothing"] and out["patches"] == [10, 0]
    fields = ["tokens", "labels", "loss_mask", "vision_mask", "position_ids", "cu_seqlens", "patches"]
    assert out["fields"] == [dict.fromkeys(fields, True)] * 2
