"""Every advertised layout trains the same model as one rank: pipeline parallel (TP=1 x PP=2,
TP=2 x PP=2, checkpoints resharded between PP=1 and PP=2) and the paper's TP=2 x DP=4 with the
distributed optimizer on 8 ranks. Real `solo-train` runs under torchrun on gloo ranks (the one-rank
references as one process, tests/warm.py), a tiny model on 256-token rows, micro batches of 2 rows;
fp32 losses agree to rel 1e-5 (the layouts only reorder float sums)."""

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.shard_fixtures import write_sources
from tests.test_train import losses, stage_config
from tests.torchrun import free_port, torchrun
from tests.warm import run_train

pytestmark = pytest.mark.distributed

STEPS = 4


def parallel(tp: int = 1, pp: int = 1) -> dict:
    return {"parallel": {"tensor_parallel": tp, "pipeline_parallel": pp}}


def run(root: Path, save_dir: Path, nproc: int, **extra) -> Path:
    config = stage_config(root, "stage1", save_dir=save_dir, **{"train_steps": STEPS, "save_interval_steps": 1,
                                                                 "keep_checkpoints": STEPS, **extra})
    if nproc > 1:
        torchrun("-m solo.train", nproc, config)
    else:  # the one-rank references: one process, as a user runs it on one machine, started warm
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(free_port())}
        done = run_train([config], env, root / f"{save_dir.name}.out", root / f"{save_dir.name}.err", timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return save_dir


def resume_copy(run_dir: Path, save_dir: Path, step: int) -> Path:
    """`run_dir` as if stopped after `step`: the next run resumes there (under its own layout)."""
    shutil.copytree(run_dir, save_dir)
    for later in range(step + 1, STEPS + 1):
        shutil.rmtree(save_dir / f"iter_{later:07d}")
    (save_dir / "latest").write_text(f"iter_{step:07d}\n")
    return save_dir


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layouts")
    write_sources(root / "shards")
    return root


MICRO = dict(micro_batch_size=2)  # global batch 4: 2 micro batches of 2 rows


@pytest.fixture(scope="module")
def pipeline(root) -> dict[str, Path]:
    """A random init differs per pipeline layout (each stage its own seed, as Megatron-LM), so the
    PP=2 runs start from the PP=1 run's step-1 checkpoint (resharded by dist_checkpointing, Adam
    state included) and train steps 2-4: their losses must be the PP=1 run's."""
    runs = {"pp1": run(root, root / "runs" / "pp1", 1, **MICRO, **parallel(1, 1))}
    for name, tp in (("pp2", 1), ("tp2pp2", 2)):
        runs[name] = run(root, resume_copy(runs["pp1"], root / "runs" / name, 1), tp * 2, **MICRO, **parallel(tp, 2))
    return runs


@pytest.mark.parametrize("layout", ["pp2", "tp2pp2"])
def test_pipeline_parallel_gives_the_losses_of_one_stage(pipeline, layout):
    reference = losses(pipeline["pp1"])
    assert len(reference) == STEPS and reference[-1] < reference[0]
    assert losses(pipeline[layout])[0] == reference[0]  # step 1: the PP=1 run's, kept
    assert losses(pipeline[layout])[1:] == pytest.approx(reference[1:], rel=1e-5)  # 3 steps at PP=2
    meta = json.loads((pipeline[layout] / f"iter_{STEPS:07d}" / "solo_meta.json").read_text())
    assert meta["parallel"]["pipeline_parallel"] == 2


def test_a_pp2_checkpoint_resumes_at_pp1(root, pipeline):
    """dist_checkpointing reshards the stages' layers, the optimizer state and the schedule."""
    save_dir = resume_copy(pipeline["pp2"], root / "runs" / "pp2-resumed-at-pp1", STEPS - 1)
    run(root, save_dir, 1, **MICRO, **parallel(1, 1))
    assert losses(save_dir)[:-1] == losses(pipeline["pp2"])[:-1]
    assert losses(save_dir)[-1] == pytest.approx(losses(pipeline["pp1"])[-1], rel=1e-5)


def test_packed_backend_sends_b_times_s_rows_between_stages(root, pipeline, tmp_path):
    """The flex backend (FlexAttention runs forward-only on the CPU) with micro batches of 2 rows:
    the same checkpoint gives the same loss through a PP=2 schedule as through PP=1."""
    config = stage_config(root, "stage1", save_dir=tmp_path / "unused", train_steps=STEPS, **MICRO)
    torchrun("pipeline_forward.py", 2, config, "--checkpoint", pipeline["pp1"], "--backend", "flex",
             "--out", tmp_path / "out.json")
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["pp1"] > 0 and out["pp2"] == pytest.approx(out["pp1"], rel=1e-5)
    assert out["seeds_pp2"] == [1234, 1334] and out["seeds_pp1"] == [1234, 1234]  # seed + 100 x stage


def test_paper_layout_tp2_dp4_distributed_optimizer_on_8_ranks_equals_one_rank(root):
    """SOLO's layout (8 GPUs: TP=2, DP=4, the distributed optimizer sharding Adam over DP) against one
    rank, both from the same random init (CPU initialization is independent of TP and DP)."""
    one = run(root, root / "runs" / "one-rank", 1, train_steps=3, **parallel(1, 1))
    paper = run(root, root / "runs" / "tp2-dp4", 8, train_steps=3, **parallel(2, 1))
    meta = json.loads((paper / "iter_0000003" / "solo_meta.json").read_text())
    assert meta["parallel"] == {"tensor_parallel": 2, "pipeline_parallel": 1, "data_parallel": 4}
    assert meta["config"]["parallel"]["use_distributed_optimizer"] is True
    assert len(losses(one)) == 3 and losses(paper) == pytest.approx(losses(one), rel=1e-5)
