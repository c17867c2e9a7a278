"""SOLOProcessor: (image, prompt) -> `input_ids` + `pixel_values` for the exported HF model.

The heavy lifting is ours and is exactly what training used: `solo.vision` (PIL resize rule,
row-major patches, ImageNet normalization), `solo.tokenizer` (sentencepiece + SOLO ids) and
`solo.templates` (the prompt layout, `plain`, `solo-inst` or `chatml`, ending where the model's
answer begins; `plain` is the pretraining layout, the prompt after the image). The processor's
template is the one its model was trained on (recorded in the export); a call may ask for another.

`pixel_values` are the normalized patches in that order, each flattened in Fuyu's
(row, column, channel) order, which the export's `vision_embed_tokens` expects (see
`solo.convert.layouts.patch_columns_to_fuyu`); `encode` also returns the uint8 patches in the
training order (channel, row, column) for the Megatron model.

It is saved beside the exported model as `solo_processor_config.json` + `tokenizer.model`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from solo.convert.layouts import patches_to_fuyu
from solo.templates import get_template
from solo.tokenizer import SOLOTokenizer
from solo.vision import IMAGENET_MEAN, IMAGENET_STD, encode_image, image_token_ids, normalize_patches

CONFIG_FILE = "solo_processor_config.json"
TOKENIZER_FILE = "tokenizer.model"


@dataclass
class EncodedPrompt:
    input_ids: list[int]
    patches: np.ndarray  # uint8 [n, 3*P*P], training order (channel, row, column)
    rows: int = 0
    cols: int = 0


class SOLOProcessor:
    def __init__(self, tokenizer: SOLOTokenizer, patch_size: int = 32, max_image_side: int = 1024,
                 template: str = "plain"):
        self.tokenizer = tokenizer
        self.patch_size = patch_size
        self.max_image_side = max_image_side
        self.template = get_template(template).name

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size**2

    def encode(self, image=None, prompt: str = "", template: str | None = None) -> EncodedPrompt:
        """`image`: a path, encoded bytes or a PIL image (or None for text only); `template`: a
        `solo.templates` name (default: the processor's)."""
        tok = self.tokenizer
        patches = np.zeros((0, self.patch_dim), dtype=np.uint8)
        rows = cols = 0
        image_ids = []
        if image is not None:
            encoded = encode_image(image, self.patch_size, self.max_image_side)
            rows, cols, patches = encoded.rows, encoded.cols, encoded.patches
            image_ids = image_token_ids(rows, cols, tok)
        ids = get_template(template or self.template).prompt(tok, prompt, image_ids)
        return EncodedPrompt(ids, patches, rows, cols)

    def stop_ids(self, template: str | None = None) -> list[int]:
        """Ids that end an answer under `template` (default: the processor's)."""
        return get_template(template or self.template).stop_ids()

    def __call__(self, image=None, prompt: str = "", template: str | None = None) -> dict:
        """Tensors for `FuyuForCausalLM`: input_ids [1, L], attention_mask [1, L] and, with an image,
        pixel_values [1, n, 3*P*P] (float32, Fuyu order)."""
        import torch

        encoded = self.encode(image, prompt, template)
        ids = torch.tensor([encoded.input_ids], dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if len(encoded.patches):
            pixels = patches_to_fuyu(normalize_patches(encoded.patches), self.patch_size)
            out["pixel_values"] = torch.from_numpy(np.ascontiguousarray(pixels))[None]
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        tok = self.tokenizer
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            control = (tok.unk_id, tok.bos_id, tok.eos_id)
            ids = [i for i in ids if i not in control and not tok.is_special(i)]
        return tok.decode(ids)

    # -- saving with the exported model -----------------------------------------------------------
    def to_dict(self) -> dict:
        tok = self.tokenizer
        return {
            "processor_class": "solo.convert.processor.SOLOProcessor",
            "patch_size": self.patch_size,
            "max_image_side": self.max_image_side,
            "resize": "solo.vision.target_size (the SOLO authors' rule), bilinear, never padded",
            "rescale_factor": 1 / 255,
            "image_mean": IMAGENET_MEAN.tolist(),
            "image_std": IMAGENET_STD.tolist(),
            "patch_order": "patches row-major over the grid; each flattened (row, column, channel) as Fuyu's",
            "template": self.template,  # solo.templates: the prompt layout the model was trained on
            "tokenizer_file": TOKENIZER_FILE,
            "vocab_size": tok.vocab_size,
            "bos_token_id": tok.bos_id,
            "eos_token_id": tok.eos_id,
            "pad_token_id": tok.pad_id,
            "image_token_id": tok.patch_id,
            "vision_start_token_id": tok.vision_start_id,
            "row_sep_token_id": tok.row_sep_id,
            "vision_end_token_id": tok.vision_end_id,
        }

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / TOKENIZER_FILE
        if not target.exists() or not os.path.samefile(target, self.tokenizer.model_file):
            shutil.copyfile(self.tokenizer.model_file, target)
        (folder / CONFIG_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> SOLOProcessor:
        folder = Path(folder)
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (folders written by `solo-convert solo-to-hf` have it)")
        config = json.loads(path.read_text())
        # Normalization is fixed by training (solo.vision); a config saying otherwise was not ours.
        if not (np.allclose(config["image_mean"], IMAGENET_MEAN) and np.allclose(config["image_std"], IMAGENET_STD)):
            raise ValueError(f"{path}: image_mean/std differ from the ImageNet values SOLO trains with")
        tokenizer = SOLOTokenizer(folder / config.get("tokenizer_file", TOKENIZER_FILE))
        try:  # exports before templates were recorded: the pretraining layout was their default
            processor = cls(tokenizer, int(config["patch_size"]), int(config["max_image_side"]),
                            config.get("template", "plain"))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        if config.get("image_token_id", tokenizer.patch_id) != tokenizer.patch_id:
            raise ValueError(f"{path}: image_token_id {config['image_token_id']} != <vpatch> id {tokenizer.patch_id}")
        return processor
