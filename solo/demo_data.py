"""Small real-format inputs built from data that ships in packages (for the demo and the tests).

* photographs: scikit-image's bundled pictures (`skimage/data/*.png|jpg`), written as an
  ImageNet-style labelled folder (`nXXXXXXXX/*.JPEG` + `LOC_synset_mapping.txt`), as an
  img2dataset webdataset tar of captions, and as a LLaVA-style conversation file;
* handwritten digits: scikit-learn's bundled copy of the UCI digits (1,797 8x8 scans,
  `sklearn.datasets.load_digits`), upscaled and written as two ImageNet-style folders, a fixed 80%
  to train on and the other 20% held out, labelled with the digit's English name;
* English text: the docstrings of Python's own standard library, as a SlimPajama-like `.jsonl.zst`.

PIL writes the images, zstandard the text, tarfile the webdataset shards. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import tarfile
from pathlib import Path

import zstandard
from PIL import Image, ImageOps

# file in skimage/data -> (class name, caption). Class names are what stage 1 learns to say.
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut.png": ("astronaut", "An astronaut in a white spacesuit smiling in front of a flag."),
    "chelsea.png": ("tabby cat", "A tabby cat named Chelsea looking to the side."),
    "coffee.png": ("coffee cup", "A cup of coffee with a saucer and a spoon on a table."),
    "rocket.jpg": ("rocket", "A rocket standing on its launch pad under a blue sky."),
    "horse.png": ("horse", "The black silhouette of a horse on a white background."),
    "hubble_deep_field.jpg": ("galaxies", "Thousands of distant galaxies seen by the Hubble telescope."),
    "retina.jpg": ("retina", "A photograph of the back of a human eye showing blood vessels."),
    "motorcycle_left.png": ("motorcycle", "A motorcycle parked in a workshop seen from the left."),
    "ihc.png": ("stained tissue", "A microscope image of tissue stained brown and blue."),
    "camera.png": ("cameraman", "A man in a coat standing behind a camera on a tripod."),
    "moon.png": ("moon", "The cratered surface of the moon in grey tones."),
    "coins.png": ("coins", "Many old coins lying on a dark surface."),
    "page.png": ("printed page", "A scanned page of printed text."),
    "brick.png": ("brick wall", "A wall of grey bricks and mortar."),
    "grass.png": ("grass", "A close view of blades of grass."),
    "gravel.png": ("gravel", "A close view of small grey stones."),
    "chessboard_RGB.png": ("chessboard", "A black and white chessboard pattern."),
    "color.png": ("color chart", "A chart of colored squares."),
    "logo.png": ("snake logo", "The scikit-image logo with a snake."),
    "clock_motion.png": ("clock", "A wall clock blurred by motion."),
}

# The pictures of skimage/data that benchmarks/preprocess.py measures (photographs, micrographs,
# scans; no logo or synthetic pattern), and that tests/test_pixel_storage.py holds to its numbers.
BENCHMARK_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
                    "coffee.png", "coins.png", "color.png", "grass.png", "gravel.png", "hubble_deep_field.jpg",
                    "ihc.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png",
                    "retina.jpg", "rocket.jpg", "text.png")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_HELDOUT_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # the held-out 20% is the same on every machine and run

TEXT_MODULES = ("json", "tarfile", "pathlib", "argparse", "collections", "functools", "itertools",
                "textwrap", "string", "random", "statistics", "fractions", "decimal", "heapq",
                "bisect", "shutil", "tempfile", "logging", "dataclasses", "enum", "typing", "csv")


def skimage_photo(name: str) -> Image.Image:
    import skimage.data

    path = Path(os.path.dirname(skimage.data.__file__)) / name
    with Image.open(path) as image:
        image.load()
        if image.mode == "RGBA":
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image, mask=image.getchannel("A"))
            return background
        return image.convert("RGB")


def _variants(image: Image.Image, count: int) -> list[Image.Image]:
    """The photo, its mirror and slightly cropped views: several images of one class."""
    w, h = image.size
    views = [image, ImageOps.mirror(image)]
    for k in range(1, count):
        d = k * min(w, h) // 20
        views.append(image.crop((d, d, w - d, h - d)))
    return views[:count]


def _jpeg(image: Image.Image, max_side: int) -> bytes:
    image = image.copy()
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_imagenet(root: Path, photos: dict = PHOTOS, images_per_class: int = 3, max_side: int = 256) -> Path:
    """ImageNet layout: `root/train/nXXXXXXXX/*.JPEG` and `root/LOC_synset_mapping.txt`."""
    root = Path(root)
    lines = []
    for k, (file, (label, _)) in enumerate(photos.items()):
        wnid = f"n{90000000 + k:08d}"
        folder = root / "train" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for j, view in enumerate(_variants(skimage_photo(file), images_per_class)):
            (folder / f"{wnid}_{j}.JPEG").write_bytes(_jpeg(view, max_side))
        lines.append(f"{wnid} {label}, {file.split('.')[0]}")
    (root / "LOC_synset_mapping.txt").write_text("\n".join(lines) + "\n")
    return root


def load_digits():
    """(images [1797, 8, 8] 0..16, targets [1797]): the file `sklearn.datasets.load_digits` reads,
    `sklearn/datasets/data/digits.csv.gz` of the installed scikit-learn (64 pixels then the digit per
    row), read without importing scikit-learn and SciPy (seconds of start-up)."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ImportError("the digits come with scikit-learn: pip install scikit-learn (scripts/setup.sh does)")
    data = np.loadtxt(Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def digit_image(pixels, side: int) -> Image.Image:
    """An 8x8 scan (0 = paper, 16 = ink) as dark ink on white, RGB, `side` pixels square (nearest
    neighbour: the scan's own squares, no blur)."""
    import numpy as np

    gray = (255 - np.rint(np.asarray(pixels, dtype=np.float64) * 255 / 16)).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((side, side), Image.Resampling.NEAREST).convert("RGB")


def write_digits(root: Path, side: int = 32, limit: int | None = None) -> Path:
    """`root/train/` and `root/heldout/` in ImageNet's layout (`nXXXXXXXX/*.png`, one synset per digit,
    named in `root/LOC_synset_mapping.txt`): a fixed random 80% / 20% split of the first `limit`
    (all 1,797 by default) of scikit-learn's digits."""
    import numpy as np

    images, targets = load_digits()
    count = len(targets) if limit is None else limit
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(count)
    heldout = set(order[:round(count * DIGITS_HELDOUT_FRACTION)].tolist())
    root = Path(root)
    for i in range(count):
        folder = root / ("heldout" if i in heldout else "train") / f"n{80000000 + int(targets[i]):08d}"
        folder.mkdir(parents=True, exist_ok=True)
        digit_image(images[i], side).save(folder / f"digit_{i:04d}.png", compress_level=1)
    (root / "LOC_synset_mapping.txt").write_text(
        "".join(f"n{80000000 + d:08d} {name}\n" for d, name in enumerate(DIGIT_NAMES)))
    return root


def write_caption_tar(path: Path, photos: dict = PHOTOS, max_side: int = 256) -> Path:
    """An img2dataset-style webdataset shard: KEY.jpg, KEY.txt and KEY.json per sample."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for k, (file, (_label, caption)) in enumerate(photos.items()):
            key = f"{k:09d}"
            members = {
                f"{key}.jpg": _jpeg(skimage_photo(file), max_side),
                f"{key}.txt": caption.encode(),
                f"{key}.json": json.dumps({"key": key, "caption": caption, "status": "success"}).encode(),
            }
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_llava(path: Path, image_dir: Path, photos: dict = PHOTOS, max_side: int = 256) -> Path:
    """LLaVA conversation JSON with `<image>` in the first human turn; images beside it."""
    path, image_dir = Path(path), Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for k, (file, (label, caption)) in enumerate(photos.items()):
        name = f"{file.split('.')[0]}.jpg"
        (image_dir / name).write_bytes(_jpeg(skimage_photo(file), max_side))
        records.append({"id": str(k), "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown in this picture?"},
            {"from": "gpt", "value": f"This is a picture of a {label}. {caption}"},
            {"from": "human", "value": "Describe it in one word."},
            {"from": "gpt", "value": label.capitalize() + "."},
        ]})
    path.write_text(json.dumps(records, indent=1))
    return path


def python_docstrings(modules: tuple[str, ...] = TEXT_MODULES) -> list[str]:
    texts = []
    for name in modules:
        module = importlib.import_module(name)
        for obj in [module, *vars(module).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200 and doc not in texts:
                texts.append(doc.strip())
    return texts


def write_text_corpus(path: Path, texts: list[str] | None = None) -> Path:
    """SlimPajama-like `.jsonl.zst`: {"text": ..., "meta": {"redpajama_set_name": ...}} per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": t, "meta": {"redpajama_set_name": "RedPajamaPythonDocs"}}) + "\n"
                    for t in (texts if texts is not None else python_docstrings()))
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(lines.encode()))
    return path
