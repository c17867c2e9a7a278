"""Step 4 of the recipe, instruction fine-tuning, as a stage of this framework: configs/sft.yaml holds
the paper's settings; the tiny SFT stage (configs/tiny-sft.yaml, the demo's) trains on solo-preprocess
sft shards in the released model's template with a held-out split, validates on it, and has every
guarantee of the pretraining stages: a preempted run saves, and resumes to the uninterrupted run's
losses, validation losses and final state, bit for bit."""

import dataclasses
import json
import signal
from pathlib import Path

import psutil
import pytest
import yaml

from solo.config import load_config
from solo.demo_data import PHOTOS, write_llava
from solo.preprocess.cli import main as preprocess
from tests.test_reliability import assert_resumed_exactly, launch, output, wait_for_steps
from tests.torchrun import torchrun

REPO = Path(__file__).resolve().parent.parent
STEPS = 6  # as tests/test_reliability.py's assert_resumed_exactly expects
TEXT_PAIRS = [("What colour is the sky?", "Blue."), ("Name a fruit.", "An apple."), ("Say hi.", "Hello there!")]


def test_sft_config_holds_the_papers_settings():
    cfg = load_config(REPO / "configs" / "sft.yaml")
    o = cfg.optimizer
    assert (cfg.global_batch_size, o.lr, o.weight_decay, o.lr_decay_style) == (640, 1e-5, 0.1, "cosine")
    assert o.lr_warmup_steps > 0 and cfg.train_steps == 0  # linear warm-up; 0 steps: one epoch
    assert cfg.init_from == "runs/stage3" and cfg.data.template == "solo-inst"
    assert cfg.eval_interval_steps > 0 and cfg.data.eval_sources[0].path.endswith("/heldout")


def test_a_one_row_image_in_the_solo_inst_layout_is_measured_not_a_crash():
    """solo-inst closes an image with `<vision>` again: a one-row image (a photograph at most 32 px
    high) has no `<vrow_sep>` or `</vision>` to end its row, and counting padded images failed."""
    import numpy as np

    from solo.preprocess.documents import Document, padded_images
    from solo.tokenizer import SOLOTokenizer

    tok = SOLOTokenizer.default()
    ids = [tok.bos_id, tok.vision_start_id, tok.patch_id, tok.patch_id, tok.vision_start_id, *tok.encode("hi")]
    uniform = np.full((2, 3 * 32 * 32), 200, dtype=np.uint8)  # one colour: bands on the left and right
    doc = Document(np.array(ids, dtype=np.int32), np.zeros(len(ids), dtype=np.uint8), [uniform])
    assert padded_images(doc, tok, 32) == 1


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Conversations about the photographs (with images) and text-only ones, as solo-inst shards,
    a quarter of the records held out."""
    root = tmp_path_factory.mktemp("sft-stage")
    conversations = write_llava(root / "conversations.json", root / "images", PHOTOS, max_side=64)
    records = json.loads(conversations.read_text()) + [
        {"id": f"text-{k}-{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        for i in range(12) for k, (q, a) in enumerate(TEXT_PAIRS)]
    conversations.write_text(json.dumps(records))
    assert preprocess(["sft", "--input", str(conversations), "--images", str(root / "images"),
                       "--output", str(root / "shards"), "--template", "solo-inst", "--seq-length", "512",
                       "--max-side", "128", "--workers", "1", "--holdout-fraction", "0.25"]) == 0
    return root


def sft_config(root: Path, save_dir: Path) -> Path:
    """configs/tiny-sft.yaml as the demo runs it, its paths here, 6 steps, no stage-3 weights."""
    cfg = load_config(REPO / "configs" / "tiny-sft.yaml", [
        f"data.sources.sft.path={root / 'shards'}", f"data.eval_sources.sft.path={root / 'shards' / 'heldout'}",
        "init_from=", f"save_dir={save_dir}", f"train_steps={STEPS}", "save_interval_steps=2", "keep_checkpoints=3",
        "eval_interval_steps=2", "eval_samples=1", "wandb_mode=disabled"])
    path = save_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg)))))
    return path


def rows(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_sft_stage_validates_and_a_preempted_run_resumes_exactly(shards):
    reference = shards / "reference"
    torchrun("-m solo.train", 2, sft_config(shards, reference))
    meta = json.loads((reference / f"iter_{STEPS:07d}" / "solo_meta.json").read_text())
    assert meta["template"] == "solo-inst" and meta["stage"] == "sft"
    curve = rows(reference)
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert [r["step"] for r in curve if "val_loss" in r] == [2, 4, 6]

    save_dir = shards / "preempted"
    cfg = sft_config(shards, save_dir)
    proc = launch(cfg)
    wait_for_steps(proc, save_dir, 3)
    for rank in psutil.Process(proc.pid).children():  # as a scheduler preempts: SIGTERM to the ranks
        rank.send_signal(signal.SIGTERM)
    log = output(proc)
    assert proc.returncode == 0 and "stop requested (SIGTERM)" in log, log[-4000:]
    assert json.loads((save_dir / "result.json").read_text())["preempted"] is True
    torchrun("-m solo.train", 2, cfg)
    assert_resumed_exactly(save_dir, reference)  # losses, weights, Adam state, RNG: bit for bit
    assert [r.get("val_loss") for r in rows(save_dir)] == [r.get("val_loss") for r in curve]
