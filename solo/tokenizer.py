"""The Mistral-7B-v0.1 tokenizer plus the SOLO special tokens (docs/design.md, "Tokens and pixels").

sentencepiece does all the text work; this module only appends the SOLO ids after the 32,000
sentencepiece pieces and keeps them out of reach of user text:

    <vision>=32000 <vpatch>=32001 <vrow_sep>=32002 <vframe_sep>=32003 </vision>=32004
    <loc_1>..<loc_1024>=32005..33028 <|im_start|>=33029 <|im_end|>=33030   (33,031 ids)

Special ids are never produced by `encode`: callers insert them by id (`image_token_ids`, the
chat template), so a caption that literally contains "<vision>" stays text.

Dummy prefix. The Mistral model has `add_dummy_prefix: true`: sentencepiece encodes "hi" as if it
were " hi" (first piece "▁hi") and `decode` drops that one leading space again. HF's
Mistral-7B-v0.1 tokenizer.json (a `Prepend("▁")` normalizer, applied after added tokens are split
off) gives every text run between special tokens the same prefix, so `encode(text)` per segment
reproduces the HF tokenization of the whole string, e.g. `<|im_start|>user` -> [33029, "▁user"].
When a text segment continues another (no special token between them), encode the continuation
with `prefix_space=False` so no extra "▁" appears; splitting just before a space, or at a script
or digit boundary, then gives exactly the ids of the unsplit text (BPE never merges across those
points). `decode` mirrors this: each text run between special ids is decoded like a whole
sentencepiece string (one leading dummy space dropped), so
`decode(encode(a) + [special] + encode(b)) == a + "<special>" + b`. The identity normalizer and
byte fallback make `decode(encode(t)) == t` for any text except one containing U+2581 "▁" itself,
sentencepiece's space marker, which decodes as a space.

The fixed ids are also plain constants (`TOKEN_IDS`), for code that must not load sentencepiece
to know them: the training loop (padding) and the benchmarks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sentencepiece as spm

SP_VOCAB_SIZE = 32_000
NUM_LOC_BINS = 1024

# Order is the id assignment: the SOLO-7B checkpoint's embedding rows depend on it.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<vision>",
    "<vpatch>",
    "<vrow_sep>",
    "<vframe_sep>",
    "</vision>",
    *(f"<loc_{k}>" for k in range(1, NUM_LOC_BINS + 1)),
    "<|im_start|>",
    "<|im_end|>",
)
VOCAB_SIZE = SP_VOCAB_SIZE + len(SPECIAL_TOKENS)  # 33,031: every real id (the model pads beyond it)



def special_id(token: str) -> int:
    """Id of a SOLO special token, from the order above (no tokenizer file needed)."""
    return SP_VOCAB_SIZE + SPECIAL_TOKENS.index(token)


@dataclass(frozen=True)
class TokenIds:
    """The fixed ids, for code that must not load sentencepiece to know them (training, benchmarks).
    `SOLOTokenizer` checks its model file against the first three."""

    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    # Padding is <unk>: with byte fallback sentencepiece never emits it for real text, and unlike
    # </s> it cannot be mistaken for an end-of-document marker by EOD-based position/mask resets.
    # Pad positions never carry loss.
    pad_id: int = 0
    vision_start_id: int = special_id("<vision>")
    patch_id: int = special_id("<vpatch>")
    row_sep_id: int = special_id("<vrow_sep>")
    frame_sep_id: int = special_id("<vframe_sep>")
    vision_end_id: int = special_id("</vision>")
    im_start_id: int = special_id("<|im_start|>")
    im_end_id: int = special_id("<|im_end|>")
    first_special_id: int = SP_VOCAB_SIZE


TOKEN_IDS = TokenIds()


def default_model_file() -> str:
    """Path of the Mistral-7B-v0.1 sentencepiece model shipped inside the mistral-common wheel."""
    import mistral_common

    return os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")


def _without_dummy_prefix(model_proto: bytes) -> spm.SentencePieceProcessor:
    # sentencepiece 0.2 has no per-call switch for the dummy prefix; a second processor built
    # from the same model with the normalizer flag off is the documented way.
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


class SOLOTokenizer:
    """Mistral sentencepiece ids 0..31999 followed by the SOLO special tokens 32000..33030."""

    def __init__(self, model_file: str | os.PathLike):
        self.model_file = os.fspath(model_file)
        with open(self.model_file, "rb") as f:
            self._load(f.read())

    @classmethod
    def default(cls) -> SOLOTokenizer:
        return cls(default_model_file())

    def _load(self, model_proto: bytes) -> None:
        self._model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if self._sp.get_piece_size() != SP_VOCAB_SIZE:
            raise ValueError(
                f"{self.model_file}: expected the Mistral-7B-v0.1 model with {SP_VOCAB_SIZE} "
                f"pieces, got {self._sp.get_piece_size()}"
            )
        control = (self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if control != (TOKEN_IDS.unk_id, TOKEN_IDS.bos_id, TOKEN_IDS.eos_id):
            raise ValueError(f"{self.model_file}: <unk>, <s>, </s> have ids {control}, SOLO expects "
                             f"{(TOKEN_IDS.unk_id, TOKEN_IDS.bos_id, TOKEN_IDS.eos_id)} (Mistral-7B-v0.1's)")
        self._sp_no_prefix = _without_dummy_prefix(model_proto)
        self.special_tokens: dict[str, int] = {
            tok: SP_VOCAB_SIZE + i for i, tok in enumerate(SPECIAL_TOKENS)
        }
        self._special_by_id = SPECIAL_TOKENS

    # Pickled as the model bytes so workers on other hosts need not see the same path.
    def __getstate__(self) -> dict:
        return {"model_file": self.model_file, "model_proto": self._model_proto}

    def __setstate__(self, state: dict) -> None:
        self.model_file = state["model_file"]
        self._load(state["model_proto"])

    def __repr__(self) -> str:
        return f"SOLOTokenizer({self.model_file!r}, vocab_size={self.vocab_size})"

    # ids ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """33,031: every real id. The embedding table is padded beyond this by the model."""
        return VOCAB_SIZE

    # The fixed ids (checked against the model file in `_load`).
    bos_id = TOKEN_IDS.bos_id
    eos_id = TOKEN_IDS.eos_id
    unk_id = TOKEN_IDS.unk_id
    pad_id = TOKEN_IDS.pad_id
    vision_start_id = TOKEN_IDS.vision_start_id
    patch_id = TOKEN_IDS.patch_id
    row_sep_id = TOKEN_IDS.row_sep_id
    frame_sep_id = TOKEN_IDS.frame_sep_id
    vision_end_id = TOKEN_IDS.vision_end_id
    im_start_id = TOKEN_IDS.im_start_id
    im_end_id = TOKEN_IDS.im_end_id

    @property
    def loc_ids(self) -> list[int]:
        """Ids of `<loc_1>`..`<loc_1024>`, in bin order."""
        return [self.loc_id(k) for k in range(1, NUM_LOC_BINS + 1)]

    def loc_id(self, k: int) -> int:
        """Id of `<loc_k>`, k in 1..1024 (box-coordinate bins)."""
        if not 1 <= k <= NUM_LOC_BINS:
            raise ValueError(f"location bin must be in 1..{NUM_LOC_BINS}, got {k}")
        return self.special_tokens[f"<loc_{k}>"]

    def is_special(self, token_id: int) -> bool:
        return SP_VOCAB_SIZE <= token_id < VOCAB_SIZE

    def id_to_piece(self, token_id: int) -> str:
        self._check_id(token_id)
        if token_id >= SP_VOCAB_SIZE:
            return self._special_by_id[token_id - SP_VOCAB_SIZE]
        return self._sp.id_to_piece(token_id)

    def piece_score(self, token_id: int) -> float:
        """sentencepiece's score of a piece (its BPE merge priority); 0 for the SOLO ids."""
        self._check_id(token_id)
        return self._sp.get_score(token_id) if token_id < SP_VOCAB_SIZE else 0.0

    def special_tokens_json(self) -> str:
        """The appended tokens as HF `added_tokens` entries (for tokenizer.json / the export)."""
        entries = [
            {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for tok, i in self.special_tokens.items()
        ]
        return json.dumps(entries, indent=1)

    # text ---------------------------------------------------------------------------------
    def encode(self, text: str, prefix_space: bool = True) -> list[int]:
        """Text -> ids 0..31999, no BOS/EOS. `prefix_space=False` for a continuation segment."""
        sp = self._sp if prefix_space else self._sp_no_prefix
        return sp.encode(text)

    def encode_batch(
        self, texts: Sequence[str], prefix_space: bool = True, num_threads: int = 1
    ) -> list[list[int]]:
        """Many texts in one sentencepiece call (threads in C++, not Python)."""
        sp = self._sp if prefix_space else self._sp_no_prefix
        return sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids (text and special, mixed) -> string; special ids become their names."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i >= SP_VOCAB_SIZE:
                self._check_id(i)
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._special_by_id[i - SP_VOCAB_SIZE])
            else:
                self._check_id(i)
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside the vocabulary 0..{self.vocab_size - 1}")
