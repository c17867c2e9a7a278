"""solo.plan: the memory plan per GPU, from the config alone (no GPU, no torchrun)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from solo.config import load_config
from solo.plan import GIB, PlanError, activations, check_fits, make_plan
from tests.warm import run_train

ROOT = Path(__file__).parent.parent
CONFIGS = ROOT / "configs"
A100_80GB = 80 * GIB
NO_RECOMPUTE = ["recompute_granularity=none", "recompute_num_layers=0"]
# A tiny model whose layers, not its vocabulary, hold most of the activations.
TINY = {"model": {"preset": "tiny", "num_layers": 4, "hidden_size": 128, "num_attention_heads": 2,
                  "num_query_groups": 1, "ffn_hidden_size": 344, "vocab_size": 1024},
        "precision": "fp32", "global_batch_size": 1, "data": {"seq_length_tokens": 256}}
CPU_TOLERANCE = 0.15  # measured: within 12% (solo/plan.py's docstring)


def _solo_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m solo.train ARGS`, started warm (tests/warm.py)."""
    return run_train(list(args), {**os.environ, "PYTHONWARNINGS": "ignore"}, tmp_path / f"{len(args)}.out",
                     tmp_path / f"{len(args)}.err", timeout=300)


def _python(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **env})


@pytest.mark.parametrize("seq,recompute", [
    (256, []),
    (1024, []),
    (1024, ["recompute_granularity=full", "recompute_method=uniform", "recompute_num_layers=2"]),
    (1024, ["recompute_granularity=full", "recompute_method=block", "recompute_num_layers=1"]),
])
def test_plan_matches_a_measured_peak_on_the_cpu(tmp_path, seq, recompute):
    config, out = tmp_path / "tiny.yaml", tmp_path / "peak.json"
    config.write_text(yaml.safe_dump(TINY))
    overrides = [f"data.seq_length_tokens={seq}", *recompute]
    # A low fixed mmap threshold: freed tensors leave the resident set, so its peak is the tensors'.
    proc = _python(str(ROOT / "tests" / "dist" / "memory_peak.py"), "--config", str(config), "--out", str(out),
                   *overrides, MALLOC_MMAP_THRESHOLD_="16384", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(out.read_text())
    cfg = load_config(config, overrides)
    assert measured["params"] == make_plan(cfg, 1).params  # the parameter count is exact
    planned = activations(cfg, bf16=False, backend="local").peak
    assert abs(planned - measured["activation_peak_bytes"]) <= CPU_TOLERANCE * measured["activation_peak_bytes"], \
        (planned, measured)


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_the_paper_configs_fit_8_a100_80gb(stage):
    cfg = load_config(CONFIGS / f"{stage}.yaml")
    plan = make_plan(cfg, world_size=8)
    assert plan.data_parallel == 4 and plan.fits(A100_80GB)
    check_fits(cfg, A100_80GB, world_size=8)  # no error
    # megatron-core's distributed optimizer: 2 (bf16) + 4 (fp32 grads) + 12 / DP bytes per parameter.
    assert plan.weights + plan.grads + plan.optimizer == (6 * plan.params + 12 * plan.params // 4)


def test_without_recompute_it_does_not_fit_and_the_suggested_change_does():
    cfg = load_config(CONFIGS / "stage1.yaml", NO_RECOMPUTE)
    assert not make_plan(cfg, 8).fits(A100_80GB)
    with pytest.raises(PlanError, match="smallest change that fits: ") as error:
        check_fits(cfg, A100_80GB, world_size=8)
    first_line = str(error.value).splitlines()[0]
    change = first_line.split("smallest change that fits: ")[1].split()
    assert change[0] == "recompute_granularity=full"
    assert make_plan(load_config(CONFIGS / "stage1.yaml", NO_RECOMPUTE + change), 8).fits(A100_80GB)
    assert "DOES NOT FIT" in str(error.value)  # the table comes with it


def test_more_recompute_tp_or_pp_never_needs_more_memory():
    base = make_plan(load_config(CONFIGS / "stage1.yaml", NO_RECOMPUTE), 8).total
    for change in (["recompute_granularity=full", "recompute_method=block", "recompute_num_layers=8"],
                   ["parallel.tensor_parallel=4"], ["parallel.pipeline_parallel=2"]):
        assert make_plan(load_config(CONFIGS / "stage1.yaml", NO_RECOMPUTE + change), 8).total < base, change


def test_check_fits_is_skipped_without_a_device_size():
    check_fits(load_config(CONFIGS / "stage1.yaml", NO_RECOMPUTE), None)  # the CPU: nothing to check


def test_cli_prints_the_plan_and_exits_0(tmp_path):
    proc = _solo_train(tmp_path, str(CONFIGS / "stage1.yaml"), "--plan", "--gpu-memory-gib", "80")
    assert proc.returncode == 0, proc.stderr
    for row in ("weights (bf16 param buffer)", "gradient buffer (fp32)", "optimizer shard (1/4)",
                "activations (peak)", "per layer kept whole", "total"):
        assert row in proc.stdout
    assert "fits (+" in proc.stdout and "TP=2 x PP=1 x CP=1 x DP=4" in proc.stdout


def test_cli_exits_2_with_the_change_when_asked_to_check_a_plan_that_does_not_fit(tmp_path):
    proc = _solo_train(tmp_path, str(CONFIGS / "stage1.yaml"), *NO_RECOMPUTE, "--plan", "--gpu-memory-gib", "80")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("solo-train: error: the memory plan does not fit the device (80.0 GiB); "
                                  "smallest change that fits: recompute_granularity=full")
    assert "Traceback" not in proc.stderr and "DOES NOT FIT" in proc.stderr
    shown = _solo_train(tmp_path, str(CONFIGS / "stage1.yaml"), *NO_RECOMPUTE, "--plan")
    assert shown.returncode == 0 and "DOES NOT FIT" in shown.stdout  # --plan alone only shows it
