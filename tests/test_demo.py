"""The main job at its smallest size: every phase of `python -m solo.demo` runs and leaves its outputs."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from solo.data.shards import list_shards, open_shard


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_quick_runs_every_phase(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "solo.demo", "--out", str(out), "--quick"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    for source in ("imagenet", "digits", "digits-heldout", "captions", "sft", "text"):  # preprocess
        prefixes = list_shards(out / "shards" / source)
        assert prefixes and len(open_shard(prefixes[0], verify_checksum=True)) > 0
    for stage in ("stage1", "stage2", "stage3", "sft"):  # training, chained
        assert (out / "runs" / stage / "latest").read_text().strip().startswith("iter_")
        assert (out / "runs" / stage / "result.json").exists()
    meta = json.loads((out / "runs" / "stage2" / "iter_0000002" / "solo_meta.json").read_text())
    assert meta["config"]["init_from"].endswith("runs/stage1")
    for stage in ("stage1", "sft"):  # export
        hf = out / "hf" / stage
        assert (hf / "config.json").exists() and (hf / "model.safetensors.index.json").exists()
        assert json.loads((hf / "config.json").read_text())["architectures"] == ["FuyuForCausalLM"]

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["losses"]) == {"stage1", "stage2", "stage3", "sft"}
    for stage in ("stage1", "sft"):  # validation on held-out data: the digits, the held-out conversations
        assert summary["losses"][stage]["final_val_loss"] > 0
    assert len(summary["stage1_generations"]) == 5 and 0.0 <= summary["stage1_accuracy"] <= 1.0
    assert all(isinstance(r["generated"], str) for r in summary["final_generations"])
    assert summary["shards"]["imagenet"]["vision_tokens"] > 0 and summary["shards"]["text"]["text_tokens"] > 0
    with Image.open(summary["loss_curves"]) as png:
        assert png.size[0] > 100
    assert "stage-1 model names the training photographs" in proc.stdout
    # the probe after each stage's last step, on the 20 held-out digits of the first 100
    assert [summary["heldout_digits"][s]["images"] for s in ("stage1", "stage2", "stage3")] == [20, 20, 20]
    assert 0.0 <= summary["heldout_digits"]["stage1"]["accuracy"] <= 1.0
    assert "held-out digits" in proc.stdout
