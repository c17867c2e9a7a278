"""solo.config: YAML + key=value overrides into frozen dataclasses; unknown keys are errors."""

import dataclasses
import os
import subprocess
import typing
from pathlib import Path

import pytest

from solo.config import MODEL_PRESETS, ConfigError, config_from_dict, load_config
from tests.warm import run_train

CONFIGS = Path(__file__).parent.parent / "configs"


# Stage 1 is one epoch, derived from the manifests (0): 1525 steps on the paper's data, which
# tests/test_dataset.py::test_one_epoch_is_derived_from_the_manifests covers.
@pytest.mark.parametrize("stage,steps", [("stage1", 0), ("stage2", 3480), ("stage3", 300)])
def test_paper_recipe_configs(stage, steps):
    cfg = load_config(CONFIGS / f"{stage}.yaml")
    assert cfg.train_steps == steps
    assert cfg.global_batch_size == 128 and cfg.micro_batch_size == 1
    assert cfg.data.seq_length_tokens == 32768
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.lr_warmup_steps) == (5e-5, 5e-6, 200)
    assert cfg.optimizer.weight_decay == 0.1 and cfg.optimizer.clip_grad == 1.0
    assert cfg.parallel.tensor_parallel == 2 and cfg.parallel.use_distributed_optimizer
    assert cfg.model == MODEL_PRESETS["mistral-7b"]
    assert abs(sum(s.fraction for s in cfg.data.sources) - 1) < 1e-9
    # The authors' scripts: --recompute_granularity full --recompute_method uniform --recompute_num_layers 4
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == ("full", "uniform", 4)
    assert cfg.optimizer.adam_beta2 == 0.999  # Megatron-LLM's default; the authors' scripts keep it
    assert {s.name: s.fraction for s in cfg.data.sources} == AUTHORS_MIXTURES[stage]


# The authors' scripts/megatron/train/curriculum/*.sh, weights summed per dataset.
AUTHORS_MIXTURES = {
    "stage1": {"imagenet21k": 0.7, "slimpajama": 0.3},
    "stage2": {"capsfusion": 0.460, "slimpajama": 0.270, "websight": 0.161, "cc3m": 0.074,
               "detailed_captions": 0.014, "ocr_charts": 0.021},
    "stage3": {"allava_laion": 0.358, "slimpajama": 0.315, "allava_vflan": 0.117, "llavar": 0.094,
               "dvqa": 0.076, "figureqa": 0.040},
}


def test_mistral_shape_and_padded_vocab():
    m = MODEL_PRESETS["mistral-7b"]
    shape = (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size)
    assert shape == (32, 4096, 32, 8, 14336)
    assert m.vocab_size == 33031 and m.padded_vocab_size % 128 == 0 and m.padded_vocab_size >= 33031


def test_overrides_reach_nested_fields_and_keep_types():
    cfg = load_config(CONFIGS / "stage1.yaml", ["optimizer.lr=1e-4", "model.num_layers=4", "data.seed=7",
                                                "parallel.sequence_parallel=false", "stage=custom"])
    assert cfg.optimizer.lr == 1e-4 and cfg.model.num_layers == 4 and cfg.model.hidden_size == 4096
    assert cfg.data.seed == 7 and cfg.parallel.sequence_parallel is False and cfg.stage == "custom"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train_steps = 3


@pytest.mark.parametrize("override,message", [
    ("optimizer.lrr=1", "unknown key"),
    ("nonsense=1", "unknown key"),
    ("train_steps=abc", "expected int"),
    ("train_steps=1.5", "expected int"),
    ("parallel.tensor_parallel=3", "not divisible"),
    ("precision=fp8", "precision"),
    ("model.preset=gpt5", "unknown model preset"),
    ("optimizer.min_lr=1", "min_lr"),
    ("lr", "key=value"),
    ("recompute_granularity=partial", "recompute_granularity='partial' must be one of none, full, selective"),
    ("recompute_method=every", "recompute_method='every' must be one of uniform, block"),
    ("recompute_num_layers=33", "1 <= recompute_num_layers <= 32"),
    ("recompute_num_layers=3", "multiple of recompute_num_layers=3"),
])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "stage1.yaml", [override])


def test_fractions_must_sum_to_one():
    sources = [{"name": "a", "path": "x", "fraction": 0.5}, {"name": "b", "path": "y", "fraction": 0.2}]
    with pytest.raises(ConfigError, match="sum to 1"):
        config_from_dict({"data": {"sources": sources}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_a_source_is_overridden_by_name():
    cfg = load_config(CONFIGS / "stage1.yaml", ["data.sources.imagenet21k.fraction=0.8",
                                                "data.sources.slimpajama.fraction=0.2",
                                                "data.sources.slimpajama.path=/scratch/slimpajama"])
    assert [(s.name, s.fraction, s.path) for s in cfg.data.sources] == [
        ("imagenet21k", 0.8, "data/shards/imagenet21k"), ("slimpajama", 0.2, "/scratch/slimpajama")]
    with pytest.raises(ConfigError, match="no entry named 'webvid'; names: \\['imagenet21k', 'slimpajama'\\]"):
        load_config(CONFIGS / "stage1.yaml", ["data.sources.webvid.fraction=0.1"])
    with pytest.raises(ConfigError, match="sum to 1"):  # one fraction alone no longer sums to 1
        load_config(CONFIGS / "stage1.yaml", ["data.sources.imagenet21k.fraction=0.8"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(CONFIGS / "stage1.yaml", ["data.sources.imagenet21k.weight=3"])


def _solo_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`solo-train` as a user runs it: its own process, so exit status and stderr are the real ones."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return run_train(list(args), env, tmp_path / "stdout", tmp_path / "stderr", timeout=300)  # warm: tests/warm.py


def test_context_parallel_is_refused_by_the_cli_naming_the_key(tmp_path):
    proc = _solo_train(tmp_path, str(CONFIGS / "stage1.yaml"), "parallel.context_parallel=2")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("solo-train: error: ") and "parallel.context_parallel=2" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_recompute_num_layers_alone_is_refused_with_the_key_to_set():
    with pytest.raises(ConfigError, match="recompute_num_layers=2 needs recompute_granularity: full"):
        config_from_dict({"recompute_num_layers": 2})
    with pytest.raises(ConfigError, match="needs recompute_granularity: full"):
        load_config(CONFIGS / "stage1.yaml", ["recompute_granularity=selective"])
    cfg = load_config(CONFIGS / "stage1.yaml", ["recompute_granularity=selective", "recompute_num_layers=0"])
    assert cfg.recompute_granularity == "selective"
    block = load_config(CONFIGS / "stage1.yaml", ["recompute_method=block", "recompute_num_layers=3"])
    assert block.recompute_num_layers == 3


# -- every field is checked before compute (issue 17, item 9) ----------------------------------

@pytest.mark.parametrize("override", [
    "optimizer.lr_decay_style=cosinus", "optimizer.lr_decay_style=WSD",  # WSD needs settings we do not have
    "log_interval_steps=0", "save_interval_steps=0", "global_batch_size=0", "micro_batch_size=-1",
    "model.num_layers=0", "model.hidden_size=0", "model.num_attention_heads=0", "model.num_query_groups=0",
    "model.ffn_hidden_size=0", "model.vocab_size=0", "model.patch_size=0", "model.max_image_side=0",
    "model.make_vocab_size_divisible_by=0", "model.max_position_embeddings=0", "model.norm_epsilon=0",
    "model.rope_theta=-1", "model.init_method_std=0", "model.init_method_std=.nan",
    "optimizer.lr=.inf", "optimizer.lr_warmup_steps=-1", "optimizer.weight_decay=-0.1", "optimizer.adam_beta1=1",
    "optimizer.adam_beta2=-0.5", "optimizer.adam_eps=0", "optimizer.clip_grad=-1",
    "data.seq_length_tokens=0", "data.seed=-1", "seed=-1", "train_steps=-1", "keep_checkpoints=-1",
    "recompute_num_layers=-1", "recompute_num_layers=33", "save_dir=", "stage=", "wandb_mode=on",
    "nonfinite_loss=ignore", "parallel.pipeline_parallel=0", "wandb_project=",
])
def test_every_bad_field_is_an_error_naming_its_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"(^|[ :]){key}\b") as error:
        load_config(CONFIGS / "stage1.yaml", [override])
    assert "stage1.yaml" in str(error.value)


def test_model_shape_rules_and_source_names():
    with pytest.raises(ConfigError, match="model.hidden_size=100 is not divisible by model.num_attention_heads=32"):
        load_config(CONFIGS / "stage1.yaml", ["model.hidden_size=100"])
    with pytest.raises(ConfigError, match="model.num_attention_heads=32 is not divisible by model.num_query_groups=6"):
        load_config(CONFIGS / "stage1.yaml", ["model.num_query_groups=6", "parallel.tensor_parallel=1"])
    with pytest.raises(ConfigError, match=r"data.sources\[1\].name 'a' is used twice"):
        config_from_dict({"data": {"sources": [{"name": "a", "path": "x", "fraction": 0.5},
                                               {"name": "a", "path": "y", "fraction": 0.5}]}})
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path='' must not be empty"):
        config_from_dict({"data": {"sources": [{"name": "a", "path": "", "fraction": 1.0}]}})


def test_every_numeric_and_choice_field_has_a_rule():
    """A new field must be given a rule (or be named free on purpose) in solo.config.FIELD_RULES."""
    from solo.config import FIELD_RULES, TrainConfig

    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from leaves(hint, f"{prefix}{f.name}.")
            elif typing.get_origin(hint) is tuple:
                yield from leaves(typing.get_args(hint)[0], f"{prefix}{f.name}[].")
            else:
                yield f"{prefix}{f.name}", hint

    from solo.config import DataSource  # noqa: F401 - resolved by get_type_hints

    unruled = [key for key, hint in leaves(TrainConfig) if hint is not bool and key not in FIELD_RULES]
    assert not unruled, f"fields without a validation rule: {unruled}"
