import io
import math
import os
import resource
import struct
import subprocess
import sys
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import skimage.data
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps

from solo.vision import (
    EncodedImage,
    ImageLoadError,
    encode_image,
    image_token_ids,
    load_image,
    normalize_patches,
    patchify,
    resize_for_patches,
    target_size,
    to_rgb,
)
from tests.patch_views import denormalize_patches, unpatchify, visualize_patches

SKIMAGE_DIR = os.path.dirname(skimage.data.__file__)
FAKE_TOK = SimpleNamespace(vision_start_id=-1, patch_id=-2, row_sep_id=-3, vision_end_id=-4)


def reference_target_size(width, height, P=32, M=1024):
    # Straight transcription of docs/design.md "Tokens and pixels", float arithmetic as in the authors' code.
    long, short = max(width, height), min(width, height)
    new_long = min(math.ceil(long / P) * P, M)
    new_short = max(P, math.ceil(int(new_long * short / long) / P) * P)
    return (new_long, new_short) if width >= height else (new_short, new_long)


def encoded(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width, height, bit_depth, color_type, idat):
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


# --- target_size -------------------------------------------------------------------------------

@settings(max_examples=2000, deadline=None)
@given(st.integers(1, 20000), st.integers(1, 20000))
def test_target_size_properties(w, h):
    nw, nh = target_size(w, h)
    assert nw > 0 and nh > 0 and nw % 32 == 0 and nh % 32 == 0
    assert max(nw, nh) <= 1024
    assert (nw, nh) == reference_target_size(w, h)
    assert (nw >= nh if w >= h else nw <= nh)
    assert target_size(h, w) == (nh, nw)
    long, short = max(w, h), min(w, h)
    scaled_short = max(nw, nh) * short / long
    if scaled_short >= 320:  # rounding the short side up by < 32 px costs < 10% of aspect
        assert abs(min(nw, nh) / scaled_short - 1) < 0.1


@pytest.mark.parametrize("size, expected", [
    ((640, 480), (640, 480)), ((500, 375), (512, 384)), ((1024, 1024), (1024, 1024)),
    ((4000, 3000), (1024, 768)), ((3000, 4000), (768, 1024)), ((1, 1), (32, 32)),
    ((20000, 1), (1024, 32)), ((1, 20000), (32, 1024)), ((33, 1), (64, 32)),
])
def test_target_size_examples(size, expected):
    assert target_size(*size) == expected


def test_target_size_other_patch_sizes():
    assert target_size(100, 50, patch_size=16, max_side=64) == (64, 32)
    assert target_size(100, 50, patch_size=14, max_side=1022 - 1022 % 14) == (112, 56)


@pytest.mark.parametrize("args", [(0, 5), (5, -1), (1.5, 4), ("3", 4), (True, 4), (4, 4, 0),
                                  (4, 4, 32, 1000)])
def test_target_size_rejects(args):
    with pytest.raises(ValueError):
        target_size(*args)


# --- patches -----------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from([1, 2, 4, 8, 32]),
       st.integers(0, 2**32 - 1))
def test_patchify_unpatchify_inverse(rows, cols, p, seed):
    a = np.random.default_rng(seed).integers(0, 256, (rows * p, cols * p, 3), dtype=np.uint8)
    patches = patchify(Image.fromarray(a), p)
    assert patches.dtype == np.uint8 and patches.shape == (rows * cols, 3 * p * p)
    assert np.array_equal(np.asarray(unpatchify(patches, rows, cols, p)), a)


def test_patch_layout_matches_loop_reference():
    p, rows, cols = 4, 2, 3
    a = np.random.default_rng(0).integers(0, 256, (rows * p, cols * p, 3), dtype=np.uint8)
    expected = np.array([
        [a[r * p + y, c * p + x, ch] for ch in range(3) for y in range(p) for x in range(p)]
        for r in range(rows) for c in range(cols)
    ], dtype=np.uint8)
    assert np.array_equal(patchify(a, p), expected)


def test_patchify_rejects():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patchify(Image.new("RGB", (64, 40)), 32)
    with pytest.raises(ValueError, match="RGB uint8"):
        patchify(Image.new("L", (64, 64)), 32)
    with pytest.raises(ValueError):
        unpatchify(np.zeros((5, 3 * 32 * 32), np.uint8), 2, 3)


def test_normalize_by_hand():
    p = 2
    patch = np.concatenate([np.full(4, 255), np.zeros(4), np.full(4, 128)]).astype(np.uint8)
    out = normalize_patches(patch[None])
    assert out.dtype == np.float32 and out.shape == (1, 12)
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    for ch in range(3):
        np.testing.assert_allclose(out[0, ch * p * p:(ch + 1) * p * p], expected[ch], rtol=1e-6)
    many = np.random.default_rng(1).integers(0, 256, (3, 5, 3 * 32 * 32), dtype=np.uint8)
    assert np.array_equal(denormalize_patches(normalize_patches(many)), many)
    with pytest.raises(ValueError):
        normalize_patches(np.zeros((1, 10), np.uint8))


# --- tokens ------------------------------------------------------------------------------------

def test_image_token_ids_layout():
    assert image_token_ids(1, 1, FAKE_TOK) == [-1, -2, -4]
    assert image_token_ids(2, 3, FAKE_TOK) == [-1, -2, -2, -2, -3, -2, -2, -2, -4]
    from solo.tokenizer import SOLOTokenizer

    tok = SOLOTokenizer.default()
    ids = image_token_ids(3, 2, tok)
    assert ids == [32000, 32001, 32001, 32002, 32001, 32001, 32002, 32001, 32001, 32004]
    with pytest.raises(ValueError):
        image_token_ids(0, 3, FAKE_TOK)


@given(st.integers(1, 32), st.integers(1, 32))
def test_image_token_ids_length(rows, cols):
    ids = image_token_ids(rows, cols, FAKE_TOK)
    assert len(ids) == rows * cols + (rows - 1) + 2
    assert ids.count(-2) == rows * cols and ids.count(-3) == rows - 1
    assert ids[0] == -1 and ids[-1] == -4 and ids[-2] == -2


# --- real photographs --------------------------------------------------------------------------

@pytest.mark.parametrize("fname", ["astronaut.png", "coffee.png", "chelsea.png", "camera.png",
                                   "rocket.jpg"])
def test_real_images_round_trip(fname):
    path = os.path.join(SKIMAGE_DIR, fname)
    enc = encode_image(path)
    assert isinstance(enc, EncodedImage) and enc.patches.dtype == np.uint8
    with Image.open(path) as raw:
        plain = raw.convert("RGB")
    loaded = load_image(path)
    assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), np.asarray(plain))
    resized = resize_for_patches(loaded)
    assert resized.size == target_size(*plain.size) == (enc.cols * 32, enc.rows * 32)
    assert enc.patches.shape == (enc.rows * enc.cols, 3072)
    assert np.array_equal(np.asarray(unpatchify(enc.patches, enc.rows, enc.cols)),
                          np.asarray(resized))
    assert np.array_equal(encode_image(loaded).patches, enc.patches)


def test_resize_is_skipped_at_target_size():
    im = Image.new("RGB", (64, 96))
    assert resize_for_patches(im) is im


def test_visualize_patches():
    im = Image.new("RGB", (70, 40), (0, 200, 0))
    vis = visualize_patches(im)
    assert vis.size == target_size(70, 40) == (96, 64)
    assert vis.getpixel((32, 5)) == (255, 0, 0) and vis.getpixel((5, 32)) == (255, 0, 0)
    assert vis.getpixel((5, 5)) == (0, 200, 0)


def test_vision_does_not_import_torch():
    code = "import sys, solo.vision; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- modes and EXIF ----------------------------------------------------------------------------

def load_bytes(data):
    im = load_image(data)
    assert im.mode == "RGB"
    return im


def test_modes_opaque():
    assert load_bytes(encoded(Image.new("L", (5, 4), 100), "PNG")).getpixel((0, 0)) == (100,) * 3
    one = Image.new("1", (8, 8), 0)
    one.putpixel((1, 1), 1)
    im = load_bytes(encoded(one, "PNG"))
    assert im.getpixel((0, 0)) == (0, 0, 0) and im.getpixel((1, 1)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert load_bytes(encoded(pal, "PNG")).getpixel((2, 2)) == (10, 20, 30)
    cmyk = Image.new("CMYK", (4, 4), (255, 0, 0, 0))
    for fmt in ("TIFF", "JPEG"):
        r, g, b = load_bytes(encoded(cmyk, fmt)).getpixel((1, 1))
        assert r < 8 and g > 247 and b > 247, fmt


def test_modes_high_bit_depth():
    a16 = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)
    im = Image.fromarray(a16)
    assert im.mode == "I;16"
    for fmt in ("PNG", "TIFF"):
        got = np.asarray(load_bytes(encoded(im, fmt)))[..., 0]
        assert got.tolist() == [[0, 255], [128, 1]], fmt
    for arr in (np.array([[-1000, 0], [500, 3000]], np.int32),
                np.array([[-1.0, 0.0], [0.5, 3.0]], np.float32)):
        got = np.asarray(load_bytes(encoded(Image.fromarray(arr), "TIFF")))[..., 0]
        assert got.min() == 0 and got.max() == 255 and got[0, 1] < got[1, 0] < 255


def test_alpha_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    im = load_bytes(encoded(rgba, "PNG"))
    assert im.getpixel((0, 0)) == (255, 255, 255)
    assert im.getpixel((2, 2)) == (10, 20, 30)
    assert all(abs(v - 127) <= 1 for v in im.getpixel((1, 0)))
    la = Image.new("LA", (4, 4), (50, 255))
    la.putpixel((3, 3), (0, 0))
    im = load_bytes(encoded(la, "PNG"))
    assert im.getpixel((3, 3)) == (255, 255, 255) and im.getpixel((0, 0)) == (50, 50, 50)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    im = load_bytes(encoded(pal, "PNG", transparency=0))
    assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((1, 1)) == (10, 20, 30)
    pa = pal.convert("PA")
    pa.putpixel((2, 2), (1, 0))
    im = to_rgb(pa)
    assert im.getpixel((2, 2)) == (255, 255, 255) and im.getpixel((1, 1)) == (10, 20, 30)


# Every PIL mode -> RGB. (label, build, file format to round-trip through or None, colour
# everywhere, colour at (0, 0) or None, tolerance). A label's mode is the part before "+".
C = (200, 100, 50)
ON_WHITE = (227, 177, 152)  # C at alpha 128 over white: c * 128/255 + 255 * 127/255
WHITE = (255, 255, 255)


def solid(mode, value):
    return Image.new(mode, (5, 3), value)


def spot(im, value):
    im.putpixel((0, 0), value)
    return im


def keyed(im, key):  # a PNG tRNS chunk: pixels of this value are transparent
    im.info["transparency"] = key
    return im


def palette(colours=(0, 0, 0, *C), mode="RGB"):
    im = solid("P", 1)
    im.putpalette(colours, mode)
    return im


MODE_CASES = [
    ("1", lambda: spot(solid("1", 1), 0), "PNG", WHITE, (0, 0, 0), 0),
    ("L", lambda: solid("L", 100), "PNG", (100,) * 3, None, 0),
    ("L+tRNS", lambda: spot(keyed(solid("L", 100), 100), 7), "PNG", WHITE, (7,) * 3, 0),
    ("LA", lambda: spot(solid("LA", (100, 128)), (100, 0)), "PNG", (177,) * 3, WHITE, 1),
    ("La", lambda: spot(solid("LA", (100, 128)), (9, 255)).convert("La"), None, (177,) * 3,
     (9,) * 3, 2),
    ("P", lambda: spot(palette(), 0), "PNG", C, (0, 0, 0), 0),
    ("P+transparency", lambda: spot(keyed(palette(), 1), 0), "PNG", WHITE, (0, 0, 0), 0),
    ("P+RGBA palette", lambda: spot(palette((0, 0, 0, 255, *C, 0), "RGBA"), 0), "PNG", WHITE,
     (0, 0, 0), 0),
    ("PA", lambda: spot(palette().convert("PA"), (1, 0)), "TIFF", C, WHITE, 0),
    ("RGB", lambda: solid("RGB", C), "PNG", C, None, 0),
    ("RGB+tRNS", lambda: spot(keyed(solid("RGB", C), C), (1, 2, 3)), "PNG", WHITE, (1, 2, 3), 0),
    ("RGBA", lambda: spot(solid("RGBA", (*C, 128)), (*C, 0)), "PNG", ON_WHITE, WHITE, 1),
    # Premultiplied: unpremultiplied first, so it ends where RGBA does.
    ("RGBa", lambda: spot(solid("RGBA", (*C, 128)), (*C, 0)).convert("RGBa"), None, ON_WHITE,
     WHITE, 2),
    ("RGBX", lambda: solid("RGB", C).convert("RGBX"), None, C, None, 0),
    ("CMYK", lambda: solid("CMYK", (0, 255, 255, 0)), "TIFF", (255, 0, 0), None, 0),
    ("YCbCr", lambda: solid("RGB", C).convert("YCbCr"), "TIFF", C, None, 3),
    ("LAB", lambda: solid("RGB", C).convert("LAB"), "TIFF", C, None, 3),
    ("HSV", lambda: solid("RGB", C).convert("HSV"), None, C, None, 3),
    # 16 bits: v -> round(v / 257), so 20 * 257 is 20 and 257 is 1.
    ("I;16", lambda: spot(solid("I;16", 20 * 257), 257), "PNG", (20,) * 3, (1,) * 3, 0),
    ("I;16+tRNS", lambda: spot(keyed(solid("I;16", 1000), 1000), 20 * 257), "PNG", WHITE,
     (20,) * 3, 0),
    ("I;16L", lambda: solid("I;16L", 20 * 257), None, (20,) * 3, None, 0),
    ("I;16B", lambda: solid("I;16B", 20 * 257), "TIFF", (20,) * 3, None, 0),
    ("I;16N", lambda: solid("I;16N", 20 * 257), None, (20,) * 3, None, 0),
    # 32 bits: stretched to 0..255 (a constant image has no range and stays as it is).
    ("I", lambda: spot(solid("I", 3000), -1000), "TIFF", WHITE, (0, 0, 0), 0),
    ("F", lambda: solid("F", 20.0), "TIFF", (20,) * 3, None, 0),
]


def test_mode_cases_cover_every_pil_mode():
    # A mode added by a newer Pillow must be added to to_rgb and to MODE_CASES.
    assert set(Image.MODES) <= {label.split("+")[0] for label, *_ in MODE_CASES}


@pytest.mark.parametrize("label, build, fmt, fill, at_origin, tol", MODE_CASES,
                         ids=[c[0] for c in MODE_CASES])
def test_every_mode_to_rgb(label, build, fmt, fill, at_origin, tol):
    im = build()
    assert im.mode == label.split("+")[0]
    expected = np.empty((3, 5, 3), np.int16)
    expected[...] = fill
    if at_origin is not None:
        expected[0, 0] = at_origin
    results = {"to_rgb": to_rgb(im, name="x")}
    if fmt:
        data = encoded(im, fmt)
        with Image.open(io.BytesIO(data)) as raw:
            assert raw.mode == im.mode, f"{fmt} stored {im.mode} as {raw.mode}"
        results[fmt] = load_image(data)
    for path, out in results.items():
        assert out.mode == "RGB" and out.size == (5, 3), path
        got = np.asarray(out)
        assert got.dtype == np.uint8
        assert np.abs(got.astype(np.int16) - expected).max() <= tol, (path, got[0, :2].tolist())


def test_unconvertible_mode_names_the_input(monkeypatch):
    def refuse(self, mode=None, *args, **kwargs):
        raise ValueError(f"conversion from {self.mode} to {mode} not supported")

    monkeypatch.setattr(Image.Image, "convert", refuse)
    for im in (solid("CMYK", 0), solid("RGBA", (1, 2, 3, 4))):
        with pytest.raises(ImageLoadError) as info:
            to_rgb(im, name="scans/page-3.tif")
        assert info.value.reason == "unsupported_mode" and "scans/page-3.tif" in str(info.value)
        assert im.mode in str(info.value)


@pytest.mark.parametrize("fname", ["chelsea.png", "retina.jpg"])  # upscaled, downscaled
def test_resize_filter_is_bilinear(fname):
    im = load_image(os.path.join(SKIMAGE_DIR, fname))
    size = target_size(*im.size)
    got = np.asarray(resize_for_patches(im))
    assert got.shape == (size[1], size[0], 3)
    assert np.array_equal(got, np.asarray(im.resize(size, Image.Resampling.BILINEAR)))
    for other in (Image.Resampling.NEAREST, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS):
        assert not np.array_equal(got, np.asarray(im.resize(size, other))), other


# EXIF orientation tag (0x0112) -> how the stored pixels are turned to be seen upright (EXIF 2.3).
ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: np.rot90(a[:, ::-1], 1),  # mirrored, then rotated 90 counter-clockwise
    6: lambda a: np.rot90(a, -1),  # rotated 90 clockwise
    7: lambda a: np.rot90(a[:, ::-1], -1),  # mirrored, then rotated 90 clockwise
    8: lambda a: np.rot90(a, 1),  # rotated 90 counter-clockwise
}


def asymmetric_blocks():
    # 3 x 2 blocks of 16 px, six different colours: every flip and rotation looks different.
    colours = np.array([[(255, 0, 0), (0, 255, 0), (0, 0, 255)],
                        [(255, 255, 0), (255, 0, 255), (0, 255, 255)]], np.uint8)
    return colours.repeat(16, axis=0).repeat(16, axis=1)  # (32, 48, 3)


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation(orientation):
    a = asymmetric_blocks()
    expected = ORIENTATIONS[orientation](a)
    assert len({ORIENTATIONS[o](a).tobytes() for o in ORIENTATIONS}) == 8
    exif = Image.Exif()
    exif[0x0112] = orientation
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 95, "subsampling": 0})):
        data = encoded(Image.fromarray(a), fmt, exif=exif, **kw)
        im = load_bytes(data)
        assert im.size == (expected.shape[1], expected.shape[0]), fmt
        got = np.asarray(im)
        with Image.open(io.BytesIO(data)) as raw:
            assert raw.getexif()[0x0112] == orientation
            assert np.array_equal(got, np.asarray(ImageOps.exif_transpose(raw).convert("RGB")))
        if fmt == "PNG":  # lossless: exact
            assert np.array_equal(got, expected)
        else:  # JPEG: ringing at the block edges, the right colour everywhere else
            diff = np.abs(got.astype(np.int16) - expected)
            assert diff.mean() < 3 and np.median(diff) <= 2, (fmt, diff.mean())


# --- bad input ---------------------------------------------------------------------------------

def check_error(source, reason, name_in_message, **kw):
    with pytest.raises(ImageLoadError) as info:
        load_image(source, **kw)
    assert info.value.reason == reason
    assert name_in_message in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.fixture
def jpeg_bytes():
    with Image.open(os.path.join(SKIMAGE_DIR, "astronaut.png")) as im:
        return encoded(im.convert("RGB"), "JPEG")


def test_truncated_jpeg(tmp_path, jpeg_bytes, monkeypatch):
    path = tmp_path / "half.jpg"
    path.write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2])
    check_error(path, "corrupt_image", str(path))
    # Another library switching PIL's global leniency on must not let it through.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    check_error(str(path), "corrupt_image", str(path))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_not_an_image_and_empty(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"<html>404 not found</html>")
    check_error(junk, "not_an_image", str(junk))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    check_error(empty, "empty_file", str(empty))
    check_error(b"", "empty_file", "<bytes len=0>")
    check_error(b"\x00" * 10, "not_an_image", "<bytes len=10>")
    check_error(b"\x00" * 10, "not_an_image", "shard-7/0001.jpg", name="shard-7/0001.jpg")
    check_error(tmp_path / "missing.jpg", "unreadable_file", "missing.jpg")
    check_error(tmp_path, "unreadable_file", str(tmp_path))


def test_zero_size_image(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(png_bytes(0, 10, 8, 2, zlib.compress(b"")))
    with pytest.raises(ImageLoadError) as info:
        load_image(path)  # PIL refuses to identify it: either reason is fine, the name is not
    assert str(path) in str(info.value)
    with pytest.raises(ImageLoadError) as info:
        encode_image(Image.new("RGB", (0, 4)), name="x.png")
    assert info.value.reason == "empty_image" and "x.png" in str(info.value)


def test_decompression_bombs(tmp_path):
    small = tmp_path / "small.png"
    small.write_bytes(encoded(Image.new("RGB", (64, 64)), "PNG"))
    check_error(small, "decompression_bomb", str(small), max_pixels=1000)
    assert load_image(small, max_pixels=64 * 64).size == (64, 64)
    # Between MAX_IMAGE_PIXELS and twice that PIL only warns; we refuse. Header only, no pixels.
    warned = tmp_path / "warn.png"
    warned.write_bytes(png_bytes(10000, 10000, 8, 0, b""))
    check_error(warned, "decompression_bomb", str(warned))
    # A real 20000x20000 1-bit PNG: ~50 KB on disk, 400 MB if PIL decoded it.
    bomb = tmp_path / "bomb.png"
    row = b"\x00" * (1 + 20000 // 8)
    bomb.write_bytes(png_bytes(20000, 20000, 1, 0, zlib.compress(row * 20000, 9)))
    assert bomb.stat().st_size < 200_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    check_error(bomb, "decompression_bomb", str(bomb))
    check_error(bomb, "decompression_bomb", str(bomb), max_pixels=10**9)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 100 * 1024


def test_no_file_handles_left_open(tmp_path, jpeg_bytes):
    psutil = pytest.importorskip("psutil")
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    good.write_bytes(jpeg_bytes)
    bad.write_bytes(jpeg_bytes[:1000])
    proc = psutil.Process()
    before = {f.path for f in proc.open_files()}
    load_image(good)
    encode_image(good)
    with pytest.raises(ImageLoadError):
        load_image(bad)
    assert {f.path for f in proc.open_files()} == before


@pytest.mark.parametrize("size", [(32, 32), (1024, 768), (96, 1024)])
def test_patchify_reads_pil_memory_in_place_with_the_same_result(size, monkeypatch):
    from solo.vision import _pixels

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pixels = _pixels(image)
    assert np.array_equal(pixels, np.asarray(image))
    assert pixels.strides[1] == 4  # a view of PIL's own RGBX memory, not a copy
    in_place = patchify(image)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # without pyarrow: np.asarray's copy
    assert np.array_equal(patchify(image), in_place)
    assert np.array_equal(in_place, patchify(np.asarray(image)))
