"""solo-preprocess end to end on real files built here: ImageNet folders, webdataset tars, JSONL,
Parquet, .jsonl.zst and LLaVA JSON, every damaged input it must skip, byte-identical output for
any --workers, and kill-and-resume in a subprocess."""

import base64
import errno
import hashlib
import io
import json
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from megatron.core.datasets.indexed_dataset import IndexedDataset
from PIL import Image

from solo import fileio
from solo.data.shards import list_shards, open_shard, read_folder_manifest
from solo.preprocess import formats, pipeline
from solo.preprocess.cli import build_parser, main
from solo.preprocess.documents import Layout, Skip, build
from solo.preprocess.formats import Record
from solo.preprocess.packing import pack
from solo.preprocess.sources import load_synsets
from solo.tokenizer import SOLOTokenizer
from solo.vision import encode_image, image_token_ids
from tests.tmpfs import full_disk_open, mount_tmpfs, resize_tmpfs, unmount

SKIMAGE = os.path.dirname(skimage.data.__file__)
PHOTOS = {"astronaut.png": "astronaut", "chelsea.png": "tabby cat", "coffee.png": "coffee cup",
          "rocket.jpg": "rocket", "horse.png": "horse", "hubble_deep_field.jpg": "galaxies",
          "camera.png": "cameraman", "coins.png": "coins", "moon.png": "moon"}
SEQ, PATCH, SIDE = 2048, 32, 256
OPTS = ["--seq-length", str(SEQ), "--patch-size", str(PATCH), "--max-side", str(SIDE), "--workers", "1"]


@pytest.fixture(scope="module")
def tok():
    return SOLOTokenizer.default()


@pytest.fixture(scope="module")
def layout(tok):
    return Layout(tok, SEQ, PATCH, SIDE)


# -- input builders ----------------------------------------------------------------------------

def photo(name, side=200, fmt="JPEG"):
    with Image.open(os.path.join(SKIMAGE, name)) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, fmt, quality=90)
        return buf.getvalue()


def synthetic(w, h, seed=0, fmt="PNG"):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png():
    """A mode-1 PNG of 20000x20000 pixels in a few kilobytes."""
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 2501 * 20000, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def add_members(tar, members):
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


BAD_IMAGES = {  # file name -> (bytes, skip reason)
    "corrupt.JPEG": (lambda: photo("chelsea.png")[:1500], "corrupt_image"),
    "text.JPEG": (lambda: b"this is not an image\n" * 10, "not_an_image"),
    "empty.JPEG": (lambda: b"", "empty_file"),
    "tiny.png": (lambda: synthetic(8, 8), "image_too_small"),
    "strip.png": (lambda: synthetic(1, 20000), "extreme_aspect_ratio"),
    "bomb.png": (bomb_png, "decompression_bomb"),
}


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    lines, good = [], {}
    for k, (file, label) in enumerate(PHOTOS.items()):
        wnid = f"n{1440764 + k:08d}"
        (root / "train" / wnid).mkdir(parents=True)
        for j, side in enumerate((160, 224)):
            path = root / "train" / wnid / f"{wnid}_{j}.JPEG"
            path.write_bytes(photo(file, side))
            good[str(path)] = label
        lines.append(f"{wnid} {label.replace(' ', '_')}, {file.split('.')[0]}")
    bad_dir = root / "train" / "n01440764"
    for name, (make, _) in BAD_IMAGES.items():
        (bad_dir / name).write_bytes(make())
    (root / "train" / "n99999999").mkdir()
    (root / "train" / "n99999999" / "x.JPEG").write_bytes(photo("coffee.png"))
    (root / "synsets.txt").write_text("\n".join(lines) + "\n")
    return root, good


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    good = {}
    with tarfile.open(root / "00000.tar", "w") as tar:
        for k, (file, label) in enumerate(list(PHOTOS.items())[:5]):
            caption = f"A photo of a {label}."
            meta = ("json", json.dumps({"caption": caption}).encode()) if k == 2 else ("txt", caption.encode())
            add_members(tar, [(f"{k:09d}.jpg", photo(file)), (f"{k:09d}.{meta[0]}", meta[1])])
            good[caption] = file
        add_members(tar, [("000000100.jpg", photo("moon.png")), ("000000100.txt", b"   ")])  # empty caption
        add_members(tar, [("000000101.jpg", photo("moon.png")), ("000000101.txt", b"\xff\xfe caption")])
        add_members(tar, [("../x.jpg", photo("moon.png")), ("../x.txt", b"escapes the archive")])
        add_members(tar, [("/etc/y.jpg", photo("moon.png")), ("/etc/y.txt", b"absolute path")])
        add_members(tar, [("000000102.jpg", b"not a jpeg at all"), ("000000102.txt", b"broken image")])
    # A tar cut inside its fourth record: three good records survive.
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w") as tar:
        for k in range(6):
            add_members(tar, [(f"1{k:08d}.jpg", photo("rocket.jpg", 96 + 16 * k)),
                              (f"1{k:08d}.txt", f"rocket {k}".encode())])
    members = tarfile.open(fileobj=io.BytesIO(full.getvalue())).getmembers()
    (root / "00001.tar").write_bytes(full.getvalue()[:members[6].offset_data + 100])
    good.update({f"rocket {k}": "rocket.jpg" for k in range(3)})
    # JSONL: a path relative to the file, base64 bytes, a broken line, a record without image.
    (root / "images").mkdir()
    (root / "images" / "horse.jpg").write_bytes(photo("horse.png"))
    rows = [{"image": "images/horse.jpg", "caption": "A horse in JSONL."},
            {"image_base64": base64.b64encode(photo("coins.png")).decode(), "caption": "Coins in base64."}]
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n"
                                      + json.dumps({"caption": "no image"}) + "\n")
    good.update({"A horse in JSONL.": "horse.png", "Coins in base64.": "coins.png"})
    # Parquet with HF datasets' Image struct, in row groups of two.
    pq_rows = [("camera.png", "A cameraman in Parquet."), ("coffee.png", "Coffee in Parquet."),
               ("astronaut.png", "An astronaut in Parquet.")]
    table = pa.table({"image": [{"bytes": photo(f), "path": None} for f, _ in pq_rows],
                      "caption": [c for _, c in pq_rows]})
    pq.write_table(table, root / "pairs.parquet", row_group_size=2)
    good.update({c: f for f, c in pq_rows})
    skipped = {"empty_text": 1, "non_utf8_text": 1, "unsafe_path": 2, "not_an_image": 1, "truncated_tar": 1,
               "bad_json": 1, "missing_image": 1}
    return root, good, skipped


def cli(*args):
    return main([str(a) for a in args])


def documents_of(folder, seq=SEQ):
    """(tokens, loss, patches) of every document in every complete shard, checking the invariants."""
    docs = []
    for prefix in list_shards(folder):
        shard = open_shard(prefix, verify_checksum=True)
        assert len(IndexedDataset(f"{prefix}.tokens")) == shard.manifest["counts"]["sequences"]
        for i in range(len(shard)):
            s = shard.sample(i)
            assert len(s.tokens) <= seq
            images, offset = iter(s.patches), 0
            for n in s.document_lengths:
                t, mask = s.tokens[offset:offset + n], s.loss_mask[offset:offset + n]
                assert mask[0] == 0 and not mask[t >= 32000].any()
                patches = [next(images) for _ in range(int((t == 32000).sum()))]
                assert sum(len(p) for p in patches) == int((t == 32001).sum())
                docs.append((t, mask, patches))
                offset += n
            assert next(images, None) is None
    return docs


def tree_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


# -- packing -----------------------------------------------------------------------------------

def test_packing_fills_99_percent_on_a_realistic_mix():
    rng = np.random.default_rng(0)
    images = rng.integers(200, 1101, 6000)  # ImageNet-sized images with their class names
    texts = np.clip(rng.lognormal(7, 1.2, 1500).astype(int), 20, 60000)
    lengths = [int(n) for n in np.concatenate([images, texts])]
    lengths = [min(n, 32768) for n in rng.permutation(lengths)]
    bins = pack(lengths, 32768)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 32768 for b in bins)
    real_tokens = sum(lengths[i] for b in bins for i in b)
    assert real_tokens / (len(bins) * 32768) >= 0.99
    assert pack(lengths, 32768) == bins  # deterministic


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 100), max_size=300), st.integers(1, 8))
def test_packing_invariants(lengths, window):
    bins = pack(lengths, 100, window)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(b == sorted(b) and 0 < sum(lengths[i] for i in b) <= 100 for b in bins)


# -- document layouts --------------------------------------------------------------------------

def image_ids(tok, path_or_bytes):
    enc = encode_image(path_or_bytes, PATCH, SIDE)
    return image_token_ids(enc.rows, enc.cols, tok), enc.patches


def test_imagenet_caption_and_html_layouts(tok, layout, tmp_path):
    path = tmp_path / "cat.jpg"
    path.write_bytes(photo("chelsea.png"))
    img, patches = image_ids(tok, str(path))
    for kind, text in (("imagenet", "tabby cat"), ("captions", "A cat looking left."),
                       ("html", "<html><b>cat</b></html>")):
        [doc] = build(kind, Record("k", image=str(path), text=text), layout)
        expected = [tok.bos_id] + img + tok.encode(text) + [tok.eos_id]
        assert doc.tokens.tolist() == expected and doc.tokens.dtype == np.int32
        assert doc.loss.tolist() == [0] * (1 + len(img)) + [1] * (len(expected) - 1 - len(img))
        assert tok.decode(doc.tokens[doc.loss == 1]) == text
        np.testing.assert_array_equal(doc.patches[0], patches)
        assert not doc.truncated
    # HTML too long for the sequence: cut to fill it exactly, without </s>.
    html = "<div>" + "lorem ipsum dolor sit amet " * 600 + "</div>"
    [doc] = build("html", Record("k", image=str(path), text=html), layout)
    assert doc.truncated and len(doc.tokens) == SEQ and doc.tokens[-1] != tok.eos_id
    assert doc.tokens[1 + len(img):].tolist() == tok.encode(html)[:SEQ - 1 - len(img)]
    with pytest.raises(Skip, match="document_too_long"):
        build("captions", Record("k", image=str(path), text=html), layout)


def test_text_layout_and_pieces(tok, layout):
    [doc] = build("text", Record("k", text="Hello world."), layout)
    assert doc.tokens.tolist() == [tok.bos_id] + tok.encode("Hello world.") + [tok.eos_id]
    assert doc.loss.tolist() == [0] + [1] * (len(doc.tokens) - 1)
    text = " ".join(f"word{i}" for i in range(3000))
    pieces = build("text", Record("k", text=text), layout)
    whole = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    assert len(pieces) > 1 and all(len(p.tokens) == SEQ for p in pieces[:-1])
    assert np.concatenate([p.tokens for p in pieces]).tolist() == whole
    for p in pieces:  # the first token of every piece has nothing before it to be predicted from
        assert p.loss[0] == 0 and p.loss[1:].all()
    with pytest.raises(Skip, match="empty_text"):
        build("text", Record("k", text=" \n "), layout)
    with pytest.raises(Skip, match="missing_text"):
        build("text", Record("k", text=None), layout)


def test_sft_layout(tok, layout, tmp_path):
    path = tmp_path / "cat.jpg"
    path.write_bytes(photo("chelsea.png"))
    img, _ = image_ids(tok, str(path))
    turns = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."},
             {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Brown and grey."}]
    [doc] = build("sft", Record("k", image=str(path), conversations=turns), layout)
    nl, s, e = tok.encode("\n"), tok.im_start_id, tok.im_end_id
    expected = ([tok.bos_id, s] + tok.encode("user\n") + img + tok.encode("\nWhat is this?") + [e] + nl
                + [s] + tok.encode("assistant\n") + tok.encode("A cat.", prefix_space=False) + [e] + nl
                + [s] + tok.encode("user\nColor?") + [e] + nl
                + [s] + tok.encode("assistant\n") + tok.encode("Brown and grey.", prefix_space=False) + [e] + nl
                + [tok.eos_id])
    assert doc.tokens.tolist() == expected
    text = tok.decode(doc.tokens)
    assert text.startswith("<|im_start|>user\n<vision><vpatch>")
    assert text.endswith("</vision>\nWhat is this?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
                         "<|im_start|>user\nColor?<|im_end|>\n<|im_start|>assistant\nBrown and grey.<|im_end|>\n")
    # Loss: the answers and the final </s>, nothing else.
    answers = tok.encode("A cat.", prefix_space=False) + tok.encode("Brown and grey.", prefix_space=False)
    assert doc.loss.sum() == len(answers) + 1
    assert tok.decode(doc.tokens[doc.loss == 1]) == "A cat.Brown and grey."
    assert doc.loss[-1] == 1 and doc.tokens[-1] == tok.eos_id
    # Encoding an answer apart from its "assistant\n" header gives the ids of the whole turn.
    assert tok.encode("assistant\nA cat.") == tok.encode("assistant\n") + tok.encode("A cat.", prefix_space=False)
    # Text-only conversations; malformed ones are skipped.
    [plain] = build("sft", Record("k", conversations=turns[2:]), layout)
    assert 32000 not in plain.tokens and plain.patches == []
    for bad_turns, image in ((turns, None), ([turns[0], turns[0], turns[1]], str(path)),
                             ([{"from": "robot", "value": "x"}], None), (turns[:1], str(path))):
        with pytest.raises(Skip, match="bad_conversation"):
            build("sft", Record("k", image=image, conversations=bad_turns), layout)


def test_image_skip_rules(tok, layout, tmp_path):
    for name, (make, reason) in BAD_IMAGES.items():
        with pytest.raises(Skip) as e:
            build("imagenet", Record(name, image=make(), text="x"), layout)
        assert e.value.reason == reason, name
    small = Layout(tok, 40, PATCH, SIDE)  # a 256x192 image needs 8*6+6+1 tokens
    with pytest.raises(Skip, match="image_too_long"):
        build("captions", Record("k", image=synthetic(256, 192), text="x"), small)


def test_synset_files(tmp_path):
    (tmp_path / "loc.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n\n")
    assert load_synsets(str(tmp_path / "loc.txt"), None) == {"n01440764": "tench", "n01443537": "goldfish"}
    (tmp_path / "wnids.txt").write_text("n00004475\nn00005787\n")
    (tmp_path / "lemmas.txt").write_text("organism, being\nbenthos\n")
    assert load_synsets(str(tmp_path / "wnids.txt"), str(tmp_path / "lemmas.txt")) == {
        "n00004475": "organism", "n00005787": "benthos"}
    (tmp_path / "bad.txt").write_text("n01440764 tench\nn01443537\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        load_synsets(str(tmp_path / "bad.txt"), None)


# -- end to end --------------------------------------------------------------------------------

def test_imagenet_end_to_end(imagenet, tok, tmp_path):
    root, good = imagenet
    out = tmp_path / "out"
    assert cli("imagenet", "--input", root / "train", "--synsets", root / "synsets.txt", "--output", out,
               "--shard-size", 7, *OPTS) == 0
    manifest = read_folder_manifest(out)
    expected_skips = {reason: 1 for _, reason in BAD_IMAGES.values()} | {"unknown_synset": 1}
    assert manifest["skipped"] == dict(sorted(expected_skips.items()))
    assert manifest["complete"] and manifest["shards_planned"] == len(list_shards(out)) == 4
    totals = manifest["totals"]
    assert totals["records"] == len(good) + len(BAD_IMAGES) + 1 and totals["documents"] == len(good)
    docs = documents_of(out)
    assert len(docs) == len(good)
    # Every good image appears once, with its class name as the only loss tokens.
    expected = {}
    for path, label in good.items():
        enc = encode_image(path, PATCH, SIDE)
        expected[hashlib.sha256(enc.patches.tobytes()).hexdigest()] = label
    seen = {}
    for tokens, loss, patches in docs:
        seen[hashlib.sha256(patches[0].tobytes()).hexdigest()] = tok.decode(tokens[loss == 1])
    assert seen == expected
    shard = json.loads((out / "shard-00000.json").read_text())
    assert shard["source"]["kind"] == "imagenet" and shard["seed"] == 0 and shard["max_side"] == SIDE
    assert set(shard["files"]) == {f"shard-00000.{p}.{e}" for p in ("tokens", "loss", "pixels") for e in ("bin", "idx")}


def test_captions_from_tar_jsonl_and_parquet(captions, tok, tmp_path):
    root, good, skipped = captions
    out = tmp_path / "out"
    assert cli("captions", "--input", f"{root}/*.tar", root / "pairs.jsonl", f"{root}/*.parquet",
               "--output", out, "--shard-size", 6, *OPTS) == 0
    manifest = read_folder_manifest(out)
    assert manifest["skipped"] == dict(sorted(skipped.items()))
    docs = documents_of(out)
    got = {tok.decode(t[mask == 1]): p[0] for t, mask, p in docs}
    assert set(got) == set(good)
    for caption in good:
        assert got[caption].shape[1] == 3 * PATCH * PATCH
    # The image travels intact: compare one with the vision pipeline.
    np.testing.assert_array_equal(got["A horse in JSONL."], encode_image(photo("horse.png"), PATCH, SIDE).patches)


def test_html_pairs_with_truncation(tok, tmp_path):
    long_html = "<html><body>" + "<p>Some paragraph text here.</p>" * 400 + "</body></html>"
    with tarfile.open(tmp_path / "web.tar", "w") as tar:
        add_members(tar, [("a.png", photo("page.png", 200, "PNG")), ("a.html", b"<h1>Title</h1>"),
                          ("b.png", photo("text.png", 200, "PNG")), ("b.html", long_html.encode())])
    pq.write_table(pa.table({"image": [{"bytes": photo("logo.png", 200, "PNG"), "path": None}],
                             "text": ["<div>logo</div>"]}), tmp_path / "websight.parquet")
    out = tmp_path / "out"
    assert cli("html", "--input", tmp_path / "web.tar", tmp_path / "websight.parquet", "--output", out, *OPTS) == 0
    manifest = read_folder_manifest(out)
    assert manifest["totals"]["truncated"] == 1 and manifest["totals"]["documents"] == 3
    texts = sorted(tok.decode(t[mask == 1]) for t, mask, _ in documents_of(out))
    assert texts[:2] == ["<div>logo</div>", "<h1>Title</h1>"]
    assert long_html.startswith(texts[2]) and len(texts[2]) < len(long_html)


def test_text_from_zst_with_a_truncated_file(tok, tmp_path):
    texts = [f"Document number {i}. " + "Some words to make it longer. " * (i % 7 + 1) for i in range(300)]
    texts[5] = "long " * 5000  # longer than the sequence: cut into pieces
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    # Several zstd blocks (128 KiB each) of hard-to-compress lines, cut in the middle.
    lines = "".join(json.dumps({"text": hashlib.sha256(str(i).encode()).hexdigest() * 4}) + "\n" for i in range(3000))
    damaged = zstandard.ZstdCompressor(level=3).compress(lines.encode())
    cut = damaged[:len(damaged) // 2]
    (tmp_path / "b.jsonl.zst").write_bytes(cut)
    kept = zstandard.ZstdDecompressor().decompressobj().decompress(cut).count(b"\n")
    assert 0 < kept < 3000
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "Plain JSONL."}) + "\n" + json.dumps({"text": ""}) + "\n")
    out = tmp_path / "out"
    assert cli("text", "--input", f"{tmp_path}/*.jsonl*", "--output", out, "--shard-size", 1000, *OPTS) == 0
    manifest = read_folder_manifest(out)
    assert manifest["skipped"] == {"empty_text": 1, "truncated_zst": 1}
    assert manifest["totals"]["documents"] == 300 + kept + 1
    assert manifest["totals"]["fill"] > 0.9  # equal-length documents leave a gap per sample
    docs = documents_of(out)
    assert sum(1 for t, _, _ in docs if t[0] == tok.bos_id) == 300 + kept + 1
    pieces = [t for t, _, _ in docs if len(t) == SEQ or (t[0] != tok.bos_id)]
    assert len(pieces) >= 2  # the long document, cut


def test_sft_end_to_end(tok, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "cat.jpg").write_bytes(photo("chelsea.png"))
    records = [
        {"id": "a", "image": "cat.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat animal?"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        {"id": "c", "image": "missing.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Nothing."}]},
        {"id": "d", "conversations": [{"from": "human", "value": "<image>\nNo image here"},
                                      {"from": "gpt", "value": "?"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    assert cli("sft", "--input", tmp_path / "llava.json", "--images", images, "--output", out, *OPTS) == 0
    manifest = read_folder_manifest(out)
    assert manifest["skipped"] == {"bad_conversation": 1, "unreadable_file": 1}
    answers = sorted(tok.decode(t[mask == 1]) for t, mask, _ in documents_of(out))
    assert answers == ["A cat.", "Hello!"]


@pytest.mark.parametrize("args, message", [
    (["imagenet", "--input", "{tmp}/nope", "--synsets", "{tmp}/syn.txt"], "--input {tmp}/nope: no such folder"),
    (["imagenet", "--input", "{tmp}", "--synsets", "{tmp}/nope.txt"], "--synsets {tmp}/nope.txt: no such file"),
    (["imagenet", "--input", "{tmp}", "--synsets", "{tmp}/syn.txt"], "--input {tmp}: no images"),
    (["captions", "--input", "{tmp}/*.tar"], "--input {tmp}/*.tar: no files match"),
    (["text", "--input", "{tmp}/syn.txt"], "--input {tmp}/syn.txt: unsupported file type"),
    (["sft", "--input", "{tmp}/syn.txt", "--images", "{tmp}"], "{tmp}/syn.txt: not a readable JSON"),
    (["sft", "--input", "{tmp}/syn.txt", "--images", "{tmp}/nope"], "--images {tmp}/nope: no such folder"),
    (["text", "--input", "{tmp}/a.jsonl", "--output", "{tmp}/syn.txt"],
     "--output {tmp}/syn.txt exists and is not a folder"),
    (["text", "--input", "{tmp}/a.jsonl", "--max-side", "100"], "--max-side 100 is not a multiple of --patch-size 32"),
    (["stats", "{tmp}"], "{tmp}: no complete shards"),
])
def test_wrong_arguments_exit_2_naming_the_path(tmp_path, capsys, args, message):
    (tmp_path / "syn.txt").write_text("n01440764 tench\n")
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    argv = [a.format(tmp=tmp_path) for a in args]
    if argv[0] != "stats" and "--output" not in argv:
        argv += ["--output", str(tmp_path / "out")]
    assert main(argv) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_workers_do_not_change_bytes_and_rerun_rewrites_nothing(imagenet, tmp_path, capsys):
    root, good = imagenet
    args = ["imagenet", "--input", root / "train", "--synsets", root / "synsets.txt", "--shard-size", 5, *OPTS[:-2]]
    assert cli(*args, "--output", tmp_path / "one", "--workers", 1) == 0
    assert cli(*args, "--output", tmp_path / "two", "--workers", 2) == 0
    one, two = tree_bytes(tmp_path / "one"), tree_bytes(tmp_path / "two")
    assert len(one) == 1 + 7 * 5 and one == two
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").glob("shard-*")}
    assert cli(*args, "--output", tmp_path / "one", "--workers", 2) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").glob("shard-*")} == mtimes
    # Other options into the same folder: refused before any work.
    assert cli(*args, "--output", tmp_path / "one", "--seed", 1) == 2
    assert "holds shards made from other inputs or options" in capsys.readouterr().err
    # stats: the totals (Table 1 of the paper); a row per shard only on request.
    assert cli("stats", tmp_path / "one") == 0
    stats = capsys.readouterr().out
    [total] = [line for line in stats.splitlines() if line.startswith("total")]
    assert total.split()[1] == str(len(good)) and "decompression_bomb 1" in stats and "shard-0000" not in stats
    assert cli("stats", tmp_path / "one", "--per-shard") == 0
    stats = capsys.readouterr().out
    assert "shard-00004" in stats
    assert [line.split() for line in stats.splitlines() if line.startswith("total")] == [total.split()]


def test_streamed_sources_give_the_same_bytes_for_any_worker_count(captions, tmp_path):
    """Tars, JSONL and Parquet (with their damaged records) are read as streams and split into
    shards by record count: the split, the order and the bytes must not depend on --workers."""
    root, good, skipped = captions
    args = ["captions", "--input", f"{root}/*.tar", root / "pairs.jsonl", f"{root}/*.parquet",
            "--shard-size", 3, *OPTS[:-2]]
    for workers in (1, 2, 3):
        assert cli(*args, "--output", tmp_path / f"w{workers}", "--workers", workers) == 0
    one = tree_bytes(tmp_path / "w1")
    assert len([name for name in one if name.endswith(".json") and name.startswith("shard-")]) >= 3
    assert one == tree_bytes(tmp_path / "w2") == tree_bytes(tmp_path / "w3")
    assert read_folder_manifest(tmp_path / "w1")["skipped"] == dict(sorted(skipped.items()))


def test_kill_and_resume(imagenet, tmp_path):
    root, _ = imagenet
    args = ["imagenet", "--input", root / "train", "--synsets", root / "synsets.txt", "--shard-size", 1, *OPTS[:-2]]
    out = tmp_path / "out"
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "solo.preprocess.cli", *map(str, args),
                                 "--output", str(out), "--workers", "2"], stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        while not list(out.glob("shard-*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    complete = list_shards(out, include_empty=True)
    assert 1 <= len(complete) < 25, (tmp_path / "log.txt").read_text()[-2000:]
    for prefix in complete:  # whatever is visible is whole
        open_shard(prefix, verify_checksum=True)
    mtimes = {p.name: p.stat().st_mtime_ns for prefix in complete for p in out.glob(os.path.basename(prefix) + ".*")}
    assert cli(*args, "--output", out, "--workers", 2) == 0
    assert {name: (out / name).stat().st_mtime_ns for name in mtimes} == mtimes
    assert not list(out.glob(".tmp-*"))
    assert cli(*args, "--output", tmp_path / "clean", "--workers", 1) == 0
    assert tree_bytes(out) == tree_bytes(tmp_path / "clean")


def test_count_and_read_agree_on_damaged_files(captions):
    root, _, _ = captions
    for name in ("00000.tar", "00001.tar", "pairs.jsonl", "pairs.parquet"):
        path = str(root / name)
        n = formats.count_records("captions", path)
        assert n == len(list(formats.read_records("captions", path, 0, None)))
        assert [r.key for r in formats.read_records("captions", path, 1, 3)] == \
               [r.key for r in formats.read_records("captions", path, 0, None)][1:3]


# -- damaged inputs and failures at the edges --------------------------------------------------

def test_tar_reads_on_past_corrupt_member_headers(tok, tmp_path, caplog):
    keys = [f"{k:09d}" for k in range(8)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:  # img2dataset's layout
        for k, key in enumerate(keys):
            add_members(tar, [(f"{key}.jpg", photo("rocket.jpg", 96 + 8 * k)), (f"{key}.txt", f"rocket {k}".encode()),
                              (f"{key}.json", json.dumps({"key": key, "caption": f"rocket {k}"}).encode())])
    data = bytearray(buf.getvalue())
    header = {m.name: m.offset for m in tarfile.open(fileobj=io.BytesIO(bytes(data)))}
    # Record 2's caption header: a checksum that is no number; its name still says whose it was.
    at = header[f"{keys[2]}.txt"]
    data[at + 148:at + 156] = b"9999999\0"
    # Record 5's image header, name and checksum overwritten: it may have been record 4's last
    # member as well as record 5's first, so both go (record 4 was intact: the price of not knowing).
    at = header[f"{keys[5]}.jpg"]
    data[at:at + 156] = b"\xfe\xff" * 78
    (tmp_path / "00000.tar").write_bytes(bytes(data))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="solo.preprocess"):
        assert cli("captions", "--input", tmp_path / "00000.tar", "--output", out, *OPTS) == 0
    manifest = read_folder_manifest(out)
    assert manifest["skipped"] == {"corrupt_tar_member": 3} and manifest["totals"]["records"] == 8
    kept = sorted(tok.decode(t[mask == 1]) for t, mask, _ in documents_of(out))
    assert kept == [f"rocket {k}" for k in (0, 1, 3, 6, 7)]
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skip")]
    assert [m.split(": ")[0] for m in skips] == [f"skip captions 00000.tar:{keys[k]}" for k in (2, 4, 5)]
    assert all("corrupt_tar_member: unreadable tar header at byte" in m for m in skips)
    # Planning counts what the shards read, from any record on.
    path = str(tmp_path / "00000.tar")
    assert formats.count_records("captions", path) == 8
    assert [r.key for r in formats.read_records("captions", path, 3, 6)] == \
        [r.key for r in formats.read_records("captions", path, 0, None)][3:6]


def test_skip_logs_name_the_file_below_the_inputs_and_the_record(tmp_path, caplog):
    # SlimPajama's layout: the same file name in every chunk folder.
    for chunk, texts in (("chunk1", ["One.", "Two."]), ("chunk2", ["Three.", " "])):
        (tmp_path / chunk).mkdir()
        (tmp_path / chunk / "example_train_0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    with caplog.at_level(logging.WARNING, logger="solo.preprocess"):
        assert cli("text", "--input", f"{tmp_path}/chunk*/*.jsonl", "--output", tmp_path / "out", *OPTS) == 0
    [skip] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skip")]
    assert skip.startswith("skip text chunk2/example_train_0.jsonl:2: empty_text:"), skip


def test_parquet_image_values_that_are_neither_bytes_nor_a_path_are_skipped(tmp_path):
    # Never handed to load_image: open(n) reads, then closes, this process's own file descriptor n.
    pq.write_table(pa.table({"jpg": [10**6, 10**6 + 1], "txt": ["an int", "another"]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"image": [[1, 2, 3]], "caption": ["a list"]}), tmp_path / "lists.parquet")
    pq.write_table(pa.table({"jpg": [photo("coins.png")], "txt": ["Coins."]}), tmp_path / "good.parquet")
    out = tmp_path / "out"
    assert cli("captions", "--input", f"{tmp_path}/*.parquet", "--output", out, *OPTS) == 0
    manifest = read_folder_manifest(out)
    assert manifest["skipped"] == {"bad_image_value": 3} and manifest["totals"]["documents"] == 1
    [record, _] = formats.read_records("captions", str(tmp_path / "ints.parquet"), 0, None)
    assert record.error == ("bad_image_value", "column 'jpg' holds int 1000000, expected encoded bytes or a path")


def test_workers_default_to_the_cpus_this_process_may_run_on(monkeypatch):
    # A SLURM job or cgroup cpuset gets 3 of the node's 64 cores: 64 workers would oversubscribe them.
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3, 5}, raising=False)
    assert build_parser().parse_args(["text", "--input", "x", "--output", "y"]).workers == 3


class _FullSpill:
    """`open` for pipeline.py (the spill file) on a disk that takes `budget` bytes, then fails writes
    with ENOSPC naming no file, as a real full disk does. Forked workers each inherit a budget."""

    def __init__(self, budget: int):
        self.budget = budget

    def open(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        disk, write = self, f.write

        def limited(data):
            if memoryview(data).nbytes > disk.budget:
                raise OSError(errno.ENOSPC, "No space left on device")
            disk.budget -= memoryview(data).nbytes
            return write(data)

        f.write = limited
        return f


@pytest.mark.parametrize("disk", ["spill", "manifest", "tmpfs"])
def test_a_full_disk_is_one_line_naming_the_file_and_a_rerun_finishes(imagenet, tmp_path, monkeypatch, capsys, disk):
    root, good = imagenet
    args = ["imagenet", "--input", root / "train", "--synsets", root / "synsets.txt", "--shard-size", 5,
            *OPTS[:-2], "--workers", 2, "--output", tmp_path / "disk" / "out"]
    out = tmp_path / "disk" / "out"
    if disk == "tmpfs":  # a real one: whichever write comes first fails (spill, shard or manifest)
        mount_tmpfs(out.parent, "1m")
    elif disk == "spill":
        monkeypatch.setattr(pipeline, "open", _FullSpill(400_000).open, raising=False)
    else:
        monkeypatch.setattr(fileio, "open", full_disk_open(".tmp-manifest.json"), raising=False)
    try:
        assert cli(*args) == 2
        err = capsys.readouterr().err
        [line] = [line for line in err.splitlines() if "error:" in line]
        assert "No space left on device" in line and line.endswith(
            "(disk full: free space, then rerun the same command to finish)"), err[-3000:]
        assert "Traceback" not in err
        if disk == "spill":
            assert re.search(rf"error: {re.escape(str(out))}/\.tmp-shard-\d{{5}}\.spill: No space", line), line
        elif disk == "manifest":
            assert f"error: {out}/.tmp-manifest.json: No space" in line
        # Nothing half-written: no temporary of any worker, no shard file without its manifest.
        names = [p.name for p in out.iterdir()]
        complete = {os.path.basename(p) for p in list_shards(out, include_empty=True)}
        assert not [n for n in names if n.startswith(".tmp-")], names
        assert all(n.split(".")[0] in complete for n in names if n.startswith("shard-")), names
        if disk == "tmpfs":
            resize_tmpfs(out.parent, "64m")
        monkeypatch.undo()  # the operator frees space
        assert cli(*args) == 0
        manifest = read_folder_manifest(out)
        assert manifest["complete"] and manifest["totals"]["documents"] == len(good)
        documents_of(out)
    finally:
        if disk == "tmpfs":
            unmount(out.parent)



# -- issue 17: argument values, malformed manifests, bad text, image paths and formats, memory ---

@pytest.mark.parametrize("option, value", [("--seed", "-1"), ("--workers", "0"), ("--workers", "-3"),
                                           ("--seq-length", "0"), ("--patch-size", "0"), ("--max-side", "-32"),
                                           ("--shard-size", "0"), ("--seed", "x")])
def test_bad_argument_values_are_argparse_errors_before_any_work(tmp_path, capsys, option, value):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(SystemExit) as e:
        main(["text", "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "out"), option, value])
    assert e.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert line.startswith("solo-preprocess text: error: argument ") and option in line and value in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["[]", "3", '"shard"', '{"shard": "zero"}'])
def test_a_shard_manifest_that_is_not_an_object_is_named_by_stats_and_by_a_resume(tmp_path, capsys, content):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(4)))
    args = ["text", "--input", tmp_path / "a.jsonl", "--output", tmp_path / "out", *OPTS, "--shard-size", "2"]
    assert cli(*args) == 0
    manifest = tmp_path / "out" / "shard-00001.json"
    manifest.write_text(content)
    capsys.readouterr()
    for argv in (["stats", tmp_path / "out"], args):
        assert cli(*argv) == 2
        err = capsys.readouterr().err
        assert f"solo-preprocess: error: {manifest}: not a shard manifest" in err and "Traceback" not in err, err


def test_a_lone_surrogate_in_json_text_is_a_skipped_record_not_a_failed_run(tmp_path, tok):
    # JSON may escape a lone UTF-16 surrogate ("\ud800"); no UTF-8 text holds one, so the record is
    # unusable: skipped as bad_text, the rest of the run goes on (a rerun used to fail the same way).
    bad = r'"a \ud800 b"'
    (tmp_path / "a.jsonl").write_text('{"text": "good one"}\n' + f'{{"text": {bad}}}\n'
                                      + f'{{"text": "fine", "meta": {bad}}}\n')
    with tarfile.open(tmp_path / "c.tar", "w") as tar:
        add_members(tar, [("0.jpg", photo("chelsea.png")), ("0.txt", b"a cat")])
        add_members(tar, [("1.jpg", photo("chelsea.png")), ("1.json", f'{{"caption": {bad}}}'.encode())])
    (tmp_path / "cat.jpg").write_bytes(photo("chelsea.png"))
    turn = '{"from": "gpt", "value": "A cat."}'
    (tmp_path / "llava.json").write_text("[" + ", ".join([
        f'{{"id": "ok", "conversations": [{{"from": "human", "value": "Hi"}}, {turn}]}}',
        f'{{"id": "v", "conversations": [{{"from": "human", "value": {bad}}}, {turn}]}}',
        f'{{"id": "i", "image": {bad}, "conversations": [{{"from": "human", "value": "What?"}}, {turn}]}}',
        f'{{"id": {bad}, "conversations": [{{"from": "human", "value": "Hi"}}, {turn}]}}']) + "]")
    runs = [(["text", "--input", tmp_path / "a.jsonl"], {"bad_text": 1}, 2),
            (["captions", "--input", tmp_path / "c.tar"], {"bad_text": 1}, 1),
            (["sft", "--input", tmp_path / "llava.json", "--images", tmp_path], {"bad_text": 2}, 2)]
    for args, skipped, documents in runs:
        out = tmp_path / f"out-{args[0]}"
        for _ in range(2):  # and the rerun resumes the finished folder
            assert cli(*args, "--output", out, *OPTS) == 0
        manifest = read_folder_manifest(out)
        assert manifest["skipped"] == skipped and manifest["totals"]["documents"] == documents, args


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["EPS", "PDF", "PPM", "ICO", "TGA"])
def test_images_are_limited_to_the_raster_formats_the_project_reads(tmp_path, monkeypatch, fmt):
    from PIL import EpsImagePlugin

    from solo.vision import IMAGE_FORMATS, ImageLoadError, load_image

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))  # never run an EPS
    assert set(IMAGE_FORMATS) == {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
    with pytest.raises(ImageLoadError) as e:
        load_image(_encoded(fmt), name="picture")
    assert e.value.reason == "unsupported_format" and str(e.value).startswith("picture: "), e.value
    assert not calls
    for ok in IMAGE_FORMATS:
        assert load_image(_encoded(ok)).size == (64, 64)
    rows = [{"image_base64": base64.b64encode(_encoded(f)).decode(), "caption": f"a {f} picture"}
            for f in (fmt, "PNG")]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli("captions", "--input", tmp_path / "a.jsonl", "--output", tmp_path / "out", *OPTS) == 0
    manifest = read_folder_manifest(tmp_path / "out")
    assert manifest["skipped"] == {"unsupported_format": 1} and manifest["totals"]["documents"] == 1


def _slimpajama_lines(tmp_path):
    """SlimPajama-shaped records: 3 of each subset, and 2 without meta."""
    sets = ["RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaArXiv"]
    rows = [{"text": f"{name} document {i}.", "meta": {"redpajama_set_name": name}} for name in sets for i in range(3)]
    rows += [{"text": f"No meta {i}."} for i in range(2)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "chunk.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    return tmp_path / "chunk.jsonl.zst"


def _texts(folder, tok):
    return sorted(tok.decode([int(i) for i in t[1:-1]]) for t, _, _ in documents_of(folder))


@pytest.mark.parametrize("option,kept", [
    # The SOLO authors' filter; records without meta are kept by an exclude list ...
    ("--exclude-subsets=RedPajamaCommonCrawl,RedPajamaC4", {"RedPajamaGithub", "RedPajamaArXiv", "No meta"}),
    # ... and dropped by an include list.
    ("--include-subsets=RedPajamaArXiv", {"RedPajamaArXiv"}),
])
def test_text_subsets_are_filtered_on_meta_and_counted(tok, tmp_path, option, kept):
    source, out = _slimpajama_lines(tmp_path), tmp_path / "out"
    assert cli("text", "--input", source, "--output", out, option, *OPTS) == 0
    manifest = read_folder_manifest(out)
    texts = _texts(out, tok)
    assert {t.rsplit(" ", 1)[0].replace(" document", "") for t in texts} == kept
    dropped = 14 - len(texts)
    assert manifest["skipped"] == {"excluded_subset": dropped}
    subsets = manifest["subsets"]
    assert {k: v["records"] for k, v in subsets.items()} == {
        "RedPajamaArXiv": 3, "RedPajamaC4": 3, "RedPajamaCommonCrawl": 3, "RedPajamaGithub": 3, "(none)": 2}
    assert sum(v["excluded"] for v in subsets.values()) == dropped
    assert subsets["RedPajamaArXiv"]["excluded"] == 0
    assert manifest["spec"]["source"]["subsets"]  # another filter, another spec: a rerun never mixes them


def test_text_subset_options_that_contradict_are_refused(tmp_path, capsys):
    source = _slimpajama_lines(tmp_path)
    assert cli("text", "--input", source, "--output", tmp_path / "out", "--include-subsets", "RedPajamaC4",
               "--exclude-subsets", "RedPajamaC4", *OPTS) == 2
    assert "solo-preprocess: error: --include-subsets and --exclude-subsets both name ['RedPajamaC4']" in \
        capsys.readouterr().err
