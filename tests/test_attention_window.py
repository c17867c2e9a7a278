"""Sliding-window attention (`model.attention_window_tokens`) against HF Mistral's `sliding_window`.

A tiny random MistralForCausalLM with an 8-token window goes the real way: `solo-convert hf-to-solo`
(which reads the window), SOLOModel on the local and FlexAttention backends (a torchrun rank on
gloo), and `solo-convert solo-to-hf` (which writes it) into the FuyuForCausalLM export. The packed
row holds a 24-token document, three windows long, then a shorter one, then padding; each
document's logits must be HF Mistral's (eager attention) on that document alone.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from solo.checkpoint import META_FILE, CheckpointError, check_attention_window, read_meta
from solo.config import MODEL_PRESETS, ConfigError, ModelConfig, config_from_dict
from solo.metrics import attention_pairs
from tests.torchrun import torchrun

REPO = Path(__file__).resolve().parents[1]
WINDOW, SEQ = 8, 40
LONG, SHORT = 24, 10  # the first document is three windows long


def convert(*args) -> None:
    proc = subprocess.run([sys.executable, "-m", "solo.convert.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, f"{args}:\n{proc.stdout}\n{proc.stderr[-4000:]}"


def mistral(window: int | None, folder: Path | None = None):
    """The tiny random model in fp32 with eager attention; the same weights for every window."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64, sliding_window=window,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    model = MistralForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    if folder is not None:
        model.save_pretrained(folder, safe_serialization=True)
    return model.eval()


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens)[None].long()).logits[0].numpy()


# -- the option, the checkpoint meta, the FLOP count -------------------------------------------------

def test_mistral_and_the_authors_window_is_the_preset_and_tiny_models_keep_full_attention():
    assert MODEL_PRESETS["mistral-7b"].attention_window_tokens == 4096
    assert MODEL_PRESETS["tiny"].attention_window_tokens is None
    full = config_from_dict({"model": "mistral-7b"}, ["model.attention_window_tokens=null"])
    assert full.model.attention_window_tokens is None
    assert config_from_dict({}, ["model.attention_window_tokens=4097"]).model.attention_window_tokens == 4097
    for bad, message in [("0", "attention_window_tokens=0 must be null"), ("abc", "expected int")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({}, [f"model.attention_window_tokens={bad}"])


def checkpoint_with_window(folder: Path, window, field=True) -> Path:
    import json

    folder.mkdir()
    model = {"attention_window_tokens": window} if field else {}
    (folder / META_FILE).write_text(json.dumps({"model": model, "step": 4}))
    return folder


def test_a_resume_with_another_window_is_refused_a_new_stage_is_warned(tmp_path, caplog):
    windowed = ModelConfig(attention_window_tokens=4096)
    saved = checkpoint_with_window(tmp_path / "full", None)
    check_attention_window(saved, ModelConfig(), resuming=True)  # same window: nothing to say
    with pytest.raises(CheckpointError, match="attention_window_tokens: checkpoint null vs config 4096.*init_from="):
        check_attention_window(saved, windowed, resuming=True)
    with caplog.at_level("WARNING", logger="solo.checkpoint"):
        check_attention_window(saved, windowed, resuming=False)
    assert "attention_window_tokens: checkpoint null vs config 4096" in caplog.text
    # Checkpoints written before the option were trained with full attention.
    old = checkpoint_with_window(tmp_path / "old", None, field=False)
    check_attention_window(old, ModelConfig(), resuming=True)
    with pytest.raises(CheckpointError):
        check_attention_window(old, windowed, resuming=True)


def test_attention_flops_count_only_the_pairs_inside_the_window():
    lengths = torch.tensor([3, 10, 1])
    brute = sum(min(q + 1, 4) for n in lengths.tolist() for q in range(n))
    assert attention_pairs(lengths, 4) == brute == 6 + (10 + 4 * 6) + 1
    assert attention_pairs(lengths, None) == 6 + 55 + 1 == attention_pairs(lengths, 10)


# -- HF Mistral parity -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("window")
    hf = mistral(WINDOW, root / "mistral")
    convert("hf-to-solo", "--hf", root / "mistral", "--output", root / "solo")
    convert("solo-to-hf", "--checkpoint", root / "solo", "--output", root / "export")
    rng = np.random.default_rng(0)
    long, short = rng.integers(3, 32000, LONG), rng.integers(3, 32000, SHORT)
    other = long.copy()
    other[: LONG - 1] = rng.integers(3, 32000, LONG - 1)  # the same length, other tokens
    rows = {"row_packed": np.concatenate([long, short]), "lengths_packed": [LONG, SHORT],
            "row_changed": np.concatenate([other, short]), "lengths_changed": [LONG, SHORT]}
    np.savez(root / "rows.npz", **rows)
    torchrun("window_checks.py", 1, "--checkpoint", root / "solo", "--rows", root / "rows.npz",
             "--seq", SEQ, "--out", root / "logits.npz")
    solo = {k: v[:, :32000] for k, v in np.load(root / "logits.npz").items()}
    return SimpleNamespace(root=root, hf=hf, long=long, short=short, solo=solo)


@pytest.mark.distributed
def test_import_reads_the_window_and_export_writes_it(run):
    from transformers import AutoConfig

    assert read_meta(run.root / "solo")["model"]["attention_window_tokens"] == WINDOW
    assert AutoConfig.from_pretrained(run.root / "export").text_config.sliding_window == WINDOW


@pytest.mark.distributed
def test_hf_mistral_window_is_the_last_w_tokens_including_the_query(run):
    # The convention everything here is compared with: transformers' masking_utils keeps
    # kv > q - sliding_window (with kv <= q), i.e. w keys per query, itself included.
    from transformers.masking_utils import sliding_window_causal_mask_function

    allowed = sliding_window_causal_mask_function(WINDOW)
    q, kv = torch.tensor(LONG - 1), torch.arange(LONG)
    assert allowed(torch.tensor(0), torch.tensor(0), q, kv).nonzero().flatten().tolist() == \
        list(range(LONG - WINDOW, LONG))


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["local", "flex"])
def test_a_packed_document_longer_than_the_window_gives_hf_mistrals_logits_alone(run, backend):
    packed = run.solo[f"logits_{backend}_packed"]
    windowed = hf_logits(run.hf, run.long)
    np.testing.assert_allclose(packed[:LONG], windowed, rtol=0, atol=1e-5)
    np.testing.assert_allclose(packed[LONG:LONG + SHORT], hf_logits(run.hf, run.short), rtol=0, atol=1e-5)
    # The window matters: full causal attention agrees up to the window and differs after it.
    full = hf_logits(mistral(None), run.long)
    np.testing.assert_allclose(full[:WINDOW], windowed[:WINDOW], rtol=0, atol=1e-5)
    assert np.abs(full[WINDOW:] - windowed[WINDOW:]).max(-1).min() > 1e-3


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["local", "flex"])
def test_a_later_document_is_unchanged_by_the_first_one_under_the_window(run, backend):
    packed, changed = run.solo[f"logits_{backend}_packed"], run.solo[f"logits_{backend}_changed"]
    assert np.abs(changed[:LONG] - packed[:LONG]).max() > 1e-3  # the change is felt where it is made
    assert np.array_equal(changed[LONG:], packed[LONG:])  # the next document and the padding: not at all


@pytest.mark.distributed
def test_the_export_applies_the_window(run):
    from transformers import FuyuForCausalLM

    fuyu = FuyuForCausalLM.from_pretrained(run.root / "export", dtype=torch.float32).eval()
    exported = hf_logits(fuyu, run.long)[:, :32000]
    np.testing.assert_allclose(exported, hf_logits(run.hf, run.long), rtol=0, atol=1e-5)
