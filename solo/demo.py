"""The main job: the whole SOLO recipe end to end on CPU, on real data that ships in packages.

    python -m solo.demo --out demo_out          (scripts/demo.sh installs first, then runs this)

Phases, each a real command a user would run: build inputs (`solo.demo_data`), `solo-preprocess`
for each source, `solo-train` for stages 1 -> 2 -> 3 under torchrun (TP=2 on 2 gloo ranks),
`solo-convert solo-to-hf`, then greedy generation with the exported `FuyuForCausalLM`. After
stage 1 the model must name the class of each training photograph (memory) and of held-out
handwritten digits it never saw (seeing: the training loop's probe, `solo.probe`, on scikit-learn's
digits, chance 10%); the demo reports both, a summary table and a PNG of the loss and probe curves.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import yaml

from solo import demo_data

REPO = Path(__file__).resolve().parent.parent
STAGES = ("stage1", "stage2", "stage3", "sft")  # the paper's three pretraining stages, then its SFT
SFT_HOLDOUT_FRACTION = 0.2  # of the conversations, for the SFT stage's validation loss
FINAL_QUESTION = "What is shown in this picture?"  # the demo conversations' first question
# --quick: the same phases at the smallest size that still exercises every code path (tests).
# (5 photographs: the 5th conversation is the one --holdout-fraction 0.2 holds out.)
QUICK = {"photos": 5, "images_per_class": 1, "texts": 8, "digits": 100,
         "steps": {"stage1": 4, "stage2": 2, "stage3": 2, "sft": 2}}
DIGITS_TARGET = 0.9  # held-out digit accuracy after stage 1 (chance: 0.1)
DIGIT_SIDE = 32  # the 8x8 scans upscaled to one patch of the tiny-demo model (patch_size 32)


class Phases:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - start
        print(f"=== {name}: done in {self.seconds[name]:.1f} s ===", flush=True)
        return result


def sh(*cmd: str) -> None:
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WANDB_SILENT": "true"}
    subprocess.run(cmd, check=True, env=env, cwd=REPO)


def build_inputs(out: Path, photos: dict, images_per_class: int, texts: int | None, digits: int | None,
                 digit_side: int) -> Path:
    inputs = out / "inputs"
    demo_data.write_imagenet(inputs / "imagenet", photos, images_per_class)
    demo_data.write_digits(inputs / "digits", digit_side, digits)
    demo_data.write_caption_tar(inputs / "captions" / "00000.tar", photos)
    demo_data.write_llava(inputs / "sft" / "conversations.json", inputs / "sft" / "images", photos)
    corpus = demo_data.python_docstrings()
    demo_data.write_text_corpus(inputs / "text" / "python_docs.jsonl.zst", corpus[:texts] if texts else corpus)
    return inputs


def in_process(command: str, module: str, *args: str) -> None:
    """A console command run in this process: the same `main` its script calls, without a fresh
    interpreter importing torch and megatron-core for each of a dozen small runs. Warnings are
    ignored, as for the commands run in their own process (PYTHONWARNINGS=ignore in `sh`)."""
    print(f"$ {command} " + " ".join(args), flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = importlib.import_module(module).main(list(args))
    if code != 0:
        raise SystemExit(f"{command} {args[0]} exited {code}")


def solo_preprocess(*args: str) -> None:
    in_process("solo-preprocess", "solo.preprocess.cli", *args)


def preprocess(inputs: Path, shards: Path, seq_length: int, max_side: int) -> None:
    common = ["--seq-length", str(seq_length), "--max-side", str(max_side), "--workers", "2", "--seed", "0"]
    solo_preprocess("imagenet", "--input", str(inputs / "imagenet" / "train"),
       "--synsets", str(inputs / "imagenet" / "LOC_synset_mapping.txt"), "--output", str(shards / "imagenet"), *common)
    for split, name in (("train", "digits"), ("heldout", "digits-heldout")):
        solo_preprocess("imagenet", "--input", str(inputs / "digits" / split),
           "--synsets", str(inputs / "digits" / "LOC_synset_mapping.txt"), "--output", str(shards / name), *common)
    solo_preprocess("captions", "--input", str(inputs / "captions" / "*.tar"),
       "--output", str(shards / "captions"), *common)
    solo_preprocess("sft", "--input", str(inputs / "sft" / "conversations.json"),
       "--images", str(inputs / "sft" / "images"), "--output", str(shards / "sft"),
       "--holdout-fraction", str(SFT_HOLDOUT_FRACTION), *common)
    solo_preprocess("text", "--input", str(inputs / "text" / "*.jsonl.zst"),
       "--output", str(shards / "text"), *common)
    for name in ("imagenet", "digits", "digits-heldout", "captions", "sft", "text"):
        solo_preprocess("stats", str(shards / name))


def stage_config(out: Path, stage: str, steps: int | None) -> Path:
    """configs/tiny-<stage>.yaml with its demo_out/ paths moved under `out`."""
    text = (REPO / "configs" / f"tiny-{stage}.yaml").read_text().replace("demo_out/", f"{out}/")
    cfg = yaml.safe_load(text)
    if steps is not None:
        cfg["train_steps"] = steps
        cfg["save_interval_steps"] = steps
        cfg["log_interval_steps"] = 1
        if "eval_samples" in cfg:  # the quick inputs hold out one packed sample per source
            cfg["eval_samples"] = cfg["micro_batch_size"] = 1
    path = out / "configs" / f"{stage}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(config: Path) -> None:
    from solo.distributed import free_port

    sh(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
       f"--master_port={free_port()}", "-m", "solo.train", str(config))


def export(run: Path, hf: Path) -> None:
    if hf.exists():
        import shutil

        shutil.rmtree(hf)
    hf.parent.mkdir(parents=True, exist_ok=True)
    in_process("solo-convert", "solo.convert.cli", "solo-to-hf", "--checkpoint", str(run), "--output", str(hf))


def first_image(inputs: Path, k: int) -> Path:
    return sorted((inputs / "imagenet" / "train" / f"n{90000000 + k:08d}").glob("*.JPEG"))[0]


def name_photographs(hf: Path, inputs: Path, photos: dict) -> list[dict]:
    """Greedy generation for the first image of each class, next to its label (one model load)."""
    from solo.convert.generate import generate, load

    model, processor = load(str(hf))
    rows = []
    for k, (file, (label, _)) in enumerate(photos.items()):
        ids = generate(model, processor, str(first_image(inputs, k)), max_new_tokens=16)
        text = processor.decode([i for i in ids if i != processor.tokenizer.eos_id]).strip()
        rows.append({"photo": file, "label": label, "generated": text, "correct": text == label})
    return rows


def solo_generate(hf: Path, inputs: Path, photos: dict) -> list[dict]:
    """What a user runs: the `solo-generate` command on the exported fine-tuned model, every photograph
    in one batch, asked a question of the conversations in the template it was fine-tuned on (solo-inst).
    One answer per line; should an answer hold a line break, each photograph is asked on its own."""
    images = [str(first_image(inputs, k)) for k in range(len(photos))]
    answers = _solo_generate(hf, images)
    if len(answers) != len(images):
        answers = [" ".join(_solo_generate(hf, [image])) for image in images]
    return [{"photo": file, "label": label, "generated": text, "names_label": label.lower() in text.lower()}
            for (file, (label, _)), text in zip(photos.items(), answers, strict=True)]


def _solo_generate(hf: Path, images: list[str]) -> list[str]:
    cmd = ["solo-generate", "--model", str(hf), *(a for image in images for a in ("--image", image)),
           "--max-new-tokens", "16", "--prompt", FINAL_QUESTION]
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True, text=True)
    print(proc.stderr.strip().splitlines()[-1], flush=True)  # its tokens/s line
    return [line.strip() for line in proc.stdout.rstrip("\n").split("\n")]


def summarize(out: Path, phases: Phases, stage1_rows: list[dict], final_rows: list[dict]) -> dict:
    from solo.data.shards import list_shards, open_shard
    from solo.plot import plot_runs

    shards = {}
    for folder in sorted((out / "shards").iterdir()):
        manifests = [open_shard(p).manifest for p in list_shards(folder)]
        counts = [m.get("counts", {}) for m in manifests]
        shards[folder.name] = {
            "shards": len(manifests), "samples": sum(m["samples"] for m in manifests),
            "text_tokens": sum(c.get("text_tokens", 0) for c in counts),
            "vision_tokens": sum(c.get("vision_tokens", 0) for c in counts),
        }
    losses = {}
    for stage in STAGES:
        rows = [json.loads(line) for line in (out / "runs" / stage / "metrics.jsonl").read_text().splitlines()]
        losses[stage] = {"first": rows[0]["loss"], "final": rows[-1]["loss"],
                         "final_vl": rows[-1]["vl_loss"], "final_text": rows[-1]["text_loss"], "steps": len(rows)}
        evaluated = [r for r in rows if "val_loss" in r]
        if evaluated:  # solo.evaluate, on the stage's held-out data (data.eval_sources)
            losses[stage].update({f"final_{k}": evaluated[-1][k] for k in ("val_loss", "val_vl_loss", "val_text_loss")})
    png = plot_runs([out / "runs" / s for s in STAGES], out / "loss_curves.png")
    accuracy = sum(r["correct"] for r in stage1_rows) / len(stage1_rows)
    digits = heldout_digits(out)
    summary = {"shards": shards, "losses": losses, "seconds": phases.seconds, "stage1_accuracy": accuracy,
               "heldout_digits": digits, "stage1_generations": stage1_rows, "final_generations": final_rows,
               "loss_curves": str(png)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print("\n" + "=" * 78)
    print(f"{'source':<10} {'shards':>6} {'sequences':>9} {'text tokens':>12} {'vision tokens':>14}")
    for name, s in shards.items():
        print(f"{name:<10} {s['shards']:>6} {s['samples']:>9} {s['text_tokens']:>12,} {s['vision_tokens']:>14,}")
    print(f"\n{'stage':<8} {'steps':>5} {'first loss':>10} {'final loss':>10} {'vl loss':>8} {'text loss':>9} "
          f"{'val loss':>8} {'val vl':>7} {'val text':>8}   (val: held-out data)")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for stage, loss in losses.items():
        print(f"{stage:<8} {loss['steps']:>5} {loss['first']:>10.3f} {loss['final']:>10.3f} "
              f"{fmt(loss['final_vl']):>8} {fmt(loss['final_text']):>9} {fmt(loss.get('final_val_loss')):>8} "
              f"{fmt(loss.get('final_val_vl_loss')):>7} {fmt(loss.get('final_val_text_loss')):>8}")
    print("\nphase times: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.seconds.items())
          + f" (total {sum(phases.seconds.values()):.0f} s)")
    print(f"\nstage-1 model names the training photographs: {accuracy:.0%} correct")
    print("held-out digits (the probe in training, greedy, never trained on; chance 10%; stage 1: the name, "
          "later stages: named in the caption):")
    for stage, d in digits.items():
        curve = ", ".join(f"step {s} {a:.0%}" for s, a in d["curve"])
        print(f"  {stage:<8} {d['accuracy']:.1%} of {d['images']} ({curve}; {d['seconds_per_probe']:.1f} s a probe, "
              f"{d['share_of_training']:.1%} of the stage's time)")
    for r in stage1_rows:
        print(f"  {'ok ' if r['correct'] else 'BAD'} {r['photo']:<24} label {r['label']!r:<18} said {r['generated']!r}")
    named = sum(r["names_label"] for r in final_rows)
    print(f"\nfinal model (after SFT), `solo-generate` with the photograph and {FINAL_QUESTION!r}, greedy "
          f"(the answer names the label for {named} of {len(final_rows)}):")
    for r in final_rows:
        mark = "ok " if r["names_label"] else "-  "
        print(f"  {mark} {r['photo']:<24} label {r['label']!r:<18} -> {r['generated']!r}")
    print(f"\nloss curves: {png}\nsummary:     {out / 'summary.json'}")
    return summary


def heldout_digits(out: Path) -> dict:
    """Per stage: the probe's last accuracy, its curve, and what it cost (from metrics.jsonl)."""
    result = {}
    for stage in STAGES:
        rows = [json.loads(line) for line in (out / "runs" / stage / "metrics.jsonl").read_text().splitlines()]
        probes = [r for r in rows if "probe_accuracy" in r]
        if not probes:
            continue
        probe_s, step_s = sum(r["probe_s"] for r in probes), sum(r["step_s"] for r in rows)
        result[stage] = {"accuracy": probes[-1]["probe_accuracy"], "images": probes[-1]["probe_images"],
                         "curve": [(r["step"], r["probe_accuracy"]) for r in probes],
                         "seconds_per_probe": probe_s / len(probes), "share_of_training": probe_s / (probe_s + step_s)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m solo.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="working folder (inputs, shards, runs, exports)")
    parser.add_argument("--quick", action="store_true", help="smallest size, for the test suite")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    quick = QUICK if args.quick else None
    photos = dict(list(demo_data.PHOTOS.items())[: quick["photos"]]) if quick else demo_data.PHOTOS
    seq_length = yaml.safe_load((REPO / "configs" / "tiny-stage1.yaml").read_text())["data"]["seq_length_tokens"]
    max_side = yaml.safe_load((REPO / "configs" / "tiny-stage1.yaml").read_text())["model"]["max_image_side"]

    phases = Phases()
    inputs = phases.run("inputs", build_inputs, out, photos, quick["images_per_class"] if quick else 3,
                        quick["texts"] if quick else None, quick["digits"] if quick else None, DIGIT_SIDE)
    phases.run("preprocess", preprocess, inputs, out / "shards", seq_length, max_side)
    for stage in STAGES:
        config = stage_config(out, stage, quick["steps"][stage] if quick else None)
        phases.run(stage, train, config)
    phases.run("export", lambda: [export(out / "runs" / s, out / "hf" / s) for s in ("stage1", "sft")])
    stage1_rows = phases.run("generate stage1", name_photographs, out / "hf" / "stage1", inputs, photos)
    final_rows = phases.run("generate final", solo_generate, out / "hf" / "sft", inputs, photos)
    summary = summarize(out, phases, stage1_rows, final_rows)
    # The check of the main job: stage 1 (ImageNet-style labels) must have taught the tiny model
    # the name of every training photograph. --quick trains too few steps for that.
    if not quick and summary["stage1_accuracy"] < 1.0:
        wrong = [r["photo"] for r in stage1_rows if not r["correct"]]
        print(f"\nCHECK FAILED: after stage 1 the model misnames {len(wrong)} of {len(stage1_rows)} training "
              f"photographs ({', '.join(wrong)}): it did not learn stage 1", file=sys.stderr)
        return 1
    digits = summary["heldout_digits"]["stage1"]
    if not quick and digits["accuracy"] < DIGITS_TARGET:
        print(f"\nCHECK FAILED: after stage 1 the model names {digits['accuracy']:.1%} of {digits['images']} "
              f"held-out digits, below {DIGITS_TARGET:.0%}: it did not learn to read them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
