"""Images -> SOLO patches and tokens (docs/design.md, "Tokens and pixels"). numpy and PIL only, no torch.

PIL decodes, applies EXIF orientation, converts modes and resizes (bilinear, as the authors'
torchvision `Resize` on a PIL image does); numpy reshapes pixels into patches, reading PIL's memory
in place through pyarrow where it can (optional; otherwise one more copy). The pipeline is
`load_image` -> `resize_for_patches` -> `patchify` (`encode_image` runs all three), then
`normalize_patches` at batch time and `image_token_ids` for the token layout. A shard may store
the resized image as JPEG or PNG instead of raw patches: `encode_stored_image` writes it,
`decode_stored_image` turns it back into patches (PIL both ways).

What is decoded is bounded before any decoding: files below their root only (`ImagePath`), of at
most MAX_IMAGE_FILE_BYTES, in IMAGE_FORMATS, taking at most MAX_DECODED_BYTES once decoded.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageMode, ImageOps

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# The raster formats images are read in (PIL format names): what image-text corpora hold. Every
# other PIL plugin stays closed: EPS would be handed to Ghostscript, and the rarely used decoders
# (ICO, TGA, PPM, ...) are attack surface that no dataset needs.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Documents that are not raster images, by their first bytes (PIL has no reader for them).
_DOCUMENT_MAGIC = {b"%PDF-": "PDF", b"%!PS": "PostScript"}

# An encoded image file larger than this is refused before any byte is read: real photos are a
# few MB (a 100-megapixel JPEG ~30 MB), and a path may name a disk image or a log file.
MAX_IMAGE_FILE_BYTES = 64 << 20

# Decoded pixels an image may take in PIL's memory (width x height x bands x bytes per band, from
# the header, before decoding): 128 MiB is a 44-megapixel RGB photo. PIL's own bomb check counts
# pixels only, so a 343 KB 9400x9400 RGBA PNG passed it and cost 2.3 GB on its way to RGB; the
# conversions after decoding take at most a few times this again. Large JPEGs are decoded at a
# reduced scale first (see `load_image`'s `fit`), so they pass.
MAX_DECODED_BYTES = 128 << 20

# Short machine-readable causes; the preprocessing CLI counts skipped images by these.
REASONS = (
    "unreadable_file",  # the path cannot be read (missing, permissions, a directory)
    "image_outside_root",  # an ImagePath that resolves (symlinks too) outside its root
    "not_a_regular_file",  # a FIFO, a device, a socket
    "image_too_large",  # a file of more than MAX_IMAGE_FILE_BYTES
    "empty_file",  # zero bytes
    "not_an_image",  # PIL cannot identify the format
    "unsupported_format",  # an image or document format outside IMAGE_FORMATS (EPS, PDF, ICO, ...)
    "decompression_bomb",  # more pixels than max_pixels / PIL's MAX_IMAGE_PIXELS
    "decoded_too_large",  # would take more than MAX_DECODED_BYTES decoded
    "empty_image",  # a side of zero pixels
    "corrupt_image",  # identified, but decoding fails (truncated JPEG, bad chunks, ...)
    "unsupported_mode",  # decoded, but a pixel mode to_rgb cannot convert
)


class ImageLoadError(ValueError):
    """An image that cannot be used; `.source` names the input, `.reason` is one of REASONS."""

    def __init__(self, source: str, reason: str, detail: str):
        assert reason in REASONS, reason
        self.source, self.reason, self.detail = source, reason, detail
        super().__init__(f"{source}: {detail} [{reason}]")


@dataclass(frozen=True)
class ImagePath:
    """A path an input record names (JSONL, Parquet, LLaVA JSON): `load_image` reads it only if
    it resolves, symlinks included, to a regular file below `root` (`../`, absolute paths, links
    out, /dev/zero and FIFOs are refused)."""

    path: str
    root: str


def read_image_file(path: str | os.PathLike | ImagePath, *, name: str | None = None,
                    max_bytes: int = MAX_IMAGE_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (below its root for an ImagePath)."""
    root = path.root if isinstance(path, ImagePath) else None
    path = path.path if isinstance(path, ImagePath) else os.fspath(path)
    label = name or path
    try:
        real = os.path.realpath(path)
        inside = root is None or os.path.commonpath([real, os.path.realpath(root)]) == os.path.realpath(root)
        # O_NONBLOCK: a FIFO opens at once (and is refused below) instead of waiting for a writer.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC) if inside else None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte or an unencodable character in the path
        raise ImageLoadError(label, "unreadable_file", f"cannot read file ({e})") from e
    if fd is None:
        raise ImageLoadError(label, "image_outside_root", f"resolves to {real}, outside {os.path.realpath(root)}")
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageLoadError(label, "unreadable_file", "cannot read file (a directory)")
        if not stat.S_ISREG(info.st_mode):
            raise ImageLoadError(label, "not_a_regular_file", f"{real} is not a regular file (FIFO, device, socket)")
        if info.st_size > max_bytes:
            raise ImageLoadError(label, "image_too_large", f"{info.st_size} bytes > limit {max_bytes}")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ImageLoadError(label, "unreadable_file", f"cannot read file ({e})") from e
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # the file grew after fstat
        raise ImageLoadError(label, "image_too_large", f"more than {max_bytes} bytes")
    return data


@dataclass(frozen=True)
class EncodedImage:
    patches: np.ndarray  # uint8 (rows * cols, 3 * P * P), see patchify
    rows: int
    cols: int


def target_size(
    width: int, height: int, patch_size: int = 32, max_side: int = 1024
) -> tuple[int, int]:
    """(new_width, new_height) by the authors' `get_resize_output_image_size`, zero sides fixed."""
    for name, v in (("width", width), ("height", height), ("patch_size", patch_size),
                    ("max_side", max_side)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if max_side % patch_size:
        raise ValueError(f"max_side {max_side} is not a multiple of patch_size {patch_size}")
    long, short = int(max(width, height)), int(min(width, height))
    new_long = min(-(-long // patch_size) * patch_size, max_side)
    # Integer floor equals their int(new_long * short / long): for these magnitudes a float
    # quotient is never within one ulp of the next integer.
    scaled_short = new_long * short // long
    # Their code stops here and returns 0 when scaled_short is 0 (e.g. 20000x1): clamp to P.
    new_short = max(patch_size, -(-scaled_short // patch_size) * patch_size)
    return (new_long, new_short) if width >= height else (new_short, new_long)


@contextmanager
def _strict_pil() -> Iterator[None]:
    # Both switches are process-global in PIL; a library that flipped them would let truncated
    # files decode as grey and bombs pass with a warning. Scoped here, restored after (not
    # thread-safe, like warnings.catch_warnings; preprocessing uses processes).
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def load_image(
    source: str | os.PathLike | ImagePath | bytes | bytearray | memoryview,
    *,
    name: str | None = None,
    max_pixels: int | None = None,
    fit: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode a path (an ImagePath: only below its root) or encoded bytes into an RGB image, EXIF
    orientation applied.

    Raises ImageLoadError naming `name` (default: the path, or "<bytes len=N>"). A path must be a
    regular file of at most MAX_IMAGE_FILE_BYTES. `max_pixels` defaults to PIL's
    Image.MAX_IMAGE_PIXELS; PIL's own check still runs, so the effective limit is the smaller of the
    two. An image that would take more than MAX_DECODED_BYTES decoded is refused before decoding.
    `fit` = (patch_size, max_side): the image will be resized to `target_size`, so a JPEG is decoded
    at the smallest DCT scale (1/2, 1/4, 1/8: PIL's `draft`) still at least that size.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or f"<bytes len={len(data)}>"
    else:
        label = name or (source.path if isinstance(source, ImagePath) else os.fspath(source))
        # Reading the bytes ourselves means no file handle outlives this call.
        data = read_image_file(source, name=label)
    if not data:
        raise ImageLoadError(label, "empty_file", "file is empty (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels

    with _strict_pil():
        try:
            im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageLoadError(label, "decompression_bomb", str(e)) from e
        except Image.UnidentifiedImageError as e:
            if other := _other_format(data):
                raise ImageLoadError(label, "unsupported_format",
                                     f"{other} is not one of the formats read ({', '.join(IMAGE_FORMATS)})") from e
            raise ImageLoadError(label, "not_an_image", "not a recognised image format") from e
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL plugins raise many types on bad headers
            raise ImageLoadError(label, "corrupt_image", f"bad header ({e!r})") from e
        if im.width == 0 or im.height == 0:
            raise ImageLoadError(label, "empty_image", f"image size {im.width}x{im.height}")
        if limit is not None and im.width * im.height > limit:
            raise ImageLoadError(
                label, "decompression_bomb",
                f"{im.width}x{im.height} = {im.width * im.height} pixels > limit {limit}",
            )
        if fit is not None:
            im.draft(None, target_size(im.width, im.height, *fit))  # a no-op but for JPEG
        _check_decoded_bytes(im, label)
        try:
            im.load()  # decode everything now: a truncated file fails here, not later
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ImageLoadError(label, "corrupt_image", f"cannot decode ({e})") from e
    try:
        # In place: the usual photo needs no rotation, and a copy of it would cost ~5% of
        # preprocessing.
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # noqa: BLE001 - an unreadable EXIF block should not cost a good image
        pass
    return to_rgb(im, name=label)


def _check_decoded_bytes(im: Image.Image, label: str) -> None:
    mode = ImageMode.getmode(im.mode)
    decoded = im.width * im.height * len(mode.bands) * np.dtype(mode.typestr).itemsize
    if decoded > MAX_DECODED_BYTES:
        raise ImageLoadError(label, "decoded_too_large", f"{im.width}x{im.height} {im.mode} would take "
                             f"{decoded >> 20} MiB decoded > limit {MAX_DECODED_BYTES >> 20} MiB")


def _other_format(data: bytes) -> str | None:
    """The format outside IMAGE_FORMATS that `data` starts like, by PIL's prefix checks only (the
    `accept` functions of its plugins look at the first 16 bytes; nothing is parsed)."""
    Image.init()
    prefix = data[:16]
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt in IMAGE_FORMATS or accept is None:
            continue
        try:
            if accept(prefix):
                return fmt
        except Exception:  # noqa: BLE001 - some checks index a short prefix (struct.error, IndexError)
            continue
    return next((name for magic, name in _DOCUMENT_MAGIC.items() if data.startswith(magic)), None)


# Every mode of Image.MODES (Pillow 13), by how it reaches RGB. tests/test_vision.py checks that
# this covers Image.MODES, so a mode added by a new Pillow is noticed there.
_WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")  # no 8-bit range: scaled by numpy
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")  # "a": premultiplied, convert() unpremultiplies
_KEYED_MODES = ("1", "L", "P", "RGB")  # info["transparency"] / RGBA palette -> alpha via convert()
_PLAIN_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def _wide_to_uint8(image: Image.Image) -> np.ndarray:
    a = np.asarray(image)
    if image.mode.startswith("I;16"):
        # The mode fixes the range to 0..65535: map it onto 0..255 with rounding.
        out = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    else:
        # "I" (int32) and "F" (float) have no fixed range: stretch what is there.
        f = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(f.min()), float(f.max())
        if hi > lo:
            f = (f - lo) * (255.0 / (hi - lo))
        out = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    key = image.info.get("transparency")
    if isinstance(key, (int, float)):  # a 16-bit PNG's tRNS grey level: that value is see-through
        out[a == key] = 255
    return out


def _on_white(image: Image.Image) -> Image.Image:
    if image.mode == "La":
        image = image.convert("LA")  # Pillow converts La only to LA
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb(image: Image.Image, *, name: str = "<image>") -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white (a transparent pixel is white).

    Raises ImageLoadError naming `name` for a mode that cannot be converted.
    """
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(name, "empty_image", f"image size {image.width}x{image.height}")
    mode = image.mode
    see_through = mode in _ALPHA_MODES or (mode in _KEYED_MODES and image.has_transparency_data)
    if mode == "RGB" and not see_through:
        return image
    try:
        if mode in _WIDE_MODES:
            # PIL's own I/F -> L conversion clips at 255 instead of scaling.
            return Image.fromarray(_wide_to_uint8(image)).convert("RGB")
        if see_through:
            return _on_white(image)
        if mode in _PLAIN_MODES:
            return image.convert("RGB")
    except (ValueError, OSError) as e:  # PIL's "conversion from X to Y not supported" and kin
        raise ImageLoadError(
            name, "unsupported_mode", f"cannot convert mode {mode!r} to RGB ({e})"
        ) from e
    raise ImageLoadError(name, "unsupported_mode", f"no conversion from mode {mode!r} to RGB")


def resize_for_patches(
    image: Image.Image, patch_size: int = 32, max_side: int = 1024
) -> Image.Image:
    """Bilinear resize to `target_size`; the image itself when it already has that size."""
    size = target_size(image.width, image.height, patch_size, max_side)
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.BILINEAR)


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image's pixels as a (H, W, 3) uint8 array. For a PIL image this is a view of PIL's own
    memory where Pillow exports it through the Arrow C data interface (Pillow >= 11.2; RGB is
    stored as RGBX, 4 bytes a pixel): np.asarray would copy it first (a third of patchify's time)."""
    if isinstance(image, Image.Image) and image.mode == "RGB" and hasattr(image, "__arrow_c_array__"):
        try:
            import pyarrow
        except ImportError:
            return np.asarray(image)
        try:
            flat = np.frombuffer(pyarrow.array(image).buffers()[-1], np.uint8)  # keeps the image alive
            return flat.reshape(image.height, image.width, 4)[..., :3]
        except (ValueError, pyarrow.ArrowException):  # e.g. an image in several memory blocks
            pass
    return np.asarray(image)


def patchify(image: Image.Image | np.ndarray, patch_size: int = 32) -> np.ndarray:
    """RGB image (H, W multiples of P) -> uint8 (rows*cols, 3*P*P), row-major grid, (C, y, x)."""
    a = _pixels(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"patchify needs an RGB uint8 image, got {a.dtype} array {a.shape}")
    h, w, _ = a.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {w}x{h} is not a multiple of patch_size {patch_size}")
    rows, cols = h // patch_size, w // patch_size
    grid = a.reshape(rows, patch_size, cols, patch_size, 3).transpose(0, 2, 4, 1, 3)
    return grid.reshape(rows * cols, 3 * patch_size * patch_size)  # copies: grid is strided


def unpatchify(patches: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The inverse of `patchify`: uint8 (rows*cols, 3*P*P) -> the (rows*P, cols*P, 3) image."""
    n, dim = patches.shape
    p = math.isqrt(dim // 3)
    if n != rows * cols or 3 * p * p != dim:
        raise ValueError(f"{n} patches of {dim} values are not a {rows}x{cols} grid of 3xPxP patches")
    grid = patches.reshape(rows, cols, 3, p, p).transpose(0, 3, 1, 4, 2)  # (row, y, col, x, channel)
    return np.ascontiguousarray(grid).reshape(rows * p, cols * p, 3)


# How a shard may store an image (solo.data.shards): PIL's format name and its save options.
# optimize=True: JPEG's Huffman tables fitted to the image, ~5% fewer bytes, same pixels.
STORED_FORMATS = {"jpeg": "JPEG", "png": "PNG"}
PIXEL_KINDS = ("raw", *STORED_FORMATS)  # raw: the patches themselves, nothing to decode
JPEG_SUBSAMPLINGS = ("4:4:4", "4:2:2", "4:2:0")  # chroma resolution: full, half across, half both ways


def encode_stored_image(patches: np.ndarray, rows: int, cols: int, kind: str, *, jpeg_quality: int = 95,
                        jpeg_subsampling: str = "4:4:4") -> bytes:
    """The image of these patches as a JPEG or PNG file (`kind`: a key of STORED_FORMATS)."""
    image = Image.fromarray(unpatchify(patches, rows, cols), "RGB")
    buffer = io.BytesIO()
    if kind == "jpeg":
        image.save(buffer, "JPEG", quality=jpeg_quality, subsampling=jpeg_subsampling, optimize=True)
    else:
        image.save(buffer, STORED_FORMATS[kind])
    return buffer.getvalue()


def decode_stored_image(data: bytes | memoryview, kind: str, rows: int, cols: int, patch_size: int) -> np.ndarray:
    """`encode_stored_image`'s bytes -> uint8 patches, refused (ValueError) unless the file is an RGB
    `kind` image of exactly the rows x cols grid: its header is checked before any pixel is decoded,
    so a damaged or foreign file never costs more memory than the grid says."""
    size = (cols * patch_size, rows * patch_size)
    with _strict_pil():
        try:
            image = Image.open(io.BytesIO(data), formats=(STORED_FORMATS[kind],))
        except Exception as e:  # noqa: BLE001 - PIL raises many types on a bad header
            raise ValueError(f"not a {kind} image ({e})") from e
        if image.size != size or image.mode != "RGB":
            raise ValueError(f"{image.mode} {image.width}x{image.height} image, the tokens say RGB "
                             f"{size[0]}x{size[1]} ({rows}x{cols} patches)")
        try:
            image.load()
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot decode the {kind} image ({e})") from e
    return patchify(image, patch_size)



def _channel_view(patches: np.ndarray) -> np.ndarray:
    n = patches.shape[-1]
    if n % 3 or math.isqrt(n // 3) ** 2 != n // 3:
        raise ValueError(f"last dim {n} is not 3 * P * P")
    return patches.reshape(*patches.shape[:-1], 3, n // 3)


def normalize_patches(patches: np.ndarray) -> np.ndarray:
    """uint8 patches (..., 3P²) -> float32: x/255, then ImageNet mean/std per channel.

    Same float32 arithmetic as torchvision's ToTensor + Normalize in the authors' code.
    """
    x = _channel_view(np.asarray(patches)).astype(np.float32) / np.float32(255.0)
    x = (x - IMAGENET_MEAN[:, None]) / IMAGENET_STD[:, None]
    return x.reshape(patches.shape)



def image_token_ids(rows: int, cols: int, tokenizer) -> list[int]:
    """`<vision>` row0 `<vrow_sep>` row1 ... row(rows-1) `</vision>`; a row is cols x `<vpatch>`."""
    if rows < 1 or cols < 1:
        raise ValueError(f"an image needs at least one patch, got {rows}x{cols}")
    row = [tokenizer.patch_id] * cols
    ids = [tokenizer.vision_start_id]
    for r in range(rows):
        if r:
            ids.append(tokenizer.row_sep_id)
        ids.extend(row)
    ids.append(tokenizer.vision_end_id)
    return ids



def encode_image(
    source: Image.Image | str | os.PathLike | bytes,
    patch_size: int = 32,
    max_side: int = 1024,
    *,
    name: str | None = None,
    max_pixels: int | None = None,
) -> EncodedImage:
    """Load (unless already a PIL image, then only converted to RGB) -> resize -> patchify."""
    if isinstance(source, Image.Image):
        image = to_rgb(source, name=name or "<image>")
    else:
        image = load_image(source, name=name, max_pixels=max_pixels)
    image = resize_for_patches(image, patch_size, max_side)
    return EncodedImage(
        patches=patchify(image, patch_size),
        rows=image.height // patch_size,
        cols=image.width // patch_size,
    )
