"""The SOLO authors' tokenizer and sequence layouts, reproduced from their source for comparison.

Sources (github Yangyi-Chen/SOLO):
* `scripts/model/create_solo.py`: the tokenizer is Mistral-7B-v0.1's sentencepiece model with the
  SOLO tokens appended to its pieces (score 0), loaded by HF's sentencepiece `LlamaTokenizer`
  (transformers 4.x, legacy). Here: the same proto edit, loaded by transformers'
  `SentencePieceBackend`, the sentencepiece tokenizer class of transformers 5 (legacy by default).
* `src/data/instruction_tuning.py`, `SFTModule.prepare_inputs_img` / `prepare_inputs`: the SFT
  layout (image tokens by `convert_tokens_to_ids`, turns by `tokenizer(..., add_special_tokens=False)`,
  labels = the answer ids, -100 elsewhere).
* `scripts/notebook/demo.ipynb`, `prepare_inputs`: the generation prompt (image, then
  `bos + "[INST] {prompt.strip()} [/INST]"`).
* `scripts/model/modeling_solo.py`, `MultimodalMistralModel.forward`: the input embedding is
  `embed_tokens(ids) + embed_vision_patch(patches)[vision_patch_indices]` (zeros at text tokens).
No code is copied: the functions below follow those descriptions.
"""

from pathlib import Path

import torch

from solo.tokenizer import SPECIAL_TOKENS, default_model_file

B_INST, E_INST = "[INST]", "[/INST]"
IGNORE_INDEX = -100


def authors_tokenizer(folder: Path):
    from transformers.convert_slow_tokenizer import import_protobuf
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    model_pb2 = import_protobuf()
    proto = model_pb2.ModelProto.FromString(Path(default_model_file()).read_bytes())
    for token in SPECIAL_TOKENS:
        piece = model_pb2.ModelProto().SentencePiece()
        piece.piece, piece.score = token, 0
        proto.pieces.append(piece)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    return SentencePieceBackend(vocab_file=str(folder / "tokenizer.model"), bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>")


def image_tokens(tokenizer, rows: int, cols: int) -> tuple[list[int], list[int]]:
    """(ids, patch indices): `<vision>`, rows of `<vpatch>` with `<vrow_sep>` between, `<vision>`."""
    names, indices = ["<vision>"], [-1]
    for r in range(rows):
        for c in range(cols):
            if r != 0 and c == 0:
                names.append("<vrow_sep>")
                indices.append(-1)
            names.append("<vpatch>")
            indices.append(r * cols + c)
    names.append("<vision>")
    indices.append(-1)
    return tokenizer.convert_tokens_to_ids(names), indices


def sft(tokenizer, values: list[str], rows: int = 0, cols: int = 0) -> tuple[list[int], list[int]]:
    """(tokens, labels) of a conversation (turn values, user first), with an image if rows > 0."""
    tokens, labels = [], []
    if rows:
        ids, _ = image_tokens(tokenizer, rows, cols)
        tokens += ids
        labels += [IGNORE_INDEX] * len(ids)
    for idx, value in enumerate(values):
        if idx % 2 == 0:
            if idx == 0 and rows:
                value = value.replace("<image>\n", "").replace("\n<image>", "")
            text = (tokenizer.bos_token if idx == 0 else "") + f"{B_INST} {value.strip()} {E_INST}"
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            tokens += ids
            labels += [IGNORE_INDEX] * len(ids)
        else:
            ids = tokenizer(value + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            tokens += ids
            labels += ids
    return tokens, labels


def prompt(tokenizer, text: str, rows: int = 0, cols: int = 0) -> tuple[list[int], list[int]]:
    """(ids, patch indices) of the demo's generation prompt."""
    ids, indices = image_tokens(tokenizer, rows, cols) if rows else ([], [])
    text = tokenizer.bos_token + f"{B_INST} {text.strip()} {E_INST}"
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + text_ids, indices + [-1] * len(text_ids)


def logits(model, ids: list[int], indices: list[int], patches: torch.Tensor) -> torch.Tensor:
    """A MistralForCausalLM holding the authors' weights, fed their input embedding."""
    ids_t = torch.tensor([ids])
    embeds = model.get_input_embeddings()(ids_t)
    if len(patches):
        vision = torch.nn.functional.linear(patches, model.embed_vision_patch)
        vision = torch.cat([vision, torch.zeros(1, vision.shape[1])])
        embeds = embeds + vision[torch.tensor([indices])]
    with torch.no_grad():
        return model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids_t)).logits[0]
