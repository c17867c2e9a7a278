"""solo.templates: the solo-inst layout equals the SOLO authors' (their tokenizer and layout as
reproduced in tests/authors_layout.py from src/data/instruction_tuning.py and
scripts/notebook/demo.ipynb), chatml equals HF's tokenization of the rendered string, and the
generation rule (stop ids, suppressed ids) of each template."""

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from solo.templates import TEMPLATES, TemplateError, Turn, get_template
from solo.tokenizer import SPECIAL_TOKENS, SOLOTokenizer
from solo.vision import image_token_ids
from tests import authors_layout as authors

TOK = SOLOTokenizer.default()
ROWS, COLS = 2, 3
IMAGE = image_token_ids(ROWS, COLS, TOK)
# Their HF tokenizer, and HF's tokenization with split_special_tokens=False, split special strings
# (theirs, and ours: <vpatch>, <|im_end|>, <loc_7>, ...) out of any text; ours keeps text text.
# Texts here leave those strings and U+2581 (sentencepiece's space marker) out.
SPECIAL_STRINGS = ("<s>", "</s>", "<unk>", "<image>", *SPECIAL_TOKENS)
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\u2581\x00"), max_size=40).filter(
    lambda s: "<" not in s or not any(t in s for t in SPECIAL_STRINGS))


@functools.cache
def exported_tokenizer():
    from solo.convert.solo_to_hf import hf_tokenizer

    return hf_tokenizer(TOK)


@pytest.fixture(scope="module")
def theirs(tmp_path_factory):
    return authors.authors_tokenizer(tmp_path_factory.mktemp("authors"))


def conversation(values, image):
    turns = [Turn("user" if i % 2 == 0 else "assistant", v) for i, v in enumerate(values)]
    encoded = get_template("solo-inst").conversation(TOK, turns, [IMAGE] if image else [])
    labels = [i if loss else authors.IGNORE_INDEX for i, loss in zip(encoded.ids, encoded.loss, strict=True)]
    return encoded.ids, labels


@pytest.mark.parametrize("values, image", [
    (["<image>\nWhat is this?", "A cat."], True),
    (["What is this?\n<image>", "A cat.", "  And its colour?  ", " Brown and grey.\n"], True),
    (["Hi", "Hello!", "Bye", ""], False),
    (["日本語で? 😀", "はい、 123 $x^2$ <b>ok</b>", "\tcode:\n    x = 1", "def f():\n    return  2"], False),
    (["Q", "A", "Only a question, unanswered"], False),
])
def test_solo_inst_equals_the_authors_sft_layout(theirs, values, image):
    assert conversation(values, image) == authors.sft(theirs, values, *((ROWS, COLS) if image else (0, 0)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(TEXT, min_size=2, max_size=6), image=st.booleans())
def test_solo_inst_equals_the_authors_sft_layout_on_any_text(theirs, values, image):
    values[1] = values[1] or "x"  # one answer to learn
    if image:
        values[0] = "<image>\n" + values[0]
    assert conversation(values, image) == authors.sft(theirs, values, *((ROWS, COLS) if image else (0, 0)))


def test_answers_have_the_dummy_prefix_as_the_authors(theirs):
    ids, labels = conversation(["Q", "A"], image=False)
    assert [i for i in labels if i != authors.IGNORE_INDEX] == [330, TOK.eos_id]  # "▁A" "</s>", not 28741
    assert theirs("A</s>", add_special_tokens=False)["input_ids"] == [330, 2]


@pytest.mark.parametrize("prompt, image", [("What is in the image?", True), ("  Explain the figure in detail. ", True),
                                           ("This is a", False)])
def test_solo_inst_prompt_equals_the_authors_demo(theirs, prompt, image):
    ids = get_template("solo-inst").prompt(TOK, prompt, IMAGE if image else [])
    assert ids == authors.prompt(theirs, prompt, *((ROWS, COLS) if image else (0, 0)))[0]
    assert ids.count(TOK.vision_start_id) == (2 if image else 0) and TOK.vision_end_id not in ids


@settings(max_examples=60, deadline=None)
@given(user=TEXT, answer=TEXT.filter(bool))
def test_chatml_is_hf_tokenization_of_the_rendered_string(user, answer):
    hf = exported_tokenizer()
    encoded = get_template("chatml").conversation(TOK, [Turn("user", user), Turn("assistant", answer)], [])
    rendered = f"<s><|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n</s>"
    assert encoded.ids == hf(rendered, add_special_tokens=False, split_special_tokens=False)["input_ids"]
    # Loss: the answer, its <|im_end|> (the stop id) and the final </s>.
    learned = [i for i, loss in zip(encoded.ids, encoded.loss, strict=True) if loss]
    assert learned == TOK.encode(answer, prefix_space=False) + [TOK.im_end_id, TOK.eos_id]


def test_generation_rule_per_template():
    assert get_template("solo-inst").stop_ids() == get_template("plain").stop_ids() == [TOK.eos_id]
    assert get_template("chatml").stop_ids() == [TOK.eos_id, TOK.im_end_id]
    for name, template in TEMPLATES.items():
        suppressed = set(template.suppressed_ids())
        assert suppressed == set(range(32000, TOK.vocab_size)) - {template.stop_id}, name
        assert not suppressed & set(template.stop_ids())


def test_bad_conversations_are_template_errors():
    inst, chatml = get_template("solo-inst"), get_template("chatml")
    with pytest.raises(TemplateError, match="alternating"):
        inst.check([Turn("system", "Be brief."), Turn("user", "Hi"), Turn("assistant", "Hello")], False)
    with pytest.raises(TemplateError, match="image first"):
        inst.check([Turn("user", "Look: <image> here"), Turn("assistant", "ok")], True)
    with pytest.raises(TemplateError, match="no assistant answer"):
        chatml.check([Turn("user", "Hi")], False)
    with pytest.raises(TemplateError, match="no conversation layout"):
        get_template("plain").check([Turn("user", "Hi"), Turn("assistant", "Hello")], False)
    with pytest.raises(ValueError, match="unknown template"):
        get_template("llava")


def test_stage_config_names_a_known_template():
    from solo.config import ConfigError, config_from_dict

    assert config_from_dict({}).data.template == "plain"
    assert config_from_dict({}, ["data.template=solo-inst"]).data.template == "solo-inst"
    with pytest.raises(ConfigError, match="data.template='llava' must be one of chatml, plain, solo-inst"):
        config_from_dict({"data": {"template": "llava"}})
