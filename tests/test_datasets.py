"""solo-preprocess on datasets as they are published: the layouts of img2dataset, webdataset's
TarWriter, Megatron-LM's and timm's webdataset shards, megatron-energon's prepared folders,
ImageNet-21K's per-synset tars and ImageNet-21K-P's tree, LLaVA conversation JSON and JSON Lines.
Each goes through the CLI unchanged; the decoded shard text and images are compared with the inputs."""

import json
import logging
import tarfile

import numpy as np
import pytest

from solo.data.shards import read_folder_manifest
from solo.tokenizer import SOLOTokenizer
from solo.vision import encode_image
from tests.test_preprocess import OPTS, PATCH, SIDE, add_members, cli, documents_of, photo


@pytest.fixture(scope="module")
def tok():
    return SOLOTokenizer.default()


def captions_of(tokenizer, folder):
    """caption -> the patches of its image(s), for every document of `folder`."""
    return {tokenizer.decode(t[loss == 1]): p for t, loss, p in documents_of(folder)}


def same_image(patches, image_bytes):
    np.testing.assert_array_equal(patches, encode_image(image_bytes, PATCH, SIDE).patches)


# -- runs that yield nothing, and skip warnings ------------------------------------------------

def test_a_run_without_documents_exits_2_with_the_skip_summary_and_stats_refuses_it(tmp_path, capsys, caplog):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for k in range(15):
            add_members(tar, [(f"{k:09d}.jpg", photo("moon.png", 64)), (f"{k:09d}.txt", b"  ")])
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="solo.preprocess"):
        assert cli("captions", "--input", tmp_path / "00000.tar", "--output", out, *OPTS) == 2
    err = capsys.readouterr().err
    assert f"solo-preprocess: error: --output {out}: no documents from 15 records " \
           "(skipped 15 records: empty_text 15)" in err
    # One warning per skipped record up to the limit, then only the count.
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skip ")]
    assert len(skips) == 10 and skips[-1].endswith("further skips for this reason are counted, not shown")
    assert cli("stats", out) == 2
    captured = capsys.readouterr()
    assert "empty_text 15" in captured.out
    assert f"solo-preprocess: error: {out}: its shards hold no documents" in captured.err


def test_stats_shows_truncated_documents(tmp_path, capsys):
    long_html = "<html><body>" + "<p>Some paragraph text here.</p>" * 400 + "</body></html>"
    with tarfile.open(tmp_path / "web.tar", "w") as tar:
        add_members(tar, [("a.png", photo("page.png", 200, "PNG")), ("a.html", b"<h1>Title</h1>"),
                          ("b.png", photo("text.png", 200, "PNG")), ("b.html", long_html.encode())])
    assert cli("html", "--input", tmp_path / "web.tar", "--output", tmp_path / "out", *OPTS) == 0
    capsys.readouterr()
    assert cli("stats", tmp_path / "out") == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split("  ")
    header = [h.strip() for h in header if h.strip()]
    [total] = [line.split() for line in lines if line.startswith("total")]
    assert total[1 + header.index("truncated")] == "1"
    assert read_folder_manifest(tmp_path / "out")["totals"]["truncated"] == 1


# -- ImageNet-21K: per-synset tars, mixed trees, ImageNet-21K-P ---------------------------------

IMAGENET = {"n01440764": ("chelsea.png", "tabby cat"), "n01443537": ("rocket.jpg", "rocket"),
            "n01484850": ("horse.png", "horse")}


def write_synset_tar(path, wnid, images):
    """A per-synset tar as winter21_whole.tar.gz holds them: flat `nXXXXXXXX_N.JPEG` members, GNU format."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        add_members(tar, [(f"{wnid}_{k}.JPEG", data) for k, data in enumerate(images)])


def imagenet_docs(tok, folder):
    """sorted (class name, sha256 of the image's patches) of every document."""
    import hashlib

    return sorted((tok.decode(t[loss == 1]), hashlib.sha256(p[0].tobytes()).hexdigest())
                  for t, loss, p in documents_of(folder))


def expected_docs(images_by_name):
    import hashlib

    return sorted((name, hashlib.sha256(encode_image(data, PATCH, SIDE).patches.tobytes()).hexdigest())
                  for name, data in images_by_name)


def test_imagenet_reads_per_synset_tars_and_mixed_trees_without_extracting(tok, tmp_path, capsys):
    root = tmp_path / "winter21_whole"
    root.mkdir()
    images = {w: [photo(f, side) for side in (96, 160)] for w, (f, _) in IMAGENET.items()}
    write_synset_tar(root / "n01440764.tar", "n01440764", images["n01440764"])
    write_synset_tar(root / "n01443537.tar", "n01443537", images["n01443537"])
    (root / "n01484850").mkdir()  # one synset already extracted: the tree is mixed
    for k, data in enumerate(images["n01484850"]):
        (root / "n01484850" / f"n01484850_{k}.JPEG").write_bytes(data)
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("".join(f"{w} {name.replace(' ', '_')}, x\n" for w, (_, name) in IMAGENET.items()))
    before = sorted(p.name for p in root.iterdir())
    out = tmp_path / "out"
    assert cli("imagenet", "--input", root, "--synsets", synsets, "--output", out, *OPTS) == 0
    assert sorted(p.name for p in root.iterdir()) == before  # nothing extracted
    assert imagenet_docs(tok, out) == expected_docs(
        (IMAGENET[w][1], data) for w, datas in images.items() for data in datas)
    assert read_folder_manifest(out)["totals"]["documents"] == 6

    def refused(message):
        assert cli("imagenet", "--input", root, "--synsets", synsets, "--output", tmp_path / "o2", *OPTS) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "o2").exists()

    # A tar it cannot read is an error naming it, never a class silently dropped.
    good = (root / "n01443537.tar").read_bytes()
    members = tarfile.open(root / "n01443537.tar").getmembers()
    (root / "n01443537.tar").write_bytes(good[:members[1].offset])  # cut between members: no end marker
    refused(f"{root}/n01443537.tar: no end-of-archive marker")
    (root / "n01443537.tar").write_bytes(good[:members[1].offset_data + 100])  # cut inside an image
    refused(f"{root}/n01443537.tar: not a readable tar (unexpected end of data)")
    (root / "n01443537.tar").write_bytes(b"not a tar at all" * 64)
    refused(f"{root}/n01443537.tar: not a readable tar")
    (root / "n01443537.tar").write_bytes(good)
    (root / "n01443537").mkdir()  # half extracted
    refused("synset n01443537 is both a folder and n01443537.tar")
    (root / "n01443537").rmdir()
    (root / "winter21_whole.tar.gz").write_bytes(b"\x1f\x8b")
    refused("winter21_whole.tar.gz: a compressed archive; unpack it once")


def miil_tree(wnids, descriptions):
    """imagenet21k_miil_tree.pth as Alibaba-MIIL's ImageNet21K code reads it (src_files/semantic/
    semantics.py: class_tree_list, class_description; visualize_detector.py: class_list indexed by
    class number; child_2_parent): class_list a numpy array of wnids, numpy ints in the tree lists."""
    return {"class_list": np.array(wnids), "child_2_parent": {w: wnids[0] for w in wnids[1:]},
            "class_tree_list": [[np.int64(i)] + ([0] if i else []) for i in range(len(wnids))],
            "class_description": dict(zip(wnids, descriptions, strict=True))}


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_imagenet21k_p_root_and_its_miil_tree(tok, tmp_path, capsys):
    import torch

    root = tmp_path / "imagenet21k_resized"
    wnids = list(IMAGENET)
    split_images = {}
    for split, side in (("train", 128), ("val", 96)):
        for w, (file, _) in IMAGENET.items():
            (root / f"imagenet21k_{split}" / w).mkdir(parents=True)
            data = photo(file, side)
            (root / f"imagenet21k_{split}" / w / f"{w}_1.JPEG").write_bytes(data)
            split_images.setdefault(split, []).append((w, data))
    tree = tmp_path / "imagenet21k_miil_tree.pth"
    torch.save(miil_tree(wnids, ["tabby_cat, tabby", "rocket", "horse, Equus_caballus"]), tree)
    for split in ("train", "val"):
        out = tmp_path / split
        assert cli("imagenet", "--input", root, "--split", split, "--synsets", tree, "--output", out, *OPTS) == 0
        assert imagenet_docs(tok, out) == expected_docs((IMAGENET[w][1], d) for w, d in split_images[split])
    # A tree whose pickle would run code is refused, and the code never runs.
    marker = tmp_path / "ran"
    torch.save({"class_list": wnids, "class_description": _RunsCode(marker)}, tmp_path / "evil.pth")
    assert cli("imagenet", "--input", root, "--synsets", tmp_path / "evil.pth", "--output", tmp_path / "e", *OPTS) == 2
    assert f"{tmp_path}/evil.pth: not a readable ImageNet-21K-P tree" in capsys.readouterr().err
    assert not marker.exists()


# -- webdataset layouts ------------------------------------------------------------------------

CAPTIONED = [("astronaut.png", "An astronaut in a white suit."), ("chelsea.png", "A tabby cat."),
             ("coffee.png", "A cup of coffee."), ("rocket.jpg", "A rocket on its launch pad.")]


def llava_conversation(caption):
    """LLaVA-Pretrain's record: an instruction with <image> (written by the converter) and the caption."""
    return [{"from": "human", "value": "Give a brief description of the image.\n<image>"},
            {"from": "gpt", "value": caption}]


def test_webdataset_layouts_are_recognized_and_tar_gz_read(tok, tmp_path):
    """Written by webdataset's own TarWriter / ShardWriter (webdataset 1.0.2): img2dataset's jpg+txt,
    energon's jpg+json caption, Megatron-LM examples/multimodal/convert_llava_pretrain_to_wds.py
    (json = json.dumps(entry['conversations']).encode(), ShardWriter 'pretrain-%d.tar'), and an
    ImageNet-style jpg+cls+json whose json carries the class_name; the first one again gzipped."""
    import gzip

    import webdataset as wds

    images = {caption: photo(file, 128) for file, caption in CAPTIONED}
    (a, ca), (b, cb), (c, cc), (d, cd) = [(images[cap], cap) for _, cap in CAPTIONED]
    with wds.TarWriter(str(tmp_path / "txt.tar")) as w:
        w.write({"__key__": "000000000", "jpg": a, "txt": ca})
    with wds.TarWriter(str(tmp_path / "json.tar")) as w:
        w.write({"__key__": "000000001", "jpg": b, "json": {"caption": cb, "width": 128}})
    with wds.ShardWriter(str(tmp_path / "pretrain-%d.tar"), maxcount=10000) as w:
        w.write({"__key__": "GCC_train_000", "jpg": c, "json": json.dumps(llava_conversation(cc)).encode("utf-8")})
    with wds.TarWriter(str(tmp_path / "cls.tar")) as w:
        w.write({"__key__": "n01484850_1", "jpg": d, "cls": 3, "json": {"filename": "n01484850_1.JPEG", "label": 3,
                                                                         "class_name": cd}})
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "txt.tar.gz").write_bytes(gzip.compress((tmp_path / "txt.tar").read_bytes()))
    out = tmp_path / "out"
    assert cli("captions", "--input", f"{tmp_path}/*.tar", tmp_path / "gz", "--output", out, *OPTS) == 0
    got = captions_of(tok, out)
    assert sorted(got) == sorted(images) and read_folder_manifest(out)["totals"]["documents"] == 5
    for caption, patches in got.items():
        same_image(patches[0], images[caption])
    # The same conversation shards through sft: the whole conversation, the gpt turn learned.
    assert cli("sft", "--input", tmp_path / "pretrain-0.tar", "--output", tmp_path / "sft", *OPTS) == 0
    [(tokens, loss, patches)] = documents_of(tmp_path / "sft")
    assert tok.decode(tokens[loss == 1]) == cc and "Give a brief description" in tok.decode(tokens)
    same_image(patches[0], c)


def test_explicit_fields_and_a_cut_tar_gz(tok, tmp_path, capsys):
    import gzip

    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "odd.tar")) as w:
        for k, (file, caption) in enumerate(CAPTIONED):
            w.write({"__key__": f"{k:04d}", "png": photo(file, 96, "PNG"), "json": {"alt": caption}})
    out = tmp_path / "out"
    assert cli("captions", "--input", tmp_path / "odd.tar", "--output", tmp_path / "auto", *OPTS) == 2
    assert "missing_text 4" in capsys.readouterr().err  # no caption key the detection knows
    assert cli("captions", "--input", tmp_path / "odd.tar", "--fields", "image=jpg|png,text=json:alt",
               "--output", out, *OPTS) == 0
    assert sorted(captions_of(tok, out)) == sorted(c for _, c in CAPTIONED)
    assert cli("captions", "--input", tmp_path / "odd.tar", "--fields", "picture=png", "--output", out, *OPTS) == 2
    assert "--fields 'picture=png': expected ROLE=EXT" in capsys.readouterr().err
    data = gzip.compress((tmp_path / "odd.tar").read_bytes())
    (tmp_path / "cut.tar.gz").write_bytes(data[:len(data) // 2])
    assert cli("captions", "--input", tmp_path / "cut.tar.gz", "--output", tmp_path / "cut", *OPTS) == 2
    assert "corrupt_gzip 1" in capsys.readouterr().err


def energon_prepare(folder, *args):
    """`energon prepare` (megatron-energon 7.4), non-interactive, in this process."""
    from click.testing import CliRunner
    from megatron.energon.tools.prepare import command

    result = CliRunner().invoke(command, [str(folder), "--non-interactive", "--no-progress", "--num-workers", "1",
                                          *args])
    assert result.exit_code == 0, result.output[-2000:]


def test_energon_folders_honour_split_yaml_and_the_field_map(tok, tmp_path):
    import webdataset as wds

    root = tmp_path / "energon"
    root.mkdir()
    by_split = {}
    for part, split in enumerate(("train", "val", "test")):
        with wds.TarWriter(str(root / f"part-{part:06d}.tar")) as w:
            for k, (file, caption) in enumerate(CAPTIONED[part:part + 2]):
                text = f"{caption} ({split})"
                w.write({"__key__": f"{part}{k:05d}", "png": photo(file, 96, "PNG"),
                         "json": {"alt_text": text, "question": f"What is in the {split} image?", "answer": text}})
                by_split.setdefault(split, []).append(text)
    energon_prepare(root, "--split-parts", "train:part-000000.tar", "--split-parts", "val:part-000001.tar",
                    "--split-parts", "test:part-000002.tar", "--sample-type", "CaptioningSample",
                    "--field-map", json.dumps({"image": "png", "caption": "json[alt_text]"}))
    for split in ("train", "val", "test"):
        out = tmp_path / split
        assert cli("captions", "--input", root, "--split", split, "--output", out, *OPTS) == 0
        assert sorted(captions_of(tok, out)) == sorted(by_split[split])  # never another split's tars
    # A VQA field map (dataset.yaml as energon prepare writes it): question and answer as a conversation.
    (root / ".nv-meta" / "dataset.yaml").write_text(
        "sample_type:\n  __module__: megatron.energon\n  __class__: VQASample\nfield_map:\n  image: png\n"
        "  context: json[question]\n  answers: json[answer]\n")
    assert cli("sft", "--input", root, "--split", "val", "--output", tmp_path / "vqa", *OPTS) == 0
    docs = documents_of(tmp_path / "vqa")
    assert sorted(tok.decode(t[loss == 1]) for t, loss, _ in docs) == sorted(by_split["val"])
    assert all("What is in the val image?" in tok.decode(t) for t, _, _ in docs)


# -- img2dataset output folders, letterboxed images --------------------------------------------

def letterbox(data, side=256):
    """img2dataset's default resize_mode=border: the image fit into a side x side white square."""
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(data)).convert("RGB")
    im.thumbnail((side, side))
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def img2dataset_folder(folder, shards):
    """An img2dataset output folder (output_format=webdataset) as img2dataset/writer.py's
    WebDatasetSampleWriter and logger.py's write_stats write it: per shard NNNNN.tar (webdataset
    TarWriter on the open file: KEY.jpg, KEY.txt, KEY.json = json.dumps(meta, indent=4)),
    NNNNN.parquet (one metadata row per URL, failed downloads included, no image) and
    NNNNN_stats.json (json.dump(stats, f, indent=4))."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()),
                        ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
                        ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32())])
    for shard, rows in enumerate(shards):
        metas = []
        with open(folder / f"{shard:05d}.tar", "wb") as fd:
            writer = wds.TarWriter(fd)
            for k, (caption, image) in enumerate(rows):
                key = f"{shard:05d}{k:04d}"
                ok = image is not None
                meta = {"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key,
                        "status": "success" if ok else "failed_to_download",
                        "error_message": None if ok else "HTTP Error 404: Not Found",
                        "width": 256 if ok else None, "height": 256 if ok else None,
                        "original_width": 200 if ok else None, "original_height": 133 if ok else None}
                if ok:
                    writer.write({"__key__": key, "jpg": image, "txt": caption, "json": json.dumps(meta, indent=4)})
                metas.append(meta)
            writer.close()
        pq.write_table(pa.Table.from_pylist(metas, schema), folder / f"{shard:05d}.parquet")
        successes = sum(image is not None for _, image in rows)
        stats = {"count": len(rows), "successes": successes, "failed_to_download": len(rows) - successes,
                 "failed_to_resize": 0, "duration": 1.5, "status_dict": {"success": successes}}
        with open(folder / f"{shard:05d}_stats.json", "w") as f:
            json.dump(stats, f, indent=4)


def test_img2dataset_folders_as_they_are_and_letterboxed_images(tok, tmp_path, capsys, caplog):
    folder = tmp_path / "cc3m"
    folder.mkdir()
    images = {caption: photo(file, 200) for file, caption in CAPTIONED}
    boxed = {caption: letterbox(data) for caption, data in list(images.items())[:3]}
    natural = {CAPTIONED[3][1]: images[CAPTIONED[3][1]]}
    inputs = {**boxed, **natural}
    img2dataset_folder(folder, [list(boxed.items())[:2] + [("a lost image", None)],
                                list(boxed.items())[2:] + list(natural.items())])
    for n, given in enumerate((f"{folder}/*", folder)):
        out = tmp_path / f"out{n}"
        with caplog.at_level(logging.WARNING, logger="solo.preprocess"):
            assert cli("captions", "--input", given, "--output", out, *OPTS) == 0
        got = captions_of(tok, out)
        assert sorted(got) == sorted(inputs)
        for caption, patches in got.items():
            same_image(patches[0], inputs[caption])
        manifest = read_folder_manifest(out)
        assert manifest["skipped"] == {} and manifest["totals"]["records"] == 4  # the failed URL is no record
        assert manifest["spec"]["source"]["img2dataset"] == {
            "count": 5, "successes": 4, "failed_to_download": 1, "failed_to_resize": 0, "stats_files": 2}
        assert manifest["totals"]["padded_images"] == 3 and manifest["totals"]["images"] == 4
    assert any("3 of 4 images (75%) are letterboxed or padded" in r.getMessage() and "keep_ratio_largest"
               in r.getMessage() for r in caplog.records)
    capsys.readouterr()
    assert cli("stats", tmp_path / "out0") == 0
    assert "padded images: 3 of 4 (75.0%" in capsys.readouterr().out


# -- conversations -----------------------------------------------------------------------------

def pieces(tok, tokens):
    """The document as text pieces with 'IMG' where each image stands."""
    out, start, inside = [], 0, False
    for i, t in enumerate(tokens.tolist() + [-1]):
        if not inside and t in (tok.vision_start_id, -1):
            text = tok.decode(tokens[start:i]).strip()
            out += [text] if text else []
            if t == tok.vision_start_id:
                out.append("IMG")
                inside = True
        elif inside and t == tok.vision_end_id:
            start, inside = i + 1, False
    return out


def test_conversations_jsonl_interleaved_images_image_first_and_leading_answers(tok, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    data = {name: photo(file, 96) for name, file in (("a.jpg", "chelsea.png"), ("b.jpg", "rocket.jpg"))}
    for name, d in data.items():
        (images / name).write_bytes(d)
    records = [
        {"id": "late", "image": "a.jpg", "conversations": [
            {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "two", "image": ["a.jpg", "b.jpg"], "conversations": [
            {"from": "human", "value": "Compare <image> with <image> please."},
            {"from": "gpt", "value": "Cat, rocket."}]},
        {"id": "cut", "conversations": [
            {"from": "gpt", "value": "the end of an answer"}, {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"}]},
        {"id": "odd", "image": ["a.jpg"], "conversations": [
            {"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "?"}]},
    ]
    (tmp_path / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "{not json\n")
    by_answer = {}
    for position in ("first", "as-is"):
        out = tmp_path / position
        assert cli("sft", "--input", tmp_path / "mix.jsonl", "--images", images, "--image-position", position,
                   "--output", out, *OPTS) == 0
        manifest = read_folder_manifest(out)
        assert manifest["skipped"] == {"bad_conversation": 1, "bad_json": 1}
        assert manifest["dropped"] == {"leading_assistant_turn": 1}
        by_answer[position] = {tok.decode(t[loss == 1]): (pieces(tok, t), p)
                               for t, loss, p in documents_of(out)}
    first, as_is = by_answer["first"], by_answer["as-is"]
    assert sorted(first) == ["A cat.", "Cat, rocket.", "Hello!"]
    # One image: moved to the front of its turn as LLaVA does (the default), or left where it was.
    assert first["A cat."][0][:2] == ["<|im_start|>user", "IMG"]
    assert first["A cat."][0][2].startswith("What is this?<|im_end|>")
    assert as_is["A cat."][0][:2] == ["<|im_start|>user\nWhat is this?", "IMG"]
    assert as_is["A cat."][0][2].startswith("<|im_end|>")
    # Several images: where their markers stand, in order, whatever the option.
    for got in (first, as_is):
        text, patches = got["Cat, rocket."]
        assert text[:4] == ["<|im_start|>user\nCompare", "IMG", "with", "IMG"] and text[4].startswith("please.")
        same_image(patches[0], data["a.jpg"])
        same_image(patches[1], data["b.jpg"])
    assert not any("the end of an answer" in piece for piece in first["Hello!"][0])


def test_llava_pretrain_json_as_captions(tok, tmp_path):
    """LLaVA-Pretrain's blip_laion_cc_sbu_558k.json layout: a JSON list, images below the file's folder."""
    (tmp_path / "00000").mkdir()
    records, expected = [], {}
    for k, (file, caption) in enumerate(CAPTIONED[:3]):
        path = f"00000/{k:09d}.jpg"
        (tmp_path / path).write_bytes(photo(file, 96))
        records.append({"id": f"{k:09d}", "image": path, "conversations": llava_conversation(caption)})
        expected[caption] = (tmp_path / path).read_bytes()
    (tmp_path / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    assert cli("captions", "--input", tmp_path / "blip_laion_cc_sbu_558k.json", "--output", out, *OPTS) == 0
    got = captions_of(tok, out)
    assert sorted(got) == sorted(expected)
    for caption, patches in got.items():
        same_image(patches[0], expected[caption])
    for tokens, _, _ in documents_of(out):
        assert "brief description" not in tok.decode(tokens) and "<image>" not in tok.decode(tokens)


def test_letterbox_needs_uniform_bands_on_two_opposite_sides(tok):
    from PIL import Image

    from solo.preprocess.documents import Layout, build, padded_images
    from solo.preprocess.formats import Record

    layout = Layout(tok, 2048, PATCH, SIDE)

    def padded(array):
        import io

        buf = io.BytesIO()
        Image.fromarray(array).save(buf, "PNG")
        [doc] = build("captions", Record("k", image=buf.getvalue(), text="x"), layout)
        return padded_images(doc, tok, PATCH)

    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (192, 256, 3), dtype=np.uint8)
    assert padded(picture) == 0
    sky = picture.copy()
    sky[:40] = (120, 170, 230)  # a clear sky on one side only: a photo, not padding
    assert padded(sky) == 0
    boxed = np.zeros((256, 256, 3), dtype=np.uint8)
    boxed[32:224] = picture  # black bars above and below
    assert padded(boxed) == 1
    pillar = np.full((192, 320, 3), 255, dtype=np.uint8)
    pillar[:, 32:288] = picture  # white bars left and right
    assert padded(pillar) == 1
