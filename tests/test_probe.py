"""solo.probe: greedy answers on held-out labelled images inside training, on megatron-core.

One torchrun world runs three tiny stage-1 trainings (TP=2 with the probe, TP=2 without it,
TP=1 x DP=2 with it); the probe's answers are then compared with the exported model's greedy
generation (transformers' FuyuForCausalLM.generate through `solo.convert.generate`)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from solo.config import ConfigError, config_from_dict
from solo.probe import _untouched, correct
from tests.shard_fixtures import write_sources
from tests.torchrun import torchrun

STEPS = 3
PROBE = {"interval_steps": 2, "images": 6, "max_new_tokens": 3}
SAVED = 2  # the checkpoint compared with the export (the step-3 model answers </s> at once)


def stage_config(root: Path, name: str, tensor_parallel: int, probe: bool) -> Path:
    cfg = {
        "stage": "stage1", "model": {"preset": "tiny", "patch_size": 32},
        "parallel": {"tensor_parallel": tensor_parallel},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "lr_warmup_steps": 2},
        "data": {"seq_length_tokens": 256, "sources": [
            {"name": "images", "path": str(root / "shards" / "images"), "fraction": 0.7},
            {"name": "text", "path": str(root / "shards" / "text"), "fraction": 0.3}]},
        "train_steps": STEPS, "global_batch_size": 4, "precision": "fp32",
        "save_dir": str(root / "runs" / name), "save_interval_steps": SAVED, "wandb_mode": "disabled",
        # the training photographs themselves: the test is about the arithmetic, not generalization
        "probe": {"path": str(root / "shards" / "images"), **PROBE} if probe else {},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    write_sources(root / "shards")
    configs = [stage_config(root, "tp2", 2, True), stage_config(root, "tp2_off", 2, False),
               stage_config(root, "tp1_dp2", 1, True)]
    torchrun("probe_checks.py", 2, "--out", root / "rng.json", *configs)
    return root


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def generations(run: Path, step: int) -> list[dict]:
    return json.loads((run / "probe" / f"step_{step:07d}.json").read_text())["generations"]


@pytest.mark.distributed
def test_the_probe_changes_no_loss_and_no_rng_state(runs):
    on, off = metrics(runs / "runs" / "tp2"), metrics(runs / "runs" / "tp2_off")
    assert [r["loss"] for r in on] == [r["loss"] for r in off]
    assert [r["grad_norm"] for r in on] == [r["grad_norm"] for r in off]
    rng = json.loads((runs / "rng.json").read_text())
    assert rng[str(runs / "tp2.yaml")] == rng[str(runs / "tp2_off.yaml")]
    # logged every interval_steps and after the last step, with the step's own time apart
    assert [r["step"] for r in on if "probe_accuracy" in r] == [2, 3]
    assert all("probe_accuracy" not in r for r in off)
    assert all(r["probe_images"] == PROBE["images"] and r["probe_s"] > 0 for r in on if "probe_accuracy" in r)


@pytest.mark.distributed
def test_the_probe_answers_alike_at_tp1_dp2_and_tp2(runs):
    for step in (2, 3):
        tp2, dp2 = generations(runs / "runs" / "tp2", step), generations(runs / "runs" / "tp1_dp2", step)
        assert [g["generated_ids"] for g in tp2] == [g["generated_ids"] for g in dp2]
        assert [g["label"] for g in tp2] == [g["label"] for g in dp2]
    accuracy = lambda run: [r["probe_accuracy"] for r in metrics(run) if "probe_accuracy" in r]  # noqa: E731
    assert accuracy(runs / "runs" / "tp2") == accuracy(runs / "runs" / "tp1_dp2")


@pytest.mark.distributed
def test_the_probe_answers_as_the_exported_model_generates(runs):
    from solo.convert.generate import generate, load
    from solo.convert.processor import SOLOProcessor
    from solo.demo_data import PHOTOS, skimage_photo

    hf = runs / "hf"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run(["solo-convert", "solo-to-hf", "--checkpoint", str(runs / "runs" / "tp2" / f"iter_{SAVED:07d}"),
                    "--output", str(hf)],
                   check=True, env=env, capture_output=True)
    model, exported = load(str(hf))
    # the processor at the fixture's image size (tests/shard_fixtures.py: max_side 64)
    processor = SOLOProcessor(exported.tokenizer, patch_size=32, max_image_side=64, template="plain")
    probed = generations(runs / "runs" / "tp2", SAVED)
    for g, (file, (label, _)) in zip(probed, PHOTOS.items(), strict=False):
        ids = generate(model, processor, skimage_photo(file), max_new_tokens=PROBE["max_new_tokens"])
        ids = ids[:-1] if ids and ids[-1] in processor.stop_ids() else ids
        assert g["label"] == label and g["generated_ids"] == ids, (file, g, ids)
        assert g["correct"] == (processor.decode(ids).strip() == label)
    assert any(g["generated_ids"] for g in probed)  # the model said something: the comparison is not empty


def test_scoring():
    assert correct("exact", " seven ", "seven") and not correct("exact", "seven.", "seven")
    assert correct("contains", "A Tabby cat, looking left.", "tabby cat")
    assert not correct("contains", "a cattle", "cat") and not correct("contains", "", "cat")


def test_the_probe_leaves_mode_grad_and_rng_as_they_were():
    module = torch.nn.Linear(2, 2)
    module.train()
    state = torch.get_rng_state()
    expected = torch.rand(3)
    torch.set_rng_state(state)
    with _untouched(module):
        assert not module.training and not torch.is_grad_enabled()
        torch.rand(100)
    assert module.training and torch.is_grad_enabled()
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("probe, message", [
    ({"path": "shards/val"}, "go together"),
    ({"interval_steps": 5}, "go together"),
    ({"path": "x", "interval_steps": 5, "match": "fuzzy"}, "probe.match"),
    ({"path": "x", "interval_steps": 5, "images": 0}, "probe.images"),
    ({"path": "x", "interval_steps": 5, "match": "exact"}, "pipeline_parallel=2"),
])
def test_bad_probe_settings_are_clear_errors(probe, message):
    parallel = {"pipeline_parallel": 2} if "pipeline" in message else {}
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"probe": probe, "parallel": parallel})
