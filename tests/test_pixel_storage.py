"""Pixel storage as a shard option (issue 20): raw patches, or the resized image as one PNG (exact)
or JPEG (<= 450 bytes per vision token at >= 40 dB) file, every kind read back by `Shard.sample`
as the same uint8 patches; a stored image that disagrees with its token grid is refused before
it is decoded."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageFile

import solo.data.shards as shards
from solo.data.shards import PackedSample, ShardError, ShardWriter, open_shard
from solo.demo_data import BENCHMARK_PHOTOS, PHOTOS, skimage_photo, write_imagenet
from solo.preprocess.cli import main
from solo.tokenizer import SOLOTokenizer
from solo.vision import encode_image, image_token_ids
from tests.shard_fixtures import image_documents, text_documents, write_sources
from tests.torchrun import free_port

PATCH = 32
SEQ = 4096


def photo_documents(tok, names, max_side=1024):
    """One document per photograph at the SOLO size: <s> image name </s>."""
    docs = []
    for name in names:
        image = encode_image(skimage_photo(name), PATCH, max_side)
        text = tok.encode(name.split(".")[0])
        tokens = [tok.bos_id] + image_token_ids(image.rows, image.cols, tok) + text + [tok.eos_id]
        docs.append((tokens, [0] * (len(tokens) - len(text) - 1) + [1] * (len(text) + 1), [image.patches]))
    return docs


def write_shard(prefix, samples, **pixels):
    writer = ShardWriter(prefix, PATCH, SEQ, **pixels)
    for sample in samples:
        writer.add_sample(sample)
    return writer.finish({"seq_length": SEQ, "patch_size": PATCH})


def read_all(prefix):
    shard = open_shard(prefix, verify_checksum=True)
    return [shard.sample(i) for i in range(len(shard))]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def tok():
    return SOLOTokenizer.default()


def test_png_storage_reads_back_the_raw_patches_exactly(tmp_path, tok):
    # Photos, a sample of text only, and images of noise (which no codec shrinks) side by side.
    rng = np.random.default_rng(0)
    noise = [([tok.bos_id] + image_token_ids(r, c, tok) + [tok.eos_id], [0] * (r * c + r + 2) + [1],
              [rng.integers(0, 256, (r * c, 3 * PATCH * PATCH), dtype=np.uint8)]) for r, c in ((1, 1), (2, 3))]
    docs = image_documents(tok, max_side=128)
    samples = [PackedSample.of_documents(docs[:3]), PackedSample.of_documents(text_documents(tok, SEQ, 2)),
               PackedSample.of_documents(noise + docs[3:5])]
    raw, png = (write_shard(tmp_path / kind, samples, pixels=kind) for kind in ("raw", "png"))
    assert raw["pixels"] == {"kind": "raw"} and png["pixels"] == {"kind": "png"}
    for a, b, written in zip(read_all(tmp_path / "raw"), read_all(tmp_path / "png"), samples, strict=True):
        np.testing.assert_array_equal(b.tokens, written.tokens)
        assert b.document_lengths == written.document_lengths and len(b.patches) == len(written.patches)
        for x, y, z in zip(a.patches, b.patches, written.patches, strict=True):
            assert y.dtype == np.uint8 and y.shape == z.shape
            np.testing.assert_array_equal(y, z)
            np.testing.assert_array_equal(x, z)
    assert png["files"]["png.pixels.bin"]["bytes"] < 0.7 * raw["files"]["raw.pixels.bin"]["bytes"]


@pytest.fixture(scope="module")
def benchmark_shards(tmp_path_factory, tok):
    """Every benchmark photograph at the SOLO size, one per sample, as raw and as JPEG q95 4:4:4."""
    root = tmp_path_factory.mktemp("photos")
    samples = [PackedSample.of_documents([d]) for d in photo_documents(tok, BENCHMARK_PHOTOS)]
    manifests = {kind: write_shard(root / kind, samples, pixels=kind) for kind in ("raw", "jpeg")}
    return root, manifests


def test_jpeg_storage_meets_the_byte_and_psnr_target_on_the_benchmark_photos(benchmark_shards):
    root, manifests = benchmark_shards
    jpeg = manifests["jpeg"]
    assert jpeg["pixels"] == {"kind": "jpeg", "quality": 95, "subsampling": "4:4:4"}
    tokens = jpeg["counts"]["vision_tokens"]
    assert tokens == manifests["raw"]["counts"]["vision_tokens"] > 5000
    assert manifests["raw"]["files"]["raw.pixels.bin"]["bytes"] == 3 * PATCH * PATCH * tokens
    bytes_per_token = jpeg["files"]["jpeg.pixels.bin"]["bytes"] / tokens
    assert bytes_per_token <= 450, bytes_per_token
    quality = [psnr(a.patches[0], b.patches[0]) for a, b in zip(read_all(root / "raw"), read_all(root / "jpeg"),
                                                              strict=True)]
    assert min(quality) >= 40, dict(zip(BENCHMARK_PHOTOS, quality, strict=True))


def test_jpeg_quality_and_subsampling_are_applied_and_recorded(tmp_path, tok, benchmark_shards):
    samples = [PackedSample.of_documents(photo_documents(tok, ("chelsea.png", "coffee.png")))]
    sizes = {}
    for quality, subsampling in ((95, "4:4:4"), (95, "4:2:0"), (80, "4:4:4")):
        prefix = tmp_path / f"q{quality}-{subsampling.replace(':', '')}"
        manifest = write_shard(prefix, samples, pixels="jpeg", jpeg_quality=quality, jpeg_subsampling=subsampling)
        assert manifest["pixels"] == {"kind": "jpeg", "quality": quality, "subsampling": subsampling}
        shard = open_shard(prefix)
        assert shard.storage == shards.PixelStorage("jpeg", quality, subsampling)
        sizes[quality, subsampling] = manifest["files"][f"{prefix.name}.pixels.bin"]["bytes"]
        with Image.open(io.BytesIO(shard.parts["pixels"][0].tobytes())) as stored:
            assert stored.format == "JPEG" and stored.layer[0][1:3] == ((1, 1) if subsampling == "4:4:4" else (2, 2))
    assert sizes[95, "4:2:0"] < sizes[95, "4:4:4"] and sizes[80, "4:4:4"] < sizes[95, "4:4:4"]


@pytest.mark.parametrize("options,message", [
    ({"pixels": "webp"}, "pixel storage 'webp': one of raw, jpeg, png"),
    ({"pixels": "jpeg", "jpeg_quality": 0}, "jpeg quality 0: an int in [1, 100]"),
    ({"pixels": "jpeg", "jpeg_subsampling": "4:1:1"}, "jpeg subsampling '4:1:1'"),
])
def test_writer_refuses_unknown_storage_options(tmp_path, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ShardWriter(tmp_path / "s", PATCH, **options)


@pytest.mark.parametrize("entry,message", [
    ({"kind": "webp"}, "pixel storage 'webp'"),
    ({"kind": "jpeg"}, "jpeg records both"),
    ({"kind": "png", "quality": 95}, "quality and subsampling belong to jpeg"),
    ("jpeg", "an object"),
])
def test_open_refuses_a_manifest_with_an_unknown_storage(tmp_path, tok, entry, message):
    prefix = tmp_path / "shard-00000"
    write_shard(prefix, [PackedSample.of_documents(image_documents(tok)[:1])], pixels="png")
    manifest = json.loads(prefix.with_suffix(".json").read_text())
    prefix.with_suffix(".json").write_text(json.dumps({**manifest, "pixels": entry}))
    with pytest.raises(ShardError, match=f"{prefix}.json: bad 'pixels'.*{message}"):
        open_shard(prefix)


def _jpeg(width, height, mode="RGB", cut=0):
    noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).convert(mode).save(buffer, "JPEG")
    return buffer.getvalue()[:len(buffer.getvalue()) - cut]


def _png(width, height):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


# The shard's one image is a 2x3 grid of 32-pixel patches: 96x64 pixels.
@pytest.mark.parametrize("stored,message", [
    (lambda: _jpeg(960, 640), "RGB 960x640 image, the tokens say RGB 96x64 \\(2x3 patches\\)"),
    (lambda: _jpeg(64, 96), "RGB 64x96 image, the tokens say RGB 96x64"),
    (lambda: _jpeg(96, 64, mode="L"), "L 96x64 image"),
    (lambda: _png(96, 64), "not a jpeg image"),
    (lambda: _jpeg(96, 64, cut=200), "cannot decode the jpeg image"),
])
def test_a_stored_image_that_disagrees_with_its_grid_is_refused_before_decoding(tmp_path, tok, monkeypatch,
                                                                                  stored, message):
    doc = ([tok.bos_id] + image_token_ids(2, 3, tok) + [tok.eos_id], [0] * 10 + [1],
           [np.zeros((6, 3 * PATCH * PATCH), np.uint8)])
    monkeypatch.setattr(shards, "encode_stored_image", lambda *args, **kwargs: stored())
    prefix = tmp_path / "shard-00000"
    write_shard(prefix, [PackedSample.of_documents(text_documents(tok, SEQ, 1)), PackedSample.of_documents([doc])],
                pixels="jpeg")
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or real_load(im))
    shard = open_shard(prefix, verify_checksum=True)
    assert shard.sample(0).patches == [] and len(shard.sample(1, with_patches=False).tokens) == 11
    with pytest.raises(ShardError, match=f"{prefix}: sample 1: image 0: {message}"):
        shard.sample(1)
    assert all(size == (96, 64) for size in decoded), decoded  # nothing of another size was decoded


def test_image_grids_are_read_from_the_token_layout(tok):
    shapes = [(2, 3), (1, 1), (4, 1), (1, 5)]
    tokens = [tok.bos_id]
    for rows, cols in shapes:
        tokens += image_token_ids(rows, cols, tok) + [100]
    assert shards.image_grids(np.array(tokens, np.int32)) == shapes
    v, p, sep, end = tok.vision_start_id, tok.patch_id, tok.row_sep_id, tok.vision_end_id
    for bad in ([v, end], [v, sep, end], [v, p, p, sep, p, end], [v, p, sep, sep, p, end], [v, p, 100, end]):
        with pytest.raises(ValueError, match="the image at token 0 is not a grid of <vpatch> rows"):
            shards.image_grids(np.array(bad, np.int32))
    for bad in ([end, v, p, end], [v, p, v, p, end, end], [v, p]):
        with pytest.raises(ValueError, match="do not pair up"):
            shards.image_grids(np.array(bad, np.int32))


def test_encoded_storage_needs_each_image_as_a_token_grid(tmp_path, tok):
    # <vpatch> tokens outside a <vision> span: raw storage takes them, jpeg has no grid to store.
    tokens = [tok.bos_id, tok.patch_id, tok.patch_id, tok.eos_id]
    sample = PackedSample(np.array(tokens, np.int32), np.array([0, 0, 0, 1], np.uint8), [4],
                          [np.zeros((2, 3 * PATCH * PATCH), np.uint8)])
    write_shard(tmp_path / "raw", [sample])
    with pytest.raises(ShardError, match=re.escape("sample 0: jpeg storage needs each image's grid: the tokens "
                                                   "hold grids [], the images [2] patches")):
        write_shard(tmp_path / "jpeg", [sample], pixels="jpeg")
    sample.tokens[0] = tok.vision_start_id  # a <vision> that never closes
    with pytest.raises(ShardError, match="sample 0: png storage needs each image's grid: <vision> at"):
        write_shard(tmp_path / "png", [sample], pixels="png")


def test_a_damaged_jpeg_pixels_bin_fails_the_checksum(tmp_path, tok):
    prefix = tmp_path / "shard-00000"
    write_shard(prefix, [PackedSample.of_documents(image_documents(tok)[:2])], pixels="jpeg")
    path = prefix.with_name(prefix.name + ".pixels.bin")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="pixels.bin does not match its"):
        open_shard(prefix, verify_checksum=True)


@pytest.fixture(scope="module")
def imagenet_kinds(tmp_path_factory):
    """solo-preprocess imagenet on one folder of photos, once per storage kind."""
    root = tmp_path_factory.mktemp("imagenet")
    write_imagenet(root / "in", dict(list(PHOTOS.items())[:6]), images_per_class=2)
    options = {"raw": [], "png": ["--pixels", "png"], "jpeg": ["--pixels", "jpeg", "--jpeg-quality", "90"]}
    for kind, extra in options.items():
        assert main(["imagenet", "--input", str(root / "in" / "train"), "--synsets",
                     str(root / "in" / "LOC_synset_mapping.txt"), "--output", str(root / kind), "--seq-length",
                     "2048", "--max-side", "256", "--workers", "1", "--shard-size", "5", *extra]) == 0
    return root


def test_solo_preprocess_pixels_writes_every_kind_and_reads_back_the_same_samples(imagenet_kinds):
    root = imagenet_kinds
    prefixes = {kind: shards.list_shards(root / kind) for kind in ("raw", "png", "jpeg")}
    assert [len(p) for p in prefixes.values()] == [3, 3, 3]  # 12 images, 5 a shard
    for k in range(3):
        manifests = {kind: json.loads(Path(f"{p[k]}.json").read_text()) for kind, p in prefixes.items()}
        assert manifests["jpeg"]["pixels"] == {"kind": "jpeg", "quality": 90, "subsampling": "4:4:4"}
        assert manifests["png"]["pixels"] == {"kind": "png"} and manifests["raw"]["pixels"] == {"kind": "raw"}
        raw, png, jpeg = (read_all(p[k]) for p in prefixes.values())
        for a, b, c in zip(raw, png, jpeg, strict=True):
            np.testing.assert_array_equal(a.tokens, c.tokens)
            for x, y, z in zip(a.patches, b.patches, c.patches, strict=True):
                np.testing.assert_array_equal(x, y)
                assert z.shape == x.shape and 35 < psnr(x, z) < float("inf")
    # The storage is part of the run's fingerprint: another kind into the same folder is refused.
    assert main(["imagenet", "--input", str(root / "in" / "train"), "--synsets",
                 str(root / "in" / "LOC_synset_mapping.txt"), "--output", str(root / "raw"), "--seq-length", "2048",
                 "--max-side", "256", "--workers", "1", "--shard-size", "5", "--pixels", "png"]) == 2


def test_stats_reports_bytes_per_vision_token_and_the_projected_size(imagenet_kinds, capsys):
    for kind, label in (("raw", "raw"), ("jpeg", "jpeg (quality 90, 4:4:4)")):
        folder = imagenet_kinds / kind
        assert main(["stats", str(folder), "--tokens", "1.5B"]) == 0
        out = capsys.readouterr().out
        manifest = shards.read_folder_manifest(folder)
        on_disk = {f.name: f.stat().st_size for f in folder.glob("shard-*.*.*")}
        vision, tokens = manifest["totals"]["vision_tokens"], manifest["totals"]["tokens"]
        pixel_bytes = sum(n for name, n in on_disk.items() if ".pixels." in name)
        assert f"pixels: {label}, {pixel_bytes / vision:,.1f} bytes per vision token" in out, out
        per_token = sum(on_disk.values()) / tokens
        projected = f"{per_token * 1.5e9 / 1e12:,.2f} TB" if per_token * 1.5e9 >= 1e12 else \
            f"{per_token * 1.5e9 / 1e9:,.2f} GB"
        assert f"{per_token:,.1f} bytes per token; 1,500,000,000 tokens like these: {projected}" in out, out
    assert "jpeg" in out and "raw" not in out  # the last folder's report is its own


def exit_code(argv) -> int:
    """main's status, argparse's errors (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("args,message", [
    (["--pixels", "png", "--jpeg-quality", "80"], "--jpeg-quality applies to --pixels jpeg, not --pixels png"),
    (["--jpeg-subsampling", "4:2:0"], "--jpeg-subsampling applies to --pixels jpeg, not --pixels raw"),
    (["--pixels", "jpeg", "--jpeg-quality", "101"], "argument --jpeg-quality: must be <= 100, got 101"),
    (["--pixels", "webp"], "--pixels: invalid choice: 'webp'"),
])
def test_pixel_options_are_checked_before_any_work(tmp_path, capsys, args, message):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    assert exit_code(["captions", "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_stats_token_counts_are_checked(tmp_path, capsys):
    assert exit_code(["stats", str(tmp_path), "--tokens", "22X"]) == 2
    assert "--tokens: expected a number of tokens (22B, 4.5e9, 300M), got '22X'" in capsys.readouterr().err


def train(config: Path) -> list[float]:
    """solo.train as one process (TP=1) on CPU; the losses of metrics.jsonl, a row per step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-m", "solo.train", str(config)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    save_dir = Path(yaml.safe_load(config.read_text())["save_dir"])
    rows = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


@pytest.mark.distributed
def test_training_on_jpeg_shards_resumes_exactly(tmp_path):
    """Four steps on JPEG shards, checkpoints at 2 and 4; the run rolled back to step 2 and resumed
    decodes the same images for steps 3 and 4 and gives the same losses, bit for bit."""
    sources = write_sources(tmp_path / "shards", pixels="jpeg")
    assert open_shard(shards.list_shards(sources["images"])[0]).storage.kind == "jpeg"
    config = tmp_path / "jpeg.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "stage1", "model": {"preset": "tiny", "patch_size": PATCH}, "parallel": {"tensor_parallel": 1},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "lr_warmup_steps": 2},
        "data": {"seq_length_tokens": 256, "sources": [
            {"name": name, "path": str(sources[name]), "fraction": fraction}
            for name, fraction in (("images", 0.7), ("text", 0.3))]},
        "train_steps": 4, "global_batch_size": 4, "precision": "fp32", "save_dir": str(tmp_path / "run"),
        "save_interval_steps": 2, "wandb_mode": "disabled"}))
    reference = train(config)
    assert len(reference) == 4 and reference[-1] < reference[0]
    shutil.rmtree(tmp_path / "run" / "iter_0000004")
    (tmp_path / "run" / "latest").write_text("iter_0000002\n")
    assert train(config) == reference
