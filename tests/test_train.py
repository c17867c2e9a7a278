"""solo.train on CPU: the three-stage curriculum under torchrun/gloo (TP=2 x DP=2), exact resume,
TP resharding of checkpoints, and clear errors before any compute."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.shard_fixtures import write_sources
from tests.torchrun import free_port, torchrun
from tests.warm import run_train

pytestmark = pytest.mark.distributed

STAGES = {
    "stage1": {"images": 0.7, "text": 0.3},
    "stage2": {"images": 0.5, "text": 0.5},
    "stage3": {"images": 0.3, "text": 0.7},
}


def stage_config(root: Path, stage: str, init_from: str = "", save_dir: Path | None = None, **extra) -> Path:
    cfg = {
        "stage": stage,
        "model": {"preset": "tiny", "patch_size": 32},
        "parallel": {"tensor_parallel": 2},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "lr_warmup_steps": 2},
        "data": {"seq_length_tokens": 256, "sources": [
            {"name": name, "path": str(root / "shards" / name), "fraction": fraction}
            for name, fraction in STAGES[stage].items()]},
        "train_steps": 6, "global_batch_size": 4, "precision": "fp32",
        "init_from": init_from, "save_dir": str(save_dir or root / "runs" / stage),
        "save_interval_steps": 2, "wandb_mode": "disabled", **extra,
    }
    path = root / f"{stage}-{Path(cfg['save_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(save_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_sources(root / "shards")
    previous = ""
    for stage in STAGES:
        torchrun("-m solo.train", 4, stage_config(root, stage, init_from=previous))
        previous = str(root / "runs" / stage)
    return root


def test_three_stages_chain_and_loss_falls_in_each(curriculum):
    for stage in STAGES:
        run = curriculum / "runs" / stage
        curve = losses(run)
        assert len(curve) == 6
        assert curve[-1] < curve[0], f"{stage}: loss did not fall: {curve}"
        assert (run / "latest").read_text().strip() == "iter_0000006"
        meta = json.loads((run / "iter_0000006" / "solo_meta.json").read_text())
        layout = {"tensor_parallel": 2, "pipeline_parallel": 1, "data_parallel": 2}
        assert meta["step"] == 6 and meta["parallel"] == layout
    # A later stage starts from the previous stage's weights, not from scratch.
    assert losses(curriculum / "runs" / "stage2")[0] < losses(curriculum / "runs" / "stage1")[0] - 0.2
    result = json.loads((curriculum / "runs" / "stage3" / "result.json").read_text())
    assert result["steps"] == 6 and result["checkpoint"].endswith("iter_0000006")


def test_killed_run_resumes_with_identical_losses(curriculum, tmp_path):
    """SIGKILL the whole torchrun job after step 3 is checkpointed... and resume it."""
    save_dir = tmp_path / "killed"
    config = stage_config(curriculum, "stage1", save_dir=save_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "solo.train", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (save_dir / "iter_0000004").exists():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (save_dir / "latest").exists(), "no checkpoint before the kill"
    torchrun("-m solo.train", 4, config)
    assert losses(save_dir) == losses(curriculum / "runs" / "stage1")


def test_tp2_checkpoint_loads_at_tp1_with_the_same_loss(curriculum, tmp_path):
    checkpoint = curriculum / "runs" / "stage1"
    config = stage_config(curriculum, "stage1", save_dir=tmp_path / "unused")
    results = {}
    for tp in (2, 1):
        out = tmp_path / f"tp{tp}.json"
        torchrun("eval_checkpoint.py", tp, config, "--checkpoint", checkpoint, "--out", out,
                 f"parallel.tensor_parallel={tp}")
        results[tp] = json.loads(out.read_text())["loss"]
    assert results[1] == pytest.approx(results[2], rel=1e-5)
    assert results[1] < losses(checkpoint)[0]


def run_train_single_process(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m solo.train CONFIG OVERRIDES` as one process, started warm (tests/warm.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(free_port())}
    stem = f".{time.monotonic_ns()}"
    return run_train([config, *overrides], env, config.with_suffix(stem + ".out"), config.with_suffix(stem + ".err"),
                     timeout=120)


@pytest.mark.parametrize("overrides,message", [
    (["optimizer.lr=fast"], "optimizer.lr: expected float"),
    (["parallel.tensor_parallel=1", "data.sources=[{name: x, path: /nonexistent/shards, fraction: 1.0}]"],
     "shard folder /nonexistent/shards does not exist"),
    (["parallel.tensor_parallel=1", "data.seq_length_tokens=128"], "packed for seq_length 256"),
])
def test_bad_input_is_a_clear_error_before_compute(curriculum, tmp_path, overrides, message):
    config = stage_config(curriculum, "stage1", save_dir=tmp_path / "run")
    proc = run_train_single_process(config, *overrides)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_checkpoint_of_another_model_shape_is_refused(curriculum, tmp_path):
    config = stage_config(curriculum, "stage1", init_from=str(curriculum / "runs" / "stage1"),
                          save_dir=tmp_path / "run")
    proc = run_train_single_process(config, "parallel.tensor_parallel=1", "model.num_layers=3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model shape does not match" in proc.stderr and "num_layers: checkpoint 2 vs config 3" in proc.stderr


def test_checkpoint_with_another_rope_base_is_refused(curriculum, tmp_path):
    """Same tensor shapes, different meaning: loading would succeed and train a wrong model."""
    config = stage_config(curriculum, "stage1", init_from=str(curriculum / "runs" / "stage1"),
                          save_dir=tmp_path / "run")
    proc = run_train_single_process(config, "parallel.tensor_parallel=1", "model.rope_theta=1000000")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "rope_theta: checkpoint 10000.0 vs config 1000000.0" in proc.stderr


def test_init_from_an_unfinished_stage_is_refused(curriculum, tmp_path):
    """A preempted stage 1 must not silently become stage 2's starting point (scripts/curriculum.sh)."""
    import shutil

    from solo.checkpoint import check_stage_finished

    unfinished = tmp_path / "stage1"
    shutil.copytree(curriculum / "runs" / "stage1", unfinished)
    (unfinished / "latest").write_text("iter_0000004\n")  # as if stopped after step 4 of 6
    config = stage_config(curriculum, "stage2", init_from=str(unfinished), save_dir=tmp_path / "run")
    proc = run_train_single_process(config, "parallel.tensor_parallel=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "stage 'stage1' stopped at step 4 of 6" in proc.stderr and "iter_0000004" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    check_stage_finished(unfinished / "iter_0000004", unfinished / "iter_0000004")  # named on purpose: taken
    check_stage_finished(curriculum / "runs" / "stage1", curriculum / "runs" / "stage1" / "iter_0000006")


def resume_stage1_with(curriculum, tmp_path, override: str):
    """A copy of the finished stage-1 run resumed on one process with one config value changed."""
    import shutil

    save_dir = tmp_path / "run"
    shutil.copytree(curriculum / "runs" / "stage1", save_dir)
    config = stage_config(curriculum, "stage1", save_dir=save_dir)
    return run_train_single_process(config, "parallel.tensor_parallel=1", override)


def test_resuming_with_another_schedule_is_a_clear_error(curriculum, tmp_path):
    proc = resume_stage1_with(curriculum, tmp_path, "optimizer.lr=0.01")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the config's schedule differs from the checkpoint's" in proc.stderr and "init_from=" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resuming_with_another_attention_window_is_refused(curriculum, tmp_path):
    """Same tensors, other attention: the run would go on computing something else than it trained."""
    proc = resume_stage1_with(curriculum, tmp_path, "model.attention_window_tokens=64")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "attention_window_tokens: checkpoint null vs config 64" in proc.stderr and "init_from=" in proc.stderr


# solo.train.train in one process (a world of one) with train_step failing at the second step and
# StepPrefetcher.close recording that it ran; prints the error and the record as the last line.
STEP_FAILS = """
import json, sys
import solo.train
from solo.config import load_config
from solo.data.prefetch import StepPrefetcher
closed, real_close, real_step = [], StepPrefetcher.close, solo.train.train_step
def close_and_record(self):
    real_close(self)
    closed.append(self._pool._shutdown)
def failing(training, micro_batches, step):
    if step == 1:
        raise RuntimeError("injected: the step failed")
    return real_step(training, micro_batches, step)
StepPrefetcher.close, solo.train.train_step = close_and_record, failing
try:
    solo.train.train(load_config(sys.argv[1], sys.argv[2:]))
except RuntimeError as e:
    print(json.dumps({"error": str(e), "closed": closed}))
"""


def test_the_read_ahead_is_closed_when_a_step_raises(tmp_path):
    write_sources(tmp_path / "shards")
    config = stage_config(tmp_path, "stage1", save_dir=tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(free_port())}
    proc = run_train([config, "parallel.tensor_parallel=1"], env, tmp_path / "out", tmp_path / "err", timeout=300,
                     code=STEP_FAILS)  # tests/warm.py
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"error": "injected: the step failed", "closed": [True]}
