"""The GPU benchmarks keep working: their CPU smoke modes run the same code paths on a tiny model.

(What they measure on a GPU is in docs/*.log; CI has no GPU.)"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--cpu-smoke", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_gpu_checks_pass_on_the_cpu():
    out = run("gpu_checks.py")
    assert "ALL PASS" in out and "FAIL" not in out.replace("ALL PASS", ""), out[-3000:]
    assert "isolation[fp32] docs 2-4 unchanged when docs 0 and 1 change" in out


def test_train_throughput_runs_the_training_step_path(tmp_path):
    out = run("train_throughput.py", "--json", str(tmp_path / "result.json"))
    assert "fit over" in out and "vs the SOLO paper's 20K tokens/s" in out, out[-3000:]
    assert (tmp_path / "result.json").read_text().strip().startswith(("{", "["))
