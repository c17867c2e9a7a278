"""The GPU benchmarks keep working: their CPU smoke modes run the same code paths on a tiny model.

(What they measure on a GPU is in docs/*.log; CI has no GPU.)"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, wrapper: tuple[str, ...] = ()) -> str:
    """`wrapper`: interpreter arguments before the script (e.g. `-c CODE`, which then runs it)."""
    proc = subprocess.run([sys.executable, *wrapper, str(REPO / "benchmarks" / script), "--cpu-smoke", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_gpu_checks_pass_on_the_cpu():
    out = run("gpu_checks.py")
    assert "ALL PASS" in out and "FAIL" not in out.replace("ALL PASS", ""), out[-3000:]
    assert "isolation[fp32] docs 2-4 unchanged when docs 0 and 1 change" in out


# Runs a benchmark with one function of the project wrapped: every call appends what `record` makes of
# (args, result) to a JSON list, so a test sees which numbers the benchmark got from the project's code.
COUNTING_WRAPPER = """
import importlib, json, runpy, sys
module_name, owner_name, attr, record_source, calls_file, script, *args = sys.argv[1:]
module = importlib.import_module(module_name)
owner = getattr(module, owner_name) if owner_name else module
calls, real, record = [], getattr(owner, attr), eval(record_source)
def counted(*a):
    done = real(*a)
    calls.append(record(a, done))
    return done
setattr(owner, attr, counted)
sys.argv = [script, *args]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    open(calls_file, "w").write(json.dumps(calls))
"""


def counting(function: str, record: str, calls_file: Path) -> tuple[str, ...]:
    """`run`'s wrapper for `module[.Class]:attr`, recording `record` (a lambda of (args, result))."""
    module, attr = function.split(":")
    owner = ""
    if "." in attr:
        owner, attr = attr.split(".")
    return ("-c", COUNTING_WRAPPER, module, owner, attr, record, str(calls_file))


# solo.train.train_step: every call's loss and what the step counted.
TRAIN_STEP_CALLS = ('lambda a, done: {"step": a[2], "loss": done.stats.loss, "flops": done.flops, '
                    '"tokens": done.stats.tokens, "training": type(a[0]).__name__}')


def test_train_throughput_runs_the_training_step_path(tmp_path):
    calls_file, result_file = tmp_path / "calls.json", tmp_path / "result.json"
    out = run("train_throughput.py", "--json", str(result_file),
              wrapper=counting("solo.train:train_step", TRAIN_STEP_CALLS, calls_file))
    assert "fit over" in out and "vs the SOLO paper's 20K tokens/s" in out, out[-3000:]
    assert (tmp_path / "result.json").read_text().strip().startswith(("{", "["))
    # Every timed step is solo.train.train_step (smoke: 3 measurements of 1 warm-up + 2 timed steps),
    # and the losses, tokens and FLOPs the benchmark reports are the ones that step returned.
    calls, results = json.loads(calls_file.read_text()), json.loads(result_file.read_text())["results"]
    assert {c["training"] for c in calls} == {"Training"}
    assert [c["step"] for c in calls] == [0, 1, 2] * 3
    assert [c["loss"] for c in calls] == [loss for r in results for loss in r["losses"]]
    assert [(c["flops"], c["tokens"]) for c in calls[2::3]] == [(r["flops"], r["tokens"]) for r in results]


def test_read_ahead_memory_measures_a_reading_and_a_receiving_tp_rank():
    out = run("read_ahead_memory.py")
    reading = re.search(r"a rank that reads\s*: RSS \+\s*([\d.]+) MiB, collated tensors\s*([\d.]+) MiB", out)
    receiving = re.search(r"a rank that receives\s*: RSS \+\s*([\d.]+) MiB, collated tensors\s*([\d.]+) MiB", out)
    assert reading and receiving, out[-3000:]
    assert float(reading.group(2)) > 1 and float(receiving.group(2)) == 0.0
    assert "TP rank != 0: before" in out


# solo.data.loader.WorkerLoader.step: how many micro batches each call handed out, so the test sees
# that the worker numbers come from the project's loader.
WORKER_STEP_CALLS = 'lambda a, batches: {"step": a[1], "workers": a[0].workers, "micro_batches": len(batches)}'


def test_data_loader_reports_every_pixel_kind_through_the_worker_loader(tmp_path):
    calls_file = tmp_path / "calls.json"
    out = run("data_loader.py", wrapper=counting("solo.data.loader:WorkerLoader.step", WORKER_STEP_CALLS, calls_file))
    assert "step time" in out and "train_throughput_h100.log" in out, out[-3000:]
    kinds = {kind: (float(size), quality) for kind, size, quality in
             re.findall(r"^\s*(raw|png|jpeg):\s+([\d.]+) bytes per vision token, (.*)$", out, re.M)}
    assert set(kinds) == {"raw", "png", "jpeg"}, out[-3000:]
    assert kinds["raw"] == (3072.0, "exact") and kinds["png"][1] == "exact", out[-3000:]
    assert kinds["jpeg"][0] < kinds["png"][0] < 3072 and kinds["jpeg"][1].startswith("PSNR min"), out[-3000:]
    ratios = re.findall(r"(\d) workers: .*loader/step ([\d.]+)", out)
    assert [w for w, _ in ratios] == ["2", "4", "8"] * 3 and all(float(r) > 0 for _, r in ratios), out[-3000:]
    calls = json.loads(calls_file.read_text())
    # One warm-up and one timed step of 2 micro batches, per kind, from one worker.
    assert calls == [{"step": s, "workers": 1, "micro_batches": 2} for _ in range(3) for s in (0, 1)]
