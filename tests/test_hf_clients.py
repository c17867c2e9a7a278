"""The export as a transformers user meets it: AutoProcessor (remote code), chat templates, batches,
bf16, pipeline, device_map, generation_config and the model card (solo/convert/processing_solo.py,
solo/convert/model_card.py, solo-generate).

One tiny export of a checkpoint whose meta says it is a solo-inst stage trained on a real shard
folder (its manifest.json written by solo-preprocess's own `folder_manifest`); the stock side runs
in a subprocess where `import solo` fails and the repository is not on sys.path.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from solo.config import DataConfig, DataSource, TrainConfig
from solo.convert import generate
from solo.convert.layouts import patches_to_fuyu
from solo.convert.processing_solo import CHAT_TEMPLATES, SOLOHFProcessor, SOLOImageProcessor
from solo.convert.processor import SOLOProcessor
from solo.demo_data import skimage_photo
from solo.templates import Turn, get_template
from solo.tokenizer import SOLOTokenizer
from solo.vision import encode_image, image_token_ids, normalize_patches
from tests.test_convert import cli, finish, make_mistral

TOK = SOLOTokenizer.default()
NEW_TOKENS = 4
PROMPTS = ["What is in the image?", "Describe this picture in a few words, please."]


def photo(name: str, side: int):
    image = skimage_photo(name)
    return image.resize((side, side * image.height // image.width))


def write_stage_meta(folder: Path, stage: str, steps: int, template: str, sources, init_from: str, base=None):
    """A trained stage's solo_meta.json (as solo.train writes it: model_meta + stage config)."""
    config = TrainConfig(stage=stage, train_steps=steps, init_from=init_from,
                         data=DataConfig(sources=tuple(sources), template=template, seq_length_tokens=256))
    meta = {**(base or {}), "stage": stage, "train_steps": steps, "step": steps, "template": template,
            "config": dataclasses.asdict(config)}
    folder.mkdir(exist_ok=True)
    (folder / "solo_meta.json").write_text(json.dumps(meta))


def write_shard_folder(folder: Path) -> Path:
    from solo.preprocess.output import folder_manifest

    folder.mkdir()
    shard = {"counts": {"records": 9, "documents": 8, "samples": 3, "tokens": 700, "images": 8}, "files": {}}
    folder_manifest(folder, {"kind": "llava", "seq_length": 256}, "0" * 64, 1, {0: shard})
    return folder


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_clients")
    make_mistral(root / "mistral")
    finish(cli("hf-to-solo", "--hf", root / "mistral", "--output", root / "solo"))
    llava = write_shard_folder(root / "llava_shards")
    # stage1 (only its meta: reachable, its own start not) -> the exported sft stage
    write_stage_meta(root / "stage1", "stage1", 5, "plain", [DataSource("captions", str(root / "gone"), 1.0)],
                     init_from="/nowhere/converted")
    base = json.loads((root / "solo" / "solo_meta.json").read_text())
    write_stage_meta(root / "solo", "sft", 6, "solo-inst", [DataSource("llava", str(llava), 1.0)],
                     init_from=str(root / "stage1"), base=base)
    finish(cli("solo-to-hf", "--checkpoint", root / "solo", "--output", root / "hf"))
    w = SimpleNamespace(root=root, hf=root / "hf", images=[root / "coffee.png", root / "chelsea.png"])
    photo("coffee.png", 100).save(w.images[0])  # 4x3 patches
    photo("chelsea.png", 64).save(w.images[1])  # 2x2 patches: a batch of unequal images
    return w


# -- Done means: stock transformers == solo-generate ----------------------------------------------

STOCK = r'''
import json, sys
sys.modules["solo"] = None  # `import solo` fails here: only the export's own files may be used
sys.path[:] = [p for p in sys.path if not p.startswith(sys.argv[2])]
import torch
from PIL import Image
from transformers import AutoProcessor, FuyuForCausalLM, pipeline

folder, images, prompts = sys.argv[1], json.loads(sys.argv[3]), json.loads(sys.argv[4])
new = int(sys.argv[5])
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
chats = [[{"role": "user", "content": [{"type": "image", "image": Image.open(i)}, {"type": "text", "text": p}]}]
         for i, p in zip(images, prompts)]
out = {"class": type(processor).__module__ + "." + type(processor).__name__}
for dtype in ("float32", "bfloat16"):
    model = FuyuForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    def run(conversations):
        inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt",
                                               processor_kwargs={"padding": True})
        inputs = inputs.to(model.device, model.dtype)
        assert inputs["input_ids"].dtype == torch.long  # .to(dtype) casts the float tensors only
        ids = model.generate(**inputs, max_new_tokens=new)  # generation_config.json: stop ids, suppression
        return ids[:, inputs["input_ids"].shape[1]:].tolist(), inputs["input_ids"].tolist()
    out[dtype] = {"alone": [run([c]) for c in chats], "batched": run(chats)}
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True, dtype=getattr(torch, dtype))
    out[dtype]["pipeline"] = [pipe(text=c, max_new_tokens=new, return_tensors=True)[0]["generated_token_ids"].tolist()
                              for c in chats]
print(json.dumps(out))
'''


def until_stop(ids, stops=(2,)):
    end = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
    return ids[:end]


@pytest.fixture(scope="module")
def stock(export):
    script = export.root / "stock.py"
    script.write_text(STOCK)
    repo = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    images = json.dumps([str(i) for i in export.images])
    args = [str(export.hf), repo, images, json.dumps(PROMPTS), str(NEW_TOKENS)]
    proc = subprocess.run([sys.executable, str(script), *args], cwd=export.root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stock_transformers_generates_what_solo_generate_does(export, stock, dtype):
    # The processor came from the export's processing_solo.py, not from this repository.
    assert stock["class"].startswith("transformers_modules.") and stock["class"].endswith(".SOLOHFProcessor")
    model, processor = generate.load(export.hf, dtype)
    assert processor.template == "solo-inst" and model.dtype == getattr(torch, dtype)
    alone = [generate.generate(model, processor, i, p, NEW_TOKENS) for i, p in zip(export.images, PROMPTS, strict=True)]
    batched = generate.generate_batch(model, processor, export.images, PROMPTS, NEW_TOKENS)
    ours = stock[dtype]
    for k, (ids, prompt_ids) in enumerate(ours["alone"]):
        assert prompt_ids[0] == processor.encode(export.images[k], PROMPTS[k]).input_ids  # the training layout
        assert until_stop(ids[0]) == alone[k], (k, ids, alone[k])
    new_ids, prompt_ids = ours["batched"]
    assert prompt_ids == generate.batch_inputs(processor, export.images, PROMPTS)["input_ids"].tolist()
    assert [until_stop(row) for row in new_ids] == batched
    for k, full in enumerate(ours["pipeline"]):
        assert until_stop(full[len(ours["alone"][k][1][0]):]) == alone[k]
    assert all(len(ids) >= 1 and max(ids) < 32000 for ids in alone)
    if dtype == "float32":  # padding changes nothing (fp32: bf16 may flip a near tie)
        assert batched == alone


# -- the processor ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_processor(export):
    return SOLOHFProcessor.from_pretrained(export.hf)  # solo installed: the same code, no remote code


@pytest.mark.parametrize("name", ["astronaut.png", "coffee.png", "camera.png", "chelsea.png"])
def test_image_processor_is_solo_vision_bit_for_bit(hf_processor, name):
    import skimage.data
    from PIL import Image

    path = Path(skimage.data.__file__).parent / name  # camera: greyscale
    pixels, rows, cols = hf_processor.image_processor.encode(path)
    image = encode_image(path)
    assert (rows, cols) == (image.rows, image.cols) and rows * cols > 1
    assert np.array_equal(pixels, patches_to_fuyu(normalize_patches(image.patches), 32))
    # Through the whole processor, as SOLOProcessor feeds the model (the plain layout: text without
    # <image> has its image first; the export's solo-inst would close the image with <vision>).
    plain = SOLOHFProcessor(hf_processor.image_processor, hf_processor.tokenizer, template="plain")
    ours = plain(images=Image.open(path), text="A photo of", return_tensors="pt")
    reference = SOLOProcessor(TOK)(path, "A photo of", template="plain")
    assert ours["input_ids"].tolist() == reference["input_ids"].tolist()
    assert torch.equal(ours["pixel_values"], reference["pixel_values"])
    assert set(ours) == {"input_ids", "attention_mask", "pixel_values"}


def test_transparent_image_is_composited_on_white_as_in_training(hf_processor):
    from PIL import Image

    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 0], rgba[:20, :, 3] = 200, 255  # the bottom half see-through
    image = Image.fromarray(rgba, "RGBA")
    pixels, _, _ = hf_processor.image_processor.encode(image)
    assert np.array_equal(pixels, patches_to_fuyu(normalize_patches(encode_image(image).patches), 32))


CONVERSATION = [Turn("user", "<image>\nWhat is it?"), Turn("assistant", "A cup of coffee."),
                Turn("user", "And the colour?"), Turn("assistant", "White, on a brown table.")]


def chat(turns, with_image):
    def content(turn, first):
        text = turn.text.replace("<image>\n", "")
        return ([{"type": "image"}] if first and with_image else []) + [{"type": "text", "text": text}]
    return [{"role": t.role, "content": content(t, i == 0)} for i, t in enumerate(turns)]


@pytest.mark.parametrize("template", ["solo-inst", "chatml"])
@pytest.mark.parametrize("with_image", [True, False])
def test_chat_template_gives_the_training_layout(export, hf_processor, template, with_image):
    from PIL import Image

    processor = SOLOHFProcessor(hf_processor.image_processor, hf_processor.tokenizer, template=template)
    image = Image.open(export.images[0])
    images = [image] if with_image else None
    chosen = get_template(template)
    encoded = encode_image(image)
    image_ids = [image_token_ids(encoded.rows, encoded.cols, TOK)] if with_image else []
    turns = CONVERSATION if with_image else [Turn(t.role, t.text.replace("<image>\n", "")) for t in CONVERSATION]
    # The generation prompt: solo.templates' prompt, as solo-generate builds it.
    prompt = processor.apply_chat_template(chat(turns[:1], with_image), add_generation_prompt=True)
    got = processor(images=images, text=prompt)["input_ids"][0]
    assert got == chosen.prompt(TOK, "What is it?", image_ids[0] if with_image else [])
    # A whole conversation: the ids solo-preprocess trained on.
    text = processor.apply_chat_template(chat(turns, with_image))
    assert processor(images=images, text=text)["input_ids"][0] == chosen.conversation(TOK, turns, image_ids).ids
    assert hf_processor.tokenizer.chat_template == CHAT_TEMPLATES["solo-inst"]  # the export's, in its tokenizer


def test_a_batch_is_padded_on_the_left_and_each_row_computes_as_alone(export, hf_processor):
    from transformers import FuyuForCausalLM

    model = FuyuForCausalLM.from_pretrained(export.hf, dtype=torch.float32).eval()
    texts = ["A photo of", "Text only, and a longer one than the first"]
    batch = hf_processor(images=[export.images[0], None], text=texts, padding=True, return_tensors="pt")
    alone = [hf_processor(images=export.images[0], text=texts[0], return_tensors="pt"),
             hf_processor(text=texts[1], return_tensors="pt")]
    assert batch["pixel_values"].shape == (2, 12, 3 * 32 * 32)
    assert batch["pixel_values"][1].abs().sum() == 0  # the text-only row: 12 zero patches ...
    row = batch["input_ids"][1][batch["attention_mask"][1] == 0]
    assert (row == 32001).sum() == 12  # ... for 12 masked <vpatch> ids in its padding
    with torch.no_grad():
        logits = model(**batch).logits
        for k, inputs in enumerate(alone):
            expected = model(**inputs).logits[0]
            got = logits[k][batch["attention_mask"][k] == 1]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    with pytest.raises(ValueError, match="padding=True"):
        hf_processor(images=[export.images[0], None], text=texts)
    right = hf_processor(images=[export.images[0], None], text=texts, padding=True, padding_side="right")
    assert right["attention_mask"][0][0] == 1 and right["attention_mask"][1][-1] == 0


def test_bf16_generate_takes_the_processor_output_cast_by_batchfeature(export, hf_processor):
    from transformers import FuyuForCausalLM

    model = FuyuForCausalLM.from_pretrained(export.hf, dtype=torch.bfloat16).eval()
    inputs = hf_processor(images=export.images[1], text="A photo of", return_tensors="pt").to(model.device, model.dtype)
    assert inputs["pixel_values"].dtype == torch.bfloat16 and inputs["input_ids"].dtype == torch.long
    out = model.generate(**inputs, max_new_tokens=2)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 2)


def test_device_map_auto_loads_on_cpu_with_accelerate(export, hf_processor):
    from transformers import FuyuForCausalLM

    model = FuyuForCausalLM.from_pretrained(export.hf, dtype=torch.float32, device_map="auto").eval()
    import accelerate  # noqa: F401  (device_map needs it: the [hf] extra)

    # All on the CPU here (transformers 5.23 records a map only when it splits the model).
    assert set(getattr(model, "hf_device_map", {"": "cpu"}).values()) == {"cpu"} and model.device.type == "cpu"
    reference = FuyuForCausalLM.from_pretrained(export.hf, dtype=torch.float32).eval()
    inputs = hf_processor(images=export.images[1], text="A photo of", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference(**inputs).logits)


# -- the files beside the weights ------------------------------------------------------------------

def test_export_configs_name_the_remote_code_and_the_template_rule(export):
    hf = export.hf
    module = Path(generate.__file__).with_name("processing_solo.py")
    assert (hf / "processing_solo.py").read_text() == module.read_text()
    for name in ("preprocessor_config.json", "processor_config.json"):
        auto = json.loads((hf / name).read_text())["auto_map"]
        assert auto == {"AutoProcessor": "processing_solo.SOLOHFProcessor",
                        "AutoImageProcessor": "processing_solo.SOLOImageProcessor"}
    assert "auto_map" not in json.loads((hf / "config.json").read_text())  # the model is stock Fuyu
    assert json.loads((hf / "processor_config.json").read_text())["template"] == "solo-inst"
    image = json.loads((hf / "preprocessor_config.json").read_text())
    assert image["image_mean"] == [0.485, 0.456, 0.406] and image["do_pad"] is False
    generation = json.loads((hf / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["suppress_tokens"] == list(range(32000, 33031))


def test_model_card_says_what_the_model_is_and_what_it_was_trained_on(export):
    card = (export.hf / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n")
    assert "2 layers, hidden 64, 4 heads (2 key-value groups)" in card
    stage1, sft = card.index("### Stage `stage1`"), card.index("### Stage `sft`")
    assert card.index("`/nowhere/converted`: not reachable") < stage1 < sft  # oldest first
    assert "Step 6 of 6, template `solo-inst`" in card and "Step 5 of 5, template `plain`" in card
    assert f"| llava | 1.0 | `{export.root / 'llava_shards'}` | llava: 8 documents, 3 samples, 700 tokens, 8 images |" \
        in card
    assert f"`{export.root / 'gone'}` | not reachable at export |" in card
    assert "`solo-inst`: IMAGE `<s>[INST] {prompt} [/INST]`" in card and "closed by `<vision>`" in card
    assert 'AutoProcessor.from_pretrained("MODEL", trust_remote_code=True)' in card
    assert "pip install solo-megatron[hf]" in card


def test_solo_generate_batches_images_and_reports_tokens_per_second(export, capsys):
    args = ["--model", str(export.hf), "--image", str(export.images[0]), "--image", str(export.images[1]),
            "--prompt", PROMPTS[0], "--max-new-tokens", "3", "--dtype", "float32"]
    assert generate.main(args) == 0
    out, err = capsys.readouterr()
    model, processor = generate.load(export.hf, "float32")
    answers = generate.generate_batch(model, processor, export.images, [PROMPTS[0]] * 2, 3)
    assert out.splitlines() == [processor.decode([i for i in ids if i != 2]) for ids in answers]
    tokens = sum(map(len, answers))
    assert f"solo-generate: {tokens} new tokens for 2 prompt(s) in " in err and "tokens/s)" in err
    assert generate.main([*args, "--prompt", "a", "--prompt", "b"]) == 2
    assert "solo-generate: error: 3 --prompt for 2 --image" in capsys.readouterr().err


def test_ungiven_processor_files_are_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="processor_config.json: missing"):
        SOLOHFProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="max_image_side 1000 is not a multiple of patch_size 32"):
        SOLOImageProcessor(32, 1000)
