"""Views of SOLO patches that only the tests need: the inverse of `solo.vision.patchify`, of
`normalize_patches`, and the resized image with its patch grid drawn (numpy + PIL)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from solo.vision import IMAGENET_MEAN, IMAGENET_STD, _channel_view, resize_for_patches, to_rgb


def unpatchify(patches: np.ndarray, rows: int, cols: int, patch_size: int = 32) -> Image.Image:
    """Exact inverse of `patchify`."""
    p = np.asarray(patches)
    expected = (rows * cols, 3 * patch_size * patch_size)
    if p.dtype != np.uint8 or p.shape != expected:
        raise ValueError(f"expected uint8 patches of shape {expected}, got {p.dtype} {p.shape}")
    a = p.reshape(rows, cols, 3, patch_size, patch_size).transpose(0, 3, 1, 4, 2)
    return Image.fromarray(np.ascontiguousarray(a.reshape(rows * patch_size, cols * patch_size, 3)))


def denormalize_patches(patches: np.ndarray) -> np.ndarray:
    """Inverse of `normalize_patches`, rounded back to uint8."""
    x = _channel_view(np.asarray(patches, dtype=np.float32))
    x = (x * IMAGENET_STD[:, None] + IMAGENET_MEAN[:, None]) * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(patches.shape)


def visualize_patches(
    image: Image.Image, patch_size: int = 32, max_side: int = 1024,
    line_color: tuple[int, int, int] = (255, 0, 0),
) -> Image.Image:
    """The resized RGB image with the patch grid drawn over the patch borders."""
    out = resize_for_patches(to_rgb(image), patch_size, max_side).copy()
    draw = ImageDraw.Draw(out)
    for x in range(patch_size, out.width, patch_size):
        draw.line([(x, 0), (x, out.height - 1)], fill=line_color)
    for y in range(patch_size, out.height, patch_size):
        draw.line([(0, y), (out.width - 1, y)], fill=line_color)
    return out
