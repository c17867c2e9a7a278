"""Small shard folders for the training tests, written with solo.data.shards.ShardWriter.

Documents are real: scikit-image photographs through solo.vision (class-name captions, loss on the
name) and Python docstrings through the Mistral tokenizer (loss on every token but BOS).
"""

from __future__ import annotations

from pathlib import Path

from solo.data.shards import PackedSample, ShardWriter
from solo.demo_data import PHOTOS, python_docstrings, skimage_photo
from solo.fileio import atomic_write_json
from solo.tokenizer import SOLOTokenizer
from solo.vision import encode_image, image_token_ids

PATCH = 32


def image_documents(tok, max_side=64):
    docs = []
    for file, (label, _) in PHOTOS.items():
        image = encode_image(skimage_photo(file), PATCH, max_side)
        name = tok.encode(label)
        tokens = [tok.bos_id] + image_token_ids(image.rows, image.cols, tok) + name + [tok.eos_id]
        loss = [0] * (len(tokens) - len(name) - 1) + [1] * (len(name) + 1)
        docs.append((tokens, loss, [image.patches]))
    return docs


def text_documents(tok, seq_length, count=40):
    docs = []
    for text in python_docstrings()[:count]:
        tokens = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
        for start in range(0, len(tokens), seq_length):
            piece = tokens[start:start + seq_length]
            docs.append((piece, [0 if start == 0 and i == 0 else 1 for i in range(len(piece))], []))
    return docs


def write_source(folder: Path, docs, seq_length: int, samples_per_shard: int = 4, pixels: str = "raw") -> Path:
    """Greedy packing in order; a new shard every `samples_per_shard` samples, images stored as `pixels`."""
    folder.mkdir(parents=True, exist_ok=True)
    samples, current = [], []
    for doc in docs:
        if current and sum(len(d[0]) for d in current) + len(doc[0]) > seq_length:
            samples.append(current)
            current = []
        current.append(doc)
    samples.append(current)
    shards = []
    for k in range(0, len(samples), samples_per_shard):
        prefix = folder / f"shard-{k // samples_per_shard:05d}"
        writer = ShardWriter(prefix, PATCH, pixels=pixels)
        for packed in samples[k:k + samples_per_shard]:
            writer.add_sample(PackedSample.of_documents(packed))
        shards.append(writer.finish({"source": folder.name, "seq_length": seq_length, "patch_size": PATCH}))
    atomic_write_json(folder / "manifest.json", {"shards": len(shards), "samples": len(samples)})
    return folder


def write_sources(root: Path, seq_length: int = 256, pixels: str = "raw") -> dict[str, Path]:
    tok = SOLOTokenizer.default()
    return {
        "images": write_source(root / "images", image_documents(tok) * 2, seq_length, pixels=pixels),
        "text": write_source(root / "text", text_documents(tok, seq_length), seq_length),
    }


def write_blend_sources(root: Path, seq_length: int = 256) -> dict[str, Path]:
    """Two sources with shards of unequal sizes: 76 text samples in shards of 5 (the last one
    smaller) and the photographs three times over, one sample per shard."""
    tok = SOLOTokenizer.default()
    return {
        "text": write_source(root / "text", text_documents(tok, seq_length, count=40), seq_length, samples_per_shard=5),
        "images": write_source(root / "images", image_documents(tok) * 3, seq_length, samples_per_shard=1),
    }
