"""Prompt templates: how a conversation, or a prompt to answer, becomes token ids. One named choice
used everywhere (`solo-preprocess sft --template`, the stage config's `data.template`, the
checkpoint meta, the export, `SOLOProcessor(template=...)`, `solo-generate --template`).

`solo.tokenizer` does the text (sentencepiece, one call per text run, each with the dummy prefix
unless noted); this module only decides the order of runs and special ids and where the loss is.
IMAGE is `<vision>` rows of `<vpatch>` separated by `<vrow_sep>`, then its closing id. L = loss.

    plain      <s> IMAGE prompt                    pretraining layout (captions, HTML, text); no turns
    solo-inst  IMAGE' <s>[INST] {user} [/INST]{answer}</s>[INST] {user} [/INST]{answer}</s>
                                                   L: every answer and its </s>
    chatml     <s><|im_start|>user\\n ...IMAGE... <|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n
               ... </s>                            L: every answer, its <|im_end|>, the final </s>

`solo-inst` is the layout the released SOLO-7B was fine-tuned on (the SOLO authors'
`src/data/instruction_tuning.py`, `SFTModule.prepare_inputs_img` / `prepare_inputs`, and the
prompt of `scripts/notebook/demo.ipynb`): the image comes first and is closed by `<vision>` again
(IMAGE', not `</vision>`); the `<image>` marker is removed from the first user turn ("<image>\\n"
or "\\n<image>", as theirs); a user turn is the string `[INST] {text.strip()} [/INST]`, the first
one preceded by `<s>`; an answer is the string `answer + "</s>"`. They tokenize each such string
with HF's (legacy, sentencepiece) LlamaTokenizer and `add_special_tokens=False`: `<s>` / `</s>` are
split off and every text run gets the dummy prefix, so `A` is `▁A` (id 330). We encode each run the
same way (`tests/test_templates.py` compares the ids with transformers' sentencepiece tokenizer).
Their code takes turns by position (even = user) and truncates long conversations; here a
conversation must alternate user/assistant (no system turn) and one too long is skipped.

`chatml` is the project's earlier layout: the answer continues the "assistant\\n" line, so it is
encoded without the dummy prefix (the ids of HF's tokenization of the whole rendered string).

The stop id (`</s>` for plain and solo-inst, `<|im_end|>` for chatml) is the token that closes an
assistant turn: it carries loss even where it is an id >= 32000 (the one exception to that rule,
`solo.data.batch.collate`), generation stops on it and is never allowed any other id >= 32000
(`suppressed_ids`, as the authors' demo suppresses every id from 32000 on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from solo.tokenizer import TOKEN_IDS, VOCAB_SIZE, SOLOTokenizer

IMAGE_MARKER = "<image>"  # LLaVA's placeholder for the image inside a user turn
ROLES = ("user", "assistant", "system")
B_INST, E_INST = "[INST]", "[/INST]"


class TemplateError(ValueError):
    """A conversation the template cannot lay out (solo-preprocess skips it as bad_conversation)."""


@dataclass(frozen=True)
class Turn:
    role: str  # one of ROLES
    text: str


@dataclass
class Encoded:
    ids: list[int]
    loss: list[int]  # 1 where the id is a training target

    def add(self, ids: Sequence[int], loss: bool = False) -> None:
        self.ids.extend(ids)
        self.loss.extend([int(loss)] * len(ids))


@dataclass(frozen=True)
class Template:
    name: str
    stop_id: int  # closes an assistant turn: carries loss, generation stops on it
    image_end_id: int  # the id after the last patch row

    def image(self, image_ids: list[int]) -> list[int]:
        """`solo.vision.image_token_ids` (closed by `</vision>`) with this template's closing id."""
        return image_ids[:-1] + [self.image_end_id] if image_ids else []

    def suppressed_ids(self) -> list[int]:
        """Ids generation never emits: every id >= 32000 but the stop id."""
        return [i for i in range(TOKEN_IDS.first_special_id, VOCAB_SIZE) if i != self.stop_id]

    def stop_ids(self) -> list[int]:
        """Ids that end generation: `</s>` always, and the stop id."""
        return sorted({TOKEN_IDS.eos_id, self.stop_id})

    def prompt(self, tok: SOLOTokenizer, prompt: str, image_ids: list[int]) -> list[int]:
        """Ids up to where the model's answer begins (`image_ids`: `image_token_ids`, or [])."""
        return _PROMPTS[self.name](self, tok, prompt, self.image(image_ids))

    def check(self, turns: Sequence[Turn], images: int) -> None:
        """Raises TemplateError if the conversation (with `images` images) has no layout here
        (cheap: nothing is encoded)."""
        if self.name not in _CONVERSATIONS:
            raise TemplateError(f"template {self.name!r} has no conversation layout; use one of {SFT_TEMPLATES}")
        _check_turns(list(turns), images)
        if self.name == "solo-inst":
            _check_solo_inst(list(turns), images)

    def conversation(self, tok: SOLOTokenizer, turns: Sequence[Turn], images: Sequence[list[int]]) -> Encoded:
        """A whole conversation with its loss flags; raises TemplateError. `images`: the token ids
        (`image_token_ids`) of each image, in the order of their `<image>` markers; [] for text only."""
        self.check(turns, len(images))
        return _CONVERSATIONS[self.name](tok, list(turns), [self.image(ids) for ids in images])


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", TOKEN_IDS.eos_id, TOKEN_IDS.vision_end_id),
    "solo-inst": Template("solo-inst", TOKEN_IDS.eos_id, TOKEN_IDS.vision_start_id),
    "chatml": Template("chatml", TOKEN_IDS.im_end_id, TOKEN_IDS.vision_end_id),
}
SFT_TEMPLATES = ("solo-inst", "chatml")  # the ones with turns


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


# -- generation prompts ----------------------------------------------------------------------------

def _plain_prompt(t: Template, tok: SOLOTokenizer, prompt: str, image: list[int]) -> list[int]:
    return [tok.bos_id] + image + (tok.encode(prompt) if prompt else [])


def _solo_inst_prompt(t: Template, tok: SOLOTokenizer, prompt: str, image: list[int]) -> list[int]:
    return image + [tok.bos_id] + tok.encode(f"{B_INST} {prompt.strip()} {E_INST}")


def _chatml_prompt(t: Template, tok: SOLOTokenizer, prompt: str, image: list[int]) -> list[int]:
    # The ids the chatml conversation gives a first user turn "<image>\n{prompt}".
    user = tok.encode("user\n") + image + tok.encode("\n" + prompt) if image else tok.encode("user\n" + prompt)
    return ([tok.bos_id, tok.im_start_id] + user + [tok.im_end_id] + tok.encode("\n")
            + [tok.im_start_id] + tok.encode("assistant\n"))


_PROMPTS = {"plain": _plain_prompt, "solo-inst": _solo_inst_prompt, "chatml": _chatml_prompt}


# -- conversations ---------------------------------------------------------------------------------

def _check_turns(turns: list[Turn], images: int) -> None:
    if any(t.role not in ROLES for t in turns):
        raise TemplateError(f"turn roles must be one of {ROLES}, got {[t.role for t in turns]}")
    markers = sum(t.text.count(IMAGE_MARKER) for t in turns if t.role == "user")
    if images and markers not in (0, images):  # no marker at all: the images go first (LLaVA's default)
        raise TemplateError(f"{markers} {IMAGE_MARKER} markers for {images} images")
    if not images and markers:
        raise TemplateError(f"{IMAGE_MARKER} marker but the record has no image")
    if images and not any(t.role == "user" for t in turns):
        raise TemplateError("an image but no user turn to put it in")
    if not any(t.role == "assistant" and t.text for t in turns):
        raise TemplateError("no assistant answer to learn")


def _first_user_text(text: str) -> str:
    # The image is always first; the marker goes, as in the authors' code.
    return text.replace(f"{IMAGE_MARKER}\n", "").replace(f"\n{IMAGE_MARKER}", "")


def _check_solo_inst(turns: list[Turn], images: int) -> None:
    roles = [turn.role for turn in turns]
    if roles != (["user", "assistant"] * len(turns))[:len(turns)]:
        raise TemplateError(f"solo-inst needs turns alternating user, assistant (no system), got {roles}")
    if images > 1:  # the released model saw one image, before the first [INST]
        raise TemplateError(f"solo-inst lays out one image first; a record with {images} images "
                            "needs --template chatml")
    if images and IMAGE_MARKER in _first_user_text(turns[0].text):
        raise TemplateError(f"solo-inst puts the image first: {IMAGE_MARKER} must begin or end the first user turn")


def _solo_inst(tok: SOLOTokenizer, turns: list[Turn], images: list[list[int]]) -> Encoded:
    image = images[0] if images else []
    out = Encoded([], [])
    out.add(image)
    for i, turn in enumerate(turns):
        if turn.role == "assistant":
            out.add(tok.encode(turn.text) + [tok.eos_id], loss=True)  # answer + "</s>"
            continue
        text = _first_user_text(turn.text) if i == 0 and image else turn.text
        out.add(([tok.bos_id] if i == 0 else []) + tok.encode(f"{B_INST} {text.strip()} {E_INST}"))
    return out


def _chatml(tok: SOLOTokenizer, turns: list[Turn], images: list[list[int]]) -> Encoded:
    if images and not any(IMAGE_MARKER in turn.text for turn in turns if turn.role == "user"):
        first = next(i for i, turn in enumerate(turns) if turn.role == "user")
        turns[first] = Turn("user", f"{IMAGE_MARKER}\n" * len(images) + turns[first].text)  # LLaVA's default
    remaining = iter(images)
    newline = tok.encode("\n")
    out = Encoded([], [])
    out.add([tok.bos_id])
    for turn in turns:
        out.add([tok.im_start_id])
        if turn.role == "assistant":
            out.add(tok.encode("assistant\n"))
            out.add(tok.encode(turn.text, prefix_space=False) + [tok.im_end_id], loss=True)
        else:
            first, *rest = turn.text.split(IMAGE_MARKER) if turn.role == "user" else [turn.text]
            out.add(tok.encode(f"{turn.role}\n{first}"))
            for after in rest:  # an image where its marker stood, then the text up to the next one
                out.add(next(remaining))
                if after:
                    out.add(tok.encode(after))
            out.add([tok.im_end_id])
        out.add(newline)  # template, fully determined by the <|im_end|> before it: no loss
    out.add([tok.eos_id], loss=True)
    return out


_CONVERSATIONS = {"solo-inst": _solo_inst, "chatml": _chatml}
