"""Records -> token documents with loss masks (docs/design.md "Tokens and pixels", "Loss").

The Mistral sentencepiece model (through `solo.tokenizer`) encodes text; PIL and numpy (through
`solo.vision`) turn images into patches; `solo.templates` lays out conversations. Layouts, with
L = loss on those tokens:

    imagenet  <s> IMAGE name</s>                       L: name, </s>
    captions  <s> IMAGE caption</s>                    L: caption, </s>
    html      <s> IMAGE html</s>                       L: html, </s>   (too long: html cut, no </s>)
    text      <s> text</s>                             L: all but <s>  (cut into seq_length pieces)
    sft       the `--template` layout (solo-inst, chatml: see solo.templates)
                                                       L: answers and the token closing each

IMAGE is `<vision>` rows of `<vpatch>` separated by `<vrow_sep>` `</vision>`. No loss ever falls on
an id >= 32000 (but the template's stop id) nor on the first token of a sequence. Every text run
that follows a special id is encoded with sentencepiece's dummy prefix, as HF's Mistral tokenizer
does for the whole string (see `solo.tokenizer`).

Skip rules (a `Skip` names the reason; the shard counts it):
* image errors from `solo.vision.load_image` (corrupt, not an image, empty file, decompression
  bomb, unreadable file);
* `extreme_aspect_ratio`: long side > MAX_ASPECT_RATIO x short side (a 1x20000 strip would be
  stretched from 1 pixel to a patch);
* `image_too_small`: a side shorter than one patch (8x8 would be upsampled 4x into one patch);
* `image_too_long`: `<s>` + the image + `</s>` alone exceed seq_length (images are never split);
* `document_too_long`: an imagenet / caption / sft document longer than seq_length;
* `missing_text` / `empty_text`: no text, or only whitespace; `bad_conversation`: malformed SFT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from solo.preprocess.formats import Record
from solo.preprocess.sources import ROLES
from solo.templates import TemplateError, Turn, get_template
from solo.tokenizer import SOLOTokenizer
from solo.vision import ImageLoadError, image_token_ids, load_image, patchify, resize_for_patches, target_size

MAX_ASPECT_RATIO = 20  # panoramas and banners up to 20:1 pass; thinner strips are not pictures
# Letterboxing (img2dataset's default resize_mode=border pads every image to a square): both
# opposite borders, PAD_BORDER_SHARE of the side deep (at least 2 pixels), one colour within
# PAD_TOLERANCE levels (JPEG noise).
PAD_BORDER_SHARE, PAD_TOLERANCE = 0.02, 6
IMAGE_MARKER = "<image>"


class Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Document:
    tokens: np.ndarray  # int32 [n]
    loss: np.ndarray  # uint8 [n]
    patches: list[np.ndarray]  # uint8 (n_patches, 3P²) per image, in order
    truncated: bool = False
    dropped: str | None = None  # the reason a part of the record was left out (counted per shard)


@dataclass(frozen=True)
class Layout:
    tokenizer: SOLOTokenizer
    seq_length: int
    patch_size: int
    max_side: int
    # sft: a record's one <image> moved to the front of its turn, as LLaVA's preprocess_multimodal
    # does and the SOLO processor places it at inference; records with several images keep theirs.
    image_first: bool = True
    template: str = "solo-inst"  # the sft layout (solo.templates); the other kinds are "plain"


def template_of(kind: str, layout: Layout) -> str:
    """The template a shard of `kind` is laid out in (recorded in its manifest)."""
    return layout.template if kind == "sft" else "plain"


def build(kind: str, record: Record, layout: Layout) -> list[Document]:
    """The documents of one record (several only for a text cut into pieces); raises Skip."""
    if record.error:
        raise Skip(*record.error)
    if kind == "text":
        return _text(record, layout)
    if kind == "sft":
        return [_sft(record, layout)]
    return [_vision_text(kind, record, layout)]


def _require_text(record: Record, strip: bool) -> str:
    if not isinstance(record.text, str):
        raise Skip("missing_text", f"no text (got {type(record.text).__name__})")
    text = record.text.strip() if strip else record.text
    if not text.strip():
        raise Skip("empty_text", "text is empty or only whitespace")
    return text


class _Tokens:
    """Token ids and loss flags built segment by segment."""

    def __init__(self):
        self.ids: list[int] = []
        self.loss: list[int] = []

    def add(self, ids: list[int], loss: bool = False) -> None:
        self.ids.extend(ids)
        self.loss.extend([int(loss)] * len(ids))

    def document(self, patches: list[np.ndarray], truncated: bool = False) -> Document:
        return Document(np.array(self.ids, dtype=np.int32), np.array(self.loss, dtype=np.uint8), patches, truncated)


def _image(source, key: str, layout: Layout) -> tuple[list[int], np.ndarray]:
    """(image token ids, patches); the size rules are checked before resizing."""
    try:
        image = load_image(source, name=key, fit=(layout.patch_size, layout.max_side))
    except ImageLoadError as e:
        raise Skip(e.reason, e.detail) from None
    w, h = image.size
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise Skip("extreme_aspect_ratio", f"{w}x{h} is more than {MAX_ASPECT_RATIO}:1")
    P = layout.patch_size
    if min(w, h) < P:
        raise Skip("image_too_small", f"{w}x{h} has a side shorter than one {P}-pixel patch")
    tw, th = target_size(w, h, P, layout.max_side)
    rows, cols = th // P, tw // P
    if rows * cols + rows + 1 + 2 > layout.seq_length:
        raise Skip("image_too_long", f"{w}x{h} -> {rows}x{cols} patches: <s> + image + </s> "
                                     f"exceed seq_length {layout.seq_length}")
    patches = patchify(resize_for_patches(image, P, layout.max_side), P)
    return image_token_ids(rows, cols, layout.tokenizer), patches


def _check_length(doc: Document, layout: Layout) -> Document:
    if len(doc.tokens) > layout.seq_length:
        raise Skip("document_too_long", f"{len(doc.tokens)} tokens > seq_length {layout.seq_length}")
    return doc


def _vision_text(kind: str, record: Record, layout: Layout) -> Document:
    tok = layout.tokenizer
    text = _require_text(record, strip=kind != "html")
    if record.image is None:
        raise Skip("missing_image", "record has no image")
    image_ids, patches = _image(record.image, record.key, layout)
    text_ids = tok.encode(text)
    t = _Tokens()
    t.add([tok.bos_id])
    t.add(image_ids)
    room = layout.seq_length - len(t.ids) - 1
    if kind == "html" and len(text_ids) > room:
        # Cut so the document fills the sequence; it did not end, so no </s>.
        t.add(text_ids[:room + 1], loss=True)
        return t.document([patches], truncated=True)
    t.add(text_ids, loss=True)
    t.add([tok.eos_id], loss=True)
    return _check_length(t.document([patches]), layout)


def _text(record: Record, layout: Layout) -> list[Document]:
    tok = layout.tokenizer
    ids = tok.encode(_require_text(record, strip=False))
    tokens = np.empty(len(ids) + 2, dtype=np.int32)
    tokens[0], tokens[1:-1], tokens[-1] = tok.bos_id, ids, tok.eos_id
    loss = np.ones(len(tokens), dtype=np.uint8)
    pieces = []
    for start in range(0, len(tokens), layout.seq_length):
        piece_loss = loss[start:start + layout.seq_length].copy()
        piece_loss[0] = 0  # <s>, or the first token of a piece: nothing before it to predict from
        pieces.append(Document(tokens[start:start + layout.seq_length], piece_loss, []))
    return pieces


def _sft(record: Record, layout: Layout) -> Document:
    """A conversation in the layout's template (solo.templates), its images where their <image>
    markers stand, as many as the record has (markers missing altogether: the images open the first
    user turn); a leading assistant turn is dropped and counted."""
    turns = record.conversations or []
    if not all(isinstance(t, dict) and t.get("from") in ROLES and isinstance(t.get("value"), str) for t in turns):
        raise Skip("bad_conversation", f"turns must be {{'from': one of {sorted(ROLES)}, 'value': str}}")
    turns, dropped = _drop_leading_answers(turns)
    images = record.image if isinstance(record.image, list) else [] if record.image is None else [record.image]
    values = _place_images([t["value"] for t in turns], [ROLES[t["from"]] for t in turns], len(images),
                           layout.image_first)
    turns = [Turn(ROLES[t["from"]], v) for t, v in zip(turns, values, strict=True)]
    template = get_template(layout.template)
    try:  # the structure first: a malformed record is skipped before its images are decoded
        template.check(turns, len(images))
    except TemplateError as e:
        raise Skip("bad_conversation", str(e)) from None
    decoded = [_image(image, record.key, layout) for image in images]
    encoded = template.conversation(layout.tokenizer, turns, [ids for ids, _ in decoded])
    doc = Document(np.array(encoded.ids, dtype=np.int32), np.array(encoded.loss, dtype=np.uint8),
                   [patches for _, patches in decoded])
    doc = _check_length(doc, layout)
    doc.dropped = dropped
    return doc


def _drop_leading_answers(turns: list[dict]) -> tuple[list[dict], str | None]:
    """Assistant turns before the first user turn answer nothing (cut conversations, ShareGPT
    exports): dropped, and counted as `leading_assistant_turn`."""
    first_user = next((i for i, t in enumerate(turns) if ROLES[t["from"]] == "user"), len(turns))
    kept = [t for i, t in enumerate(turns) if i >= first_user or ROLES[t["from"]] != "assistant"]
    return kept, ("leading_assistant_turn" if len(kept) < len(turns) else None)


def _place_images(values: list[str], roles: list[str], n_images: int, image_first: bool) -> list[str]:
    users = [i for i, r in enumerate(roles) if r == "user"]
    markers = sum(values[i].count(IMAGE_MARKER) for i in users)
    values = list(values)
    if markers == 0 and n_images:
        if not users:
            raise Skip("bad_conversation", "an image but no user turn to put it in")
        values[users[0]] = f"{IMAGE_MARKER}\n" * n_images + values[users[0]]  # LLaVA's default placement
    elif markers != n_images:
        raise Skip("bad_conversation", f"{markers} {IMAGE_MARKER} markers for {n_images} images")
    elif n_images == 1 and image_first:
        i = next(i for i in users if IMAGE_MARKER in values[i])
        values[i] = f"{IMAGE_MARKER}\n" + values[i].replace(IMAGE_MARKER, "").strip()  # as LLaVA's preprocess
    return values


# -- letterboxed / padded images ---------------------------------------------------------------

def padded_images(doc: Document, tokenizer: SOLOTokenizer, patch_size: int) -> int:
    """How many of the document's images are letterboxed or padded (see `letterboxed`)."""
    tokens = doc.tokens
    starts = np.flatnonzero(tokens == tokenizer.vision_start_id)
    count = 0
    for patches, start in zip(doc.patches, starts, strict=False):
        # The first row ends at the first token that is no patch: `<vrow_sep>`, or the template's
        # closing id (`</vision>`, or `<vision>` again in solo-inst: a one-row image ends there).
        row = tokens[start + 1:start + 2 + len(patches)]
        cols = int(np.argmax(row != tokenizer.patch_id))
        count += letterboxed(patches, cols, patch_size)
    return count


def letterboxed(patches: np.ndarray, cols: int, patch_size: int) -> bool:
    """Whether the image of these patches (row-major grid, `cols` wide) has uniform bands of one
    colour on two opposite sides: top and bottom, or left and right. Only the border pixels are read."""
    P = patch_size
    grid = patches.reshape(-1, cols, 3, P, P)  # (rows, cols, channel, y, x)
    rows = grid.shape[0]
    depth_y = min(P, max(2, round(PAD_BORDER_SHARE * rows * P)))
    depth_x = min(P, max(2, round(PAD_BORDER_SHARE * cols * P)))
    top, bottom = grid[0, :, :, :depth_y, :], grid[-1, :, :, P - depth_y:, :]
    left, right = grid[:, 0, :, :, :depth_x], grid[:, -1, :, :, P - depth_x:]
    return (_same_colour(top, bottom) and rows > 1) or (_same_colour(left, right) and cols > 1)


def _same_colour(a: np.ndarray, b: np.ndarray) -> bool:
    # channel is axis 1 of both bands
    both = np.concatenate([a.transpose(1, 0, 2, 3).reshape(3, -1), b.transpose(1, 0, 2, 3).reshape(3, -1)], axis=1)
    return bool((both.max(axis=1).astype(int) - both.min(axis=1) <= 2 * PAD_TOLERANCE).all())
