"""The SOLO processor for HF transformers: images + text -> the inputs of the exported FuyuForCausalLM.

This file travels inside every export (`solo-convert solo-to-hf` copies it there as
`processing_solo.py`; `preprocessor_config.json` / `processor_config.json` name its classes in
`auto_map`), so `AutoProcessor.from_pretrained(export, trust_remote_code=True)` loads it where
`solo` is not installed. It therefore imports only numpy, PIL and transformers, never `solo`;
where `solo` is installed, `solo.convert.processing_solo.SOLOHFProcessor.from_pretrained(export)`
is the same code without remote code. The model itself is stock `FuyuForCausalLM`.

What it must equal (tests/test_hf_clients.py checks it against `solo.vision`, `solo.templates`
and `solo.convert.processor.SOLOProcessor`): PIL's bilinear resize to SOLO's `target_size` (the
SOLO authors' rule, never padded), x/255 then ImageNet mean/std in float32, patches row-major over
the grid, each flattened (row, column, channel) as Fuyu's `vision_embed_tokens` expects; an image
is `<vision>` rows of `<vpatch>` joined by `<vrow_sep>`, closed by `</vision>` (by `<vision>` in
the solo-inst template); each text run is tokenized separately, as `solo.tokenizer` does.

Text: `<image>` marks where each image goes (the chat templates write it); a text without one has
its image first, after `<s>` (the pretraining layout). `<s>` is put first unless the text has one
(the chat templates write their own). Batches are padded on the left for generation; stock Fuyu
(transformers 5.2x) scatters the image embeddings over every `<vpatch>` id of the batch in order
and needs one patch per `<vpatch>`, so a sample with fewer patches than the batch's most gets
masked `<vpatch>` ids in its padding and zero patches in the same place: images of any size batch
without touching the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

IMAGE_TOKEN = "<image>"  # the marker in text; LLaVA's
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

# The prompt layouts of solo.templates as chat templates (Jinja, rendered by transformers). Each
# `{{ ... }}` run between special tokens is tokenized on its own, as the training layouts encode
# each run; sentencepiece never merges across a space, so "[/INST] answer" gives the ids of
# "[/INST]" and "answer" encoded apart.
_CONTENT = (
    "{%- macro content(message, image) -%}"
    "{%- if message.content is string -%}{{ message.content }}"
    "{%- else -%}{%- for part in message.content -%}"
    "{%- if part.type == 'image' -%}{{ image }}{%- elif part.type == 'text' -%}{{ part.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
CHAT_TEMPLATES = {
    # <s> IMAGE text: the pretraining layout; no turns, the messages' contents in order
    "plain": _CONTENT + "{{ '<s>' }}{%- for message in messages -%}{{ content(message, '<image>') }}{%- endfor -%}",
    # IMAGE' <s>[INST] {user} [/INST] {answer}</s>[INST] ...: the released SOLO-7B's layout
    "solo-inst": _CONTENT + (
        "{%- for message in messages -%}"
        "{%- set text = content(message, '<image>\n') -%}"
        "{%- if message.role == 'user' -%}"
        "{%- if loop.first -%}"
        "{{ '<image>' * (text.count('<image>\n') + text.count('\n<image>')) }}{{ '<s>' }}"
        "{%- set text = text.replace('<image>\n', '').replace('\n<image>', '') -%}"
        "{%- endif -%}"
        "{{ '[INST] ' + text.strip() + ' [/INST]' }}"
        "{%- elif message.role == 'assistant' -%}{{ ' ' + text + '</s>' }}"
        "{%- else -%}{{ raise_exception('solo-inst has user and assistant turns only, got ' + message.role) }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    # <s><|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n ... </s>
    "chatml": _CONTENT + (
        "{{ '<s>' }}{%- for message in messages -%}"
        "{{ '<|im_start|>' + message.role + '\n' }}{{ content(message, '<image>\n') }}{{ '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- else -%}{{ '</s>' }}{%- endif -%}"
    ),
}
IMAGE_END_TOKENS = {"plain": "</vision>", "solo-inst": "<vision>", "chatml": "</vision>"}


def target_size(width: int, height: int, patch_size: int, max_side: int) -> tuple[int, int]:
    """(new_width, new_height): the long side rounded up to patches (at most `max_side`), the short
    side scaled with it and rounded up (`solo.vision.target_size`, the SOLO authors' rule)."""
    long, short = max(width, height), min(width, height)
    new_long = min(-(-long // patch_size) * patch_size, max_side)
    new_short = max(patch_size, -(-(new_long * short // long) // patch_size) * patch_size)
    return (new_long, new_short) if width >= height else (new_short, new_long)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparency composited on white, as training did (`solo.vision.to_rgb`)."""
    if image.mode == "RGB":
        return image
    if image.mode in _ALPHA_MODES or image.has_transparency_data:
        rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _as_pil(image) -> Image.Image:
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        from transformers.image_utils import load_image

        return load_image(image)
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)
    if isinstance(image, Image.Image):
        return image
    from transformers.image_transforms import to_pil_image

    return to_pil_image(np.asarray(image))  # numpy / torch arrays, HWC or CHW


class SOLOImageProcessor(BaseImageProcessor):
    """One image -> its normalized patches [rows*cols, 3*P*P] (Fuyu order) and grid (rows, cols).
    A batch: `pixel_values` [images, most patches, 3*P*P] (zero patches after the real ones) and
    `patch_grid` [images, 2]."""

    model_input_names = ["pixel_values", "patch_grid"]

    def __init__(self, patch_size: int = 32, max_image_side: int = 1024, image_mean=None, image_std=None,
                 rescale_factor: float = 1 / 255, **kwargs):
        super().__init__(**kwargs)
        if max_image_side % patch_size:
            raise ValueError(f"max_image_side {max_image_side} is not a multiple of patch_size {patch_size}")
        self.patch_size, self.max_image_side, self.rescale_factor = patch_size, max_image_side, rescale_factor
        self.image_mean = list(image_mean or IMAGENET_MEAN)
        self.image_std = list(image_std or IMAGENET_STD)

    def encode(self, image) -> tuple[np.ndarray, int, int]:
        p = self.patch_size
        image = to_rgb(_as_pil(image))
        size = target_size(image.width, image.height, p, self.max_image_side)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        pixels = np.asarray(image)
        rows, cols = pixels.shape[0] // p, pixels.shape[1] // p
        # float32 throughout, as solo.vision.normalize_patches (and torchvision's Normalize)
        x = pixels.astype(np.float32) / np.float32(1 / self.rescale_factor)
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        patches = x.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, 3 * p * p)
        return np.ascontiguousarray(patches), rows, cols

    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        images = images if isinstance(images, (list, tuple)) else [images]
        encoded = [self.encode(image) for image in images]
        most = max(len(patches) for patches, _, _ in encoded)
        pixel_values = np.zeros((len(encoded), most, 3 * self.patch_size**2), np.float32)
        for i, (patches, _, _) in enumerate(encoded):
            pixel_values[i, :len(patches)] = patches
        grid = np.array([(rows, cols) for _, rows, cols in encoded], np.int64)
        return BatchFeature({"pixel_values": pixel_values, "patch_grid": grid}, tensor_type=return_tensors)


class SOLOHFProcessor(ProcessorMixin):
    """`processor(images=..., text=..., return_tensors="pt", padding=True)` -> BatchFeature with
    input_ids, attention_mask, pixel_values (with images) and position_ids (when padded)."""

    def __init__(self, image_processor, tokenizer, template: str = "plain", chat_template=None,
                 padding_side: str = "left"):
        if template not in IMAGE_END_TOKENS:
            raise ValueError(f"unknown template {template!r}; known: {sorted(IMAGE_END_TOKENS)}")
        self.template, self.padding_side = template, padding_side
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATES[template])
        ids = tokenizer.convert_tokens_to_ids
        self.image_token_id = ids("<vpatch>")
        self._vision = (ids("<vision>"), ids("<vrow_sep>"), ids(IMAGE_END_TOKENS[template]))

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    # -- loading and saving: plain files, so a missing or foreign one is a clear error ---------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **kwargs) -> SOLOHFProcessor:
        folder = Path(folder)
        for name in (PROCESSOR_CONFIG, PREPROCESSOR_CONFIG):
            if not (folder / name).is_file():
                raise OSError(f"{folder / name}: missing (folders written by `solo-convert solo-to-hf` have it)")
        config = json.loads((folder / PROCESSOR_CONFIG).read_text())
        image = json.loads((folder / PREPROCESSOR_CONFIG).read_text())
        names = ("patch_size", "max_image_side", "image_mean", "image_std", "rescale_factor")
        image_processor = SOLOImageProcessor(**{k: image[k] for k in names if k in image})
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return cls(image_processor, tokenizer, template=config.get("template", "plain"),
                   chat_template=tokenizer.chat_template)

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> None:
        """The tokenizer (with the chat template in tokenizer_config.json), the two configs naming
        this module in `auto_map`, and this module itself, as the export has them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(str(folder), save_jinja_files=False)
        module = Path(__file__).stem
        auto_map = {"AutoProcessor": f"{module}.SOLOHFProcessor", "AutoImageProcessor": f"{module}.SOLOImageProcessor"}
        ip = self.image_processor
        image = {"image_processor_type": "SOLOImageProcessor", "processor_class": "SOLOHFProcessor",
                 "auto_map": auto_map, "patch_size": ip.patch_size, "max_image_side": ip.max_image_side,
                 "image_mean": ip.image_mean, "image_std": ip.image_std, "rescale_factor": ip.rescale_factor,
                 "resample": "bilinear", "do_pad": False}
        config = {"processor_class": "SOLOHFProcessor", "auto_map": auto_map, "template": self.template}
        (folder / PREPROCESSOR_CONFIG).write_text(json.dumps(image, indent=2) + "\n")
        (folder / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (folder / f"{module}.py").write_text(Path(__file__).read_text())

    # -- inputs ----------------------------------------------------------------------------------------
    def image_ids(self, rows: int, cols: int) -> list[int]:
        start, row_sep, end = self._vision
        ids = [start]
        for r in range(rows):
            ids += ([row_sep] if r else []) + [self.image_token_id] * cols
        return ids + [end]

    def _text_ids(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=False).input_ids

    def _sample_ids(self, text: str, grids: list[tuple[int, int]], add_special_tokens: bool) -> list[int]:
        bos = self.tokenizer.bos_token
        head = [self.tokenizer.bos_token_id] if add_special_tokens and bos not in text else []
        if grids and IMAGE_TOKEN not in text:  # the image first, after <s>
            text = bos + IMAGE_TOKEN * len(grids) + text[len(bos):] if text.startswith(bos) else \
                IMAGE_TOKEN * len(grids) + text
        runs = text.split(IMAGE_TOKEN)
        if len(runs) - 1 != len(grids):
            raise ValueError(f"text has {len(runs) - 1} {IMAGE_TOKEN} markers for {len(grids)} images: {text[:80]!r}")
        ids = head + self._text_ids(runs[0])
        for (rows, cols), run in zip(grids, runs[1:], strict=True):
            ids += self.image_ids(rows, cols) + self._text_ids(run)
        return ids

    def __call__(self, images=None, text=None, padding=False, padding_side: str | None = None,
                 return_tensors=None, add_special_tokens: bool = True, **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text) if text is not None else None
        per_sample = _images_per_sample(images, len(texts) if texts is not None else None)
        texts = texts if texts is not None else [""] * len(per_sample)
        if len(per_sample) != len(texts):
            raise ValueError(f"{len(texts)} texts but images for {len(per_sample)} samples")
        samples = []
        for sample_text, sample_images in zip(texts, per_sample, strict=True):
            encoded = [self.image_processor.encode(image) for image in sample_images]
            ids = self._sample_ids(sample_text, [(rows, cols) for _, rows, cols in encoded], add_special_tokens)
            patches = np.concatenate([p for p, _, _ in encoded]) if encoded else None
            samples.append((ids, patches))
        return self._batch(samples, padding, padding_side or self.padding_side, return_tensors)

    def _batch(self, samples, padding, side: str, return_tensors) -> BatchFeature:
        lengths = {(len(ids), 0 if patches is None else len(patches)) for ids, patches in samples}
        if len(lengths) > 1 and not padding:
            raise ValueError("samples of different lengths or patch counts: pass padding=True")
        return pad_batch(samples, self.tokenizer.pad_token_id, self.image_token_id,
                         3 * self.image_processor.patch_size**2, side, return_tensors)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)


def _is_image(x) -> bool:
    return isinstance(x, (Image.Image, str, os.PathLike, np.ndarray)) or hasattr(x, "__array__")


def _images_per_sample(images, samples: int | None) -> list[list]:
    """images as one list per sample: one image, one per sample (None: text only), or lists."""
    if images is None:
        return [[] for _ in range(samples or 1)]
    if _is_image(images):
        return [[images]]
    images = list(images)
    if all(isinstance(x, (list, tuple)) for x in images):
        return [list(x) for x in images]
    if samples in (None, len(images)):
        return [[] if x is None else [x] for x in images]
    if samples == 1:
        return [images]
    raise ValueError(f"{len(images)} images for {samples} texts: pass one per text, or a list per text")


def pad_batch(samples, pad_id: int, image_token_id: int, patch_dim: int, side: str = "left",
              return_tensors=None) -> BatchFeature:
    """[(input ids, patches [n, patch_dim] or None)] -> one padded batch for stock Fuyu: input_ids,
    attention_mask, pixel_values (when any sample has an image: [batch, most patches, patch_dim])
    and position_ids (when padded: real tokens count from 0, as unpadded). A sample with fewer
    patches than the most gets masked `<vpatch>` ids in its padding and zero patches in the same
    place (Fuyu scatters the patches over the batch's `<vpatch>` ids in order)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    counts = [0 if patches is None else len(patches) for _, patches in samples]
    most = max(counts)
    length = max(len(ids) + most - n for (ids, _), n in zip(samples, counts, strict=True))
    rows_ids, rows_mask, rows_pixels = [], [], []
    for (ids, patches), n in zip(samples, counts, strict=True):
        fill = [image_token_id] * (most - n)
        pad = [pad_id] * (length - len(ids) - len(fill))
        zeros = np.zeros((most - n, patch_dim), np.float32)
        real = np.zeros((0, patch_dim), np.float32) if patches is None else np.asarray(patches, np.float32)
        masked = [0] * (len(pad) + len(fill))
        if side == "left":
            rows_ids.append(pad + fill + ids)
            rows_mask.append(masked + [1] * len(ids))
            rows_pixels.append(np.concatenate([zeros, real]))
        else:
            rows_ids.append(ids + fill + pad)
            rows_mask.append([1] * len(ids) + masked)
            rows_pixels.append(np.concatenate([real, zeros]))
    data = {"input_ids": np.array(rows_ids, np.int64), "attention_mask": np.array(rows_mask, np.int64)}
    if most:
        data["pixel_values"] = np.stack(rows_pixels)
    if not data["attention_mask"].all():
        data["position_ids"] = np.maximum(data["attention_mask"].cumsum(-1) - 1, 0)
    if return_tensors is None:  # lists of ids, as tokenizers give them
        data = {k: v if k == "pixel_values" else v.tolist() for k, v in data.items()}
    return BatchFeature(data, tensor_type=return_tensors)
