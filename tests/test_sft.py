"""Supervised fine-tuning end to end on CPU: solo-preprocess sft -> solo.train (one gloo process) ->
solo-convert solo-to-hf -> greedy generation. The token closing an assistant turn carries loss, so
a tiny model learns to end its answer with it (chatml's <|im_end|> is an id >= 32000, the one
exception to no loss there); the stage refuses shards of another template."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from solo.data.batch import collate
from solo.preprocess.cli import main as preprocess
from solo.tokenizer import SOLOTokenizer
from tests.torchrun import free_port
from tests.warm import run_train

TOK = SOLOTokenizer.default()
SEQ = 128
PAIRS = [("What colour is the sky?", "Blue."), ("Name a fruit.", "An apple."), ("Say hi.", "Hello there!")]


def write_conversations(path: Path, copies: int = 30) -> None:
    records = [{"id": f"{k}-{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
               for i in range(copies) for k, (q, a) in enumerate(PAIRS)]
    path.write_text(json.dumps(records))


def stage_config(root: Path, template: str, shards: Path, steps: int = 50) -> Path:
    cfg = {
        "stage": "sft", "model": {"preset": "tiny", "patch_size": 32},
        "optimizer": {"lr": 1e-2, "min_lr": 3e-3, "lr_warmup_steps": 2},  # loss about 0.05 after 50 steps
        "data": {"seq_length_tokens": SEQ, "template": template,
                 "sources": [{"name": "sft", "path": str(shards), "fraction": 1.0}]},
        "train_steps": steps, "global_batch_size": 4, "precision": "fp32",
        "save_dir": str(root / "run"), "save_interval_steps": steps, "wandb_mode": "disabled",
    }
    path = root / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def chatml_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    write_conversations(root / "conversations.json")
    (root / "images").mkdir()
    assert preprocess(["sft", "--input", str(root / "conversations.json"), "--images", str(root / "images"),
                       "--output", str(root / "shards"), "--template", "chatml", "--seq-length", str(SEQ),
                       "--workers", "1"]) == 0
    return root


def test_collate_gives_loss_to_the_stop_id_only(tmp_path):
    ids = [TOK.bos_id, *TOK.encode("hi"), TOK.im_end_id, TOK.vision_start_id, TOK.eos_id]
    sample = SimpleNamespace(tokens=np.array(ids), loss_mask=np.ones(len(ids), dtype=np.uint8),
                             document_lengths=[len(ids)], patches=[])
    labels = collate([sample], 16).labels[0, :len(ids) - 1].tolist()
    without = collate([sample], 16).loss_mask[0, :len(ids) - 1]
    with_stop = collate([sample], 16, stop_id=TOK.im_end_id).loss_mask[0, :len(ids) - 1]
    at = {i: labels.index(i) for i in (TOK.im_end_id, TOK.vision_start_id, TOK.eos_id)}
    assert without[at[TOK.im_end_id]] == 0 and with_stop[at[TOK.im_end_id]] == 1
    assert without[at[TOK.vision_start_id]] == with_stop[at[TOK.vision_start_id]] == 0  # other specials: never
    assert without[at[TOK.eos_id]] == with_stop[at[TOK.eos_id]] == 1


@pytest.mark.distributed
@pytest.mark.slow
def test_a_tiny_sft_run_learns_to_end_its_answer(chatml_run):
    from solo.checkpoint import read_meta, resolve_checkpoint
    from solo.convert import generate

    root = chatml_run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(free_port())}
    trained = run_train([stage_config(root, "chatml", root / "shards")], env, root / "train.out", root / "train.err",
                        timeout=600)  # one process, started warm (tests/warm.py)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-5000:]
    checkpoint = resolve_checkpoint(root / "run")
    assert read_meta(checkpoint)["template"] == "chatml"
    proc = subprocess.run([sys.executable, "-m", "solo.convert.cli", "solo-to-hf", "--checkpoint", str(checkpoint),
                           "--output", str(root / "hf")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, processor = generate.load(root / "hf", dtype="float32")
    assert processor.template == "chatml"  # recorded through training and export
    for question, answer in PAIRS:
        ids = generate.generate(model, processor, None, question, max_new_tokens=16)
        assert ids[-1] == TOK.im_end_id, (question, processor.decode(ids))  # it stops, with the stop id
        assert processor.decode(ids[:-1]) == answer
    # Before the answer ends, <|im_end|> is unlikely; at its end, the most likely token.
    inputs = processor(None, PAIRS[0][0])
    with torch.no_grad():
        probs = model(**generate.fuyu_inputs(model, inputs)).logits[0, -1].softmax(-1)
    assert probs[TOK.im_end_id] < 0.05


def test_a_stage_refuses_shards_of_another_template(chatml_run, tmp_path):
    config = stage_config(tmp_path, "solo-inst", chatml_run / "shards", steps=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(free_port())}
    proc = run_train([config], env, tmp_path / "train.out", tmp_path / "train.err", timeout=300)  # tests/warm.py
    assert proc.returncode == 2
    assert "shard-00000: supervised shard laid out in template 'chatml'" in proc.stderr
    assert "data.template='solo-inst'" in proc.stderr
