"""Validation: solo-preprocess's held-out split is deterministic and disjoint from the training shards;
under torchrun/gloo the held-out loss solo-train logs (solo.evaluate) equals the same samples' loss
recomputed one by one in another rank layout, and evaluating changes nothing about training (the
losses, weights, optimizer state and RNG states of a run with and without validation are identical)."""

import json
import re
from pathlib import Path

import pytest
import yaml

from solo.data.shards import list_shards, open_shard
from solo.demo_data import python_docstrings
from solo.preprocess.cli import main as preprocess
from solo.tokenizer import SOLOTokenizer
from tests.shard_fixtures import image_documents, write_source, write_sources
from tests.test_reliability import assert_same_state, losses
from tests.test_train import stage_config
from tests.torchrun import torchrun

STEPS = 4
TOK = SOLOTokenizer.default()
RECORDS = 120


def record_ids(folder: Path) -> list[int]:
    """The `record N` of every document in a folder's shards (one per record: short texts)."""
    ids = []
    for prefix in list_shards(folder):
        shard = open_shard(prefix)
        for i in range(len(shard)):
            sample, start = shard.sample(i, with_patches=False), 0
            for length in sample.document_lengths:
                ids += [int(n) for n in re.findall(r"record (\d+)", TOK.decode(sample.tokens[start:start + length]))]
                start += length
    return ids


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("holdout")
    texts = python_docstrings()
    lines = [json.dumps({"text": f"record {i}: {texts[i][:200]}"}) for i in range(RECORDS)]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return root


def split(root: Path, name: str, *options: str) -> tuple[list[int], list[int]]:
    out = root / name
    assert preprocess(["text", "--input", str(root / "corpus.jsonl"), "--output", str(out), "--seq-length", "256",
                       "--holdout-fraction", "0.25", *options]) == 0
    return record_ids(out), record_ids(out / "heldout")


def test_holdout_is_disjoint_complete_and_independent_of_shards_and_workers(corpus):
    train, heldout = split(corpus, "a", "--shard-size", "40", "--workers", "1")
    assert sorted(train + heldout) == list(range(RECORDS))  # every record once: none on both sides
    assert 0.1 * RECORDS < len(heldout) < 0.4 * RECORDS
    again_train, again_heldout = split(corpus, "b", "--shard-size", "25", "--workers", "2")
    assert sorted(again_heldout) == sorted(heldout) and sorted(again_train) == sorted(train)
    # A rerun into the same folder finds both finished; another fraction is refused, not mixed in.
    assert split(corpus, "a", "--shard-size", "40", "--workers", "1") == (train, heldout)
    assert preprocess(["text", "--input", str(corpus / "corpus.jsonl"), "--output", str(corpus / "a"),
                       "--seq-length", "256", "--shard-size", "40", "--holdout-fraction", "0.5"]) == 2


def test_holdout_fraction_out_of_range_is_a_usage_error(corpus, capsys):
    with pytest.raises(SystemExit) as exit_:
        preprocess(["text", "--input", str(corpus / "corpus.jsonl"), "--output", str(corpus / "c"),
                    "--holdout-fraction", "1.5"])
    assert exit_.value.code == 2 and "--holdout-fraction: must be in [0, 1), got 1.5" in capsys.readouterr().err


def write_heldout(root: Path) -> dict[str, int]:
    """Held-out folders of both kinds (photographs, docstrings training never sees); their sample counts."""
    tok = SOLOTokenizer.default()
    texts = [[tok.bos_id, *tok.encode(t)[:250], tok.eos_id] for t in python_docstrings()[300:308]]
    write_source(root / "heldout-images", image_documents(tok) * 4, 256, samples_per_shard=1)
    write_source(root / "heldout-text", [(t, [0] + [1] * (len(t) - 1), []) for t in texts], 256, samples_per_shard=2)
    return {name: json.loads((root / name / "manifest.json").read_text())["samples"]
            for name in ("heldout-images", "heldout-text")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 steps at DP=2 (2 ranks, TP=1) without and with validation every 2 steps on every
    held-out sample (each folder weighted by its share, so the blend reads each sample once)."""
    root = tmp_path_factory.mktemp("validation")
    write_sources(root / "shards")
    counts = write_heldout(root)
    total = sum(counts.values())
    assert total % 2 == 0  # eval_samples is split over the 2 data-parallel ranks
    eval_sources = [{"name": name, "path": str(root / name), "fraction": n / total} for name, n in counts.items()]
    common = {"train_steps": STEPS, "save_interval_steps": STEPS, "parallel": {"tensor_parallel": 1}}
    plain = stage_config(root, "stage1", save_dir=root / "plain", **common)
    evaluated = stage_config(root, "stage1", save_dir=root / "evaluated", eval_interval_steps=2, eval_samples=total,
                             **common)
    cfg = yaml.safe_load(evaluated.read_text())
    cfg["data"]["eval_sources"] = eval_sources
    evaluated.write_text(yaml.safe_dump(cfg))
    torchrun("-m solo.train", 2, plain)
    log = torchrun("-m solo.train", 2, evaluated)
    return {"root": root, "plain": root / "plain", "evaluated": root / "evaluated", "config": evaluated,
            "total": total, "log": log}


def rows(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_validation_changes_nothing_about_training(runs):
    assert losses(runs["evaluated"]) == losses(runs["plain"])  # exact, every step
    # Weights, Adam moments, scheduler and every saved RNG state: bit for bit.
    assert_same_state(runs["evaluated"] / f"iter_{STEPS:07d}", runs["plain"] / f"iter_{STEPS:07d}")


@pytest.mark.distributed
def test_validation_is_logged_at_its_interval_like_the_training_loss(runs):
    evaluated = {r["step"]: r for r in rows(runs["evaluated"]) if "val_loss" in r}
    assert sorted(evaluated) == [2, 4]
    assert all(r["val_vl_loss"] is not None and r["val_text_loss"] is not None for r in evaluated.values())
    assert evaluated[4]["val_loss"] < evaluated[2]["val_loss"]  # the model learns what the held-out data holds
    assert not any("val_loss" in r for r in rows(runs["plain"]))
    assert f"step 4/{STEPS} | val loss {evaluated[4]['val_loss']:.4f}" in runs["log"]


@pytest.mark.distributed
def test_validation_loss_equals_a_recomputation_in_another_layout(runs, tmp_path):
    """The logged step-4 losses (DP=2, megatron-core's forward-only schedule, the held-out blend) equal
    the step-4 checkpoint's loss over every held-out sample, one at a time, at TP=2 (resharded)."""
    out = tmp_path / "recomputed.json"
    root = runs["root"]
    torchrun("heldout_loss.py", 2, runs["config"], "parallel.tensor_parallel=2", "--checkpoint", runs["evaluated"],
             "--out", out, "--folders", root / "heldout-images", root / "heldout-text")
    recomputed = json.loads(out.read_text())
    logged = rows(runs["evaluated"])[-1]
    assert recomputed["samples"] == runs["total"]
    for key in ("loss", "vl_loss", "text_loss"):
        assert logged[f"val_{key}"] == pytest.approx(recomputed[key], rel=1e-5), key


def test_eval_settings_are_checked_before_compute(tmp_path):
    from solo.config import ConfigError, config_from_dict
    from solo.evaluate import eval_data

    counts = write_heldout(tmp_path)
    base = {"model": {"preset": "tiny", "patch_size": 32}, "data": {"seq_length_tokens": 256, "sources": [
        {"name": "text", "path": str(tmp_path / "heldout-text"), "fraction": 1.0}]}, "eval_interval_steps": 2}
    with pytest.raises(ConfigError, match="eval_interval_steps=2 needs data.eval_sources"):
        config_from_dict(base)
    base["data"]["eval_sources"] = [{"name": "images", "path": str(tmp_path / "heldout-images"), "fraction": 1.0}]
    with pytest.raises(ValueError, match="eval_samples 3 is not divisible by data-parallel size 2"):
        eval_data(config_from_dict(base, ["eval_samples=3"]), dp_size=2)
    too_many = counts["heldout-images"] + 1
    with pytest.raises(ValueError, match=f"eval_samples={too_many} takes {too_many} samples of data.eval_sources "
                                         f"'images', which holds {counts['heldout-images']}"):
        eval_data(config_from_dict(base, [f"eval_samples={too_many}"]), dp_size=1)
    fits = config_from_dict(base, [f"eval_samples={too_many - 1}"])
    assert eval_data(fits, dp_size=1).global_batch_size == too_many - 1


@pytest.mark.distributed
def test_solo_plot_draws_the_validation_losses(runs, tmp_path):
    from solo.plot import plot_runs

    without = tmp_path / "without-val"
    without.mkdir()
    stripped = [{k: v for k, v in r.items() if not k.startswith("val_")} for r in rows(runs["evaluated"])]
    (without / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stripped))
    drawn = plot_runs([runs["evaluated"]], tmp_path / "with.png").read_bytes()
    assert drawn != plot_runs([without], tmp_path / "without.png").read_bytes()
