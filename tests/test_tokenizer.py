import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solo.tokenizer import SPECIAL_TOKENS, SOLOTokenizer


@pytest.fixture(scope="module")
def tok():
    return SOLOTokenizer.default()


def test_special_token_ids(tok):
    assert tok.vocab_size == 33031
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.id_to_piece(1) == "<s>" and tok.id_to_piece(2) == "</s>"
    assert tok.vision_start_id == 32000 and tok.patch_id == 32001 and tok.row_sep_id == 32002
    assert tok.frame_sep_id == 32003 and tok.vision_end_id == 32004
    assert tok.loc_id(1) == 32005 and tok.loc_id(1024) == 33028
    assert tok.loc_ids == list(range(32005, 33029))
    assert tok.im_start_id == 33029 and tok.im_end_id == 33030
    expected = ["<vision>", "<vpatch>", "<vrow_sep>", "<vframe_sep>", "</vision>"]
    expected += [f"<loc_{k}>" for k in range(1, 1025)] + ["<|im_start|>", "<|im_end|>"]
    assert tok.special_tokens == {t: 32000 + i for i, t in enumerate(expected)}
    for t, i in tok.special_tokens.items():
        assert tok.id_to_piece(i) == t and tok.decode([i]) == t
    for bad in (0, 1025):
        with pytest.raises(ValueError):
            tok.loc_id(bad)
    with pytest.raises(ValueError):
        tok.id_to_piece(33031)


def test_special_tokens_json(tok):
    entries = json.loads(tok.special_tokens_json())
    assert len(entries) == 1031
    assert {e["content"]: e["id"] for e in entries} == tok.special_tokens
    assert all(e["special"] for e in entries)


# U+2581 is sentencepiece's whitespace marker: in input text it becomes the piece "▁", which
# decodes as a space. Surrogates (Cs) cannot be UTF-8 encoded at all. Everything else round-trips
# (identity normalizer, byte fallback), control characters and leading/trailing spaces included.
round_trip_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\u2581"))


@settings(max_examples=300, deadline=None)
@given(round_trip_text)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < 32000 for i in ids)
    assert tok.decode(ids) == text


def test_space_marker_is_the_one_exception(tok):
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


@pytest.mark.parametrize(
    "text", ["<vision>", "a <|im_start|>user\n<|im_end|>", "<loc_5><loc_1024>", "</vision><vpatch>"]
)
def test_user_text_never_makes_special_ids(tok, text):
    ids = tok.encode(text)
    assert max(ids) < 32000
    assert tok.decode(ids) == text
    assert max(tok.encode(text, prefix_space=False)) < 32000


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(SPECIAL_TOKENS), min_size=1).map("".join))
def test_special_token_strings_stay_text(tok, text):
    assert max(tok.encode(text)) < 32000


def test_decode_mixed(tok):
    ids = (
        [tok.im_start_id] + tok.encode("user\nDescribe") + [tok.vision_start_id, tok.patch_id,
        tok.patch_id, tok.row_sep_id, tok.patch_id, tok.patch_id, tok.vision_end_id]
        + tok.encode(" a cat on a mat.") + [tok.im_end_id, tok.loc_id(5)]
    )
    assert tok.decode(ids) == (
        "<|im_start|>user\nDescribe<vision><vpatch><vpatch><vrow_sep><vpatch><vpatch></vision>"
        " a cat on a mat.<|im_end|><loc_5>"
    )
    assert tok.decode([]) == ""
    with pytest.raises(ValueError):
        tok.decode([33031])
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_dummy_prefix(tok):
    # Each segment gets the dummy "▁" (as HF does after a special token) ...
    assert tok.id_to_piece(tok.encode("user")[0]) == "▁user"
    assert tok.id_to_piece(tok.encode("user", prefix_space=False)[0]) == "user"
    # ... and a continuation encoded without it equals encoding the whole string when split
    # before a space or at a script/digit boundary.
    whole = "Hello there, world 12345 中文"
    for cut in (5, 11, 12, 18, 20, 21, 24):
        head, tail = whole[:cut], whole[cut:]
        assert tok.encode(head) + tok.encode(tail, prefix_space=False) == tok.encode(whole), cut
        assert tok.decode(tok.encode(head) + tok.encode(tail, prefix_space=False)) == whole


def test_encode_batch(tok):
    texts = ["a cat", " two", "", "中文"]
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, prefix_space=False) == [
        tok.encode(t, prefix_space=False) for t in texts
    ]


def test_pickle_round_trip(tok):
    clone = pickle.loads(pickle.dumps(tok))
    text = "A photo of <vision> a dog, 2024."
    assert clone.encode(text) == tok.encode(text)
    assert clone.encode(text, prefix_space=False) == tok.encode(text, prefix_space=False)
    assert clone.special_tokens == tok.special_tokens and clone.vocab_size == 33031
    assert clone.decode([clone.im_start_id, *clone.encode("hi")]) == "<|im_start|>hi"


def test_wrong_model_file(tmp_path):
    with pytest.raises(OSError):
        SOLOTokenizer(tmp_path / "missing.model")


def test_token_id_constants_are_the_tokenizer_ids(tok):
    """TOKEN_IDS (what training and the benchmarks use instead of loading sentencepiece) says what
    the real model file says."""
    from dataclasses import fields

    from solo.tokenizer import TOKEN_IDS

    for field in fields(TOKEN_IDS):
        if field.name not in ("pad_id", "first_special_id"):
            assert getattr(TOKEN_IDS, field.name) == getattr(tok, field.name), field.name
    assert TOKEN_IDS.first_special_id == min(tok.special_tokens.values())
    control = (tok._sp.unk_id(), tok._sp.bos_id(), tok._sp.eos_id())  # from the model file itself
    assert (TOKEN_IDS.unk_id, TOKEN_IDS.bos_id, TOKEN_IDS.eos_id) == control
    assert tok.id_to_piece(TOKEN_IDS.pad_id) == "<unk>" and tok.pad_id == TOKEN_IDS.pad_id
